//! `loadgen`: opens up to a million long-lived WebSocket connections from one box and reports
//! HdrHistogram latency. Plain RFC 6455 for `connect` and `echo` (any server), switchboard
//! protocol v1 for `dm` and `fanout`.

use std::path::PathBuf;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::json;

use loadgen::plan::Scenario;
use loadgen::worker::{self, now_ns, phase, ErrKind, Job, Shared, WorkerStats};
use loadgen::{plan, report};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Load generator for switchboard and any RFC 6455 server.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Args {
    /// What to do.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Target URL, ws:// or wss:// (repeatable; connections are spread round-robin).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: Vec<String>,
    /// CA certificates (PEM) that wss:// servers are verified against [default: the
    /// system's bundle].
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Accept any wss:// server certificate (self-signed test certificates).
    #[arg(long)]
    insecure: bool,
    /// Source addresses to bind before connect, e.g. 127.0.0.2-127.0.0.101 [default: automatic
    /// for loopback targets, keeping each (source, destination) pair under 14k connections].
    #[arg(long)]
    source_ips: Option<String>,
    /// Connections to open (subscribers, for fanout).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Connects per second, in total.
    #[arg(long, default_value_t = 20_000.0)]
    connect_rate: f64,
    /// Upgrades in flight at once, in total.
    #[arg(long, default_value_t = 10_000)]
    max_inflight_handshakes: usize,
    /// Messages per second in total (echo, dm, fanout).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// How long to run once every connection is up (e.g. 30s, 5m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Output folder for histograms, interval log, plot and summary.json.
    #[arg(long, default_value = "loadgen-out")]
    out: PathBuf,
    /// Worker threads, each with its own fd table [default: cores; for echo and dm only what
    /// the rate needs (one per 100k socket events a second, at most cores): spare threads spin
    /// beside the server; at least enough for the fd limit].
    #[arg(long)]
    threads: Option<usize>,
    /// Sample this server process's RSS and CPU from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Text message size in bytes (echo, flood; fanout pads its publications to it with
    /// JSON text when larger than they are).
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Offer permessage-deflate (`client_no_context_takeover`) and inflate compressed
    /// messages (what we send stays uncompressed).
    #[arg(long)]
    deflate: bool,
    /// Messages in flight per connection (flood).
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// flood without a window (tcpkali-style): each connection keeps its socket's send
    /// buffer full of frames, many per write, and counts the echoes as they come; TCP's
    /// flow control is the only limit. Replaces `--window`.
    #[arg(long)]
    write_combined: bool,
    /// Channels (fanout).
    #[arg(long, default_value_t = 10)]
    channels: usize,
    /// Publisher connections (fanout).
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// dm with `--qos 1`: every this long (e.g. 3s) drop `--drop-percent` % of the connections
    /// abruptly; they reconnect with `since=<epoch>:<offset>` and resume, and send again
    /// (same id) what was not acknowledged. Reports gaps, redelivered duplicates (dropped by
    /// offset), the sends sent again (`resent`) and the drops.
    #[arg(long, value_parser = parse_duration)]
    resume_every: Option<Duration>,
    /// Share of connections to drop at once (storm, dm --resume-every), percent.
    #[arg(long, default_value_t = 20)]
    drop_percent: u32,
    /// User id prefix (dm, fanout).
    #[arg(long, default_value = "lg")]
    user_prefix: String,
    /// Run worker threads under SCHED_BATCH, so a co-located loadgen does not preempt the
    /// server at every message it receives (helps fan-out runs; slowed the 1M connect ramp).
    #[arg(long)]
    sched_batch: bool,
    /// 1: dm sends every DM with `"qos":1` (stored, acknowledged); fanout publishes with an id
    /// (acknowledged; stored when the server has a `[[channels]]` rule for `lg-*`) and checks
    /// each subscriber's stream offsets for gaps and duplicates. Ack latency is reported.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Open-loop sends: stop sleeping this many µs before a send is due and poll without
    /// blocking until it is (reading replies meanwhile, yielding the core when idle). This
    /// host's timer wake-ups land 30–200 µs late, and open-loop latency counts that lateness;
    /// the spin costs CPU (at most this much per send). 0: sleep to the microsecond on a
    /// timerfd only [default: 50 when every worker thread can have a core, else 0: many
    /// spinning threads take the CPU the server needs].
    #[arg(long)]
    spin_us: Option<u64>,
    /// dm with `--qos 1`: the fault-campaign client (`loadgen::audit`): a blocking client per
    /// user (at most 2000) that retries with the same id, reconnects through the `--url`
    /// list resuming with `since`, then checks every acknowledged message arrived and reads
    /// every inbox through `GET /api/history` to find it stored once. Prints one `audit:`
    /// line, writes summary.json; exit status 1 if anything acknowledged was lost or doubled.
    #[arg(long)]
    audit: bool,
    /// With `--audit`: longest wait after sending stops for acknowledged messages to arrive.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    drain: Duration,
    /// Give up on connecting after this long.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    connect_timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 30s, 5m, 500ms)"))?;
    if !(0.0..=86_400.0 * 7.0).contains(&(v * mult)) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// A size field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in bytes.
fn proc_status_bytes(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A process's peak RSS so far (VmHWM, bytes).
fn proc_peak_rss(pid: &str) -> Option<u64> {
    proc_status_bytes(pid, "VmHWM")
}

/// Connections a switchboard server accepted so far (`switchboard_accepted_total` of its
/// `/metrics`), or `None` when `t` is not a plain switchboard server that answers.
fn server_accepted(t: &plan::Target) -> Option<u64> {
    loadgen::http::get(t, "/metrics", Duration::from_secs(2))?
        .lines()
        .find_map(|l| l.strip_prefix("switchboard_accepted_total "))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether a server's memory at the start of a run is a fair baseline: not when it held
/// much more before (an earlier run's connections), as its allocator then reuses what it
/// kept and the run's growth says nothing per connection. 8 MiB of slack for start-up.
fn baseline_reused(rss_start: u64, peak_before: u64) -> bool {
    peak_before > rss_start + (8 << 20)
}

/// A process's RSS (bytes) and CPU time (s) from /proc.
fn proc_sample(pid: &str) -> Option<(u64, f64)> {
    let rss = proc_status_bytes(pid, "VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((rss, ticks / hz))
}

#[derive(Default)]
struct Totals {
    open: u64,
    connecting: u64,
    established: u64,
    ready: u64,
    failed: u64,
    errors: u64,
    sent: u64,
    received: u64,
    expected: u64,
    /// `error` answers (a refused DM is one delivery that will never come).
    op_errors: u64,
}

fn totals(stats: &[WorkerStats]) -> Totals {
    let mut t = Totals::default();
    for s in stats {
        t.open += s.open.load(Relaxed);
        t.connecting += s.connecting.load(Relaxed);
        t.established += s.established.load(Relaxed);
        t.ready += s.ready.load(Relaxed);
        t.failed += s.failed.load(Relaxed);
        t.errors += s.errors.iter().map(|e| e.load(Relaxed)).sum::<u64>();
        t.sent += s.sent.load(Relaxed);
        t.received += s.received.load(Relaxed);
        t.expected += s.expected.load(Relaxed);
        t.op_errors += s.op_errors.load(Relaxed);
    }
    t
}

/// connect: when the first and the last message to a held connection arrived, in Unix
/// milliseconds (null without any): a broadcast's spread, against when it was sent.
fn arrivals(stats: &[WorkerStats]) -> serde_json::Value {
    let first = stats.iter().map(|s| s.first_message_ns.load(Relaxed));
    let first = first.filter(|&t| t > 0).min();
    let last = stats.iter().map(|s| s.last_message_ns.load(Relaxed)).max();
    let unix_ms = |t: u64| {
        let now_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3);
        now_unix_ms - (worker::now_ns().saturating_sub(t)) as f64 / 1e6
    };
    match (first, last) {
        (Some(f), Some(l)) => json!({"first_unix_ms": unix_ms(f), "last_unix_ms": unix_ms(l)}),
        _ => json!(null),
    }
}

/// Clock, messages received and the server's CPU seconds at one moment (the run's start or
/// end): what `flood` divides.
#[derive(Debug, Clone, Copy)]
struct RunMark {
    ns: u64,
    received: u64,
    server_cpu_s: Option<f64>,
}

impl RunMark {
    fn now(ns: u64, received: u64, server_pid: Option<&str>) -> RunMark {
        RunMark {
            ns,
            received,
            server_cpu_s: server_pid.and_then(proc_sample).map(|s| s.1),
        }
    }
}

/// Echoed messages per second and server CPU per message (ns) between two marks.
fn flood_figures(a: RunMark, b: RunMark) -> (f64, Option<f64>) {
    let msgs = b.received.saturating_sub(a.received);
    let secs = (b.ns.saturating_sub(a.ns) as f64 / 1e9).max(1e-9);
    let per_msg = match (a.server_cpu_s, b.server_cpu_s) {
        (Some(x), Some(y)) if msgs > 0 => Some((y - x) * 1e9 / msgs as f64),
        _ => None,
    };
    (msgs as f64 / secs, per_msg)
}

struct Sampler {
    server_pid: Option<String>,
    /// Connections the server had accepted before this run (a switchboard server).
    server_accepted_before: Option<u64>,
    /// The server's peak RSS before this run (VmHWM at the first sample).
    server_peak_before: Option<u64>,
    server_first: Option<(u64, f64)>,
    server_last: Option<(u64, f64)>,
    server_peak_rss: u64,
    self_first: Option<(u64, f64)>,
    self_last: Option<(u64, f64)>,
}

impl Sampler {
    fn sample(&mut self) {
        if let Some(pid) = &self.server_pid {
            if let Some(s) = proc_sample(pid) {
                if self.server_first.is_none() {
                    self.server_peak_before = proc_peak_rss(pid);
                }
                self.server_first.get_or_insert(s);
                self.server_last = Some(s);
                self.server_peak_rss = self.server_peak_rss.max(s.0);
            }
        }
        if let Some(s) = proc_sample("self") {
            self.self_first.get_or_insert(s);
            self.self_last = Some(s);
        }
    }
}

/// `dm --qos 1 --audit`: runs the fault-campaign client, prints one line, writes
/// summary.json, exits 1 when anything acknowledged was lost or doubled.
fn run_audit(args: &Args, targets: Vec<plan::Target>) -> anyhow::Result<()> {
    if args.scenario != Scenario::Dm || args.qos != 1 {
        bail!("--audit needs dm with --qos 1");
    }
    if targets.iter().any(|t| t.tls) {
        bail!("--audit speaks plain ws:// only");
    }
    let users = args.connections & !1;
    if !(2..=loadgen::audit::MAX_USERS).contains(&users) {
        bail!(
            "--audit needs 2..={} connections (one thread each)",
            loadgen::audit::MAX_USERS
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let r = loadgen::audit::run(loadgen::audit::Audit {
        targets,
        users,
        rate: args.rate,
        duration: args.duration,
        drain: args.drain,
        prefix: args.user_prefix.clone(),
    });
    println!(
        "audit: sent {} acked {} refused {} unavailable {} retries {} acked_lost {} duplicates {} redelivered {} reconnects {} epoch_changes {} longest_unavailable_ms {} audit_missing {} audit_duplicates {} audit_complete {}",
        r.sent, r.acked, r.refused, r.unavailable, r.retries, r.acked_lost, r.duplicates,
        r.redelivered, r.reconnects, r.epoch_changes, r.longest_unavailable_ms,
        r.audit_missing, r.audit_duplicates, r.audit_complete
    );
    let path = args.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json!({ "audit": r }))?)
        .with_context(|| format!("writing {}", path.display()))?;
    if !r.clean() {
        println!("FAILED: acknowledged messages lost or doubled (see above)");
        std::process::exit(1);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let targets: Vec<plan::Target> = args
        .url
        .iter()
        .map(|u| plan::parse_url(u))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    if args.connections == 0 {
        bail!("--connections must be > 0");
    }
    // Before any connection of ours: did the server run before? (Its memory baseline.)
    let accepted_before = args.server_pid.and_then(|_| server_accepted(&targets[0]));
    let tls = if targets.iter().any(|t| t.tls) {
        Some(loadgen::tls::client_config(
            args.ca_file.as_deref(),
            args.insecure,
        )?)
    } else {
        None
    };
    if args.scenario == Scenario::Dm && args.connections < 2 {
        bail!("dm needs at least 2 connections (pairs)");
    }
    if args.resume_every.is_some() && (args.scenario != Scenario::Dm || args.qos != 1) {
        bail!("--resume-every needs dm with --qos 1 (stored messages to resume)");
    }
    if args.audit {
        return run_audit(&args, targets);
    }
    let explicit = args
        .source_ips
        .as_deref()
        .map(plan::parse_ip_range)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let (sources, warning) = plan::source_ips(explicit, &targets, args.connections);
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (soft, _) = nofile();
    let total = args.connections
        + if args.scenario == Scenario::Fanout {
            args.publishers
        } else {
            0
        };
    // Each thread's private fd table holds `soft` descriptors; leave room for epoll and stdio.
    let min_threads = total.div_ceil((soft as usize).saturating_sub(64).max(64));
    let threads = args
        .threads
        .unwrap_or_else(|| plan::threads_for(args.scenario, args.rate, cores))
        .max(min_threads)
        .max(1);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let job = Arc::new(Job {
        scenario: args.scenario,
        targets,
        sources,
        connections: args.connections,
        publishers: args.publishers,
        channels: args.channels.max(1),
        threads,
        connect_rate: args.connect_rate,
        max_inflight: args.max_inflight_handshakes.max(threads),
        rate: args.rate,
        size: args.size.max(24),
        drop_percent: args.drop_percent.min(100),
        user_prefix: args.user_prefix.clone(),
        sched_batch: args.sched_batch,
        qos: args.qos,
        resume_every_ns: args.resume_every.map_or(0, |d| d.as_nanos() as u64),
        spin_ns: args
            .spin_us
            .unwrap_or(if threads <= cores { 50 } else { 0 })
            * 1000,
        window: args.window.max(1),
        write_combined: args.write_combined,
        tls,
        deflate: args.deflate,
    });
    let shared = Arc::new(Shared {
        phase: std::sync::atomic::AtomicU8::new(phase::CONNECT),
        run_start_ns: std::sync::atomic::AtomicU64::new(0),
        storm: std::sync::atomic::AtomicBool::new(false),
        stats: (0..threads).map(|_| WorkerStats::default()).collect(),
    });
    eprintln!(
        "loadgen {}: {} connections to {} target(s) from {} source address(es), {} threads, connect rate {}/s{}",
        scenario_name(args.scenario),
        total,
        job.targets.len(),
        job.sources.as_ref().map_or(1, |v| v.len()),
        threads,
        args.connect_rate,
        if matches!(args.scenario, Scenario::Echo | Scenario::Dm | Scenario::Fanout) {
            format!(
                ", {} msg/s open loop (latency from the scheduled send time; spin {} µs)",
                args.rate,
                job.spin_ns / 1000
            )
        } else {
            String::new()
        }
    );
    let started_wall = SystemTime::now();
    let t_start = now_ns();
    let (itx, irx) = crossbeam_channel::bounded::<worker::Interval>(threads * 64);
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (job, shared, itx) = (job.clone(), shared.clone(), itx.clone());
            std::thread::Builder::new()
                .name(format!("lg-{i}"))
                .spawn(move || worker::Worker::run(i, job, shared, itx))
                .expect("spawn worker")
        })
        .collect();
    drop(itx);

    let mut sampler = Sampler {
        server_accepted_before: accepted_before,
        server_pid: args.server_pid.map(|p| p.to_string()),
        server_peak_before: None,
        server_first: None,
        server_last: None,
        server_peak_rss: 0,
        self_first: None,
        self_last: None,
    };
    sampler.sample();
    let mut intervals: Vec<(f64, f64, Histogram<u64>)> = Vec::new();
    let mut open_per_second: Vec<u64> = Vec::new();
    let mut last_established = 0;
    let mut last_received = 0;
    let mut connected_at: Option<u64> = None;
    let mut run_end: Option<u64> = None;
    let mut drain_until: Option<u64> = None;
    let mut storm_at: Option<u64> = None;
    let mut storm_recovered_s: Option<f64> = None;
    let mut open_at_storm = 0;
    let server_pid = args.server_pid.map(|p| p.to_string());
    let (mut run_mark, mut drain_mark): (Option<RunMark>, Option<RunMark>) = (None, None);
    let mut peak_open = 0;
    let mut next_print = now_ns() + 1_000_000_000;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
        let now = now_ns();
        // Read before the counters: once every worker has seen the drain, the counters hold
        // every message sent in the run (a worker may still send in the turn it began
        // before the drain was set).
        let all_draining = shared
            .stats
            .iter()
            .all(|s| s.seen_phase.load(Acquire) >= phase::DRAIN);
        let t = totals(&shared.stats);
        peak_open = peak_open.max(t.open);
        if now >= next_print {
            next_print += 1_000_000_000;
            sampler.sample();
            open_per_second.push(t.open);
            let mut interval = report::new_histogram();
            while let Ok(iv) = irx.try_recv() {
                let _ = interval.add(&iv.latency);
            }
            // No latency in an interval without messages (not "0.000 ms").
            let p99 = if interval.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.3} ms", interval.value_at_quantile(0.99) as f64 / 1000.0)
            };
            let elapsed = (now - t_start) as f64 / 1e9;
            intervals.push((elapsed - 1.0, 1.0, interval));
            eprintln!(
                "[{elapsed:6.1}s] open {} connecting {} connect/s {} errors {} msgs/s {} p99 {p99}",
                t.open,
                t.connecting,
                t.established - last_established,
                t.errors,
                t.received - last_received,
            );
            last_established = t.established;
            last_received = t.received;
        }
        let ph = shared.phase.load(Relaxed);
        let done_connecting = t.ready + t.failed >= total as u64 && t.connecting == 0;
        if ph == phase::CONNECT
            && (done_connecting || now - t_start > args.connect_timeout.as_nanos() as u64)
        {
            connected_at = Some(now);
            let start = now + 50_000_000;
            shared.run_start_ns.store(start, Relaxed);
            shared.phase.store(phase::RUN, Relaxed);
            run_end = Some(start + args.duration.as_nanos() as u64);
            run_mark = Some(RunMark::now(now, t.received, server_pid.as_deref()));
            if args.scenario == Scenario::Storm {
                storm_at = Some(start + args.duration.as_nanos() as u64 / 3);
            }
        }
        if let Some(s) = storm_at {
            if now >= s && !shared.storm.load(Relaxed) {
                eprintln!("storm: dropping {}% of the connections", args.drop_percent);
                shared.storm.store(true, Relaxed);
                open_at_storm = t.open;
            } else if shared.storm.load(Relaxed)
                && storm_recovered_s.is_none()
                && t.open >= open_at_storm
            {
                // Back to what was open when the storm hit (a connection that never opened
                // before it is not waited for).
                storm_recovered_s = Some((now - s) as f64 / 1e9);
                eprintln!(
                    "storm: all {open_at_storm} open again after {:.2} s",
                    (now - s) as f64 / 1e9
                );
            }
        }
        if ph == phase::RUN && run_end.is_some_and(|e| now >= e) {
            shared.phase.store(phase::DRAIN, Relaxed);
            drain_mark = Some(RunMark::now(now, t.received, server_pid.as_deref()));
            // Ends as soon as every expected delivery arrived; big fan-outs need the time.
            drain_until = Some(now + 30_000_000_000);
        }
        // With periodic drops, also wait for the last dropped connections to come back and
        // resume (a drop just before the end would otherwise never count as recovered).
        let all_back = args.resume_every.is_none() || t.open as usize >= total;
        // A refused DM was answered: nothing more will come for it.
        let refused = if args.scenario == Scenario::Dm {
            t.op_errors
        } else {
            0
        };
        if shared.phase.load(Relaxed) == phase::DRAIN
            && ((all_draining && t.received + refused >= t.expected && all_back)
                || drain_until.is_some_and(|d| now >= d))
        {
            shared.phase.store(phase::CLOSE, Relaxed);
        }
    }
    while let Ok(iv) = irx.try_recv() {
        if let Some(last) = intervals.last_mut() {
            let _ = last.2.add(&iv.latency);
        }
    }
    let mut connect_hist = report::new_histogram();
    let mut latency_hist = report::new_histogram();
    let mut ack_hist = report::new_histogram();
    let mut recovery_hist = report::new_histogram();
    let mut lateness_hist = report::new_histogram();
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => {
                connect_hist.add(&r.connect).ok();
                latency_hist.add(&r.latency).ok();
                ack_hist.add(&r.ack).ok();
                recovery_hist.add(&r.recovery).ok();
                lateness_hist.add(&r.lateness).ok();
            }
            Ok(Err(e)) => eprintln!("a worker failed: {e}"),
            Err(_) => eprintln!("a worker panicked"),
        }
    }
    sampler.sample();
    let t = totals(&shared.stats);
    // From the first connect to the last upgrade, as the workers saw it.
    let last_up = shared
        .stats
        .iter()
        .map(|s| s.last_established_ns.load(Relaxed))
        .max()
        .unwrap_or(0);
    let connect_secs = if last_up > t_start {
        (last_up - t_start) as f64 / 1e9
    } else {
        connected_at.map_or(0.0, |c| (c - t_start) as f64 / 1e9)
    }
    .max(1e-3);
    let run_secs = args.duration.as_secs_f64().max(1e-3);
    let mut errors = serde_json::Map::new();
    let mut closes = std::collections::BTreeMap::new();
    let (mut gaps, mut dups, mut op_errors, mut dropped, mut acked) = (0, 0, 0, 0, 0);
    let (mut redelivered, mut resent) = (0, 0);
    let mut first_error = None;
    let mut by_code = [0u64; worker::OP_ERROR_CODES.len() + 1];
    for s in &shared.stats {
        for (i, n) in by_code.iter_mut().enumerate() {
            *n += s.op_error_codes[i].load(Relaxed);
        }
        for k in ErrKind::ALL {
            let v = s.errors[k as usize].load(Relaxed);
            if v > 0 {
                let e = errors
                    .entry(k.name())
                    .or_insert(json!({"count":0,"fix":k.fix()}));
                e["count"] = json!(e["count"].as_u64().unwrap_or(0) + v);
            }
        }
        for (code, n) in s.unexpected_closes.lock().unwrap().iter() {
            *closes.entry(*code).or_insert(0u64) += n;
        }
        gaps += s.gaps.load(Relaxed);
        dups += s.duplicates.load(Relaxed);
        op_errors += s.op_errors.load(Relaxed);
        dropped += s.dropped.load(Relaxed);
        acked += s.acked.load(Relaxed);
        redelivered += s.redelivered.load(Relaxed);
        resent += s.resent.load(Relaxed);
        if first_error.is_none() {
            first_error = s.first_error.lock().unwrap().clone();
        }
    }
    let unexpected: u64 = closes.values().sum();
    let latency_name = match args.scenario {
        Scenario::Echo => "echo_rtt",
        Scenario::Dm => "dm_latency",
        Scenario::Fanout => "fanout_latency",
        Scenario::Connect | Scenario::Storm | Scenario::Tcp | Scenario::Flood => "latency",
    };
    let mut hists: Vec<(&str, &Histogram<u64>)> = vec![("connect", &connect_hist)];
    if matches!(
        args.scenario,
        Scenario::Echo | Scenario::Dm | Scenario::Fanout
    ) {
        hists.push((latency_name, &latency_hist));
        hists.push(("send_lateness", &lateness_hist));
    }
    if args.qos == 1 && matches!(args.scenario, Scenario::Dm | Scenario::Fanout) {
        hists.push(("ack_latency", &ack_hist));
    }
    if args.resume_every.is_some() {
        hists.push(("resume_recovery", &recovery_hist));
    }
    let title = format!(
        "loadgen {}: {} connections",
        scenario_name(args.scenario),
        total
    );
    report::write_histograms(&args.out, &title, &hists)?;
    report::write_interval_log(&args.out.join("intervals.hlog"), started_wall, &intervals)?;
    let per_conn = |first: Option<(u64, f64)>, last: Option<(u64, f64)>| -> serde_json::Value {
        match (first, last) {
            (Some(a), Some(b)) => json!({
                "rss_start_bytes": a.0,
                "rss_end_bytes": b.0,
                "cpu_seconds": b.1 - a.1,
            }),
            _ => serde_json::Value::Null,
        }
    };
    let mut server = per_conn(sampler.server_first, sampler.server_last);
    if let serde_json::Value::Object(m) = &mut server {
        m.insert("rss_peak_bytes".into(), json!(sampler.server_peak_rss));
        let start = sampler.server_first.map_or(0, |f| f.0);
        let growth = sampler.server_peak_rss.saturating_sub(start);
        // Our own scrape above is one accepted connection.
        let reused = sampler.server_accepted_before.is_some_and(|n| n > 1)
            || sampler
                .server_peak_before
                .is_some_and(|p| baseline_reused(start, p));
        m.insert(
            "accepted_before_run".into(),
            json!(sampler.server_accepted_before),
        );
        m.insert(
            "rss_peak_before_run_bytes".into(),
            json!(sampler.server_peak_before),
        );
        m.insert("baseline_reused".into(), json!(reused));
        // A server that held more before this run gives no per-connection figure.
        m.insert(
            "bytes_per_connection".into(),
            if reused {
                serde_json::Value::Null
            } else {
                json!(growth as f64 / peak_open.max(1) as f64)
            },
        );
    }
    let mut me = per_conn(sampler.self_first, sampler.self_last);
    if let serde_json::Value::Object(m) = &mut me {
        let growth = sampler
            .self_last
            .map_or(0, |l| l.0)
            .saturating_sub(sampler.self_first.map_or(0, |f| f.0));
        m.insert(
            "bytes_per_connection".into(),
            json!(growth as f64 / peak_open.max(1) as f64),
        );
    }
    let missing = t.expected.saturating_sub(t.received);
    let codes = op_errors_by_code(&by_code);
    let flood = match (args.scenario, run_mark, drain_mark) {
        (Scenario::Flood, Some(a), Some(b)) => Some(flood_figures(a, b)),
        _ => None,
    };
    let summary = json!({
        "scenario": args.scenario,
        "started_at_unix_s": started_wall.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "targets": args.url,
        "threads": threads,
        // Without --source-ips the kernel picks one source address.
        "source_ips": job.sources.as_ref().map_or(1, |v| v.len()),
        "open_loop": args.scenario != Scenario::Flood,
        "latency_from_scheduled_send_time": true,
        "connections": {
            "target": total,
            "established": t.established,
            "failed": t.failed,
            "peak_open": peak_open,
            "connect_seconds": connect_secs,
            "connect_rate_per_s": t.established as f64 / connect_secs,
            "dropped_on_purpose": dropped,
            "storm_recovery_seconds": storm_recovered_s,
            "storm_open_before": open_at_storm,
        },
        "errors": errors,
        "first_error": first_error,
        "unexpected_closes": {"total": unexpected, "by_code": closes},
        "messages": {
            "rate_target_per_s": args.rate,
            "sent": t.sent,
            "received": t.received,
            "expected": t.expected,
            "missing": missing,
            "gaps": gaps,
            "duplicates": dups,
            "op_errors": op_errors,
            "op_errors_by_code": &codes,
            "qos": args.qos,
            "acked": acked,
            "redelivered": redelivered,
            "resent": resent,
            "resume_every_s": args.resume_every.map(|d| d.as_secs_f64()),
            "received_per_s": t.received as f64 / run_secs,
        },
        "arrivals": arrivals(&shared.stats),
        "flood": flood.map(|(rate, per_msg)| json!({
            "window": (!args.write_combined).then_some(args.window),
            "write_combined": args.write_combined,
            "size": args.size,
            "echoed_per_s": rate,
            "server_cpu_ns_per_message": per_msg,
        })),
        "histograms": {
            "connect": report::stats(&connect_hist),
            latency_name: report::stats(&latency_hist),
            "ack_latency": report::stats(&ack_hist),
            "resume_recovery": report::stats(&recovery_hist),
            "send_lateness": report::stats(&lateness_hist),
        },
        "open_per_second": open_per_second,
        "server": server,
        "loadgen": me,
    });
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    println!("{}", report::table(&hists));
    println!(
        "connections: {} established of {} ({} failed) in {:.1} s = {:.0}/s; peak open {}",
        t.established,
        total,
        t.failed,
        connect_secs,
        t.established as f64 / connect_secs,
        peak_open
    );
    if matches!(
        args.scenario,
        Scenario::Echo | Scenario::Dm | Scenario::Fanout | Scenario::Flood
    ) {
        println!(
            "messages: sent {} received {} expected {} missing {} duplicates {} gaps {} errors {} ({:.0} deliveries/s)",
            t.sent, t.received, t.expected, missing, dups, gaps, op_errors, t.received as f64 / run_secs
        );
        if let Some(m) = codes.as_object().filter(|m| !m.is_empty()) {
            let list: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!(
                "refused by the server: {} (each answered `error` to its sender)",
                list.join(", ")
            );
        }
    }
    if let Some((rate, per_msg)) = flood {
        let depth = if args.write_combined {
            "write-combined".to_string()
        } else {
            format!("{} in flight per connection", args.window)
        };
        println!(
            "flood: {rate:.0} echoed msg/s over the run ({depth}, {} B), server CPU {}",
            args.size,
            per_msg.map_or("not sampled (give --server-pid)".to_string(), |ns| format!(
                "{ns:.0} ns per message"
            ))
        );
    }
    if args.scenario == Scenario::Storm {
        println!(
            "storm: dropped {dropped}, recovered to {open_at_storm} open in {}",
            storm_recovered_s.map_or("(not recovered)".to_string(), |s| format!("{s:.2} s"))
        );
    }
    println!("unexpected closes: {unexpected} {closes:?}");
    for (k, v) in &errors {
        println!(
            "error {k}: {} — fix: {}",
            v["count"],
            v["fix"].as_str().unwrap_or("")
        );
    }
    if let Some(e) = &first_error {
        println!("first error: {e}");
    }
    if !server.is_null() {
        match server["bytes_per_connection"].as_f64() {
            Some(b) => println!(
                "server: RSS peak {} MiB, {b:.0} B per connection, CPU {:.1} s",
                sampler.server_peak_rss / (1 << 20),
                server["cpu_seconds"].as_f64().unwrap_or(0.0)
            ),
            None => println!(
                "server: RSS peak {} MiB, CPU {:.1} s; B per connection not measured: the server \
                 ran before this run ({} connections accepted, peak RSS {} MiB, {} MiB at this \
                 run's start) and reuses the memory it kept: restart it for a per-connection \
                 figure",
                sampler.server_peak_rss / (1 << 20),
                server["cpu_seconds"].as_f64().unwrap_or(0.0),
                sampler
                    .server_accepted_before
                    .map_or("?".to_owned(), |n| n.saturating_sub(1).to_string()),
                sampler.server_peak_before.unwrap_or(0) / (1 << 20),
                sampler.server_first.map_or(0, |f| f.0) / (1 << 20),
            ),
        }
    }
    if !me.is_null() {
        println!(
            "loadgen: RSS {} MiB, {:.0} B per connection, CPU {:.1} s",
            me["rss_end_bytes"].as_u64().unwrap_or(0) / (1 << 20),
            me["bytes_per_connection"].as_f64().unwrap_or(0.0),
            me["cpu_seconds"].as_f64().unwrap_or(0.0)
        );
    }
    if args.scenario == Scenario::Flood {
        println!("flood measures throughput, not latency (use echo for latency)");
    } else {
        println!("latency is measured from each message's scheduled send time (open loop, coordinated omission corrected)");
    }
    println!("reports in {}", args.out.display());
    if t.established == 0 {
        std::process::exit(1);
    }
    if missing > 0 {
        println!("FAILED: {missing} messages never arrived");
        std::process::exit(2);
    }
    Ok(())
}

