//! Configuration: command-line flags, an optional TOML file with the same keys, and the
//! validated [`Config`] the shards run with. Flags win over the file; the file wins over
//! the `DEFAULT_*` constants.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default accept backlog per shard listener.
pub const DEFAULT_BACKLOG: u32 = 4096;
/// Default connection limit (upgraded WebSockets).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1_000_000;
/// Default silence before the server pings.
pub const DEFAULT_PING_INTERVAL_MS: u64 = 25_000;
/// Default silence before the server closes with 4000.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Default timer slack: deadlines are handled on a grid this coarse (see `timer::slack`).
pub const DEFAULT_TIMER_SLACK_MS: u64 = 64;
/// Default time to complete the HTTP upgrade.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Default time to wait for the peer's close frame or EOF after ours.
pub const DEFAULT_CLOSE_TIMEOUT_MS: u64 = 2_000;
/// Default largest message.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Default per-connection outbound queue limit.
pub const DEFAULT_MAX_OUTBOUND_BYTES: usize = 1024 * 1024;
/// Default `--max-messages-per-sec` (per connection).
pub const DEFAULT_MAX_MESSAGES_PER_SEC: u32 = 1000;
/// Default `--message-burst` (per connection).
pub const DEFAULT_MESSAGE_BURST: u32 = 2000;
/// Default `--max-handshakes-per-sec` (per shard).
pub const DEFAULT_MAX_HANDSHAKES_PER_SEC: u32 = 20_000;
/// Default `--max-pending-handshakes` (per shard).
pub const DEFAULT_MAX_PENDING_HANDSHAKES: u32 = 4096;
/// Default `--max-connections-per-ip`.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 10_000;
/// Default shutdown grace period.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 5_000;
/// Default capacity of each shard's mailbox (messages).
pub const DEFAULT_MAILBOX_CAPACITY: usize = 16_384;
/// Default interval of SSE comment heartbeats.
pub const DEFAULT_SSE_HEARTBEAT_MS: u64 = 15_000;

/// Default directory of the durable store.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Default total payload bytes the store keeps before qos-1 sends are refused.
pub const DEFAULT_STORE_MAX_BYTES: u64 = 1 << 30;
/// Default dedup window of client request ids.
pub const DEFAULT_DEDUP_WINDOW_MS: u64 = 5 * 60 * 1000;
/// Replicas that must have a stored message before its sender is acked (0: the master's
/// answer is enough).
pub const DEFAULT_BROKER_MIN_REPLICAS: u32 = 0;
/// How long a store waits for `--broker-min-replicas` replicas before answering `unavailable`.
pub const DEFAULT_BROKER_MIN_REPLICAS_TIMEOUT_MS: u64 = 1_000;
/// Default messages kept per inbox.
pub const DEFAULT_INBOX_HISTORY: u64 = 10_000;
/// Default age of the oldest message kept in an inbox (7 days).
pub const DEFAULT_INBOX_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// Where streams are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// A redb file in `--data-dir`: survives restarts and kill -9 (one fsync per batch).
    #[default]
    Redb,
    /// Memory: streams and resume within one process lifetime (tests, benchmarks).
    Memory,
    /// Redis (the `--broker`; the default with one): streams shared by every node of the
    /// cluster, so a client resumes on any node.
    Redis,
}

/// A `[[channels]]` rule of the config file: channels matching `pattern` keep a stream
/// (`history` > 0) and/or tell subscribers who joined and left (`join_leave`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRuleOpt {
    /// A channel name, or a prefix followed by `*`.
    pub pattern: String,
    /// Messages kept (0: no stream).
    #[serde(default)]
    pub history: u64,
    /// Oldest age kept (`"24h"`, `"30m"`, `"90s"`, `"500ms"`, `"7d"`) [default: 24h].
    #[serde(default)]
    pub ttl: Option<String>,
    /// Subscribes and unsubscribes are told as `join`/`leave` events to the subscribers that
    /// asked for them (`"join_leave":true` in their `sub`).
    #[serde(default)]
    pub join_leave: bool,
}

/// A validated channel rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRule {
    /// Pattern (exact, or prefix + `*`).
    pub pattern: String,
    /// Messages kept (0: no stream).
    pub history: u64,
    /// Oldest age kept (ms).
    pub ttl_ms: u64,
    /// Subscribes and unsubscribes are told as `join`/`leave` events.
    pub join_leave: bool,
}

impl ChannelRule {
    /// Whether `channel` matches.
    pub fn matches(&self, channel: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => channel.starts_with(prefix),
            None => self.pattern == channel,
        }
    }
}

/// Parses `24h`, `30m`, `90s`, `500ms`, `7d` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let mul = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// How file descriptors are tabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FdTableMode {
    /// Per-shard when `RLIMIT_NOFILE` cannot cover `--max-connections`, else shared.
    #[default]
    Auto,
    /// One table for the whole process.
    Shared,
    /// Each shard calls `unshare(CLONE_FILES)` and gets its own table (and its own limit).
    PerShard,
}

