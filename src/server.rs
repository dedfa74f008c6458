//! Start-up and shutdown: limits, fd-table mode, listeners, shard threads.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;

use mio::{Poll, Waker};
use tracing::{info, warn};

use crate::broker::Broker;
use crate::config::{Config, FdTableMode, StoreKind};
use crate::mail::ShardMsg;
use crate::metrics::{ShardMetrics, StoreMetrics};
use crate::shard::{self, fdtable, listener, Mailbox, Shard, ShardSetup};
use crate::store::{Retention, Store, StoreConfig};

/// Descriptors a process needs beyond its shards' (stdio, signal pipe, store, broker).
const FD_OVERHEAD: u64 = 32;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] listener::BindError),
    /// epoll / eventfd creation failed.
    #[error("cannot create the event loop of shard {shard}: {source}")]
    Poll {
        /// Shard.
        shard: usize,
        /// Cause.
        source: std::io::Error,
    },
    /// The token verifier could not be built.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthSetupError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The cluster's broker could not be joined.
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    /// A TLS listener's certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A shard thread could not be spawned.
    #[error("cannot spawn shard {shard}: {source}")]
    Spawn {
        /// Shard.
        shard: usize,
        /// Cause.
        source: std::io::Error,
    },
}

/// A running server: its shards and how to stop them.
pub struct Server {
    /// Bound addresses (port 0 resolved).
    pub local_addrs: Vec<std::net::SocketAddr>,
    /// The fd-table mode in effect.
    pub fd_table: FdTableMode,
    /// Shards running (more than asked for when fd tables needed them).
    pub shards: usize,
    /// Connections the fd tables hold (`--max-connections` or less).
    pub capacity: usize,
    /// Per-shard counters.
    pub metrics: Arc<[ShardMetrics]>,
    peers: Arc<[Mailbox]>,
    threads: Vec<JoinHandle<std::io::Result<()>>>,
    store: Option<Store>,
    broker: Option<Broker>,
    /// This node's id in the cluster.
    pub node_id: Arc<str>,
    /// TLS of each listen address (`None`: plain), by index.
    tls: Vec<Option<Arc<crate::tls::Acceptor>>>,
}

/// How the fd tables hold `--max-connections`: the shards, their tables and the capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdPlan {
    /// `Shared` or `PerShard` (`Auto` resolved).
    pub mode: FdTableMode,
    /// Shards to run.
    pub shards: usize,
    /// Shards asked for (or the cores): how many take new connections at a time when
    /// `shards` is larger.
    pub width: usize,
    /// Sockets one fd table holds beside its overhead.
    pub per_table: usize,
    /// Connections the process can hold: `--max-connections` or less.
    pub capacity: usize,
    /// The hard `RLIMIT_NOFILE` planned under (each table's limit).
    pub hard: u64,
}

impl FdPlan {
    /// Shards added beyond those asked for, only for their fd tables.
    pub fn added(&self) -> usize {
        self.shards - self.width
    }
}

/// Smallest mailbox start-up scales one to.
const MIN_SCALED_MAILBOX: usize = 1024;

/// Most shards start-up adds for fd tables.
const MAX_AUTO_SHARDS: usize = 256;

/// Descriptors one fd table spends beside sockets: a private table is a copy of the process's
/// at the unshare, so it holds every shard's epoll, waker and listeners.
fn table_overhead(shards: usize, listen: usize) -> u64 {
    FD_OVERHEAD + (shards * (2 + listen)) as u64
}

