//! Where a cold validation's time goes, step by step: `cargo run --release --example cold_profile`.
use sha2::{Digest, Sha256};
use std::sync::{Arc, RwLock};
use std::time::Instant;
use tokenbroker_core::keys::KeySet;
use tokenbroker_core::{b64, json, jws, Engine, EngineConfig, IssueRequest, Reason, ValidateRequest};

fn per_item(label: &str, n: usize, start: Instant) {
    println!("{label:<12}{:>8.2} us", start.elapsed().as_secs_f64() * 1e6 / n as f64);
}

fn main() {
    let mut keys = KeySet::new();
    keys.generate();
    let e = Engine::new(Arc::new(RwLock::new(keys)), EngineConfig::new("https://b")).unwrap();
    let scopes = vec!["tools:call".to_string()];
    let req = IssueRequest {
        client_id: "agent",
        audience: "https://a/mcp",
        scopes: &scopes,
        ttl_secs: Some(300),
        ..Default::default()
    };
    let toks: Vec<String> = (0..20000).map(|_| e.issue(&req, "s", u64::MAX, 1_800_000_000).unwrap().0).collect();
    let t = Instant::now();
    for tok in &toks {
        let _: [u8; 32] = Sha256::digest(tok.as_bytes()).into();
    }
    per_item("sha256", toks.len(), t);
    let t = Instant::now();
    for tok in &toks {
        std::hint::black_box(jws::parse(tok.as_bytes(), "token", Reason::Malformed).unwrap());
    }
    per_item("jws::parse", toks.len(), t);
    let payloads: Vec<Vec<u8>> =
        toks.iter().map(|t| b64::decode(t.split('.').nth(1).unwrap().as_bytes()).unwrap()).collect();
    let t = Instant::now();
    for p in &payloads {
        let m = json::parse_object(p).unwrap();
        std::hint::black_box(tokenbroker_core::claims::AccessClaims::from_json(&m).unwrap());
    }
    per_item("claims", toks.len(), t);
    let t = Instant::now();
    for tok in &toks {
        let r = ValidateRequest { token: tok.as_bytes(), audience: "https://a/mcp", ..Default::default() };
        e.validate(&r, 1_800_000_001).unwrap();
    }
    per_item("validate", toks.len(), t);
}
