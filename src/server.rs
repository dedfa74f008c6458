//! Start-up and shutdown: limits, fd-table mode, listeners, shard threads.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;

use mio::{Poll, Waker};
use tracing::{info, warn};

use crate::broker::Broker;
use crate::config::{Config, FdTableMode, StoreKind};
use crate::hub::ShardMsg;
use crate::metrics::{ShardMetrics, StoreMetrics};
use crate::shard::{self, fdtable, listener, Mailbox, Shard, ShardSetup};
use crate::store::{Retention, Store, StoreConfig};

/// Descriptors a shard needs beyond its connections (epoll, eventfds, listeners, stdio).
const FD_OVERHEAD: u64 = 64;

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
    /// Per-shard counters.
    pub metrics: Arc<[ShardMetrics]>,
    peers: Arc<[Mailbox]>,
    threads: Vec<JoinHandle<std::io::Result<()>>>,
    store: Option<Store>,
    broker: Option<Broker>,
    /// This node's id in the cluster.
    pub node_id: Arc<str>,
}

/// Resolves `auto`, raising the soft `RLIMIT_NOFILE` when it is below what is needed.
pub fn choose_fd_table(cfg: &Config) -> FdTableMode {
    let needed = cfg.max_connections as u64 + FD_OVERHEAD;
    let (soft, hard) = fdtable::nofile_limit().unwrap_or((1024, 1024));
    if soft < needed {
        match fdtable::raise_nofile_to_hard() {
            Ok(new) if new < needed => warn!(
                soft, hard, needed,
                "RLIMIT_NOFILE cannot cover --max-connections in one fd table; raise it (tuning/limits.d/switchboard.conf, LimitNOFILE in tuning/systemd) or rely on per-shard fd tables"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
        }
    }
    let (_, hard) = fdtable::nofile_limit().unwrap_or((soft, hard));
    match cfg.fd_table {
        FdTableMode::Auto if hard < needed => FdTableMode::PerShard,
        FdTableMode::Auto => FdTableMode::Shared,
        m => m,
    }
}

impl Server {
    /// Binds, creates every shard's poll and mailbox, then starts the shard threads.
    pub fn start(cfg: Config) -> Result<Server, StartError> {
        let fd_table = choose_fd_table(&cfg);
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
        let (local_addrs, mut listeners) =
            listener::bind_all(&cfg.listen, cfg.shards, cfg.backlog)?;
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
                    .post(ShardMsg::Store(m))
                    .map_err(|e| match e {
                        ShardMsg::Store(m) => m,
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
            };
            let m = store_metrics.clone();
            Some(match (cfg.store, &broker) {
                (StoreKind::Redis, Some(b)) => {
                    crate::store::redis_streams::start(b.client(), node_id.clone(), scfg, sink, m)?
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
                metrics: metrics.clone(),
                config: config.clone(),
                open_total: open_total.clone(),
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
            metrics,
            peers,
            threads,
            store,
            broker,
            node_id,
        })
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
