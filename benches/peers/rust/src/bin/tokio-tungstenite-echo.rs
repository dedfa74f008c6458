//! tokio-tungstenite echo server: every message back to its sender (`forward` flushes when
//! the read side has nothing ready, so echoes are write-combined).
//!   tokio-tungstenite-echo 127.0.0.1:9002 [threads=2]
use futures_util::StreamExt;

fn main() -> anyhow::Result<()> {
    peers::run("tokio-tungstenite", "127.0.0.1:9002", |stream| async move {
        let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
            return;
        };
        let (write, read) = ws.split();
        let _ = read
            .filter(|m| std::future::ready(matches!(m, Ok(m) if m.is_text() || m.is_binary())))
            .forward(write)
            .await;
    })
}