impl std::fmt::Display for FdTableMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FdTableMode::Auto => "auto",
            FdTableMode::Shared => "shared",
            FdTableMode::PerShard => "per-shard",
        })
    }
}

/// One `listen` entry: an address, or (in the file) a table with its own certificate.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ListenEntry {
    /// `"127.0.0.1:8080"`.
    Addr(SocketAddr),
    /// `{ addr = "…", cert = "…", key = "…" }`: TLS when `cert` and `key` are given.
    Table(ListenTable),
    /// `"localhost:8080"`: a host name, bound on every address it resolves to (as nginx
    /// does), resolved when the configuration is read.
    Name(String),
}

/// A `[[listen]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenTable {
    /// Address.
    pub addr: SocketAddr,
    /// Certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Private key (PEM).
    pub key: Option<PathBuf>,
}

fn parse_listen(s: &str) -> Result<ListenEntry, String> {
    if let Ok(a) = s.parse() {
        return Ok(ListenEntry::Addr(a));
    }
    resolve_listen(s).map(|_| ListenEntry::Name(s.to_owned()))
}

/// Every distinct address `host:port` resolves to, IPv4 first.
fn resolve_listen(s: &str) -> Result<Vec<SocketAddr>, String> {
    use std::net::ToSocketAddrs;
    let expected = "expected host:port, e.g. 127.0.0.1:8080, [::1]:8080 or localhost:8080";
    if s.rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(format!("{s:?}: {expected}"));
    }
    let mut addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?}: cannot resolve the host name ({e}); {expected}"))?
        .collect();
    addrs.sort_by_key(|a| (a.is_ipv6(), *a));
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("{s:?}: the host name resolves to no address"));
    }
    Ok(addrs)
}

