//! The engine end to end: issue, validate, and the rejections of DESIGN.md section 3.

use ed25519_dalek::Signer;
use serde_json::{json, Value};
use std::sync::{Arc, RwLock};
use tokenbroker_core::b64;
use tokenbroker_core::claims::Confirmation;
use tokenbroker_core::dpop::ProofSigner;
use tokenbroker_core::keys::{verify_ed25519, KeySet};
use tokenbroker_core::replay::Mark;
use tokenbroker_core::{Engine, EngineConfig, IssueRequest, Reason, ReplayRecord, ValidateRequest};

const AUD: &str = "https://mcp.example.com/mcp";
const NOW: u64 = 1_800_000_000;

fn engine() -> Engine {
    let mut keys = KeySet::new();
    keys.generate();
    Engine::new(Arc::new(RwLock::new(keys)), EngineConfig::new("https://broker.example")).unwrap()
}

fn issue(e: &Engine, cnf: Option<Confirmation>, once: bool) -> String {
    let scopes = vec!["tools:read".to_string()];
    let (dpop_jkt, cert_thumbprint) = match &cnf {
        Some(Confirmation::DpopJkt(j)) => (Some(j.as_str()), None),
        Some(Confirmation::CertThumbprint(x)) => (None, Some(x.as_str())),
        None => (None, None),
    };
    let req = IssueRequest {
        client_id: "agent-1",
        audience: AUD,
        scopes: &scopes,
        ttl_secs: Some(300),
        dpop_jkt,
        cert_thumbprint,
        once,
        ..Default::default()
    };
    e.issue(&req, "sess-1", u64::MAX, NOW).unwrap().0
}

fn validate(e: &Engine, token: &str, now: u64) -> Result<(), Reason> {
    e.validate(&ValidateRequest { token: token.as_bytes(), audience: AUD, ..Default::default() }, now)
        .map(|_| ())
        .map_err(|r| r.reason)
}

#[test]
fn rfc8037_a4_known_answer() {
    // RFC 8037 Appendix A.1 key, A.4 signature over A.4's JWS signing input.
    let d: [u8; 32] = b64::decode(b"nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A").unwrap().try_into().unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&d);
    assert_eq!(b64::encode(key.verifying_key().as_bytes()), "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo");
    let input = b"eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc";
    let expected = "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";
    assert_eq!(b64::encode(&key.sign(input).to_bytes()), expected);
    verify_ed25519(&key.verifying_key(), input, &b64::decode(expected.as_bytes()).unwrap()).unwrap();
}

#[test]
fn issued_token_validates_and_expires() {
    let e = engine();
    let t = issue(&e, None, false);
    assert_eq!(validate(&e, &t, NOW), Ok(()));
    assert_eq!(validate(&e, &t, NOW), Ok(()), "cached path");
    assert_eq!(validate(&e, &t, NOW + 300 + 5), Err(Reason::Expired));
    assert_eq!(validate(&e, &t, NOW - 60), Err(Reason::NotYetValid));
    let other =
        e.validate(&ValidateRequest { token: t.as_bytes(), audience: "https://other/mcp", ..Default::default() }, NOW);
    assert_eq!(other.unwrap_err().reason, Reason::WrongAudience);
}

#[test]
fn every_single_byte_change_is_rejected() {
    let e = engine();
    let t = issue(&e, None, false);
    let bytes = t.as_bytes();
    for i in 0..bytes.len() {
        for replacement in [b'A', b'_', b'.', b'=', 0u8] {
            if bytes[i] == replacement {
                continue;
            }
            let mut m = bytes.to_vec();
            m[i] = replacement;
            let m = String::from_utf8_lossy(&m).into_owned();
            assert!(validate(&e, &m, NOW).is_err(), "byte {i} -> {replacement} accepted");
        }
    }
}

#[test]
fn a_token_from_another_key_or_issuer_is_rejected() {
    let a = engine();
    let b = engine();
    let t = issue(&a, None, false);
    assert_eq!(validate(&b, &t, NOW), Err(Reason::UnknownKey));
    let mut keys = KeySet::new();
    keys.generate();
    let shared = Arc::new(RwLock::new(keys));
    let c = Engine::new(shared.clone(), EngineConfig::new("https://c")).unwrap();
    let d = Engine::new(shared, EngineConfig::new("https://d")).unwrap();
    assert_eq!(validate(&d, &issue(&c, None, false), NOW), Err(Reason::WrongIssuer));
}

