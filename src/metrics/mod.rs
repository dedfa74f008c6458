//! Every metric name in one place: per-shard counters (relaxed atomics written only by their
//! shard) and the Prometheus text rendering of their sum (`docs/metrics.md`).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::http::api;
use crate::ws::close;

/// Why an HTTP request or upgrade failed, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum HandshakeFailure {
    /// Malformed HTTP (400).
    Malformed,
    /// Header section over 8 KiB (431).
    HeadTooLarge,
    /// Plain request on an upgrade-only endpoint (426).
    NotUpgrade,
    /// Unsupported WebSocket version (426).
    Version,
    /// Missing or bad key (400).
    BadKey,
    /// Wrong method (405).
    Method,
    /// Bad user id (400).
    BadUser,
    /// The upgrade did not complete in time.
    Timeout,
    /// Over `--max-connections` (closed with 1013 after the upgrade).
    OverCapacity,
    /// A body over the size limit or a chunked body (413/411).
    Body,
    /// A browser request from an origin not in `--allowed-origin` (403).
    Origin,
    /// A private channel the token does not grant (403).
    Forbidden,
    /// Over the shard's `--max-handshakes-per-sec` (1013 after the upgrade, or 503).
    RateLimited,
    /// Over the shard's `--max-pending-handshakes` (503 at once).
    Pending,
    /// Over `--max-connections-per-ip` (429 at once).
    PerIp,
}

impl HandshakeFailure {
    /// All reasons, in index order.
    pub const ALL: [HandshakeFailure; 15] = [
        HandshakeFailure::Malformed,
        HandshakeFailure::HeadTooLarge,
        HandshakeFailure::NotUpgrade,
        HandshakeFailure::Version,
        HandshakeFailure::BadKey,
        HandshakeFailure::Method,
        HandshakeFailure::BadUser,
        HandshakeFailure::Timeout,
        HandshakeFailure::OverCapacity,
        HandshakeFailure::Body,
        HandshakeFailure::Origin,
        HandshakeFailure::Forbidden,
        HandshakeFailure::RateLimited,
        HandshakeFailure::Pending,
        HandshakeFailure::PerIp,
    ];

    /// Label value.
    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Malformed => "malformed",
            HandshakeFailure::HeadTooLarge => "head_too_large",
            HandshakeFailure::NotUpgrade => "not_upgrade",
            HandshakeFailure::Version => "version",
            HandshakeFailure::BadKey => "bad_key",
            HandshakeFailure::Method => "method",
            HandshakeFailure::BadUser => "bad_user",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::OverCapacity => "over_capacity",
            HandshakeFailure::Body => "body",
            HandshakeFailure::Origin => "origin",
            HandshakeFailure::Forbidden => "forbidden",
            HandshakeFailure::RateLimited => "rate_limited",
            HandshakeFailure::Pending => "pending_handshakes",
            HandshakeFailure::PerIp => "per_ip",
        }
    }
}

const CLOSE_SLOTS: usize = close::COUNTED.len() + 1;

