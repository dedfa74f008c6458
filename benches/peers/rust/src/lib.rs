//! What every peer echo server shares: `NAME [addr] [threads=2]`, a multi-thread tokio
//! runtime, and an accept loop that hands each connection (with TCP_NODELAY) to `serve`.

use std::future::Future;

use tokio::net::{TcpListener, TcpStream};

/// Runs `serve` for every accepted connection, on the address and thread count given as
/// arguments (`default_addr` and 2 by default).
pub fn run<F, Fut>(name: &str, default_addr: &str, serve: F) -> anyhow::Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| default_addr.into());
    let threads: usize = args.next().map_or(Ok(2), |t| t.parse())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await?;
        eprintln!("{name} echo on {addr} ({threads} threads)");
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve(stream));
        }
    })
}