#[test]
fn retired_key_stops_validating_even_from_cache() {
    let e = engine();
    let t = issue(&e, None, false);
    assert_eq!(validate(&e, &t, NOW), Ok(()));
    let old = e.keys().read().unwrap().active_kid().unwrap().to_owned();
    e.keys().write().unwrap().rotate();
    assert_eq!(validate(&e, &t, NOW), Ok(()), "rotation keeps the previous key");
    e.keys().write().unwrap().retire(&old).unwrap();
    assert_eq!(validate(&e, &t, NOW), Err(Reason::UnknownKey));
}

fn resign(e: &Engine, header: Value, claims: Value) -> String {
    let input =
        format!("{}.{}", b64::encode(header.to_string().as_bytes()), b64::encode(claims.to_string().as_bytes()));
    let (_, sig) = e.keys().read().unwrap().sign(input.as_bytes()).unwrap();
    format!("{input}.{}", b64::encode(&sig))
}

fn claims_of(t: &str) -> Value {
    serde_json::from_slice(&b64::decode(t.split('.').nth(1).unwrap().as_bytes()).unwrap()).unwrap()
}

#[test]
fn header_variants_are_rejected_with_their_reason() {
    let e = engine();
    let t = issue(&e, None, false);
    let kid = e.keys().read().unwrap().active_kid().unwrap().to_owned();
    let claims = claims_of(&t);
    let good = json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid});
    assert_eq!(validate(&e, &resign(&e, good.clone(), claims.clone()), NOW), Ok(()));
    let mut cases = vec![
        (json!({"alg": "none", "typ": "at+jwt", "kid": kid}), Reason::UnsupportedAlgorithm),
        (json!({"alg": "HS256", "typ": "at+jwt", "kid": kid}), Reason::UnsupportedAlgorithm),
        (json!({"alg": "Ed25519", "typ": "at+jwt", "kid": kid}), Reason::UnsupportedAlgorithm),
        (json!({"typ": "at+jwt", "kid": kid}), Reason::UnsupportedAlgorithm),
        (json!({"alg": "EdDSA", "typ": "JWT", "kid": kid}), Reason::Malformed),
        (json!({"alg": "EdDSA", "kid": kid}), Reason::Malformed),
        (json!({"alg": "EdDSA", "typ": "at+jwt"}), Reason::Malformed),
        (json!({"alg": "EdDSA", "typ": "at+jwt", "kid": "nope"}), Reason::UnknownKey),
    ];
    for forbidden in ["jku", "x5u", "jwk", "crit", "b64", "cty"] {
        let mut h = good.clone();
        h[forbidden] = json!("x");
        cases.push((h, Reason::Malformed));
    }
    for (header, reason) in cases {
        assert_eq!(validate(&e, &resign(&e, header.clone(), claims.clone()), NOW), Err(reason), "{header}");
    }
}

