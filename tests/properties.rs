//! Property tests: frames and HTTP requests parsed at every split point, a whole session fed
//! a request and frames cut at a random point, and the timer wheel against a simple model.

use std::collections::BTreeMap;

use proptest::prelude::*;
use switchboard::http::request::{self, Method};
use switchboard::testkit;
use switchboard::timer::Wheel;
use switchboard::ws::frame::{self, OpCode};

fn payload_len() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..=130, 65530usize..=65540, Just(70_000)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Encoded client frames parse back at every split point: a cut inside the header is
    /// "need more bytes", and the header plus the unmasked payload give back the input.
    #[test]
    fn frames_round_trip_at_every_split(
        len in payload_len(),
        seed in any::<u8>(),
        opcode in prop::sample::select(vec![0x0u8, 0x1, 0x2, 0x8, 0x9, 0xA]),
        fin in any::<bool>(),
        mask in any::<[u8; 4]>(),
    ) {
        let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
        let mut bytes = Vec::new();
        testkit::put_frame(&mut bytes, (if fin { 0x80 } else { 0 }) | opcode, &payload, Some(mask));
        let (h, hl) = frame::parse_header(&bytes).unwrap().unwrap();
        prop_assert_eq!(hl, frame::header_len(len) + 4);
        prop_assert_eq!(h.payload_len as usize, len);
        prop_assert_eq!(h.fin, fin);
        prop_assert_eq!(u8::from(h.opcode), opcode);
        for cut in 0..hl {
            prop_assert_eq!(frame::parse_header(&bytes[..cut]), Ok(None));
        }
        // Unmasking in two pieces at every split point of a short payload (all of them), or
        // at sampled points of a long one, gives the payload back.
        let step = if len <= 130 { 1 } else { 997 };
        for cut in (0..=len).step_by(step) {
            let mut p = bytes[hl..].to_vec();
            let (a, b) = p.split_at_mut(cut);
            frame::apply_mask(a, mask, 0);
            frame::apply_mask(b, mask, cut);
            prop_assert_eq!(&p, &payload);
        }
        // Server frames: encode → parse gives the payload back.
        if opcode == 0x1 || opcode == 0x2 {
            let f = frame::encode(OpCode::from(opcode), &payload);
            let (sh, shl) = frame::parse_header(&f).unwrap().unwrap();
            prop_assert!(sh.mask.is_none());
            prop_assert_eq!(&f[shl..], &payload[..]);
        }
    }

    /// Any request we can describe parses to what was described, and every proper prefix of
    /// its head is "need more bytes".
    #[test]
    fn http_requests_parse_at_every_split(
        method in prop::sample::select(vec!["GET", "POST", "HEAD", "PUT"]),
        path in "/[a-z0-9/._-]{0,40}",
        query in proptest::option::of("[a-z]{1,8}=[a-zA-Z0-9%+]{0,16}(&[a-z]{1,8}=[a-z0-9]{0,8}){0,3}"),
        extra in prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,20}", "[ -~]{0,40}"), 0..8),
        body in proptest::option::of("[ -~]{0,64}"),
        upgrade in any::<bool>(),
    ) {
        let mut head = format!("{method} {path}");
        if let Some(q) = &query {
            head.push('?');
            head.push_str(q);
        }
        head.push_str(" HTTP/1.1\r\nHost: t\r\n");
        for (n, v) in &extra {
            let lower = n.to_ascii_lowercase();
            if ["upgrade", "connection", "content-length", "transfer-encoding"].contains(&lower.as_str())
                || lower.starts_with("sec-websocket") || lower == "origin" || lower == "authorization"
                || lower == "last-event-id"
            {
                continue;
            }
            head.push_str(&format!("{n}: {}\r\n", v.trim()));
        }
        if upgrade {
            head.push_str("Upgrade: websocket\r\nConnection: Upgrade\r\n");
        }
        if let Some(b) = &body {
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.clone().into_bytes();
        if let Some(b) = &body {
            bytes.extend_from_slice(b.as_bytes());
        }
        let r = request::parse(&bytes).unwrap().unwrap();
        prop_assert_eq!(r.head_len, head.len());
        prop_assert_eq!(&r.path, &path);
        prop_assert_eq!(r.query.as_deref(), query.as_deref());
        let want = match method {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "HEAD" => Method::Head,
            _ => Method::Other,
        };
        prop_assert_eq!(r.method, Some(want));
        prop_assert_eq!(r.upgrade_websocket && r.connection_upgrade, upgrade);
        prop_assert_eq!(r.content_length, body.as_ref().map(|b| b.len()));
        for cut in 0..head.len() {
            prop_assert_eq!(request::parse(&bytes[..cut]), Ok(None), "cut at {}", cut);
        }
    }

    /// The wheel fires exactly the entries whose deadline has passed, none early, none lost,
    /// none twice, whatever the mix of arms (new and replaced deadlines), cancels and polls.
    #[test]
    fn wheel_matches_a_reference_model(
        ops in prop::collection::vec((0u8..10, 0u64..200_000, any::<u16>()), 1..400),
    ) {
        let mut wheel = Wheel::new(0);
        let mut model: BTreeMap<u32, u64> = BTreeMap::new();
        let mut now = 0u64;
        for (op, x, pick) in ops {
            match op {
                0..=4 => {
                    // Deadlines from the past to far beyond the first level.
                    let deadline = match x % 4 {
                        0 => now.saturating_sub(x % 50),
                        1 => now + x % 64,
                        2 => now + x % 5_000,
                        _ => now + x,
                    };
                    // Keys are slots: a small range, so arming an armed key (a new
                    // deadline) and re-arming a fired or cancelled one both happen.
                    let key = u32::from(pick % 64);
                    wheel.arm(key, deadline);
                    model.insert(key, deadline);
                }
                5 | 6 => {
                    let key = u32::from(pick % 64);
                    prop_assert_eq!(wheel.cancel(key), model.remove(&key).is_some());
                }
                _ => {
                    now += match x % 3 { 0 => x % 3, 1 => x % 700, _ => x % 90_000 };
                    let mut out = Vec::new();
                    while wheel.poll(now, &mut out, 64) == 64 {}
                    let mut fired = out.clone();
                    fired.sort_unstable();
                    let mut due: Vec<u32> = model.iter().filter(|(_, &d)| d <= now).map(|(&i, _)| i).collect();
                    due.sort_unstable();
                    prop_assert_eq!(&fired, &due, "at {}", now);
                    for id in fired {
                        model.remove(&id);
                        prop_assert!(!wheel.is_armed(id));
                    }
                    if let Some(next) = wheel.next_expiration() {
                        let earliest = model.values().min().copied().unwrap();
                        prop_assert!(next <= earliest.max(now), "next {} earliest {}", next, earliest);
                    }
                }
            }
            prop_assert_eq!(wheel.len(), model.len());
            for (&key, &deadline) in &model {
                prop_assert_eq!(wheel.deadline(key), Some(deadline));
            }
            wheel.check_invariants();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A whole session gets an upgrade and a batch of requests cut at random points, and
    /// answers the same bytes as when they come in one piece.
    #[test]
    fn session_answers_the_same_whatever_the_split(
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        n in 1usize..12,
    ) {
        let mut input = testkit::upgrade_request("t", "/ws?user=p").into_bytes();
        for i in 0..n {
            let op = match i % 3 {
                0 => format!(r#"{{"op":"sub","channel":"c{i}","id":{i}}}"#),
                1 => format!(r#"{{"op":"ping","data":{i}}}"#),
                _ => format!(r#"{{"op":"pub","channel":"c0","data":"{}","id":{i}}}"#, "x".repeat(i * 40)),
            };
            input.extend(testkit::text_frame(&op));
        }
        let whole = run_session(&input, &[]);
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(input.len())).collect();
        at.sort_unstable();
        let split = run_session(&input, &at);
        prop_assert_eq!(&split, &whole);
        // 101, the welcome, then one answer per request, plus our own publication to c0
        // (subscribed by the first request).
        let head = testkit::parse_response_head(&whole).unwrap().unwrap();
        prop_assert_eq!(head.status, 101);
        let mut rest = whole[head.head_len..].to_vec();
        let mut frames = 0;
        while let Some(f) = testkit::take_frame(&mut rest).unwrap() {
            prop_assert_eq!(f.opcode, 0x1);
            frames += 1;
        }
        let expected = 1 + (0..n).map(|i| if i % 3 == 2 { 2 } else { 1 }).sum::<usize>();
        prop_assert_eq!(frames, expected);
    }
}

/// Feeds `input` to a one-shard session, cut at `cuts`, one turn per piece; returns what the
/// client received.
fn run_session(input: &[u8], cuts: &[usize]) -> Vec<u8> {
    use switchboard::config::Config;

    use switchboard::router::{Router, Shared};
    use switchboard::sim::SimSocket;
    let shared = Shared::standalone(Config::default(), 1);
    let mut s: Router<SimSocket> = Router::new(0, 1, shared, 0, 1_800_000_000_000);
    let pipe = SimSocket::new(1 << 20);
    let key = s.accept(pipe.clone(), true);
    let mut pieces = Vec::new();
    let mut from = 0;
    for &c in cuts.iter().chain(std::iter::once(&input.len())) {
        pieces.push(&input[from..c.max(from)]);
        from = c.max(from);
    }
    let mut out = Vec::new();
    for p in pieces {
        pipe.0.borrow_mut().client_write(p);
        s.set_clock(1, 1_800_000_000_001);
        s.on_readable(key, false);
        s.on_timers();
        s.post_mail(|_, _| panic!("one shard mails nobody"));
        s.flush();
        s.check_invariants();
        out.extend(pipe.0.borrow_mut().client_read());
    }
    out
}