/// Counters of one shard.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// Open upgraded WebSocket connections (gauge).
    pub open_ws: AtomicU64,
    /// Open connections not (yet) upgraded (gauge).
    pub open_http: AtomicU64,
    /// Open Server-Sent Events streams (gauge).
    pub open_sse: AtomicU64,
    /// API requests by route and status.
    pub api_requests: [[AtomicU64; api::STATUSES.len()]; api::Route::ALL.len()],
    /// Accepted TCP connections.
    pub accepted: AtomicU64,
    /// Failed handshakes by reason.
    pub handshake_failures: [AtomicU64; HandshakeFailure::ALL.len()],
    /// WebSocket closes by code; the last slot is "other".
    pub closes: [AtomicU64; CLOSE_SLOTS],
    /// Messages received from clients.
    pub messages_in: AtomicU64,
    /// Frames queued to clients.
    pub messages_out: AtomicU64,
    /// Bytes read from sockets.
    pub bytes_in: AtomicU64,
    /// Bytes written to sockets.
    pub bytes_out: AtomicU64,
    /// Cross-shard messages dropped because a mailbox was full.
    pub dropped: AtomicU64,
    /// Connections closed with 4001.
    pub slow_consumers: AtomicU64,
    /// Connections cut with a TCP reset: their close frame was still unwritten at the close
    /// deadline (a peer that stopped reading).
    pub closes_reset: AtomicU64,
    /// Ops refused `rate_limited` (over `--max-messages-per-sec`).
    pub rate_limited: AtomicU64,
    /// Inbox catch-ups started: a gap in the offsets, or a broker subscription restored.
    pub catch_ups: AtomicU64,
    /// Stored messages delivered by catch-ups (missed on pub/sub).
    pub caught_up_messages: AtomicU64,
    /// Catch-ups that could not read the stream (the gap is left to a resume).
    pub catch_ups_failed: AtomicU64,
    /// Connections closed (1013) to resume: their stream moved to another epoch while they
    /// replayed it, or a catch-up could not read what they missed.
    pub closed_to_resume: AtomicU64,
    /// Entries in the shard's timer wheel (gauge).
    pub wheel_entries: AtomicU64,
}

impl ShardMetrics {
    /// Adds `n` to a counter.
    #[inline]
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Sets a gauge.
    #[inline]
    pub fn set(c: &AtomicU64, v: u64) {
        c.store(v, Relaxed);
    }

    /// Counts a close with `code`.
    pub fn count_close(&self, code: u16) {
        let i = close::COUNTED
            .iter()
            .position(|&c| c == code)
            .unwrap_or(CLOSE_SLOTS - 1);
        self.closes[i].fetch_add(1, Relaxed);
    }

    /// Counts a failed handshake.
    pub fn count_handshake_failure(&self, why: HandshakeFailure) {
        self.handshake_failures[why as usize].fetch_add(1, Relaxed);
    }
}

/// Upper bounds (µs) of the commit latency histogram.
pub const COMMIT_US_BUCKETS: [u64; 9] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000];
/// Upper bounds of the commit batch size histogram (appended messages per commit).
pub const BATCH_BUCKETS: [u64; 9] = [1, 2, 4, 8, 16, 64, 256, 1_024, 4_096];

/// Counters of the cluster broker's threads.
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    /// Messages published.
    pub published: AtomicU64,
    /// Messages received from other nodes.
    pub received: AtomicU64,
    /// Messages of this node that came back and were dropped.
    pub own_dropped: AtomicU64,
    /// Qos-0 copies of other nodes that never arrived (gaps in their numbers).
    pub missed: AtomicU64,
    /// Active Redis subscriptions.
    pub subscriptions: AtomicU64,
    /// Connections to Redis lost.
    pub disconnects: AtomicU64,
    /// Whether both connections are up (1) or not (0).
    pub connected: AtomicU64,
}

/// Counters of the store thread (written only by it).
#[derive(Debug, Default)]
pub struct StoreMetrics {
    /// Streams (gauge).
    pub streams: AtomicU64,
    /// Payload bytes stored (gauge).
    pub bytes: AtomicU64,
    /// Messages appended.
    pub appends: AtomicU64,
    /// Commits.
    pub commits: AtomicU64,
    /// Commit latency histogram (cumulative buckets of [`COMMIT_US_BUCKETS`], then +Inf).
    pub commit_us: [AtomicU64; COMMIT_US_BUCKETS.len() + 1],
    /// Sum of commit latencies (µs).
    pub commit_us_sum: AtomicU64,
    /// Appends per commit histogram ([`BATCH_BUCKETS`], then +Inf).
    pub batch: [AtomicU64; BATCH_BUCKETS.len() + 1],
    /// Requests handled in commits.
    pub requests: AtomicU64,
    /// Replay pages read.
    pub replays: AtomicU64,
    /// Resumes that recovered everything.
    pub recoveries_ok: AtomicU64,
    /// Resumes that could not.
    pub recoveries_failed: AtomicU64,
    /// Retries answered from the dedup window.
    pub dedup_hits: AtomicU64,
    /// qos-1 sends refused (store over `--store-max-bytes`).
    pub refused: AtomicU64,
    /// Delivery receipts stored for senders (a recipient confirmed their messages).
    pub receipts: AtomicU64,
    /// Writes answered `unavailable`: fewer replicas than `--broker-min-replicas` had them
    /// in time.
    pub replicas_short: AtomicU64,
    /// Streams this node knew that it found in a new epoch (Redis lost their history; or
    /// held less than was handed out, and this node moved them on).
    pub epoch_changes: AtomicU64,
}