#[test]
fn dpop_bound_token_needs_a_fresh_proof_from_the_bound_key() {
    let e = engine();
    let client = ProofSigner::generate();
    let t = issue(&e, Some(Confirmation::DpopJkt(client.jkt().into())), false);
    let uri = "https://mcp.example.com/mcp";
    let req = |proof: Option<&str>, method: &str, u: &str| {
        e.validate(
            &ValidateRequest {
                token: t.as_bytes(),
                audience: AUD,
                dpop_proof: proof.map(str::as_bytes),
                http_method: Some(method),
                http_uri: Some(u),
                cert_thumbprint: None,
                required_scopes: &[],
            },
            NOW,
        )
        .map(|_| ())
        .map_err(|r| r.reason)
    };
    let p1 = client.sign("POST", uri, Some(t.as_bytes()), NOW, "proof-1");
    assert_eq!(req(Some(&p1), "POST", "https://MCP.example.com:443/mcp?x=1"), Ok(()));
    assert_eq!(req(None, "POST", uri), Err(Reason::ProofMissing));
    let p2 = client.sign("GET", uri, Some(t.as_bytes()), NOW, "proof-2");
    assert_eq!(req(Some(&p2), "POST", uri), Err(Reason::ProofInvalid), "htm");
    let p3 = client.sign("POST", "https://evil.example/mcp", Some(t.as_bytes()), NOW, "proof-3");
    assert_eq!(req(Some(&p3), "POST", uri), Err(Reason::ProofInvalid), "htu");
    let p4 = client.sign("POST", uri, Some(b"another token"), NOW, "proof-4");
    assert_eq!(req(Some(&p4), "POST", uri), Err(Reason::ProofInvalid), "ath");
    let p5 = client.sign("POST", uri, Some(t.as_bytes()), NOW - 120, "proof-5");
    assert_eq!(req(Some(&p5), "POST", uri), Err(Reason::ProofInvalid), "old iat");
    let p6 = client.sign("POST", uri, Some(t.as_bytes()), NOW + 60, "proof-6");
    assert_eq!(req(Some(&p6), "POST", uri), Err(Reason::ProofInvalid), "future iat");
    let thief = ProofSigner::generate();
    let p7 = thief.sign("POST", uri, Some(t.as_bytes()), NOW, "proof-7");
    assert_eq!(req(Some(&p7), "POST", uri), Err(Reason::BindingMismatch));
    let p8 = client.sign("POST", uri, Some(t.as_bytes()), NOW, "proof-8");
    assert_eq!(req(Some(&p8), "POST", uri), Ok(()));
}

fn es256_proof(
    key: &p256::ecdsa::SigningKey,
    jwk_extra: Option<(&str, &str)>,
    token: &str,
    uri: &str,
) -> (String, String) {
    use p256::ecdsa::signature::Signer as _;
    let point = key.verifying_key().to_encoded_point(false);
    let (x, y) = (b64::encode(point.x().unwrap()), b64::encode(point.y().unwrap()));
    let mut jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y});
    if let Some((k, v)) = jwk_extra {
        jwk[k] = json!(v);
    }
    let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk});
    let claims = json!({"jti": format!("es-{}", rand_jti()), "htm": "POST", "htu": uri, "iat": NOW,
                        "ath": tokenbroker_core::dpop::access_token_hash(token.as_bytes())});
    let input =
        format!("{}.{}", b64::encode(header.to_string().as_bytes()), b64::encode(claims.to_string().as_bytes()));
    let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
    (
        format!("{input}.{}", b64::encode(&sig.to_bytes())),
        tokenbroker_core::keys::ec_thumbprint(&b64::decode(x.as_bytes()).unwrap(), &b64::decode(y.as_bytes()).unwrap()),
    )
}

fn rand_jti() -> String {
    tokenbroker_core::engine::random_id()
}

#[test]
fn es256_proofs_verify_and_private_keys_in_jwk_are_rejected() {
    let e = engine();
    let key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let uri = "https://mcp.example.com/mcp";
    let (_, jkt) = es256_proof(&key, None, "", uri);
    let t = issue(&e, Some(Confirmation::DpopJkt(jkt)), false);
    let check = |proof: &str| {
        e.validate(
            &ValidateRequest {
                token: t.as_bytes(),
                audience: AUD,
                dpop_proof: Some(proof.as_bytes()),
                http_method: Some("POST"),
                http_uri: Some(uri),
                cert_thumbprint: None,
                required_scopes: &[],
            },
            NOW,
        )
        .map(|_| ())
        .map_err(|r| r.reason)
    };
    assert_eq!(check(&es256_proof(&key, None, &t, uri).0), Ok(()));
    assert_eq!(check(&es256_proof(&key, Some(("d", "AAAA")), &t, uri).0), Err(Reason::ProofInvalid));
}

