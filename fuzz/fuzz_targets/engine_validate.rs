//! The whole `Engine::validate` on arbitrary requests (see `tokenbroker_fuzz::fields`).
//! Oracles: `validate` and `validate_batch` give the same answer; an accepted token is one
//! the fixtures signed, byte for byte, for the audience it names; a DPoP-bound one came
//! with one of the fixtures' proofs; a certificate-bound one with its thumbprint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenbroker_core::claims::Confirmation;
use tokenbroker_fuzz::{fields, fixtures, AUDIENCE, CERT_THUMBPRINT, NOW};

fuzz_target!(|data: &[u8]| {
    let Some(fields) = fields(data) else { return };
    let f = fixtures();
    let req = fields.request();
    let one = f.engine.validate(&req, NOW);
    let batch = f.engine.validate_batch(&[req], NOW).pop().expect("one answer");
    match (&one, &batch) {
        (Ok(a), Ok(b)) => assert_eq!(a.claims.jti, b.claims.jti),
        (Err(a), Err(b)) => assert_eq!(a.reason, b.reason, "validate and validate_batch disagree"),
        _ => panic!("validate and validate_batch disagree: {:?} / {:?}", one.is_ok(), batch.is_ok()),
    }
    let Ok(valid) = one else { return };
    assert!(f.tokens.iter().any(|t| t.as_bytes() == fields.token), "an unsigned token was accepted");
    assert_eq!(fields.audience, AUDIENCE);
    match &valid.claims.cnf {
        Some(Confirmation::DpopJkt(_)) => {
            let proof = fields.proof.expect("a DPoP-bound token needs a proof");
            assert!(f.proofs.iter().any(|p| p.as_bytes() == proof), "an unsigned proof was accepted");
        }
        Some(Confirmation::CertThumbprint(_)) => assert_eq!(fields.cert, Some(CERT_THUMBPRINT)),
        None => {}
    }
});