/// The scenario as typed on the command line (`dm`, not `Dm`).
fn scenario_name(s: Scenario) -> String {
    use clap::ValueEnum;
    s.to_possible_value()
        .map_or_else(|| format!("{s:?}"), |v| v.get_name().to_owned())
}

/// The `error` answers by code, as JSON (codes never seen left out).
fn op_errors_by_code(counts: &[u64]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 {
            let code = worker::OP_ERROR_CODES.get(i).copied().unwrap_or("other");
            m.insert(code.into(), n.into());
        }
    }
    serde_json::Value::Object(m)
}

fn nofile() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return (1024, 1024);
    }
    (r.rlim_cur, r.rlim_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn proc_sampling_reads_self() {
        let (rss, cpu) = proc_sample("self").unwrap();
        assert!(rss > 1 << 20 && cpu >= 0.0);
        assert!(proc_peak_rss("self").unwrap() >= rss / 2);
    }

    #[test]
    fn a_server_that_held_more_before_the_run_gives_no_per_connection_figure() {
        const MIB: u64 = 1 << 20;
        // Fresh: its peak is about where it stands.
        assert!(!baseline_reused(20 * MIB, 22 * MIB));
        // Reused after a 100k run: it peaked at 60 MiB and holds 35 of it.
        assert!(baseline_reused(35 * MIB, 60 * MIB));
    }
}