#[test]
fn certificate_bound_token_needs_the_certificate() {
    let e = engine();
    let x5t = b64::encode(&[7u8; 32]);
    let t = issue(&e, Some(Confirmation::CertThumbprint(x5t.clone())), false);
    let check = |cert: Option<&str>| {
        e.validate(
            &ValidateRequest { token: t.as_bytes(), audience: AUD, cert_thumbprint: cert, ..Default::default() },
            NOW,
        )
        .map(|_| ())
        .map_err(|r| r.reason)
    };
    assert_eq!(check(Some(&x5t)), Ok(()));
    assert_eq!(check(Some(&b64::encode(&[8u8; 32]))), Err(Reason::BindingMismatch));
    assert_eq!(check(None), Err(Reason::BindingMismatch));
}

fn dpop_request<'a>(token: &'a str, proof: &'a str) -> ValidateRequest<'a> {
    ValidateRequest {
        token: token.as_bytes(),
        audience: AUD,
        dpop_proof: Some(proof.as_bytes()),
        http_method: Some("POST"),
        http_uri: Some(AUD),
        cert_thumbprint: None,
        required_scopes: &[],
    }
}

fn records(e: &Engine, req: &ValidateRequest, now: u64) -> Vec<ReplayRecord> {
    e.validate(req, now).expect("passes the engine").replay
}

// The store holds the one exact replay record (DESIGN.md section 3): the engine hands it
// the proof's record, marked by the bloom filter, and never refuses a replay itself.
#[test]
fn a_proof_presented_twice_passes_the_engine_with_one_key_marked_maybe_seen() {
    let e = engine();
    let client = ProofSigner::generate();
    let t = issue(&e, Some(Confirmation::DpopJkt(client.jkt().into())), false);
    let proof = client.sign("POST", AUD, Some(t.as_bytes()), NOW, "twice");
    let first = records(&e, &dpop_request(&t, &proof), NOW);
    let second = records(&e, &dpop_request(&t, &proof), NOW + 1);
    assert_eq!((first.len(), second.len()), (1, 1));
    assert_eq!(first[0].key, second[0].key, "the store refuses the second by this key");
    assert_eq!(first[0].until, second[0].until);
    assert_eq!((first[0].mark, second[0].mark), (Mark::New, Mark::MaybeSeen));
    let other = client.sign("POST", AUD, Some(t.as_bytes()), NOW, "another");
    assert_ne!(records(&e, &dpop_request(&t, &other), NOW)[0].key, first[0].key);
}

#[test]
fn a_single_use_token_carries_one_record_that_lives_as_long_as_the_token() {
    let e = engine();
    let t = issue(&e, None, true);
    let first = records(&e, &ValidateRequest { token: t.as_bytes(), audience: AUD, ..Default::default() }, NOW);
    let again = records(&e, &ValidateRequest { token: t.as_bytes(), audience: AUD, ..Default::default() }, NOW + 1);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].key, again[0].key);
    assert_eq!(first[0].until, NOW + 300 + e.config().leeway_secs, "exp plus leeway: as long as it validates");
    assert_eq!(again[0].mark, Mark::MaybeSeen);
    let plain = issue(&e, None, false);
    assert!(
        records(&e, &ValidateRequest { token: plain.as_bytes(), audience: AUD, ..Default::default() }, NOW).is_empty()
    );
}

#[test]
fn a_proof_repeated_in_one_batch_gets_the_same_key_for_the_store_to_refuse() {
    let e = engine();
    let client = ProofSigner::generate();
    let t = issue(&e, Some(Confirmation::DpopJkt(client.jkt().into())), false);
    let proof = client.sign("POST", AUD, Some(t.as_bytes()), NOW, "batched");
    let answers = e.validate_batch(&[dpop_request(&t, &proof), dpop_request(&t, &proof)], NOW);
    let keys: Vec<[u8; 32]> = answers.into_iter().map(|a| a.expect("passes the engine").replay[0].key).collect();
    assert_eq!(keys[0], keys[1]);
}

