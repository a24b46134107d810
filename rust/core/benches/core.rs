//! `cargo bench -p tokenbroker-core`: the engine's hot paths against the raw Ed25519
//! verification rate (the physical limit of a cold validate).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ed25519_dalek::Signer;
use std::hint::black_box;
use std::sync::{Arc, RwLock};
use tokenbroker_core::claims::Confirmation;
use tokenbroker_core::dpop::ProofSigner;
use tokenbroker_core::keys::KeySet;
use tokenbroker_core::replay::RotatingBloom;
use tokenbroker_core::{Engine, EngineConfig, IssueRequest, ValidateRequest};

const AUD: &str = "https://mcp.example.com/mcp";

fn engine() -> Engine {
    let mut keys = KeySet::new();
    keys.generate();
    Engine::new(Arc::new(RwLock::new(keys)), EngineConfig::new("https://broker.example")).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn issue(e: &Engine, cnf: Option<Confirmation>) -> String {
    issue_at(e, cnf, now())
}

fn issue_at(e: &Engine, cnf: Option<Confirmation>, at: u64) -> String {
    let scopes = vec!["tools:call".to_string()];
    let (dpop_jkt, cert_thumbprint) = match &cnf {
        Some(Confirmation::DpopJkt(j)) => (Some(j.as_str()), None),
        Some(Confirmation::CertThumbprint(x)) => (None, Some(x.as_str())),
        None => (None, None),
    };
    let req = IssueRequest {
        client_id: "agent",
        audience: AUD,
        scopes: &scopes,
        ttl_secs: Some(300),
        dpop_jkt,
        cert_thumbprint,
        once: false,
        ..Default::default()
    };
    e.issue(&req, "s", u64::MAX, at).unwrap().0
}

fn benches(c: &mut Criterion) {
    let e = engine();
    let t = now();

    let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let msg = issue_at(&e, None, t);
    let sig = key.sign(msg.as_bytes());
    let vk = key.verifying_key();
    c.bench_function("ed25519_verify_strict_raw", |b| {
        b.iter(|| vk.verify_strict(black_box(msg.as_bytes()), &sig).unwrap())
    });

    c.bench_function("validate_cold", |b| {
        b.iter_batched(
            || issue_at(&e, None, t),
            |tok| {
                e.validate(&ValidateRequest { token: tok.as_bytes(), audience: AUD, ..Default::default() }, t).unwrap()
            },
            BatchSize::SmallInput,
        )
    });

    let t = now();
    let warm = issue_at(&e, None, t);
    c.bench_function("validate_warm", |b| {
        b.iter(|| {
            e.validate(&ValidateRequest { token: warm.as_bytes(), audience: AUD, ..Default::default() }, t).unwrap()
        })
    });

    let t = now();
    let signer = ProofSigner::generate();
    let bound = issue_at(&e, Some(Confirmation::DpopJkt(signer.jkt().to_owned())), t);
    let mut n = 0u64;
    c.bench_function("validate_dpop_cached_token_fresh_proof", |b| {
        b.iter_batched(
            || {
                n += 1;
                signer.sign("POST", AUD, Some(bound.as_bytes()), t, &format!("bench-{n}"))
            },
            |proof| {
                let req = ValidateRequest {
                    token: bound.as_bytes(),
                    audience: AUD,
                    dpop_proof: Some(proof.as_bytes()),
                    http_method: Some("POST"),
                    http_uri: Some(AUD),
                    cert_thumbprint: None,
                    required_scopes: &[],
                };
                e.validate(&req, t).unwrap()
            },
            BatchSize::SmallInput,
        )
    });

    let t = now();
    let mut group = c.benchmark_group("validate_batch_cold");
    group.throughput(Throughput::Elements(64));
    group.bench_function("64", |b| {
        b.iter_batched(
            || (0..64).map(|_| issue_at(&e, None, t)).collect::<Vec<_>>(),
            |toks| {
                let reqs: Vec<ValidateRequest> = toks
                    .iter()
                    .map(|t| ValidateRequest { token: t.as_bytes(), audience: AUD, ..Default::default() })
                    .collect();
                e.validate_batch(&reqs, t)
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();

    let bloom = RotatingBloom::new(1_000_000, 0.001, 65);
    let mut i = 0u64;
    c.bench_function("bloom_check_and_insert", |b| {
        b.iter(|| {
            i += 1;
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
            k[8..16].copy_from_slice(&i.rotate_left(17).wrapping_mul(0xC2B2_AE3D_27D4_EB4F).to_le_bytes());
            bloom.check_and_insert(black_box(&k), 1000)
        })
    });

    c.bench_function("issue", |b| b.iter(|| issue(&e, None)));
}

criterion_group!(core, benches);
criterion_main!(core);