impl StoreMetrics {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Sets a gauge.
    pub fn set(c: &AtomicU64, v: u64) {
        c.store(v, Relaxed);
    }

    /// Records one commit of `appends` messages from `requests` requests taking `us`.
    pub fn commit(&self, us: u64, appends: u64, requests: u64) {
        self.commits.fetch_add(1, Relaxed);
        self.requests.fetch_add(requests, Relaxed);
        self.commit_us_sum.fetch_add(us, Relaxed);
        let i = COMMIT_US_BUCKETS
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(COMMIT_US_BUCKETS.len());
        self.commit_us[i].fetch_add(1, Relaxed);
        let j = BATCH_BUCKETS
            .iter()
            .position(|&b| appends <= b)
            .unwrap_or(BATCH_BUCKETS.len());
        self.batch[j].fetch_add(1, Relaxed);
    }
}

fn histogram(
    o: &mut String,
    name: &str,
    help: &str,
    bounds: &[u64],
    counts: &[AtomicU64],
    sum: u64,
) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut acc = 0;
    for (b, c) in bounds.iter().zip(counts) {
        acc += c.load(Relaxed);
        let _ = writeln!(o, "{name}_bucket{{le=\"{b}\"}} {acc}");
    }
    acc += counts[bounds.len()].load(Relaxed);
    let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {acc}");
    let _ = writeln!(o, "{name}_sum {sum}\n{name}_count {acc}");
}