#[test]
fn batch_answers_equal_single_answers() {
    let e = engine();
    let other = engine();
    let good: Vec<String> = (0..6).map(|_| issue(&e, None, false)).collect();
    let foreign = issue(&other, None, false);
    let mut forged = good[0].clone();
    let at = forged.len() - 3;
    let replacement = if &forged[at..at + 1] == "A" { "B" } else { "A" };
    forged.replace_range(at..at + 1, replacement);
    assert_ne!(forged, good[0]);
    let mut tokens: Vec<&str> = good.iter().map(String::as_str).collect();
    tokens.extend([foreign.as_str(), forged.as_str(), "not.a.token"]);
    let reqs: Vec<ValidateRequest> =
        tokens.iter().map(|t| ValidateRequest { token: t.as_bytes(), audience: AUD, ..Default::default() }).collect();
    let fresh = engine_with_keys_of(&e);
    let batch: Vec<Result<(), Reason>> =
        fresh.validate_batch(&reqs, NOW).into_iter().map(|r| r.map(|_| ()).map_err(|r| r.reason)).collect();
    let single: Vec<Result<(), Reason>> = tokens.iter().map(|t| validate(&engine_with_keys_of(&e), t, NOW)).collect();
    assert_eq!(batch, single);
    assert_eq!(batch[..6], vec![Ok(()); 6][..]);
    assert_eq!(batch[6], Err(Reason::UnknownKey));
    assert!(batch[7].is_err());
}

fn engine_with_keys_of(e: &Engine) -> Engine {
    Engine::new(e.keys().clone(), EngineConfig::new("https://broker.example")).unwrap()
}

#[test]
fn a_kid_rebound_to_another_key_does_not_keep_cached_tokens_alive() {
    let mut keys = KeySet::new();
    keys.add_pem(&KeySet::pem_of_new_key(), Some("main".into())).unwrap();
    let shared = Arc::new(RwLock::new(keys));
    let e = Engine::new(shared.clone(), EngineConfig::new("https://broker.example")).unwrap();
    let t = issue(&e, None, false);
    assert_eq!(validate(&e, &t, NOW), Ok(()), "now cached");
    shared.write().unwrap().add_pem(&KeySet::pem_of_new_key(), Some("main".into())).unwrap();
    assert_eq!(validate(&e, &t, NOW), Err(Reason::BadSignature));
}

#[test]
fn a_proof_record_outlives_its_last_accepted_second_even_without_leeway() {
    let mut keys = KeySet::new();
    keys.generate();
    let mut cfg = EngineConfig::new("https://broker.example");
    cfg.leeway_secs = 0;
    cfg.dpop.leeway_secs = 0;
    let e = Engine::new(Arc::new(RwLock::new(keys)), cfg).unwrap();
    let client = ProofSigner::generate();
    let t = issue(&e, Some(Confirmation::DpopJkt(client.jkt().into())), false);
    let proof = client.sign("POST", AUD, Some(t.as_bytes()), NOW - 60, "last-second");
    let req = ValidateRequest {
        token: t.as_bytes(),
        audience: AUD,
        dpop_proof: Some(proof.as_bytes()),
        http_method: Some("POST"),
        http_uri: Some(AUD),
        cert_thumbprint: None,
        required_scopes: &[],
    };
    let record = records(&e, &req, NOW);
    assert!(record[0].until > NOW, "still live in the proof's last accepted second");
    assert_eq!(e.validate(&req, NOW + 1).unwrap_err().reason, Reason::ProofInvalid, "then the proof is too old");
}

#[test]
fn a_proof_with_an_unbound_token_is_a_binding_mismatch() {
    let e = engine();
    let t = issue(&e, None, false);
    let proof = ProofSigner::generate().sign("POST", AUD, Some(t.as_bytes()), NOW, "unbound");
    let req = ValidateRequest {
        token: t.as_bytes(),
        audience: AUD,
        dpop_proof: Some(proof.as_bytes()),
        http_method: Some("POST"),
        http_uri: Some(AUD),
        cert_thumbprint: None,
        required_scopes: &[],
    };
    assert_eq!(e.validate(&req, NOW).unwrap_err().reason, Reason::BindingMismatch);
}

fn outcome(
    r: Result<tokenbroker_core::Validated, tokenbroker_core::Rejection>,
) -> Result<(usize, Option<String>), Reason> {
    r.map(|v| (v.replay.len(), v.missing_scopes)).map_err(|r| r.reason)
}

