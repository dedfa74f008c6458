//! Delivery receipts: when a user confirms their inbox up to an offset, the senders of the
//! messages in the newly confirmed range learn which of theirs arrived. A receipt is stored in
//! the sender's inbox like a DM, so it reaches every connection of the sender on any node, and
//! one that comes while the sender is away is replayed when they resume.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol;

/// Most ids one receipt names: a confirmation of a long range sends several.
pub const MAX_IDS: usize = 500;

/// Most inbox entries one confirmation reads for its receipts (older ones get none).
pub const MAX_SCAN: usize = 10_000;

/// The fields of a stored inbox event a receipt needs.
#[derive(Deserialize)]
struct Stored<'a> {
    #[serde(borrow)]
    op: &'a str,
    #[serde(borrow, default)]
    from: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
}

/// The receipts for `recipient` confirming its inbox up to `upto`, given the entries of the
/// newly confirmed range in order: per sender (in order of their first message), the ids of
/// its messages (DMs from another user that carry an id), at most [`MAX_IDS`] per receipt.
/// Returns (sender, receipt event without its closing brace).
pub fn receipts<'a>(
    recipient: &str,
    payloads: impl IntoIterator<Item = &'a [u8]>,
    upto: u64,
    now_ms: u64,
) -> Vec<(Arc<str>, Bytes)> {
    let mut by_sender: Vec<(String, Vec<&RawValue>)> = Vec::new();
    for p in payloads {
        let Ok(e) = serde_json::from_slice::<Stored<'_>>(p) else {
            continue;
        };
        let (Some(from), Some(id)) = (e.from, e.id) else {
            continue;
        };
        if e.op != "msg" || from == recipient || id.get() == "null" {
            continue;
        }
        match by_sender.iter_mut().find(|(s, _)| *s == from) {
            Some((_, ids)) => ids.push(id),
            None => by_sender.push((from.into_owned(), vec![id])),
        }
    }
    let mut out = Vec::new();
    for (sender, ids) in by_sender {
        let sender: Arc<str> = Arc::from(sender);
        for chunk in ids.chunks(MAX_IDS) {
            let r = protocol::receipt_prefix(recipient, &sender, chunk, upto, now_ms);
            out.push((sender.clone(), r));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(r: &Bytes) -> serde_json::Value {
        let mut v = r.to_vec();
        v.push(b'}');
        serde_json::from_slice(&v).unwrap()
    }

    #[test]
    fn a_receipt_per_sender_names_their_ids_in_order() {
        let inbox = [
            r#"{"op":"msg","from":"alice","to":"bob","data":1,"ts":1,"id":"a1","stream":"inbox","offset":1,"epoch":"e"}"#,
            r#"{"op":"msg","from":"bob","to":"alice","data":2,"ts":1,"id":"b1","stream":"inbox","offset":2,"epoch":"e"}"#,
            r#"{"op":"msg","from":"carol","to":"bob","data":3,"ts":1,"id":7,"stream":"inbox","offset":3,"epoch":"e"}"#,
            r#"{"op":"msg","from":"billing","to":"bob","data":4,"ts":1,"stream":"inbox","offset":4,"epoch":"e"}"#,
            r#"{"op":"receipt","from":"alice","to":"bob","ids":["b0"],"upto":9,"ts":1,"stream":"inbox","offset":5,"epoch":"e"}"#,
            r#"{"op":"msg","from":"alice","to":"bob","data":{"id":"x"},"ts":1,"id":"a2","stream":"inbox","offset":6,"epoch":"e"}"#,
            "not json",
        ];
        let r = receipts("bob", inbox.iter().map(|s| s.as_bytes()), 6, 99);
        assert_eq!(r.len(), 2);
        assert_eq!(&*r[0].0, "alice");
        assert_eq!(
            event(&r[0].1),
            serde_json::json!({"op":"receipt","from":"bob","to":"alice","ids":["a1","a2"],"upto":6,"ts":99})
        );
        assert_eq!(&*r[1].0, "carol");
        assert_eq!(event(&r[1].1)["ids"], serde_json::json!([7]));
    }

    #[test]
    fn a_long_range_is_split() {
        let inbox: Vec<String> = (0..MAX_IDS + 3)
            .map(|i| format!(r#"{{"op":"msg","from":"a","to":"b","data":0,"ts":0,"id":{i}}}"#))
            .collect();
        let r = receipts("b", inbox.iter().map(|s| s.as_bytes()), 9, 0);
        assert_eq!(r.len(), 2);
        assert_eq!(event(&r[1].1)["ids"], serde_json::json!([500, 501, 502]));
    }
}
