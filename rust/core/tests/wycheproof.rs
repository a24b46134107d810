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