// Batch verification of the proofs must not change one answer: good Ed25519 proofs, one
// whose signature is broken, an ES256 proof (verified alone), a proof for another key,
// and a token that lacks a scope, in one batch and one by one.
#[test]
fn a_batch_of_dpop_requests_gets_the_answers_of_single_validation() {
    let e = engine();
    let clients: Vec<ProofSigner> = (0..6).map(|_| ProofSigner::generate()).collect();
    let tokens: Vec<String> =
        clients.iter().map(|c| issue(&e, Some(Confirmation::DpopJkt(c.jkt().into())), false)).collect();
    let mut proofs: Vec<String> =
        clients.iter().zip(&tokens).map(|(c, t)| c.sign("POST", AUD, Some(t.as_bytes()), NOW, &rand_jti())).collect();
    // A broken signature that still parses: a character in the middle of it (the last
    // one would only change base64 trailing bits, refused before any signature check),
    // so the batch of Ed25519 proofs fails as a whole and each is verified alone.
    let at = proofs[1].len() - 20;
    let replacement = if &proofs[1][at..at + 1] == "A" { "B" } else { "A" };
    proofs[1].replace_range(at..at + 1, replacement);
    assert!(tokenbroker_core::dpop::parse_proof(proofs[1].as_bytes(), &tokenbroker_core::dpop::ProofKeyCache::new(1))
        .is_ok());
    proofs[2] = clients[3].sign("POST", AUD, Some(tokens[2].as_bytes()), NOW, &rand_jti()); // another key
    let p256_key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let (_, jkt) = es256_proof(&p256_key, None, "", AUD);
    let es_token = issue(&e, Some(Confirmation::DpopJkt(jkt)), false);
    let (es_proof, _) = es256_proof(&p256_key, None, &es_token, AUD);
    let mut reqs: Vec<ValidateRequest> = tokens.iter().zip(&proofs).map(|(t, p)| dpop_request(t, p)).collect();
    reqs.push(dpop_request(&es_token, &es_proof));
    let admin = vec!["admin".to_string()];
    reqs[4].required_scopes = &admin;
    let batch: Vec<_> = engine_with_keys_of(&e).validate_batch(&reqs, NOW).into_iter().map(outcome).collect();
    let single: Vec<_> = reqs.iter().map(|r| outcome(engine_with_keys_of(&e).validate(r, NOW))).collect();
    assert_eq!(batch, single);
    assert_eq!(batch[0], Ok((1, None)));
    assert_eq!(batch[1], Err(Reason::ProofInvalid));
    assert_eq!(batch[2], Err(Reason::BindingMismatch));
    assert_eq!(batch[4], Ok((0, Some("token lacks scope: admin".into()))), "no replay record for a refusal");
    assert_eq!(batch[6], Ok((1, None)), "ES256 proof");
}

#[test]
fn required_scopes_are_decided_by_the_engine_after_the_binding() {
    let e = engine();
    let t = issue(&e, None, true);
    let check = |required: &[String]| {
        outcome(e.validate(
            &ValidateRequest { token: t.as_bytes(), audience: AUD, required_scopes: required, ..Default::default() },
            NOW,
        ))
    };
    assert_eq!(check(&["tools:read".into()]), Ok((1, None)));
    let missing = ["b".to_string(), "tools:read".into(), "a".into()];
    assert_eq!(check(&missing), Ok((0, Some("token lacks scope: a b".into()))), "sorted, and no once record");
}

#[test]
fn a_token_binds_to_a_dpop_key_or_a_certificate_never_both() {
    let e = engine();
    let thumb = b64::encode(&[7u8; 32]);
    let both = IssueRequest {
        client_id: "c",
        audience: AUD,
        dpop_jkt: Some(&thumb),
        cert_thumbprint: Some(&thumb),
        ..Default::default()
    };
    assert!(both.check().is_err());
    assert!(e.issue(&both, "s", u64::MAX, NOW).is_err());
    let short = IssueRequest { client_id: "c", audience: AUD, cert_thumbprint: Some("short"), ..Default::default() };
    assert!(short.check().is_err());
    // A DPoP proof presented with a certificate-bound token claims a binding it lacks.
    let t = issue(&e, Some(Confirmation::CertThumbprint(thumb.clone())), false);
    let proof = ProofSigner::generate().sign("POST", AUD, Some(t.as_bytes()), NOW, "p");
    let req = ValidateRequest { cert_thumbprint: Some(&thumb), ..dpop_request(&t, &proof) };
    assert_eq!(e.validate(&req, NOW).unwrap_err().reason, Reason::BindingMismatch);
}

