//! fastwebsockets echo server (hyper 1 upgrade), after the crate's own echo example.
//!   fastwebsockets-echo 127.0.0.1:9003 [threads=2]
use fastwebsockets::{upgrade, FragmentCollector, OpCode, WebSocketError};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

async fn echo(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = FragmentCollector::new(fut.await?);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
    Ok(())
}

async fn upgrade(mut req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        let _ = echo(fut).await;
    });
    Ok(response)
}

fn main() -> anyhow::Result<()> {
    peers::run("fastwebsockets", "127.0.0.1:9003", |stream| async move {
        let io = TokioIo::new(stream);
        let _ = http1::Builder::new()
            .serve_connection(io, service_fn(upgrade))
            .with_upgrades()
            .await;
    })
}
