//! The deterministic simulation (`src/sim/`): many seeds of random clients, shards and mail
//! in virtual time, invariants checked after every step; every other seed with a store
//! (qos-1 sends, inboxes, delayed commits, and the audit that every acknowledged send is
//! stored exactly once), every fourth a cluster of two nodes over a model broker that drops
//! its connections (`src/sim/cluster.rs`).
//!
//! `SIM_SEEDS=N` plays seeds 0..N (default 500), `SIM_STEPS=S` steps per seed (default 1500),
//! `SIM_SEED=S` replays one seed exactly (a failure prints the command), `SIM_DEBUG=<client>`
//! prints that client's event-stream blocks as it reads them.

use std::time::Instant;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn seeded_simulation_keeps_every_invariant() {
    let steps = env_u64("SIM_STEPS").unwrap_or(1500);
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(s) => vec![s],
        None => (0..env_u64("SIM_SEEDS").unwrap_or(500)).collect(),
    };
    let started = Instant::now();
    let mut total = switchboard::sim::Stats::default();
    for &seed in &seeds {
        let shards = 1 + (seed % 4) as usize;
        let run = std::panic::catch_unwind(|| switchboard::sim::run(seed, shards, steps));
        match run {
            Ok(s) => total += s,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!(
                    "simulation failed with seed {seed} ({shards} shards): {msg}\nreplay: SIM_SEED={seed} SIM_STEPS={steps} cargo test --test simulation -- --nocapture"
                );
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "simulated {} seeds, {} steps in {secs:.2} s ({:.0} steps/s): {total:?}",
        seeds.len(),
        total.steps,
        total.steps as f64 / secs
    );
    // The runs must exercise what they claim to.
    if seeds.len() >= 20 {
        assert!(
            total.broker_carried > 0 && total.broker_faults > 0 && total.broker_lost > 0,
            "the cluster worlds never carried, lost or faulted: {total:?}"
        );
        assert!(
            total.dms_received > 0 && total.pubs_received > 0,
            "{total:?}"
        );
        assert!(
            total.heartbeat_closes > 0,
            "no unanswered ping ever closed: {total:?}"
        );
        assert!(
            total.slow_consumer_closes > 0,
            "no slow reader was ever cut: {total:?}"
        );
        assert!(
            total.qos1_acked > 0 && total.store_batches > 0,
            "no qos-1 send was ever stored and acked: {total:?}"
        );
        assert!(
            total.resumed > 0 && total.replayed > 0,
            "no resume ever replayed anything: {total:?}"
        );
        assert!(total.crashes > 0, "the process never crashed: {total:?}");
        assert!(
            total.sse_events > 0,
            "no event stream got an event: {total:?}"
        );
        assert!(
            total.store_refused > 0,
            "the store never refused a request: {total:?}"
        );
    }
}
