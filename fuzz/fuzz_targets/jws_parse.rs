//! `jws::parse` on arbitrary bytes. Oracle: what it accepts is at most 8 KiB, has exactly
//! three non-empty segments, each the canonical base64url of what it decoded to, and a
//! header the strict JSON parser reads the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenbroker_core::jws::{self, MAX_COMPACT_BYTES};
use tokenbroker_core::{b64, json, Reason};

fuzz_target!(|data: &[u8]| {
    let Ok(compact) = jws::parse(data, "token", Reason::Malformed) else { return };
    assert!(data.len() <= MAX_COMPACT_BYTES);
    let segments: Vec<&[u8]> = data.split(|b| *b == b'.').collect();
    assert_eq!(segments.len(), 3);
    let header = b64::decode(segments[0]).expect("accepted header decodes");
    assert_eq!(b64::encode(&header).as_bytes(), segments[0], "non-canonical header accepted");
    assert_eq!(b64::encode(&compact.payload).as_bytes(), segments[1], "non-canonical payload accepted");
    assert_eq!(b64::encode(&compact.signature).as_bytes(), segments[2], "non-canonical signature accepted");
    assert_eq!(compact.signing_input.len(), segments[0].len() + 1 + segments[1].len());
    assert_eq!(json::parse_object(&header).expect("accepted header parses"), compact.header);
});