/// Plans the fd tables for `cfg` under a hard `RLIMIT_NOFILE` of `hard`. With `auto`, one
/// shared table when `hard` covers `--max-connections`, else a private table per shard; and
/// when the shard count is the default, as many more shards as the private tables need (up to
/// [`MAX_AUTO_SHARDS`], while a table's overhead stays under half of it).
pub fn plan_fd_tables(cfg: &Config, hard: u64) -> FdPlan {
    let listen = cfg.listen.len().max(1);
    let max = cfg.max_connections;
    let per = |shards: usize| hard.saturating_sub(table_overhead(shards, listen)) as usize;
    let mode = match cfg.fd_table {
        FdTableMode::Auto if per(cfg.shards) >= max => FdTableMode::Shared,
        FdTableMode::Auto => FdTableMode::PerShard,
        m => m,
    };
    let width = cfg.shards;
    let mut shards = cfg.shards;
    if mode == FdTableMode::PerShard && cfg.shards_auto {
        while shards * per(shards) < max
            && shards < MAX_AUTO_SHARDS
            && per(shards + 1) as u64 >= hard / 2
        {
            shards += 1;
        }
    }
    let per_table = per(shards);
    let capacity = match mode {
        FdTableMode::PerShard => max.min(shards * per_table),
        _ => max.min(per_table),
    };
    FdPlan {
        mode,
        shards,
        width,
        per_table,
        capacity,
        hard,
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one and plans the fd tables under it.
pub fn choose_fd_tables(cfg: &Config) -> FdPlan {
    if let Err(e) = fdtable::raise_nofile_to_hard() {
        warn!(error = %e, "cannot raise RLIMIT_NOFILE");
    }
    let (_, hard) = fdtable::nofile_limit().unwrap_or((1024, 1024));
    plan_fd_tables(cfg, hard)
}

/// With shards added for their fd tables, new connections go to the first `plan.width`
/// shards with room ([`shard::steer`]). Without the program (a kernel that refuses it) the
/// kernel's hash spreads them over every shard: it still works, at more wake-ups per publish.
fn steer_new_connections(
    plan: &FdPlan,
    listeners: &[Vec<std::net::TcpListener>],
) -> Option<Arc<shard::steer::Steering>> {
    use std::os::fd::AsRawFd;
    if plan.added() == 0 {
        return None;
    }
    let steering = shard::steer::Steering::new(plan.shards, plan.width, plan.per_table);
    let eligible = steering.eligible();
    for l in &listeners[0] {
        if let Err(e) = shard::steer::attach(l.as_raw_fd(), &eligible) {
            warn!(error = %e, "cannot steer new connections to the first shards; they spread over all shards");
            return None;
        }
    }
    Some(Arc::new(steering))
}

/// Tells how many connections the process holds and why, in one line; a warning only when
/// that is less than an explicit `--max-connections` or `--shards` asked for.
fn report_capacity(cfg: &Config, plan: &FdPlan) {
    let hard = plan.hard;
    let why = match plan.mode {
        FdTableMode::PerShard if plan.added() > 0 => format!(
            "{} shards with a private fd table of {} descriptors each (RLIMIT_NOFILE {hard}); \
             {} take new connections at a time, the other {} only as those fill",
            plan.shards,
            plan.per_table,
            plan.width,
            plan.added()
        ),
        FdTableMode::PerShard => format!(
            "{} shards with a private fd table of {} descriptors each (RLIMIT_NOFILE {hard})",
            plan.shards, plan.per_table
        ),
        _ => format!("one shared fd table (RLIMIT_NOFILE {hard})"),
    };
    let asked = !cfg.shards_auto || cfg.fd_table == FdTableMode::Shared;
    if plan.capacity < cfg.max_connections && asked {
        warn!(
            capacity = plan.capacity,
            max_connections = cfg.max_connections,
            "the fd tables hold fewer connections than --max-connections: {why}; raise RLIMIT_NOFILE (tuning/limits.d/switchboard.conf, LimitNOFILE in tuning/systemd) or leave --shards and --fd-table on their defaults"
        );
    } else if plan.capacity < cfg.max_connections {
        info!(
            capacity = plan.capacity,
            "holds {} connections, not --max-connections {}: {why}; raise RLIMIT_NOFILE for more",
            plan.capacity,
            cfg.max_connections
        );
    } else {
        info!(
            capacity = plan.capacity,
            "holds {} connections: {why}", plan.capacity
        );
    }
}

impl Server {
    /// Binds, creates every shard's poll and mailbox, then starts the shard threads.
    pub fn start(mut cfg: Config) -> Result<Server, StartError> {
        let plan = choose_fd_tables(&cfg);
        report_capacity(&cfg, &plan);
        let fd_table = plan.mode;
        cfg.shards = plan.shards;
        cfg.home_shards = plan.width;
        cfg.max_connections = plan.capacity;
        if cfg.mailbox_capacity_auto && plan.added() > 0 {
            // The added shards share the cores' budget of mail that may wait (memory a
            // mailbox holds only while its mail waits).
            cfg.mailbox_capacity =
                (cfg.mailbox_capacity * plan.width / plan.shards).max(MIN_SCALED_MAILBOX);
        }
        let auth = Arc::new(crate::auth::Auth::from_config(&cfg)?);
        if !auth.requires_token() && !cfg.echo {
            warn!("no --jwt-secret or --jwt-public-key: identities are unauthenticated (?user= is trusted)");
        }
        if cfg.api_key.is_none() {
            info!("no --api-key: the push API answers loopback peers only");
        }
        if cfg.allowed_origins.is_empty() {
            info!("no --allowed-origin: browser upgrades and SSE are accepted from any origin");
        }
        let mut tls = Vec::with_capacity(cfg.tls.len());
        for files in &cfg.tls {
            tls.push(match files {
                Some(f) => Some(Arc::new(crate::tls::Acceptor::load(f.clone())?)),
                None => None,
            });
        }
        let (local_addrs, mut listeners) =
            listener::bind_all(&cfg.listen, cfg.shards, cfg.backlog)?;
        let steering = steer_new_connections(&plan, &listeners);
        // Every fd another thread touches is created here, before any shard unshares.
        let mut polls = Vec::new();
        let mut peers = Vec::new();
        let mut inboxes = Vec::new();
        for i in 0..cfg.shards {
            let poll = Poll::new().map_err(|source| StartError::Poll { shard: i, source })?;
            let waker = Waker::new(poll.registry(), shard::WAKER)
                .map_err(|source| StartError::Poll { shard: i, source })?;
            let (tx, rx) = shard::mailbox(waker, cfg.mailbox_capacity);
            polls.push(poll);
            peers.push(tx);
            inboxes.push(rx);
        }
        let peers: Arc<[Mailbox]> = peers.into();
        let store_metrics = Arc::new(StoreMetrics::default());
        let node_id: Arc<str> = match &cfg.node_id {
            Some(id) => id.as_str().into(),
            None => format!("{}:{}", hostname(), local_addrs[0].port()).into(),
        };
        let broker = match &cfg.broker_url {
            None => None,
            Some(url) => {
                let sink_peers = peers.clone();
                let sink: crate::broker::Sink = Box::new(move |i, m| {
                    sink_peers[i as usize]
                        .post(ShardMsg::Broker(Box::new(m)))
                        .map_err(|e| match e {
                            ShardMsg::Broker(m) => *m,
                            _ => unreachable!("posted a broker message"),
                        })
                });
                let password = std::env::var("SWITCHBOARD_BROKER_PASSWORD").ok();
                Some(Broker::start(
                    url,
                    password,
                    node_id.clone(),
                    cfg.shards,
                    cfg.homes(),
                    sink,
                )?)
            }
        };
        let store = if cfg.echo {
            None
        } else {
            let sink_peers = peers.clone();
            let sink: crate::store::Sink = Box::new(move |i, m| {
                sink_peers[i as usize]
                    .post(ShardMsg::StoreBatch(m))
                    .map_err(|e| match e {
                        ShardMsg::StoreBatch(m) => m,
                        _ => unreachable!("posted a store message"),
                    })
            });
            let scfg = StoreConfig {
                inbox: Retention {
                    max_count: cfg.inbox_history,
                    ttl_ms: cfg.inbox_ttl_ms,
                },
                dedup_window_ms: cfg.dedup_window_ms,
                max_bytes: cfg.store_max_bytes,
                homes: cfg.homes(),
                min_replicas: cfg.broker_min_replicas,
                min_replicas_timeout_ms: cfg.broker_min_replicas_timeout_ms,
                page_items: crate::store::PAGE_ITEMS,
            };
            let m = store_metrics.clone();
            Some(match (cfg.store, &broker) {
                (StoreKind::Redis, Some(b)) => {
                    crate::store::redis_streams::start(b, node_id.clone(), scfg, sink, m)?
                }
                (StoreKind::Redis, None) => unreachable!("validated: redis needs --broker"),
                (StoreKind::Redb, _) => {
                    let backend = Box::new(crate::store::Redb::open(&cfg.data_dir)?);
                    Store::start(backend, scfg, cfg.shards, sink, m)?
                }
                (StoreKind::Memory, _) => {
                    let backend = Box::new(crate::store::Memory::default());
                    Store::start(backend, scfg, cfg.shards, sink, m)?
                }
            })
        };
        let metrics: Arc<[ShardMetrics]> =
            (0..cfg.shards).map(|_| ShardMetrics::default()).collect();
        let open_total = Arc::new(AtomicUsize::new(0));
        let ip_table = Arc::new(crate::router::admission::IpTable::new(
            cfg.max_connections_per_ip,
            cfg.limit_loopback,
        ));
        let subscribed: Arc<[AtomicUsize]> = (0..cfg.shards).map(|_| AtomicUsize::new(0)).collect();
        let directory = Arc::new(crate::hub::Directory::with_room(
            cfg.homes(),
            cfg.max_connections,
        ));
        let barrier = Arc::new(Barrier::new(cfg.shards));
        let config = Arc::new(cfg);
        let mut threads = Vec::new();
        for (i, (poll, inbox)) in polls.into_iter().zip(inboxes).enumerate() {
            let setup = ShardSetup {
                index: i,
                poll,
                inbox,
                peers: peers.clone(),
                listeners: std::mem::take(&mut listeners[i]),
                tls: tls.clone(),
                metrics: metrics.clone(),
                config: config.clone(),
                open_total: open_total.clone(),
                subscribed: subscribed.clone(),
                ip_table: ip_table.clone(),
                directory: directory.clone(),
                steering: steering.clone(),
                private_fd_table: fd_table == FdTableMode::PerShard,
                barrier: barrier.clone(),
                auth: auth.clone(),
                store: store.as_ref().map(Store::handle),
                store_metrics: store_metrics.clone(),
                broker: broker.as_ref().map(Broker::handle),
                broker_metrics: broker.as_ref().map(|b| b.metrics.clone()),
                node: node_id.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn(move || Shard::run(setup))
                .map_err(|source| StartError::Spawn { shard: i, source })?;
            threads.push(t);
        }
        info!(
            listen = ?local_addrs,
            shards = config.shards,
            fd_table = %fd_table,
            echo = config.echo,
            "switchboard started"
        );
        Ok(Server {
            local_addrs,
            fd_table,
            shards: config.shards,
            capacity: config.max_connections,
            metrics,
            peers,
            threads,
            store,
            broker,
            node_id,
            tls,
        })
    }

    /// Whether each listen address serves TLS (by index, as `local_addrs`).
    pub fn tls_listeners(&self) -> Vec<bool> {
        self.tls.iter().map(Option::is_some).collect()
    }

    /// Reloads every TLS listener's certificate and key (SIGHUP). New handshakes use the
    /// new ones; open connections keep theirs. A listener whose files fail keeps its old
    /// certificate; the errors are returned.
    pub fn reload_tls(&self) -> Vec<crate::tls::TlsError> {
        let mut errors = Vec::new();
        for a in self.tls.iter().flatten() {
            match a.reload() {
                Ok(()) => info!(cert = %a.files().cert.display(), "TLS certificate reloaded"),
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// Asks every shard to close its connections with 1001 and stop.
    pub fn shutdown(&self) {
        for p in self.peers.iter() {
            // A full mailbox is retried: shutdown must get through.
            let mut msg = ShardMsg::Shutdown;
            for _ in 0..1000 {
                match p.post(msg) {
                    Ok(()) => break,
                    Err(m) => {
                        msg = m;
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        }
    }

    /// Waits for every shard thread; returns how many ended with an error.
    pub fn join(self) -> usize {
        let mut failed = 0;
        for t in self.threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "a shard ended with an error");
                    failed += 1;
                }
                Err(_) => {
                    warn!("a shard panicked");
                    failed += 1;
                }
            }
        }
        if let Some(s) = self.store {
            s.stop();
        }
        if let Some(b) = self.broker {
            b.stop();
        }
        failed
    }
}

/// This host's name (for the default node id).
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if r == 0 && n > 0 {
        String::from_utf8_lossy(&buf[..n]).into_owned()
    } else {
        "localhost".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(shards: Option<usize>, max: usize) -> Config {
        Config {
            shards: shards.unwrap_or(2),
            shards_auto: shards.is_none(),
            max_connections: max,
            ..Config::default()
        }
    }

    #[test]
    fn the_default_adds_shards_until_their_tables_hold_max_connections() {
        let p = plan_fd_tables(&cfg(None, 1_000_000), 20_000);
        assert_eq!(p.mode, FdTableMode::PerShard);
        assert_eq!(p.capacity, 1_000_000);
        assert!(p.shards * p.per_table >= 1_000_000, "{p:?}");
        assert!(
            (p.shards - 1) * p.per_table < 1_000_000,
            "no more than needed: {p:?}"
        );
        assert_eq!((p.width, p.shards), (2, 51), "{p:?}");
    }

    #[test]
    fn asked_for_shards_are_kept_and_the_capacity_says_what_they_hold() {
        let p = plan_fd_tables(&cfg(Some(2), 1_000_000), 20_000);
        assert_eq!((p.mode, p.shards, p.width), (FdTableMode::PerShard, 2, 2));
        assert_eq!(p.capacity, 2 * (20_000 - 32 - 6));
    }

    #[test]
    fn a_limit_that_covers_everything_keeps_one_table_and_the_cores() {
        let p = plan_fd_tables(&cfg(None, 1_000_000), 2_000_000);
        assert_eq!(
            (p.mode, p.shards, p.capacity),
            (FdTableMode::Shared, 2, 1_000_000)
        );
    }

    #[test]
    fn a_tiny_limit_stops_adding_shards_and_lowers_the_capacity() {
        let p = plan_fd_tables(&cfg(None, 1_000_000), 1024);
        assert_eq!(p.mode, FdTableMode::PerShard);
        assert!(p.per_table as u64 >= 1024 / 2, "{p:?}");
        assert!(
            p.capacity < 1_000_000 && p.capacity == p.shards * p.per_table,
            "{p:?}"
        );
    }
}