/// Command-line flags; every one (but `--config`) can also be a key of the TOML file.
#[derive(Debug, Clone, Parser, Default, Deserialize)]
#[command(
    name = "switchboard",
    version,
    about = "WebSocket messaging and push server"
)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    /// TOML file with the same keys as the flags (e.g. `ping-interval-ms = 30000`).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on (repeatable) [default: 127.0.0.1:8080]. In the file also a
    /// table, `[[listen]] addr = "…", cert = "…", key = "…"`, for TLS on that address only.
    #[arg(long, value_parser = parse_listen)]
    pub listen: Vec<ListenEntry>,
    /// Certificate chain (PEM) for TLS on every `--listen` address given as a flag:
    /// clients connect with wss:// and https://. Reloaded on SIGHUP.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Event-loop shards [default: one per core, plus enough to hold --max-connections when
    /// RLIMIT_NOFILE cannot: each added shard has a private fd table (51 shards for the
    /// default 1,000,000 under a 20,000 limit); only one per core takes new connections, the
    /// others only as those fill, and an idle one costs about 0.1 MiB and no wake-ups].
    #[arg(long)]
    pub shards: Option<usize>,
    /// Accept backlog of each shard's listener [default: 4096].
    #[arg(long)]
    pub backlog: Option<u32>,
    /// File-descriptor tables [default: auto].
    #[arg(long, value_enum)]
    pub fd_table: Option<FdTableMode>,
    /// Most open WebSocket connections; beyond it new ones are closed with 1013 [default: 1000000].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Silence (ms) after which the server sends a ping [default: 25000].
    #[arg(long)]
    pub ping_interval_ms: Option<u64>,
    /// Silence (ms) after which the connection is closed with 4000 [default: 60000].
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
    /// A shard handles its deadlines (pings, timeouts) on a grid this coarse (ms), waking once
    /// for all that fall due within a step; 0: to the millisecond [default: 64].
    #[arg(long)]
    pub timer_slack_ms: Option<u64>,
    /// Time (ms) to complete the HTTP upgrade before the socket is dropped [default: 10000].
    #[arg(long)]
    pub handshake_timeout_ms: Option<u64>,
    /// Time (ms) to wait for the peer's close frame after ours [default: 2000].
    #[arg(long)]
    pub close_timeout_ms: Option<u64>,
    /// Largest message (and HTTP body) in bytes; larger is closed with 1009 [default: 65536].
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
    /// Per-connection outbound queue limit; over it the connection is closed with 4001 [default: 1048576].
    #[arg(long)]
    pub max_outbound_bytes: Option<usize>,
    /// Messages a connection may send per second on average (0: no limit; off with --echo);
    /// over it an op is answered `rate_limited`, and a connection that keeps going is closed
    /// with 1008 [default: 1000].
    #[arg(long)]
    pub max_messages_per_sec: Option<u32>,
    /// Messages a connection may send at once above its rate [default: 2000].
    #[arg(long)]
    pub message_burst: Option<u32>,
    /// WebSocket and SSE handshakes each shard completes per second, with a burst of one
    /// second's worth; beyond it an upgrade is closed with 1013 and an SSE request answered
    /// 503, both saying when to retry (0: no limit) [default: 20000].
    #[arg(long)]
    pub max_handshakes_per_sec: Option<u32>,
    /// Half-open handshakes per shard: connections holding part of an HTTP request (what a
    /// slowloris does to pin memory); beyond it such a connection is answered 503 (0: no
    /// limit) [default: 4096].
    #[arg(long)]
    pub max_pending_handshakes: Option<u32>,
    /// Open connections per source address; beyond it new ones are answered 429 (0: no
    /// limit; loopback addresses are exempt unless --limit-loopback) [default: 10000].
    #[arg(long)]
    pub max_connections_per_ip: Option<u32>,
    /// Apply --max-connections-per-ip to loopback peers too.
    #[arg(long)]
    #[serde(default)]
    pub limit_loopback: bool,
    /// Time (ms) shutdown waits for close handshakes [default: 5000].
    #[arg(long)]
    pub shutdown_grace_ms: Option<u64>,
    /// Time (ms) over which shutdown spreads the 1001 closes, each saying when to come back,
    /// so clients do not reconnect as one wave [default: 2000 per 100,000 open connections,
    /// within --shutdown-grace-ms].
    #[arg(long)]
    pub drain_ms: Option<u64>,
    /// Capacity of each shard's cross-shard mailbox [default: 16384; shards added for fd
    /// tables share the cores' total: 16384 × cores / shards, at least 1024].
    #[arg(long)]
    pub mailbox_capacity: Option<usize>,
    /// Echo every message back and upgrade on any path (conformance and peer benchmarks only).
    #[arg(long)]
    #[serde(default)]
    pub echo: bool,
    /// Offer permessage-deflate (RFC 7692) to WebSocket clients that ask for it.
    #[arg(long)]
    #[serde(default)]
    pub deflate: bool,
    /// With --deflate, messages shorter than this go out uncompressed, and so do messages
    /// that compression does not shrink; 0 compresses every message [default: 256].
    #[arg(long)]
    pub deflate_min_bytes: Option<usize>,
    /// Key for the HTTP push API (`Authorization: Bearer <key>`); without one the API answers
    /// loopback peers only.
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// HS256 secret: `/ws` and `/events` then require a signed token (`sub` is the user).
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM file with an RS256 or ES256 public key for signed tokens.
    #[arg(long)]
    pub jwt_public_key: Option<PathBuf>,
    /// Origin allowed for browser upgrades and SSE (repeatable) [default: any].
    #[arg(long)]
    pub allowed_origin: Vec<String>,
    /// Interval (ms) of SSE comment heartbeats [default: 15000].
    #[arg(long)]
    pub sse_heartbeat_ms: Option<u64>,
    /// Where inbox streams live [default: redb; redis with --broker].
    #[arg(long, value_enum)]
    pub store: Option<StoreKind>,
    /// Directory of the durable store, created on first use [default: ./data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Payload bytes the store keeps before qos-1 sends are refused with `store_full` [default: 1073741824].
    #[arg(long)]
    pub store_max_bytes: Option<u64>,
    /// Window (ms) in which a retried request id is answered with the first ack [default: 300000].
    #[arg(long)]
    pub dedup_window_ms: Option<u64>,
    /// Messages kept per inbox [default: 10000].
    #[arg(long)]
    pub inbox_history: Option<u64>,
    /// Age (ms) of the oldest message kept in an inbox [default: 604800000].
    #[arg(long)]
    pub inbox_ttl_ms: Option<u64>,
    /// Channels with history (config file only: `[[channels]]` tables).
    #[arg(skip)]
    pub channels: Vec<ChannelRuleOpt>,
    /// Join the cluster of nodes sharing this Redis: `redis://host:port[/db]`, a Redis
    /// Cluster node's URL, or Sentinel: `redis+sentinel://host:port[,host:port…]/<master>[/db]`
    /// (password in the URL or `SWITCHBOARD_BROKER_PASSWORD`) [default: none, one node].
    #[arg(long = "broker", value_name = "URL")]
    #[serde(skip)]
    pub broker_url: Option<String>,
    /// The `[broker]` table of the config file.
    #[arg(skip)]
    pub broker: Option<BrokerOpt>,
    /// With streams in Redis: replicas that must have a message (Redis `WAIT`) before its
    /// sender gets the ack, else `unavailable` (a retry with the same id stores it once)
    /// [default: 0, the master's answer].
    #[arg(long)]
    pub broker_min_replicas: Option<u32>,
    /// How long (ms) an ack waits for `--broker-min-replicas` replicas [default: 1000].
    #[arg(long)]
    pub broker_min_replicas_timeout_ms: Option<u64>,
    /// This node's id in the cluster [default: hostname:port of the first listener].
    #[arg(long)]
    pub node_id: Option<String>,
}

