//! Heap allocations per message on the hot paths, counted: a global allocator (test builds
//! only) that counts the allocations of the thread that asked, so tests running beside it
//! do not disturb the count. `ALLOC_TRACE=1` prints a backtrace for each one counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use super::tests::Harness;
use crate::testkit;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
    static TRACE: Cell<bool> = const { Cell::new(false) };
}

fn bump() {
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            COUNT.with(|n| n.set(n.get() + 1));
            if TRACE.with(Cell::get) {
                on.set(false);
                eprintln!("ALLOC {}", std::backtrace::Backtrace::force_capture());
                on.set(true);
            }
        }
    });
}

// SAFETY: every call goes to the system allocator unchanged; counting touches only
// thread-locals without destructors.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        bump();
        unsafe { System.alloc(l) }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        bump();
        unsafe { System.alloc_zeroed(l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        bump();
        unsafe { System.realloc(p, l, new) }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`, counting this thread's heap allocations in it.
fn counted<R>(f: impl FnOnce() -> R) -> (R, u64) {
    COUNT.with(|n| n.set(0));
    let trace = std::env::var_os("ALLOC_TRACE").is_some();
    TRACE.with(|t| t.set(trace));
    COUNTING.with(|on| on.set(true));
    let r = f();
    COUNTING.with(|on| on.set(false));
    (r, COUNT.with(Cell::get))
}

#[test]
fn the_counter_sees_an_allocation() {
    let (v, n) = counted(|| vec![1u8; 10]);
    assert_eq!((v.len(), n), (10, 1));
}

#[test]
fn echo_allocates_nothing_per_message_after_warm_up() {
    let cfg = crate::config::Config {
        echo: true,
        ..super::tests::config()
    };
    let mut h = Harness::new(cfg);
    let (_key, pipe) = h.accept(1 << 20);
    h.send(&pipe, testkit::upgrade_request("t", "/").as_bytes());
    pipe.0.borrow_mut().client_read();
    let frame = testkit::client_frame(0x1, br#"{"op":"echo","n":12345}"#, [1, 2, 3, 4]);
    let mut total = 0;
    for i in 0..10_100 {
        pipe.0.borrow_mut().client_write(&frame);
        let ((), n) = counted(|| h.turn());
        let out = pipe.0.borrow_mut().client_read();
        assert_eq!(out.len(), 2 + 23, "one echoed frame");
        if i >= 100 {
            total += n;
        }
    }
    assert_eq!(total, 0, "allocations in 10k echoes after warm-up");
}

/// A DM between two users of this shard: the event is written into a reused buffer and
/// copied into the recipient's outbox, the ack likewise; the recipient's name and the
/// request's id stay borrowed (they become owned only for mail or the broker).
#[test]
fn a_dm_allocates_nothing_per_message_after_warm_up() {
    let cfg = crate::config::Config {
        // One virtual instant: the per-connection rate limit would refuse after the burst.
        max_messages_per_sec: 0,
        ..super::tests::config()
    };
    let mut h = Harness::new(cfg);
    let (_a, alice, _) = h.open("/ws?user=alice", 1 << 20);
    let (_b, bob, _) = h.open("/ws?user=bob", 1 << 20);
    let frame = testkit::client_frame(
        0x1,
        br#"{"op":"send","to":"bob","data":{"text":"hi"},"id":"c1"}"#,
        [1, 2, 3, 4],
    );
    let mut total = 0;
    for i in 0..10_100 {
        alice.0.borrow_mut().client_write(&frame);
        let ((), n) = counted(|| h.turn());
        let ack = alice.0.borrow_mut().client_read();
        let msg = bob.0.borrow_mut().client_read();
        assert!(!ack.is_empty() && !msg.is_empty(), "acked and delivered");
        if i >= 100 {
            total += n;
        }
    }
    assert_eq!(total, 0, "allocations in 10k DMs after warm-up");
}
