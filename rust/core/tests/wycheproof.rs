//! Project Wycheproof's Ed25519 vectors through the core's verification: every case must
//! give its expected result. The file lives in `../shared/testdata/` beside the checkout;
//! a missing file fails the test (it never skips).

use ed25519_dalek::VerifyingKey;
use serde_json::Value;
use std::path::PathBuf;
use tokenbroker_core::keys::verify_ed25519;

fn testdata(name: &str) -> PathBuf {
    let dir = std::env::var_os("TOKENBROKER_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata"));
    dir.join(name)
}

#[test]
fn all_wycheproof_ed25519_vectors_give_the_expected_result() {
    let path = testdata("wycheproof_ed25519_test.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {} ({e}); set TOKENBROKER_TESTDATA", path.display()));
    let doc: Value = serde_json::from_str(&text).unwrap();
    let (mut checked, mut valid, mut invalid) = (0, 0, 0);
    for group in doc["testGroups"].as_array().unwrap() {
        let pk: [u8; 32] = hex::decode(group["publicKey"]["pk"].as_str().unwrap()).unwrap().try_into().unwrap();
        let key = VerifyingKey::from_bytes(&pk);
        for case in group["tests"].as_array().unwrap() {
            let msg = hex::decode(case["msg"].as_str().unwrap()).unwrap();
            let sig = hex::decode(case["sig"].as_str().unwrap()).unwrap();
            let accepted = key.as_ref().map(|k| verify_ed25519(k, &msg, &sig).is_ok()).unwrap_or(false);
            let expected = case["result"].as_str().unwrap();
            assert!(expected == "valid" || expected == "invalid", "unexpected result kind {expected}");
            assert_eq!(
                accepted,
                expected == "valid",
                "tcId {} ({}): expected {expected}",
                case["tcId"],
                case["comment"]
            );
            checked += 1;
            if accepted {
                valid += 1
            } else {
                invalid += 1
            }
        }
    }
    assert_eq!(checked, doc["numberOfTests"].as_u64().unwrap() as usize);
    assert_eq!((checked, valid, invalid), (151, 88, 63));
}

#[test]
fn batch_verification_agrees_with_verify_strict_on_every_vector() {
    use ed25519_dalek::{Signer, SigningKey};
    use tokenbroker_core::keys::verify_batch_strict;
    let text = std::fs::read_to_string(testdata("wycheproof_ed25519_test.json")).expect("testdata");
    let doc: Value = serde_json::from_str(&text).unwrap();
    let signer = SigningKey::from_bytes(&[7u8; 32]);
    let good_key = signer.verifying_key();
    let good: Vec<(Vec<u8>, [u8; 64])> = (0..5u8).map(|i| (vec![i; 10], signer.sign(&[i; 10]).to_bytes())).collect();
    let mut checked = 0;
    for group in doc["testGroups"].as_array().unwrap() {
        let pk: [u8; 32] = hex::decode(group["publicKey"]["pk"].as_str().unwrap()).unwrap().try_into().unwrap();
        let Ok(key) = VerifyingKey::from_bytes(&pk) else { continue };
        for case in group["tests"].as_array().unwrap() {
            let msg = hex::decode(case["msg"].as_str().unwrap()).unwrap();
            let sig = hex::decode(case["sig"].as_str().unwrap()).unwrap();
            let mut items: Vec<(&VerifyingKey, &[u8], &[u8])> =
                good.iter().map(|(m, s)| (&good_key, m.as_slice(), s.as_slice())).collect();
            items.insert(2, (&key, &msg, &sig));
            let results = verify_batch_strict(&items);
            let expected = case["result"].as_str().unwrap() == "valid";
            assert_eq!(results[2].is_ok(), expected, "tcId {} in a batch", case["tcId"]);
            assert!(
                results.iter().enumerate().all(|(i, r)| i == 2 || r.is_ok()),
                "tcId {} spoiled the batch",
                case["tcId"]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 151);
}