/// The `[broker]` table of the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerOpt {
    /// `redis://host:port[/db]` or `redis+sentinel://host:port[,host:port…]/<master>`.
    pub url: Option<String>,
    /// `--broker-min-replicas`.
    pub min_replicas: Option<u32>,
    /// `--broker-min-replicas-timeout-ms`.
    pub min_replicas_timeout_ms: Option<u64>,
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for these keys.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid value for {key}: {reason}")]
    Invalid {
        /// Key.
        key: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A listen address that does not resolve.
    #[error("invalid value for listen: {reason}")]
    Listen {
        /// What is wrong, with the expected form.
        reason: String,
    },
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen addresses.
    pub listen: Vec<SocketAddr>,
    /// TLS certificate files of each listen address (`None`: plain), by index.
    pub tls: Vec<Option<crate::tls::TlsFiles>>,
    /// Shards.
    pub shards: usize,
    /// `shards` is the default (the cores), not asked for: start-up may add shards for fd
    /// tables ([`crate::server::plan_fd_tables`]).
    pub shards_auto: bool,
    /// Shards that are users' homes (their directory entries, DM routing); 0: all. Shards
    /// added for fd tables are not homes, so a DM never wakes an empty shard.
    pub home_shards: usize,
    /// Listener backlog.
    pub backlog: u32,
    /// Requested fd-table mode (`Auto` is resolved at start-up).
    pub fd_table: FdTableMode,
    /// Connection limit.
    pub max_connections: usize,
    /// Ping after this much silence.
    pub ping_interval_ms: u64,
    /// Close with 4000 after this much silence.
    pub idle_timeout_ms: u64,
    /// Grid (ms) on which a shard wakes for its deadlines; 0: none.
    pub timer_slack_ms: u64,
    /// Upgrade deadline.
    pub handshake_timeout_ms: u64,
    /// Close handshake deadline.
    pub close_timeout_ms: u64,
    /// Largest message.
    pub max_message_bytes: usize,
    /// Outbound queue limit.
    pub max_outbound_bytes: usize,
    /// Per-connection message rate (0: none).
    pub max_messages_per_sec: u32,
    /// Per-connection message burst.
    pub message_burst: u32,
    /// Handshakes per shard per second (0: none).
    pub max_handshakes_per_sec: u32,
    /// Connections per shard holding part of an HTTP request (0: none).
    pub max_pending_handshakes: u32,
    /// Connections per source address (0: none).
    pub max_connections_per_ip: u32,
    /// Loopback peers count against `max_connections_per_ip`.
    pub limit_loopback: bool,
    /// Shutdown grace.
    pub shutdown_grace_ms: u64,
    /// Drain length (`None`: by the number of connections).
    pub drain_ms: Option<u64>,
    /// Mailbox capacity.
    pub mailbox_capacity: usize,
    /// `mailbox_capacity` is the default: start-up scales it down when it adds shards.
    pub mailbox_capacity_auto: bool,
    /// Echo mode.
    pub echo: bool,
    /// permessage-deflate offered.
    pub deflate: bool,
    /// Messages shorter than this are not compressed.
    pub deflate_min_bytes: usize,
    /// Push API key.
    pub api_key: Option<String>,
    /// HS256 secret.
    pub jwt_secret: Option<String>,
    /// RS256/ES256 public key (PEM text).
    pub jwt_public_key_pem: Option<String>,
    /// Allowed browser origins (empty: any).
    pub allowed_origins: Vec<String>,
    /// SSE heartbeat interval.
    pub sse_heartbeat_ms: u64,
    /// Where streams live.
    pub store: StoreKind,
    /// Directory of the durable store.
    pub data_dir: PathBuf,
    /// Payload bytes the store keeps before refusing qos-1 sends.
    pub store_max_bytes: u64,
    /// Dedup window of request ids (ms).
    pub dedup_window_ms: u64,
    /// Messages kept per inbox.
    pub inbox_history: u64,
    /// Oldest age kept in an inbox (ms).
    pub inbox_ttl_ms: u64,
    /// Channels with history, first match wins.
    pub channels: Vec<ChannelRule>,
    /// Redis URL of the cluster (none: a single node).
    pub broker_url: Option<String>,
    /// Replicas a stored message must reach before its ack.
    pub broker_min_replicas: u32,
    /// How long an ack waits for them (ms).
    pub broker_min_replicas_timeout_ms: u64,
    /// This node's id (none: hostname:port, known once bound).
    pub node_id: Option<String>,
}

