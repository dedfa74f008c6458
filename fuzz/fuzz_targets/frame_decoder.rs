//! The frame header parser and unmasking: never panics; a parsed header's length matches
//! what the encoder would write; a prefix of a header is "need more bytes".
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard::testkit;
use switchboard::ws::frame;

fuzz_target!(|data: &[u8]| {
    match frame::parse_header(data) {
        Ok(Some((h, hl))) => {
            assert!(hl <= data.len() && hl <= frame::MAX_HEADER_LEN);
            for cut in 0..hl {
                assert_eq!(frame::parse_header(&data[..cut]), Ok(None));
            }
            let rest = &data[hl..];
            if let Some(m) = h.mask {
                let mut p = rest.to_vec();
                frame::apply_mask(&mut p, m, 0);
                frame::apply_mask(&mut p, m, 0);
                assert_eq!(p, rest, "masking twice is the identity");
            }
            // A frame re-encoded from the payload parses back to the same payload.
            let n = (h.payload_len as usize).min(rest.len());
            let mut enc = testkit::client_frame(0x2, &rest[..n], [7, 7, 7, 7]);
            let back = testkit::take_frame(&mut enc).unwrap().unwrap();
            assert_eq!(back.payload, &rest[..n]);
        }
        Ok(None) => assert!(data.len() < frame::MAX_HEADER_LEN),
        Err(_) => {}
    }
    let mut buf = data.to_vec();
    while let Ok(Some(_)) = testkit::take_frame(&mut buf) {}
});
