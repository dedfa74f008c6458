//! The HTTP request head parser: never panics, and a request cut short is "need more bytes"
//! (or the same error), never a different request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard::http::request::{parse, query_params};

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Ok(Some(r)) = &whole {
        assert!(r.head_len <= data.len());
        // The head alone parses to the same request.
        assert_eq!(parse(&data[..r.head_len]).as_ref(), Ok(&Some(r.clone())));
        for cut in [r.head_len / 2, r.head_len.saturating_sub(1)] {
            match parse(&data[..cut]) {
                Ok(Some(_)) => panic!("a prefix of {cut} bytes parsed as a complete request"),
                Ok(None) | Err(_) => {}
            }
        }
        let _ = query_params(r.query.as_deref(), "channel").count();
    }
});