#[test]
fn a_token_never_outlives_its_session() {
    let e = engine();
    let scopes: Vec<String> = vec![];
    let req = IssueRequest { client_id: "c", audience: AUD, scopes: &scopes, ..Default::default() };
    let (_, claims) = e.issue(&req, "s", NOW + 10, NOW).unwrap();
    assert_eq!(claims.exp, NOW + 10);
    let (_, claims) = e.issue(&req, "s", u64::MAX, NOW).unwrap();
    assert_eq!(claims.exp, NOW + 300, "the engine's default lifetime");
    assert!(e.issue(&req, "s", NOW, NOW).is_err());
}

#[test]
fn the_cached_path_answers_as_validate_does_and_only_without_a_signature_to_check() {
    let e = engine();
    let t = issue(&e, None, false);
    let req = ValidateRequest { token: t.as_bytes(), audience: AUD, ..Default::default() };
    assert!(e.validate_cached(&req, NOW).is_none(), "not cached yet: a signature to verify");
    assert_eq!(validate(&e, &t, NOW), Ok(()));
    assert!(e.validate_cached(&req, NOW).unwrap().is_ok());
    let other = ValidateRequest { audience: "https://other/mcp", ..req };
    assert_eq!(e.validate_cached(&other, NOW).unwrap().unwrap_err().reason, Reason::WrongAudience);
    assert!(e.validate_cached(&req, NOW + 10_000).is_none(), "an expired entry leaves the cache");
    assert_eq!(validate(&e, &t, NOW + 10_000), Err(Reason::Expired));
    let client = ProofSigner::generate();
    let bound = issue(&e, Some(Confirmation::DpopJkt(client.jkt().into())), false);
    let proof = client.sign("POST", AUD, Some(bound.as_bytes()), NOW, "p1");
    assert!(e.validate(&dpop_request(&bound, &proof), NOW).is_ok());
    assert!(e.validate_cached(&dpop_request(&bound, &proof), NOW).is_none(), "a proof to verify");
    let no_proof = ValidateRequest { token: bound.as_bytes(), audience: AUD, ..Default::default() };
    assert_eq!(e.validate_cached(&no_proof, NOW).unwrap().unwrap_err().reason, Reason::ProofMissing);
}

// The proof-key cache holds keys, never verdicts: a known key's next proof is still
// verified in full.
#[test]
fn a_cached_proof_key_still_has_every_proof_verified() {
    let e = engine();
    let client = ProofSigner::generate();
    let t = issue(&e, Some(Confirmation::DpopJkt(client.jkt().into())), false);
    let first = client.sign("POST", AUD, Some(t.as_bytes()), NOW, &rand_jti());
    assert!(e.validate(&dpop_request(&t, &first), NOW).is_ok(), "the key is now cached");
    let mut forged = client.sign("POST", AUD, Some(t.as_bytes()), NOW, &rand_jti());
    let at = forged.len() - 5;
    let replacement = if &forged[at..at + 1] == "A" { "B" } else { "A" };
    forged.replace_range(at..at + 1, replacement);
    assert_eq!(e.validate(&dpop_request(&t, &forged), NOW).unwrap_err().reason, Reason::ProofInvalid);
    let other = client.sign("GET", AUD, Some(t.as_bytes()), NOW, &rand_jti());
    assert_eq!(e.validate(&dpop_request(&t, &other), NOW).unwrap_err().reason, Reason::ProofInvalid, "htm");
}