/// Appends this node's id and, with a broker, its counters.
pub fn render_node(o: &mut String, node: &str, b: Option<&BrokerMetrics>) {
    let node = node.replace(['"', '\\', '\n'], "_");
    let _ = writeln!(
        o,
        "# HELP switchboard_node_info This node's id in the cluster.\n# TYPE switchboard_node_info gauge\nswitchboard_node_info{{node=\"{node}\"}} 1"
    );
    let Some(b) = b else { return };
    let rows: [(&str, &str, &str, u64); 7] = [
        (
            "switchboard_broker_published_total",
            "counter",
            "Messages published to Redis.",
            b.published.load(Relaxed),
        ),
        (
            "switchboard_broker_received_total",
            "counter",
            "Messages received from other nodes.",
            b.received.load(Relaxed),
        ),
        (
            "switchboard_broker_own_dropped_total",
            "counter",
            "This node's own messages that came back from Redis (dropped).",
            b.own_dropped.load(Relaxed),
        ),
        (
            "switchboard_broker_missed_total",
            "counter",
            "Qos-0 copies from other nodes that never arrived here (a dropped subscription, a partition): gaps in each publisher's numbers per channel, seen when a later copy arrives.",
            b.missed.load(Relaxed),
        ),
        (
            "switchboard_broker_subscriptions",
            "gauge",
            "Redis subscriptions (users and channels with local interest).",
            b.subscriptions.load(Relaxed),
        ),
        (
            "switchboard_broker_disconnects_total",
            "counter",
            "Connections to Redis lost.",
            b.disconnects.load(Relaxed),
        ),
        (
            "switchboard_broker_connected",
            "gauge",
            "1 while Redis is reachable.",
            b.connected.load(Relaxed),
        ),
    ];
    for (name, kind, help, v) in rows {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
}

/// Prometheus text of the store's counters.
pub fn render_store(o: &mut String, m: &StoreMetrics) {
    let gauge = |o: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    let counter = |o: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    gauge(
        o,
        "switchboard_store_streams",
        "Streams in the store.",
        m.streams.load(Relaxed),
    );
    gauge(
        o,
        "switchboard_store_bytes",
        "Payload bytes stored.",
        m.bytes.load(Relaxed),
    );
    counter(
        o,
        "switchboard_store_appends_total",
        "Messages appended to streams.",
        m.appends.load(Relaxed),
    );
    counter(
        o,
        "switchboard_store_commits_total",
        "Store commits (one fsync each when durable).",
        m.commits.load(Relaxed),
    );
    counter(
        o,
        "switchboard_store_requests_total",
        "Requests applied by commits.",
        m.requests.load(Relaxed),
    );
    histogram(
        o,
        "switchboard_store_commit_latency_us",
        "Commit latency (µs).",
        &COMMIT_US_BUCKETS,
        &m.commit_us,
        m.commit_us_sum.load(Relaxed),
    );
    histogram(
        o,
        "switchboard_store_commit_batch",
        "Messages appended per commit.",
        &BATCH_BUCKETS,
        &m.batch,
        m.appends.load(Relaxed),
    );
    counter(
        o,
        "switchboard_store_replays_total",
        "Replay pages read.",
        m.replays.load(Relaxed),
    );
    let _ = writeln!(
        o,
        "# HELP switchboard_store_recoveries_total Resumes by outcome.\n# TYPE switchboard_store_recoveries_total counter"
    );
    let _ = writeln!(
        o,
        "switchboard_store_recoveries_total{{result=\"ok\"}} {}",
        m.recoveries_ok.load(Relaxed)
    );
    let _ = writeln!(
        o,
        "switchboard_store_recoveries_total{{result=\"failed\"}} {}",
        m.recoveries_failed.load(Relaxed)
    );
    counter(
        o,
        "switchboard_store_receipts_total",
        "Delivery receipts stored for senders (a recipient confirmed their messages).",
        m.receipts.load(Relaxed),
    );
    counter(
        o,
        "switchboard_store_replicas_short_total",
        "Stored messages answered unavailable: fewer replicas than --broker-min-replicas had them in time.",
        m.replicas_short.load(Relaxed),
    );
    counter(
        o,
        "switchboard_store_epoch_changes_total",
        "Streams this node knew that it found in a new epoch: Redis lost their history, or held less than was handed out.",
        m.epoch_changes.load(Relaxed),
    );
    counter(
        o,
        "switchboard_store_dedup_hits_total",
        "Retries answered from the dedup window.",
        m.dedup_hits.load(Relaxed),
    );
    counter(
        o,
        "switchboard_store_refused_total",
        "qos-1 sends refused: store full.",
        m.refused.load(Relaxed),
    );
}

fn sum(shards: &[ShardMetrics], f: impl Fn(&ShardMetrics) -> &AtomicU64) -> u64 {
    shards.iter().map(|s| f(s).load(Relaxed)).sum()
}

/// Prometheus text exposition of all shards.
pub fn render(shards: &[ShardMetrics]) -> String {
    let mut o = String::with_capacity(4096);
    let _ = writeln!(
        o,
        "# HELP switchboard_connections_open Open connections by shard and transport."
    );
    let _ = writeln!(o, "# TYPE switchboard_connections_open gauge");
    for (i, s) in shards.iter().enumerate() {
        let _ = writeln!(
            o,
            "switchboard_connections_open{{shard=\"{i}\",transport=\"ws\"}} {}",
            s.open_ws.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "switchboard_connections_open{{shard=\"{i}\",transport=\"http\"}} {}",
            s.open_http.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "switchboard_connections_open{{shard=\"{i}\",transport=\"sse\"}} {}",
            s.open_sse.load(Relaxed)
        );
    }
    let counter = |o: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    counter(
        &mut o,
        "switchboard_accepted_total",
        "Accepted TCP connections.",
        sum(shards, |s| &s.accepted),
    );
    let _ = writeln!(
        o,
        "# HELP switchboard_handshake_failures_total Failed HTTP requests and upgrades by reason."
    );
    let _ = writeln!(o, "# TYPE switchboard_handshake_failures_total counter");
    for r in HandshakeFailure::ALL {
        let v = sum(shards, |s| &s.handshake_failures[r as usize]);
        let _ = writeln!(
            o,
            "switchboard_handshake_failures_total{{reason=\"{}\"}} {v}",
            r.label()
        );
    }
    let _ = writeln!(
        o,
        "# HELP switchboard_closes_total WebSocket closes by close code."
    );
    let _ = writeln!(o, "# TYPE switchboard_closes_total counter");
    for (i, code) in close::COUNTED.iter().enumerate() {
        let v = sum(shards, |s| &s.closes[i]);
        let _ = writeln!(o, "switchboard_closes_total{{code=\"{code}\"}} {v}");
    }
    let v = sum(shards, |s| &s.closes[CLOSE_SLOTS - 1]);
    let _ = writeln!(o, "switchboard_closes_total{{code=\"other\"}} {v}");
    counter(
        &mut o,
        "switchboard_messages_in_total",
        "Messages received from clients.",
        sum(shards, |s| &s.messages_in),
    );
    counter(
        &mut o,
        "switchboard_messages_out_total",
        "Frames queued to clients.",
        sum(shards, |s| &s.messages_out),
    );
    counter(
        &mut o,
        "switchboard_bytes_in_total",
        "Bytes read from sockets.",
        sum(shards, |s| &s.bytes_in),
    );
    counter(
        &mut o,
        "switchboard_bytes_out_total",
        "Bytes written to sockets.",
        sum(shards, |s| &s.bytes_out),
    );
    counter(
        &mut o,
        "switchboard_dropped_total",
        "Cross-shard messages dropped on a full mailbox.",
        sum(shards, |s| &s.dropped),
    );
    counter(
        &mut o,
        "switchboard_slow_consumer_closes_total",
        "Connections closed with 4001.",
        sum(shards, |s| &s.slow_consumers),
    );
    counter(
        &mut o,
        "switchboard_close_resets_total",
        "Connections cut with a TCP reset: their close frame was not written by --close-timeout-ms.",
        sum(shards, |s| &s.closes_reset),
    );
    counter(
        &mut o,
        "switchboard_inbox_catch_ups_total",
        "Stream catch-ups (inboxes and channels with history): a gap in the offsets, or a broker subscription restored.",
        sum(shards, |s| &s.catch_ups),
    );
    counter(
        &mut o,
        "switchboard_inbox_caught_up_messages_total",
        "Stored messages delivered by catch-ups (missed on pub/sub).",
        sum(shards, |s| &s.caught_up_messages),
    );
    counter(
        &mut o,
        "switchboard_inbox_catch_ups_failed_total",
        "Catch-ups that could not read the stream (the gap is left to a resume).",
        sum(shards, |s| &s.catch_ups_failed),
    );
    counter(
        &mut o,
        "switchboard_stream_closed_to_resume_total",
        "Connections closed (1013) to resume: their stream moved to another epoch while they replayed it, or a catch-up could not read what they missed.",
        sum(shards, |s| &s.closed_to_resume),
    );
    counter(
        &mut o,
        "switchboard_rate_limited_total",
        "Ops refused rate_limited (over --max-messages-per-sec).",
        sum(shards, |s| &s.rate_limited),
    );
    let _ = writeln!(
        o,
        "# HELP switchboard_api_requests_total Push API requests by route and status."
    );
    let _ = writeln!(o, "# TYPE switchboard_api_requests_total counter");
    for r in api::Route::ALL {
        for (si, status) in api::STATUSES.iter().enumerate() {
            let v = sum(shards, |s| &s.api_requests[r as usize][si]);
            let _ = writeln!(
                o,
                "switchboard_api_requests_total{{route=\"{}\",status=\"{status}\"}} {v}",
                r.label()
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP switchboard_timer_wheel_entries Entries in each shard's timer wheel."
    );
    let _ = writeln!(o, "# TYPE switchboard_timer_wheel_entries gauge");
    for (i, s) in shards.iter().enumerate() {
        let _ = writeln!(
            o,
            "switchboard_timer_wheel_entries{{shard=\"{i}\"}} {}",
            s.wheel_entries.load(Relaxed)
        );
    }
    o
}

/// The Prometheus text of [`render`] and friends as JSON, so `/api/stats` carries every
/// series `/metrics` has from the same definitions: an unlabelled series is
/// `"name": value`; a labelled one is `"name": [{"label": "..", .., "value": v}, ..]`.
pub fn text_to_json(text: &str) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value = match value.parse::<u64>() {
            Ok(v) => serde_json::Value::from(v),
            Err(_) => value
                .parse::<f64>()
                .map_or(serde_json::Value::Null, serde_json::Value::from),
        };
        match series.split_once('{') {
            None => {
                out.insert(series.to_owned(), value);
            }
            Some((name, labels)) => {
                let mut row = serde_json::Map::new();
                for pair in labels.trim_end_matches('}').split("\",") {
                    if let Some((k, v)) = pair.split_once("=\"") {
                        row.insert(k.to_owned(), v.trim_end_matches('"').into());
                    }
                }
                row.insert("value".into(), value);
                let e = out
                    .entry(name.to_owned())
                    .or_insert_with(|| serde_json::Value::Array(Vec::new()));
                if let Some(a) = e.as_array_mut() {
                    a.push(serde_json::Value::Object(row));
                }
            }
        }
    }
    serde_json::Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_of_the_text_is_in_the_json() {
        let shards: Vec<ShardMetrics> = (0..2).map(|_| ShardMetrics::default()).collect();
        ShardMetrics::add(&shards[1].accepted, 3);
        shards[1].count_close(4000);
        let mut text = render(&shards);
        render_store(&mut text, &StoreMetrics::default());
        let j = text_to_json(&text);
        assert_eq!(j["switchboard_accepted_total"], 3);
        let closes = j["switchboard_closes_total"].as_array().unwrap();
        assert!(closes.contains(&serde_json::json!({"code":"4000","value":1})));
        let api = j["switchboard_api_requests_total"].as_array().unwrap();
        assert!(api.contains(&serde_json::json!({"route":"presence","status":"200","value":0})));
        let buckets = j["switchboard_store_commit_latency_us_bucket"]
            .as_array()
            .unwrap();
        assert!(buckets.iter().any(|b| b["le"] == "+Inf"));
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        let in_json: usize = j
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_array().map_or(1, Vec::len))
            .sum();
        assert_eq!(in_json, samples, "one JSON value per sample");
    }

    #[test]
    fn renders_sums_and_labels() {
        let shards: Vec<ShardMetrics> = (0..2).map(|_| ShardMetrics::default()).collect();
        ShardMetrics::add(&shards[0].accepted, 2);
        ShardMetrics::add(&shards[1].accepted, 3);
        shards[1].count_close(4000);
        shards[1].count_close(3999);
        shards[0].count_handshake_failure(HandshakeFailure::HeadTooLarge);
        let text = render(&shards);
        assert!(text.contains("switchboard_accepted_total 5\n"));
        assert!(text.contains("switchboard_closes_total{code=\"4000\"} 1\n"));
        assert!(text.contains("switchboard_closes_total{code=\"other\"} 1\n"));
        assert!(
            text.contains("switchboard_handshake_failures_total{reason=\"head_too_large\"} 1\n")
        );
        assert!(text.contains("switchboard_connections_open{shard=\"1\",transport=\"ws\"} 0\n"));
    }
}
