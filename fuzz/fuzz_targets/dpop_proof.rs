//! DPoP proof verification (`dpop::verify_proof`) on arbitrary bytes, for the fixtures'
//! request, with and without an access token. Oracle: an accepted proof is one the fixtures
//! signed, byte for byte, and one signed over the access token it is presented with. (With
//! no access token, the token endpoint's case, a proof's `ath` is not checked: RFC 9449
//! section 4.3 asks for it only with an access token, and `htu` keeps a resource's proof
//! from the token endpoint.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenbroker_core::dpop::{verify_proof, DpopConfig, ProofKeyCache};
use tokenbroker_fuzz::{fixtures, METHOD, NOW, URI};

fuzz_target!(|data: &[u8]| {
    let f = fixtures();
    let keys = ProofKeyCache::new(16);
    let cfg = DpopConfig::default();
    let signed = |i: usize| f.proofs[i].as_bytes() == data;
    if verify_proof(data, METHOD, URI, None, NOW, &cfg, &keys).is_ok() {
        assert!((0..f.proofs.len()).any(signed), "an unsigned proof was accepted with no access token");
    }
    for (proof, token) in [(0, 1), (1, 3)] {
        if verify_proof(data, METHOD, URI, Some(f.tokens[token].as_bytes()), NOW, &cfg, &keys).is_ok() {
            assert!(signed(proof), "a proof was accepted for a token it was not signed over");
        }
    }
    // Another method or URI never accepts it.
    assert!(verify_proof(data, "GET", URI, None, NOW, &cfg, &keys).is_err());
    assert!(verify_proof(data, METHOD, "https://other.example/mcp", None, NOW, &cfg, &keys).is_err());
});
