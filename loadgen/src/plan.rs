//! The connection plan: which target and which source address each connection uses, spread so
//! no (source IP, destination) pair holds more than [`PAIR_LIMIT`] connections, and how many
//! worker threads a run wants.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

/// Which load to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Open and hold connections.
    Connect,
    /// Timestamped messages to any echo server; RTT.
    Echo,
    /// Pairs of users sending each other `send` ops.
    Dm,
    /// Subscribers over channels, publishers at a rate.
    Fanout,
    /// Drop a share of connections at once and reconnect with jittered backoff.
    Storm,
    /// Plain TCP connects, no upgrade: the baseline the `connect` rate is compared with.
    Tcp,
    /// Closed loop against any echo server: `--window` messages in flight per connection,
    /// each echo answered by the next message, many frames per write (write-combining);
    /// echoed msg/s and the server's CPU per message.
    Flood,
}

/// Above this many connections per (source IP, destination) pair `connect()` slows from
/// ~45k/s to ~260/s on the machines we measured (port search in the kernel).
pub const PAIR_LIMIT: usize = 14_000;

/// A WebSocket target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Resolved address.
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Path and query (starts with `/`).
    pub path: String,
    /// `wss://`: TLS, verified against `server_name`.
    pub tls: bool,
    /// The host without its port (the TLS server name).
    pub server_name: String,
}

/// Parses `ws://host:port/path?query` (or `wss://`).
pub fn parse_url(url: &str) -> Result<Target, String> {
    let (rest, tls) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
        (Some(r), _) => (r, false),
        (_, Some(r)) => (r, true),
        _ => return Err(format!("{url}: only ws:// and wss:// URLs are supported")),
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let hostport_full = if hostport.contains(':') && !hostport.ends_with(']') {
        hostport.to_string()
    } else {
        format!("{hostport}:{}", if tls { 443 } else { 80 })
    };
    let server_name = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => hostport,
    }
    .trim_start_matches('[')
    .trim_end_matches(']')
    .to_string();
    let addr = hostport_full
        .to_socket_addrs()
        .map_err(|e| format!("{url}: cannot resolve {hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: {hostport} resolves to nothing"))?;
    Ok(Target {
        addr,
        host: hostport.to_string(),
        path: path.to_string(),
        tls,
        server_name,
    })
}

/// Parses `127.0.0.2-127.0.0.101` or a comma-separated list of addresses.
pub fn parse_ip_range(s: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().map_err(|e| format!("{part}: {e}"))?;
            let b: Ipv4Addr = b.trim().parse().map_err(|e| format!("{part}: {e}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 1 << 20 {
                return Err(format!("{part}: empty or huge range"));
            }
            out.extend((a..=b).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else {
            out.push(part.parse().map_err(|e| format!("{part}: {e}"))?);
        }
    }
    if out.is_empty() {
        return Err("no source addresses".into());
    }
    Ok(out)
}

/// Source addresses for `connections` spread over `targets`.
///
/// With explicit addresses, returns them and a warning when a pair would exceed
/// [`PAIR_LIMIT`]. Without, loopback targets get as many `127.0.0.x` addresses as needed (from
/// 127.0.0.2) and other targets the kernel's choice (`None`).
pub fn source_ips(
    explicit: Option<Vec<IpAddr>>,
    targets: &[Target],
    connections: usize,
) -> (Option<Vec<IpAddr>>, Option<String>) {
    let per_target = connections.div_ceil(targets.len().max(1));
    match explicit {
        Some(ips) => {
            let per_pair = per_target.div_ceil(ips.len());
            let warn = (per_pair > PAIR_LIMIT).then(|| {
                format!(
                    "{per_pair} connections per (source IP, destination) pair exceeds {PAIR_LIMIT}: connect() will crawl; give at least {} source addresses",
                    per_target.div_ceil(PAIR_LIMIT)
                )
            });
            (Some(ips), warn)
        }
        None => {
            let all_loopback = targets
                .iter()
                .all(|t| t.addr.ip().is_loopback() && t.addr.is_ipv4());
            let needed = per_target.div_ceil(PAIR_LIMIT);
            if all_loopback && needed > 1 {
                let ips = (0..needed as u32)
                    .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + i)))
                    .collect();
                (Some(ips), None)
            } else if needed > 1 {
                let warn = format!(
                    "{per_target} connections per destination from one source address exceeds {PAIR_LIMIT}: pass --source-ips"
                );
                (None, Some(warn))
            } else {
                (None, None)
            }
        }
    }
}