#[test]
fn introspection_checks_everything_but_the_binding_and_records_nothing() {
    let e = engine();
    let client = ProofSigner::generate();
    let bound = issue(&e, Some(Confirmation::DpopJkt(client.jkt().into())), true);
    let v = e.introspect(bound.as_bytes(), AUD, NOW).unwrap();
    assert!(matches!(&v.claims.cnf, Some(Confirmation::DpopJkt(j)) if j == client.jkt()));
    assert!(v.replay.is_empty(), "introspection must not use up a proof or a single-use token");
    // Still the token's own rules: audience, lifetime, signature.
    let wrong_aud = e.introspect(bound.as_bytes(), "https://other.example/mcp", NOW).unwrap_err();
    assert_eq!(wrong_aud.reason, Reason::WrongAudience);
    assert_eq!(e.introspect(bound.as_bytes(), AUD, NOW + 3600).unwrap_err().reason, Reason::Expired);
    let mut forged = bound.clone();
    forged.replace_range(forged.len() - 4.., "AAAA");
    assert_eq!(e.introspect(forged.as_bytes(), AUD, NOW).unwrap_err().reason, Reason::BadSignature);
}

#[test]
fn a_token_issued_on_an_attestation_names_the_attested_subject() {
    let e = engine();
    let scopes = vec!["tools:read".to_string()];
    let req = IssueRequest {
        client_id: "agent-1",
        audience: AUD,
        scopes: &scopes,
        attested_subject: Some("spiffe://attest.test/ns/a/sa/b"),
        ..Default::default()
    };
    let (token, claims) = e.issue(&req, "sess-1", u64::MAX, NOW).unwrap();
    assert_eq!(claims.attested_sub.as_deref(), Some("spiffe://attest.test/ns/a/sa/b"));
    let validated =
        e.validate(&ValidateRequest { token: token.as_bytes(), audience: AUD, ..Default::default() }, NOW).unwrap();
    assert_eq!(validated.claims.attested_sub.as_deref(), Some("spiffe://attest.test/ns/a/sa/b"));
    // Without an attestation there is no such claim at all.
    let plain = e.issue(&IssueRequest { attested_subject: None, ..req }, "sess-1", u64::MAX, NOW).unwrap().1;
    assert!(plain.attested_sub.is_none());
}

#[test]
fn a_token_carries_the_usage_window_it_was_issued_with() {
    let e = engine();
    let scopes = vec!["tools:read".to_string()];
    let office_hours = 0b0000_0000_0011_1111_1111_0000_0000; // 08:00 to 18:00 UTC
    let req = IssueRequest {
        client_id: "agent-1",
        audience: AUD,
        scopes: &scopes,
        usage_window: Some(office_hours),
        ..Default::default()
    };
    let token = e.issue(&req, "sess-1", u64::MAX, NOW).unwrap().0;
    let validated =
        e.validate(&ValidateRequest { token: token.as_bytes(), audience: AUD, ..Default::default() }, NOW).unwrap();
    assert_eq!(validated.claims.usage_window, Some(office_hours));
    let plain = e.issue(&IssueRequest { usage_window: None, ..req }, "sess-1", u64::MAX, NOW).unwrap().1;
    assert!(plain.usage_window.is_none());
    // No hour at all, or bits beyond the 24 hours: refused before anything is signed.
    for bad in [0, 1 << 24, u32::MAX] {
        let refused = e.issue(&IssueRequest { usage_window: Some(bad), ..req }, "sess-1", u64::MAX, NOW);
        assert!(matches!(refused, Err(tokenbroker_core::Error::InvalidArgument(_))), "{bad}");
    }
}

#[test]
fn a_usage_window_claim_that_is_not_an_hour_mask_is_malformed() {
    let e = engine();
    let scopes = vec!["tools:read".to_string()];
    let req = IssueRequest { client_id: "agent-1", audience: AUD, scopes: &scopes, ..Default::default() };
    let token = e.issue(&req, "sess-1", u64::MAX, NOW).unwrap().0;
    let payload = token.split('.').nth(1).unwrap();
    let issued: serde_json::Value = serde_json::from_slice(&b64::decode(payload.as_bytes()).unwrap()).unwrap();
    for bad in [serde_json::json!(0), serde_json::json!(1 << 24), serde_json::json!("08-18"), serde_json::json!(-1)] {
        let mut claims = issued.clone();
        claims["usage_window"] = bad.clone();
        let token = e.sign(&claims).unwrap();
        let refused =
            e.validate(&ValidateRequest { token: token.as_bytes(), audience: AUD, ..Default::default() }, NOW);
        assert_eq!(refused.unwrap_err().reason, Reason::Malformed, "{bad}");
    }
}