impl Config {
    /// How many shards are users' homes: the modulus of [`crate::ids::home_of`].
    pub fn homes(&self) -> usize {
        match self.home_shards {
            0 => self.shards,
            n => n.min(self.shards),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Options::default()
            .resolve(None)
            .expect("defaults are valid")
    }
}

impl Options {
    /// Reads the `--config` file (if any) and merges it under the flags.
    pub fn load(self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Some(
                    toml::from_str::<Options>(&text).map_err(|source| ConfigError::Parse {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
        };
        self.resolve(file)
    }

    /// Merges flags over `file` over defaults and validates.
    pub fn resolve(self, file: Option<Options>) -> Result<Config, ConfigError> {
        let f = file.unwrap_or_default();
        let entries = if !self.listen.is_empty() {
            self.listen.clone()
        } else if !f.listen.is_empty() {
            f.listen.clone()
        } else {
            vec![ListenEntry::Addr(
                DEFAULT_LISTEN.parse().expect("default address parses"),
            )]
        };
        let flag_tls = match (
            self.tls_cert.clone().or(f.tls_cert.clone()),
            self.tls_key.clone().or(f.tls_key.clone()),
        ) {
            (Some(cert), Some(key)) => Some(crate::tls::TlsFiles { cert, key }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid {
                    key: "tls-cert",
                    reason: "--tls-cert and --tls-key go together",
                })
            }
        };
        let mut listen = Vec::with_capacity(entries.len());
        let mut tls = Vec::with_capacity(entries.len());
        for e in entries {
            match e {
                ListenEntry::Addr(a) => {
                    listen.push(a);
                    tls.push(flag_tls.clone());
                }
                ListenEntry::Name(n) => {
                    for a in resolve_listen(&n).map_err(|reason| ConfigError::Listen { reason })? {
                        listen.push(a);
                        tls.push(flag_tls.clone());
                    }
                }
                ListenEntry::Table(t) => {
                    listen.push(t.addr);
                    tls.push(match (t.cert, t.key) {
                        (Some(cert), Some(key)) => Some(crate::tls::TlsFiles { cert, key }),
                        (None, None) => flag_tls.clone(),
                        _ => {
                            return Err(ConfigError::Invalid {
                                key: "listen",
                                reason: "a [[listen]] table needs both cert and key, or neither",
                            })
                        }
                    });
                }
            }
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let broker_given = self
            .broker_url
            .as_deref()
            .or(f.broker.as_ref().and_then(|b| b.url.as_deref()))
            .is_some_and(|u| !u.is_empty());
        let c = Config {
            listen,
            tls,
            shards: self.shards.or(f.shards).unwrap_or(cores),
            shards_auto: self.shards.or(f.shards).is_none(),
            home_shards: 0,
            backlog: self.backlog.or(f.backlog).unwrap_or(DEFAULT_BACKLOG),
            fd_table: self.fd_table.or(f.fd_table).unwrap_or_default(),
            max_connections: self
                .max_connections
                .or(f.max_connections)
                .unwrap_or(DEFAULT_MAX_CONNECTIONS),
            ping_interval_ms: self
                .ping_interval_ms
                .or(f.ping_interval_ms)
                .unwrap_or(DEFAULT_PING_INTERVAL_MS),
            idle_timeout_ms: self
                .idle_timeout_ms
                .or(f.idle_timeout_ms)
                .unwrap_or(DEFAULT_IDLE_TIMEOUT_MS),
            timer_slack_ms: self
                .timer_slack_ms
                .or(f.timer_slack_ms)
                .unwrap_or(DEFAULT_TIMER_SLACK_MS),
            handshake_timeout_ms: self
                .handshake_timeout_ms
                .or(f.handshake_timeout_ms)
                .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_MS),
            close_timeout_ms: self
                .close_timeout_ms
                .or(f.close_timeout_ms)
                .unwrap_or(DEFAULT_CLOSE_TIMEOUT_MS),
            max_message_bytes: self
                .max_message_bytes
                .or(f.max_message_bytes)
                .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
            max_outbound_bytes: self
                .max_outbound_bytes
                .or(f.max_outbound_bytes)
                .unwrap_or(DEFAULT_MAX_OUTBOUND_BYTES),
            max_messages_per_sec: self
                .max_messages_per_sec
                .or(f.max_messages_per_sec)
                .unwrap_or(DEFAULT_MAX_MESSAGES_PER_SEC),
            message_burst: self
                .message_burst
                .or(f.message_burst)
                .unwrap_or(DEFAULT_MESSAGE_BURST),
            max_handshakes_per_sec: self
                .max_handshakes_per_sec
                .or(f.max_handshakes_per_sec)
                .unwrap_or(DEFAULT_MAX_HANDSHAKES_PER_SEC),
            max_pending_handshakes: self
                .max_pending_handshakes
                .or(f.max_pending_handshakes)
                .unwrap_or(DEFAULT_MAX_PENDING_HANDSHAKES),
            max_connections_per_ip: self
                .max_connections_per_ip
                .or(f.max_connections_per_ip)
                .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP),
            limit_loopback: self.limit_loopback || f.limit_loopback,
            drain_ms: self.drain_ms.or(f.drain_ms),
            shutdown_grace_ms: self
                .shutdown_grace_ms
                .or(f.shutdown_grace_ms)
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS),
            mailbox_capacity: self
                .mailbox_capacity
                .or(f.mailbox_capacity)
                .unwrap_or(DEFAULT_MAILBOX_CAPACITY),
            mailbox_capacity_auto: self.mailbox_capacity.or(f.mailbox_capacity).is_none(),
            echo: self.echo || f.echo,
            deflate: self.deflate || f.deflate,
            deflate_min_bytes: self
                .deflate_min_bytes
                .or(f.deflate_min_bytes)
                .unwrap_or(256),
            api_key: self.api_key.or(f.api_key).filter(|k| !k.is_empty()),
            jwt_secret: self.jwt_secret.or(f.jwt_secret).filter(|k| !k.is_empty()),
            jwt_public_key_pem: match self.jwt_public_key.or(f.jwt_public_key) {
                None => None,
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .map_err(|source| ConfigError::Read { path, source })?,
                ),
            },
            allowed_origins: if self.allowed_origin.is_empty() {
                f.allowed_origin
            } else {
                self.allowed_origin
            },
            sse_heartbeat_ms: self
                .sse_heartbeat_ms
                .or(f.sse_heartbeat_ms)
                .unwrap_or(DEFAULT_SSE_HEARTBEAT_MS),
            store: self.store.or(f.store).unwrap_or(if broker_given {
                StoreKind::Redis
            } else {
                StoreKind::Redb
            }),
            data_dir: self
                .data_dir
                .or(f.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            store_max_bytes: self
                .store_max_bytes
                .or(f.store_max_bytes)
                .unwrap_or(DEFAULT_STORE_MAX_BYTES),
            dedup_window_ms: self
                .dedup_window_ms
                .or(f.dedup_window_ms)
                .unwrap_or(DEFAULT_DEDUP_WINDOW_MS),
            inbox_history: self
                .inbox_history
                .or(f.inbox_history)
                .unwrap_or(DEFAULT_INBOX_HISTORY),
            inbox_ttl_ms: self
                .inbox_ttl_ms
                .or(f.inbox_ttl_ms)
                .unwrap_or(DEFAULT_INBOX_TTL_MS),
            broker_min_replicas: self
                .broker_min_replicas
                .or(f.broker.as_ref().and_then(|b| b.min_replicas))
                .unwrap_or(DEFAULT_BROKER_MIN_REPLICAS),
            broker_min_replicas_timeout_ms: self
                .broker_min_replicas_timeout_ms
                .or(f.broker.as_ref().and_then(|b| b.min_replicas_timeout_ms))
                .unwrap_or(DEFAULT_BROKER_MIN_REPLICAS_TIMEOUT_MS),
            broker_url: self
                .broker_url
                .or(f.broker.and_then(|b| b.url))
                .filter(|u| !u.is_empty()),
            node_id: self.node_id.or(f.node_id).filter(|n| !n.is_empty()),
            channels: {
                let rules = if self.channels.is_empty() {
                    f.channels
                } else {
                    self.channels
                };
                let mut out = Vec::new();
                for r in rules {
                    let ttl_ms = match r.ttl.as_deref() {
                        None => 86_400_000,
                        Some(t) => parse_duration_ms(t).ok_or(ConfigError::Invalid {
                            key: "channels.ttl",
                            reason: "a duration such as 24h, 30m, 90s, 500ms or 7d",
                        })?,
                    };
                    out.push(ChannelRule {
                        pattern: r.pattern,
                        history: r.history,
                        ttl_ms,
                        join_leave: r.join_leave,
                    });
                }
                out
            },
        };
        c.validate()?;
        Ok(c)
    }
}