/// Target and source address of connection `i`: round-robin over targets, then over sources.
pub fn assign(i: usize, targets: usize, sources: usize) -> (usize, usize) {
    let t = i % targets;
    let s = (i / targets) % sources.max(1);
    (t, s)
}

/// Socket events (a send, a reply, an ack: one unbatched syscall each) one worker thread
/// handles a second in an open-loop run, with room to spare.
pub const OPEN_LOOP_EVENTS_PER_THREAD: f64 = 100_000.0;

/// Worker threads a scenario wants when `--threads` is not given (the fd limit may ask for
/// more). Open-loop echo and DM runs get the threads their rate needs, at most one per core:
/// each worker spins before its sends are due, and a thread beyond the load only spins beside
/// the server. At 20k echoes a second on 200 connections here (2 cores, switchboard on 2
/// shards) two workers put loadgen's send lateness p99 at 60–157 µs, one at 16–32 µs. The
/// other scenarios (connect storms, flood, fan-out's many deliveries) use every core.
pub fn threads_for(scenario: Scenario, rate: f64, cores: usize) -> usize {
    let cores = cores.max(1);
    let events_per_message = match scenario {
        // The send and its echo.
        Scenario::Echo => 2.0,
        // The send, its delivery and its ack.
        Scenario::Dm => 3.0,
        _ => return cores,
    };
    let wanted = (rate.max(0.0) * events_per_message / OPEN_LOOP_EVENTS_PER_THREAD).ceil();
    (wanted as usize).clamp(1, cores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_runs_get_the_threads_their_rate_needs() {
        assert_eq!(threads_for(Scenario::Echo, 20_000.0, 2), 1);
        assert_eq!(threads_for(Scenario::Echo, 50_000.0, 2), 1);
        assert_eq!(threads_for(Scenario::Echo, 50_001.0, 2), 2);
        assert_eq!(threads_for(Scenario::Dm, 20_000.0, 8), 1);
        assert_eq!(threads_for(Scenario::Dm, 50_000.0, 8), 2);
        // Never more than the cores, never none.
        assert_eq!(threads_for(Scenario::Echo, 1e9, 4), 4);
        assert_eq!(threads_for(Scenario::Echo, 0.0, 4), 1);
        assert_eq!(threads_for(Scenario::Dm, 1000.0, 0), 1);
    }

    #[test]
    fn other_scenarios_use_every_core() {
        for s in [
            Scenario::Connect,
            Scenario::Flood,
            Scenario::Fanout,
            Scenario::Storm,
            Scenario::Tcp,
        ] {
            assert_eq!(threads_for(s, 20_000.0, 2), 2, "{s:?}");
        }
    }

    #[test]
    fn urls() {
        let t = parse_url("ws://127.0.0.1:8080/ws?user=a").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.path, "/ws?user=a");
        assert_eq!(parse_url("ws://127.0.0.1").unwrap().path, "/");
        assert!(parse_url("http://x").is_err());
        assert!(!t.tls);
        let s = parse_url("wss://localhost:8443/ws").unwrap();
        assert!(s.tls);
        assert_eq!((s.server_name.as_str(), s.addr.port()), ("localhost", 8443));
        assert_eq!(parse_url("wss://127.0.0.1").unwrap().addr.port(), 443);
    }

    #[test]
    fn ranges() {
        let v = parse_ip_range("127.0.0.2-127.0.0.5").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[3], "127.0.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(parse_ip_range("10.0.0.1, 10.0.0.3").unwrap().len(), 2);
        assert!(parse_ip_range("127.0.0.5-127.0.0.2").is_err());
    }

    #[test]
    fn spreading() {
        let t = vec![parse_url("ws://127.0.0.1:1/").unwrap()];
        let (ips, warn) = source_ips(None, &t, 1_000_000);
        assert_eq!(ips.unwrap().len(), 72);
        assert!(warn.is_none());
        let (ips, _) = source_ips(None, &t, 1000);
        assert!(ips.is_none());
        let one = parse_ip_range("127.0.0.2").unwrap();
        let (_, warn) = source_ips(Some(one), &t, 20_000);
        assert!(warn.unwrap().contains("at least 2"));
        // Every pair stays under the limit with the automatic plan.
        let mut counts = std::collections::HashMap::new();
        for i in 0..1_000_000 {
            *counts.entry(assign(i, 1, 72)).or_insert(0usize) += 1;
        }
        assert!(counts.values().all(|&c| c <= PAIR_LIMIT));
    }
}
