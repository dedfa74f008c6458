//! The `switchboard` binary: flags, logging, jemalloc, shards, signals.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use switchboard::config::Options;
use switchboard::server::Server;
use tracing::{info, warn};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `error: what failed: why` on one line per cause, each said once: a cause whose text the
/// message before it already includes (errors that print their source) is skipped.
fn report(e: &anyhow::Error) -> String {
    let mut out = format!("error: {e}");
    let mut last = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !last.contains(&text) {
            out.push_str(&format!("\n  caused by: {text}"));
        }
        last = text;
    }
    out
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = Options::parse().load().context("configuration")?;
    let grace = Duration::from_millis(cfg.shutdown_grace_ms);
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handlers")?;
    let server = Server::start(cfg).context("starting the server")?;
    {
        let mut out = std::io::stdout().lock();
        for (a, tls) in server.local_addrs.iter().zip(server.tls_listeners()) {
            writeln!(
                out,
                "switchboard listening on {a} (shards={}, fd-table={}, capacity={}{})",
                server.shards,
                server.fd_table,
                server.capacity,
                if tls { ", tls" } else { "" }
            )?;
        }
        out.flush()?;
    }
    let mut stop_signal = 0;
    for sig in signals.forever() {
        if sig == SIGHUP {
            // Certificates: new handshakes use the new ones, open connections stay.
            for e in server.reload_tls() {
                warn!(error = %e, "TLS reload failed; the old certificate stays in use");
            }
            continue;
        }
        stop_signal = sig;
        break;
    }
    // One line when it is over (each shard's part is at debug level).
    let open: u64 = server
        .metrics
        .iter()
        .map(|m| {
            m.open_ws.load(std::sync::atomic::Ordering::Relaxed)
                + m.open_sse.load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    let shards = server.shards;
    let started = std::time::Instant::now();
    server.shutdown();
    // The shards finish within the grace period; a watchdog makes sure the process does too.
    std::thread::spawn(move || {
        std::thread::sleep(grace + Duration::from_millis(500));
        warn!("shutdown grace period over; exiting");
        std::process::exit(0);
    });
    let failed = server.join();
    let signal = match stop_signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    };
    if failed == 0 {
        info!(
            "stopped on {signal}: {open} connections closed with 1001 in {} ms ({shards} shards)",
            started.elapsed().as_millis()
        );
    } else {
        warn!(
            "stopped on {signal} in {} ms: {failed} of {shards} shards ended with an error",
            started.elapsed().as_millis()
        );
    }
    std::process::exit(0);
}
