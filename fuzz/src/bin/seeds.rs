//! Writes the seed corpus of every target into `corpus/<target>/` (run from `fuzz/`:
//! `cargo run --bin seeds`). The seeds are the fixtures' own tokens, proofs and requests,
//! plus a few near misses, so each run starts from inputs that reach the deepest checks.

use std::fs;
use std::path::Path;
use tokenbroker_fuzz::{fixtures, request, AUDIENCE, METHOD, URI};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus directory");
    fs::write(dir.join(name), bytes).expect("seed");
}

fn main() {
    let f = fixtures();
    for (i, t) in f.tokens.iter().chain(&f.proofs).enumerate() {
        write("jws_parse", &format!("compact-{i}"), t.as_bytes());
        let header = t.split('.').next().expect("header");
        let decoded = tokenbroker_core::b64::decode(header.as_bytes()).expect("base64url");
        write("json_parse", &format!("header-{i}"), &decoded);
        let payload = t.split('.').nth(1).expect("payload");
        let decoded = tokenbroker_core::b64::decode(payload.as_bytes()).expect("base64url");
        write("json_parse", &format!("claims-{i}"), &decoded);
    }
    write("json_parse", "duplicate", br#"{"a":1,"b":{"c":2,"c":3}}"#);
    write("json_parse", "numbers", br#"{"n":[1e308,-0,1.5e-300,18446744073709551616]}"#);
    write("jws_parse", "empty-segment", b"eyJhbGciOiJFZERTQSJ9..c2ln");
    for (i, p) in f.proofs.iter().enumerate() {
        write("dpop_proof", &format!("proof-{i}"), p.as_bytes());
    }
    for (i, r) in f.requests.iter().enumerate() {
        write("engine_validate", &format!("request-{i}"), r);
    }
    let wrong_audience = request(&f.tokens[0], "https://other.example/mcp", None, None, None, None);
    write("engine_validate", "wrong-audience", &wrong_audience);
    let missing_proof = request(&f.tokens[1], AUDIENCE, None, Some(METHOD), Some(URI), None);
    write("engine_validate", "missing-proof", &missing_proof);
}
