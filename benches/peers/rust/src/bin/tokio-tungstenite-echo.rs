//! tokio-tungstenite echo server: every message back to its sender (`forward` flushes when
//! the read side has nothing ready, so echoes are write-combined).
//!   tokio-tungstenite-echo 127.0.0.1:9002 [threads=2]
use futures_util::StreamExt;
use tokio::net::TcpListener;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9002".into());
    let threads: usize = args.next().map_or(Ok(2), |t| t.parse())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await?;
        eprintln!("tokio-tungstenite echo on {addr} ({threads} threads)");
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let (write, read) = ws.split();
                let _ = read
                    .filter(|m| {
                        std::future::ready(matches!(m, Ok(m) if m.is_text() || m.is_binary()))
                    })
                    .forward(write)
                    .await;
            });
        }
    })
}
