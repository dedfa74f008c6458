//! Listening sockets: one SO_REUSEPORT listener per shard and address, bound through socket2.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Why a listener could not be set up, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// socket(2).
    #[error("cannot create a socket for {addr}: {source}")]
    Socket {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: io::Error,
    },
    /// SO_REUSEADDR / SO_REUSEPORT / O_NONBLOCK.
    #[error("cannot set socket options on {addr}: {source}")]
    SetOptions {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: io::Error,
    },
    /// bind(2).
    #[error("cannot bind {addr}: {source} (is another server on that port?)")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: io::Error,
    },
    /// listen(2).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: io::Error,
    },
}

/// Binds one non-blocking SO_REUSEPORT listener.
pub fn bind(addr: SocketAddr, backlog: u32) -> Result<std::net::TcpListener, BindError> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|source| BindError::Socket { addr, source })?;
    let opts = || -> io::Result<()> {
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_nonblocking(true)
    };
    opts().map_err(|source| BindError::SetOptions { addr, source })?;
    socket
        .bind(&addr.into())
        .map_err(|source| BindError::Bind { addr, source })?;
    socket
        .listen(backlog.min(i32::MAX as u32) as i32)
        .map_err(|source| BindError::Listen { addr, source })?;
    Ok(socket.into())
}

/// Binds `shards` listeners on each address. Port 0 is resolved by the first bind, so every
/// shard shares the port the kernel chose.
pub fn bind_all(
    addrs: &[SocketAddr],
    shards: usize,
    backlog: u32,
) -> Result<(Vec<SocketAddr>, Vec<Vec<std::net::TcpListener>>), BindError> {
    let mut per_shard: Vec<Vec<std::net::TcpListener>> = (0..shards).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for &addr in addrs {
        let first = bind(addr, backlog)?;
        let actual = first
            .local_addr()
            .map_err(|source| BindError::Bind { addr, source })?;
        per_shard[0].push(first);
        for list in per_shard.iter_mut().skip(1) {
            list.push(bind(actual, backlog)?);
        }
        bound.push(actual);
    }
    Ok((bound, per_shard))
}
