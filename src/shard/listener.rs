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
    /// Another process already listens on the address (SO_REUSEPORT would share the port
    /// with it silently: clients split between servers that do not know each other).
    #[error(
        "another process is already serving {addr} (a second switchboard?): stop it or pick \
         another --listen"
    )]
    Taken {
        /// Address.
        addr: SocketAddr,
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

/// Fails when another socket listens on `addr` (or on a wildcard or specific address that
/// overlaps it), whatever its options: a probe bound without SO_REUSEPORT meets
/// `EADDRINUSE` then. SO_REUSEADDR on the probe lets a port whose old connections linger in
/// TIME_WAIT through. The probe is closed before the shards bind.
pub fn ensure_free(addr: SocketAddr) -> Result<(), BindError> {
    if addr.port() == 0 {
        return Ok(()); // the kernel picks a free port
    }
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|source| BindError::Socket { addr, source })?;
    let opts = || -> io::Result<()> {
        probe.set_reuse_address(true)?;
        if addr.is_ipv6() {
            probe.set_only_v6(true)?;
        }
        Ok(())
    };
    opts().map_err(|source| BindError::SetOptions { addr, source })?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(BindError::Taken { addr }),
        Err(source) => Err(BindError::Bind { addr, source }),
    }
}

/// Binds `shards` listeners on each address (each checked free first: [`ensure_free`]). Port
/// 0 is resolved by the first bind, so every shard shares the port the kernel chose.
pub fn bind_all(
    addrs: &[SocketAddr],
    shards: usize,
    backlog: u32,
) -> Result<(Vec<SocketAddr>, Vec<Vec<std::net::TcpListener>>), BindError> {
    let mut per_shard: Vec<Vec<std::net::TcpListener>> = (0..shards).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for &addr in addrs {
        ensure_free(addr)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_another_listener_serves_is_refused_and_shards_still_share_one() {
        let (bound, per_shard) = bind_all(&["127.0.0.1:0".parse().unwrap()], 2, 16).unwrap();
        assert_eq!(
            per_shard.iter().map(Vec::len).sum::<usize>(),
            2,
            "two shards share it"
        );
        let taken = bound[0];
        assert!(matches!(ensure_free(taken), Err(BindError::Taken { .. })));
        // The wildcard address overlaps it too.
        let wild: SocketAddr = format!("0.0.0.0:{}", taken.port()).parse().unwrap();
        assert!(matches!(
            bind_all(&[wild], 1, 16),
            Err(BindError::Taken { .. })
        ));
        drop(per_shard);
        assert!(ensure_free(taken).is_ok(), "free again once closed");
    }
}