impl Config {
    /// The history rule of `channel`, if any (first match).
    pub fn channel_rule(&self, channel: &str) -> Option<&ChannelRule> {
        self.channels.iter().find(|r| r.matches(channel))
    }

    /// The rule of `channel` if it keeps a stream (history > 0).
    pub fn stream_rule(&self, channel: &str) -> Option<&ChannelRule> {
        self.channel_rule(channel).filter(|r| r.history > 0)
    }

    /// Whether `channel`'s subscribes and unsubscribes are told as `join`/`leave` events.
    pub fn join_leave(&self, channel: &str) -> bool {
        self.channel_rule(channel).is_some_and(|r| r.join_leave)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason| Err(ConfigError::Invalid { key, reason });
        if self.shards == 0 || self.shards > 1024 {
            return bad("shards", "must be 1..=1024");
        }
        if self.ping_interval_ms == 0 {
            return bad("ping-interval-ms", "must be > 0");
        }
        if self.timer_slack_ms > 1000 {
            return bad("timer-slack-ms", "must be at most 1000");
        }
        if self.idle_timeout_ms <= self.ping_interval_ms {
            return bad("idle-timeout-ms", "must be greater than ping-interval-ms");
        }
        if self.handshake_timeout_ms == 0 || self.close_timeout_ms == 0 {
            return bad("handshake-timeout-ms/close-timeout-ms", "must be > 0");
        }
        if self.max_message_bytes < 128 || self.max_message_bytes > 1 << 30 {
            return bad("max-message-bytes", "must be 128..=1073741824");
        }
        if self.max_handshakes_per_sec > 1_000_000 {
            return bad(
                "max-handshakes-per-sec",
                "must be at most 1000000 (0: no limit)",
            );
        }
        if self.max_messages_per_sec > 1_000_000 {
            return bad(
                "max-messages-per-sec",
                "must be at most 1000000 (0: no limit)",
            );
        }
        if self.max_messages_per_sec > 0 && self.message_burst == 0 {
            return bad("message-burst", "must be at least 1");
        }
        if self.max_outbound_bytes < 1024 {
            return bad("max-outbound-bytes", "must be >= 1024");
        }
        if self.mailbox_capacity < 16 {
            return bad("mailbox-capacity", "must be >= 16");
        }
        if self.jwt_secret.is_some() && self.jwt_public_key_pem.is_some() {
            return bad("jwt-secret/jwt-public-key", "give one of them, not both");
        }
        if self.sse_heartbeat_ms == 0 {
            return bad("sse-heartbeat-ms", "must be > 0");
        }
        if self.max_connections == 0 {
            return bad("max-connections", "must be > 0");
        }
        if self.store == StoreKind::Redis && self.broker_url.is_none() {
            return bad(
                "store",
                "redis keeps streams in the --broker's Redis: give --broker",
            );
        }
        if self.broker_min_replicas > 0 && self.store != StoreKind::Redis {
            return bad(
                "broker-min-replicas",
                "applies to streams in Redis: give --broker (and --store redis)",
            );
        }
        if self.broker_min_replicas_timeout_ms == 0 {
            return bad("broker-min-replicas-timeout-ms", "must be > 0");
        }
        if self.inbox_history == 0 || self.inbox_ttl_ms == 0 {
            return bad("inbox-history/inbox-ttl-ms", "must be > 0");
        }
        for r in &self.channels {
            if (r.history == 0 && !r.join_leave) || r.ttl_ms == 0 || r.pattern.is_empty() {
                return bad(
                    "channels",
                    "each rule needs a pattern, history > 0 or join_leave, and ttl > 0",
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_with_no_configuration() {
        let c = Config::default();
        assert_eq!(c.listen, vec![DEFAULT_LISTEN.parse().unwrap()]);
        assert_eq!(c.ping_interval_ms, 25_000);
        assert_eq!(c.idle_timeout_ms, 60_000);
        assert_eq!(c.max_message_bytes, 65_536);
        assert_eq!(c.fd_table, FdTableMode::Auto);
        assert!(!c.echo);
    }

    #[test]
    fn listen_takes_host_names_and_says_what_it_expects() {
        let o = Options::try_parse_from(["switchboard", "--listen", "localhost:8095"]).unwrap();
        let c = o.resolve(None).unwrap();
        assert!(!c.listen.is_empty());
        assert!(c
            .listen
            .iter()
            .all(|a| a.port() == 8095 && a.ip().is_loopback()));
        assert!(c.listen[0].is_ipv4(), "IPv4 first: {:?}", c.listen);
        assert_eq!(c.listen.len(), c.tls.len());
        let f: Options = toml::from_str("listen = [\"localhost:9001\"]").unwrap();
        let c = Options::default().resolve(Some(f)).unwrap();
        assert_eq!(c.listen[0].port(), 9001);
        for bad in [
            "localhost",
            "localhost:http",
            ":8080",
            "no-such-host.invalid:80",
        ] {
            let e = Options::try_parse_from(["switchboard", "--listen", bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains("host:port"), "{bad}: {e}");
        }
    }

    #[test]
    fn listen_tables_give_tls_per_address_and_flags_cover_the_rest() {
        let file: Options = toml::from_str(
            "[[listen]]\naddr = \"127.0.0.1:8443\"\ncert = \"a.pem\"\nkey = \"a.key\"\n\n[[listen]]\naddr = \"127.0.0.1:8080\"\n",
        )
        .unwrap();
        let c = Options::default().resolve(Some(file.clone())).unwrap();
        assert_eq!(c.listen.len(), 2);
        assert_eq!(
            c.tls[0],
            Some(crate::tls::TlsFiles {
                cert: "a.pem".into(),
                key: "a.key".into()
            })
        );
        assert_eq!(c.tls[1], None, "plain beside TLS");
        // --tls-cert/--tls-key cover entries without their own.
        let flags =
            Options::parse_from(["switchboard", "--tls-cert", "b.pem", "--tls-key", "b.key"]);
        let c = flags.resolve(Some(file)).unwrap();
        assert_eq!(c.tls[0].as_ref().unwrap().cert, PathBuf::from("a.pem"));
        assert_eq!(c.tls[1].as_ref().unwrap().cert, PathBuf::from("b.pem"));
        // Plain strings still parse; a table with half a pair is refused.
        let plain: Options = toml::from_str("listen = [\"127.0.0.1:9000\"]").unwrap();
        assert_eq!(plain.resolve(None).unwrap().tls, vec![None]);
        let half: Options =
            toml::from_str("[[listen]]\naddr = \"127.0.0.1:8443\"\ncert = \"a.pem\"\n").unwrap();
        assert!(Options::default().resolve(Some(half)).is_err());
        assert!(Options::try_parse_from(["switchboard", "--tls-cert", "b.pem"]).is_err());
    }

    #[test]
    fn flags_over_file_over_defaults() {
        let file: Options = toml::from_str(
            "ping-interval-ms = 1000\nidle-timeout-ms = 3000\nfd-table = \"per-shard\"\nlisten = [\"127.0.0.1:9000\"]\n",
        )
        .unwrap();
        let flags = Options::parse_from(["switchboard", "--idle-timeout-ms", "5000", "--echo"]);
        let c = flags.resolve(Some(file)).unwrap();
        assert_eq!((c.ping_interval_ms, c.idle_timeout_ms), (1000, 5000));
        assert_eq!(c.fd_table, FdTableMode::PerShard);
        assert_eq!(c.listen[0].port(), 9000);
        assert!(c.echo);
    }

    #[test]
    fn channel_rules_from_the_file() {
        let file: Options = toml::from_str(
            "[[channels]]\npattern = \"room*\"\nhistory = 1000\nttl = \"24h\"\n[[channels]]\npattern = \"news\"\nhistory = 5\n",
        )
        .unwrap();
        let c = Options::default().resolve(Some(file)).unwrap();
        let r = c.channel_rule("room42").unwrap();
        assert_eq!((r.history, r.ttl_ms), (1000, 86_400_000));
        assert_eq!(c.channel_rule("news").unwrap().history, 5);
        assert!(c.channel_rule("newsy").is_none() && c.channel_rule("lobby").is_none());
        assert!(!c.join_leave("room1"));
        let jl: Options = toml::from_str(
            "[[channels]]\npattern = \"chat*\"\njoin_leave = true\n[[channels]]\npattern = \"log\"\nhistory = 9\njoin_leave = true\n",
        )
        .unwrap();
        let c = Options::default().resolve(Some(jl)).unwrap();
        assert!(
            c.join_leave("chat1") && c.stream_rule("chat1").is_none(),
            "no stream"
        );
        assert!(c.join_leave("log") && c.stream_rule("log").is_some());
        let neither: Options = toml::from_str("[[channels]]\npattern = \"x\"\n").unwrap();
        assert!(Options::default().resolve(Some(neither)).is_err());
        assert_eq!(parse_duration_ms("90s"), Some(90_000));
        assert_eq!(parse_duration_ms("7d"), Some(604_800_000));
        assert_eq!(parse_duration_ms("5 parsecs"), None);
        let bad: Options =
            toml::from_str("[[channels]]\npattern = \"x\"\nhistory = 1\nttl = \"soon\"\n").unwrap();
        assert!(Options::default().resolve(Some(bad)).is_err());
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(toml::from_str::<Options>("nope = 1").is_err());
        let o = Options::parse_from([
            "switchboard",
            "--ping-interval-ms",
            "9000",
            "--idle-timeout-ms",
            "9000",
        ]);
        assert!(matches!(
            o.resolve(None),
            Err(ConfigError::Invalid {
                key: "idle-timeout-ms",
                ..
            })
        ));
        let o = Options::parse_from(["switchboard", "--shards", "0"]);
        assert!(o.resolve(None).is_err());
        let o = Options::parse_from(["switchboard", "--timer-slack-ms", "1001"]);
        assert!(matches!(
            o.resolve(None),
            Err(ConfigError::Invalid {
                key: "timer-slack-ms",
                ..
            })
        ));
    }

    #[test]
    fn timer_slack_defaults_to_64_ms_and_0_turns_it_off() {
        assert_eq!(Config::default().timer_slack_ms, 64);
        let file: Options = toml::from_str("timer-slack-ms = 0").unwrap();
        assert_eq!(
            Options::default()
                .resolve(Some(file))
                .unwrap()
                .timer_slack_ms,
            0
        );
    }
}
