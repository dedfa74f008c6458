//! The SSE machine alone: what a request asks for, and event ids.

use super::{event_head, Request, HEAD, TRAILER};
use crate::auth::Grant;
use crate::conn::buffers::INLINE_MAX;
use crate::conn::Conn;
use crate::store::{Epoch, Since};

fn head<T>(c: &mut Conn<T>, payload: &[u8]) -> String {
    let mut h = [0u8; INLINE_MAX];
    let n = event_head(c, payload, &mut h);
    String::from_utf8(h[..n].to_vec()).unwrap()
}

#[test]
fn last_event_id_wins_over_since_and_channels_are_checked_and_kept_once() {
    let r = Request::parse(
        Some("channel=a&since=1f:3&channel=b&channel=a"),
        Some("2a:9"),
        None,
    )
    .unwrap();
    assert_eq!(
        r.since,
        Some(Since::Position {
            epoch: Some(Epoch(0x2a)),
            offset: 9
        })
    );
    let names: Vec<&str> = r.channels.iter().map(|c| &**c).collect();
    assert_eq!(names, ["a", "b"]);
    // A counted id (an anonymous stream's) is no position: `since` applies.
    let r = Request::parse(Some("since=confirmed"), Some("17"), None).unwrap();
    assert_eq!(r.since, Some(Since::Confirmed));

    let refused =
        |q: &str, grant: Option<&Grant>| Request::parse(Some(q), None, grant).unwrap_err();
    assert_eq!(refused("since=soon", None).status, 400);
    assert_eq!(refused("channel=a%20b", None).status, 400);
    assert_eq!(refused("channel=private:x", None).status, 403);
    let grant = Grant {
        exp: u64::MAX,
        channels: vec!["private:x".into()],
    };
    assert!(Request::parse(Some("channel=private:x"), None, Some(&grant)).is_ok());
    let many: Vec<String> = (0..=crate::protocol::MAX_CHANNELS_PER_CONN)
        .map(|i| format!("channel=c{i}"))
        .collect();
    assert_eq!(refused(&many.join("&"), None).status, 400);
}

#[test]
fn a_named_streams_ids_are_inbox_positions_from_the_first_event() {
    // Opened at the top: no id until the store placed the inbox (the browser keeps its
    // last one), then positions.
    let mut c = Conn::new((), 1, 0);
    let r = Request::parse(None, None, None).unwrap();
    c.extra_mut().cursor = Some(Box::new(r.cursor()));
    assert_eq!(head(&mut c, b"{}"), "data: ");
    let cur = c.extra_mut().cursor.as_mut().unwrap();
    cur.epoch = Some(Epoch(0xab));
    cur.next = 8;
    assert_eq!(head(&mut c, b"{}"), "id: ab:7\ndata: ");

    // Resuming: the position it resumes from until the store answers.
    let mut c = Conn::new((), 1, 0);
    let r = Request::parse(None, Some("ab:5"), None).unwrap();
    c.extra_mut().cursor = Some(Box::new(r.cursor()));
    assert_eq!(head(&mut c, b"{}"), "id: ab:5\ndata: ");

    // Anonymous: counted.
    let mut c = Conn::new((), 1, 0);
    assert_eq!(head(&mut c, b"{}"), "id: 1\ndata: ");
    assert_eq!(head(&mut c, b"{}"), "id: 2\ndata: ");
}

#[test]
fn the_head_asks_for_a_quick_retry_and_events_end_with_a_blank_line() {
    let head = std::str::from_utf8(HEAD).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(head.contains("Content-Type: text/event-stream\r\n"));
    assert!(head.ends_with("\r\n\r\nretry: 2000\n\n"));
    assert_eq!(TRAILER, b"\n\n");
}
