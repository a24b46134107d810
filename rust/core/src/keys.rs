//! The broker's Ed25519 key set: several keys by `kid`, one active for signing. Rotation
//! makes a new key active and keeps the previous ones for verification, so tokens they
//! signed stay valid until they expire. Exports a public JWKS (RFC 7517, RFC 8037).

use crate::b64;
use crate::error::{reject, Error, Reason, Rejection};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::OsRng;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

struct Entry {
    kid: String,
    signing: SigningKey,
    verifying: VerifyingKey,
}

/// Keys by id; the last one added or rotated in is the active signing key.
pub struct KeySet {
    entries: Vec<Entry>,
}

impl Default for KeySet {
    fn default() -> Self {
        Self::new()
    }
}

impl KeySet {
    pub fn new() -> Self {
        KeySet { entries: Vec::new() }
    }

    /// A new random key, made active; returns its kid (the RFC 7638 thumbprint).
    pub fn generate(&mut self) -> String {
        let signing = SigningKey::generate(&mut OsRng);
        self.insert(signing, None).expect("a freshly generated key is never weak")
    }

    /// Adds a PKCS#8 PEM Ed25519 private key and makes it active.
    pub fn add_pem(&mut self, pem: &str, kid: Option<String>) -> Result<String, Error> {
        let signing = SigningKey::from_pkcs8_pem(pem)
            .map_err(|_| Error::InvalidKey("not an Ed25519 PKCS#8 private key in PEM".into()))?;
        self.insert(signing, kid)
    }

    /// Adds a private OKP JWK (`kty` OKP, `crv` Ed25519, `x`, `d`) and makes it active.
    pub fn add_jwk(&mut self, jwk: &str) -> Result<String, Error> {
        let bad = |m: &str| Error::InvalidKey(format!("JWK: {m}"));
        let map = crate::json::parse_object(jwk.as_bytes()).map_err(bad)?;
        let field = |n: &str| map.get(n).and_then(Value::as_str).ok_or_else(|| bad(&format!("'{n}' missing")));
        if field("kty")? != "OKP" || field("crv")? != "Ed25519" {
            return Err(bad("not an OKP Ed25519 key"));
        }
        let d: [u8; 32] = b64::decode(field("d")?.as_bytes())
            .and_then(|d| d.try_into().ok())
            .ok_or_else(|| bad("'d' is not 32 bytes of base64url"))?;
        let signing = SigningKey::from_bytes(&d);
        let x = b64::decode(field("x")?.as_bytes()).ok_or_else(|| bad("'x' is not base64url"))?;
        if x != signing.verifying_key().as_bytes() {
            return Err(bad("'x' does not match 'd'"));
        }
        let kid = map.get("kid").and_then(Value::as_str).map(str::to_owned);
        self.insert(signing, kid)
    }

    fn insert(&mut self, signing: SigningKey, kid: Option<String>) -> Result<String, Error> {
        let verifying = signing.verifying_key();
        if verifying.is_weak() {
            return Err(Error::InvalidKey("small-order (weak) Ed25519 key".into()));
        }
        let kid = kid.unwrap_or_else(|| okp_thumbprint(verifying.as_bytes()));
        if kid.is_empty() || kid.len() > 128 {
            return Err(Error::InvalidArgument("kid must be 1 to 128 characters".into()));
        }
        self.entries.retain(|e| e.kid != kid);
        self.entries.push(Entry { kid: kid.clone(), signing, verifying });
        Ok(kid)
    }

    /// A new random key as PKCS#8 PEM, not added to any set (for tests and tooling).
    pub fn pem_of_new_key() -> String {
        let mut set = KeySet::new();
        let kid = set.generate();
        set.private_pem(&kid).expect("a key of the set")
    }

    /// Generates a new active key; the previous keys stay for verification.
    pub fn rotate(&mut self) -> String {
        self.generate()
    }

    /// Removes a key: tokens it signed stop validating (`UNKNOWN_KEY`).
    pub fn retire(&mut self, kid: &str) -> Result<(), Error> {
        if self.active_kid() == Some(kid) {
            return Err(Error::InvalidArgument("cannot retire the active signing key; rotate first".into()));
        }
        let before = self.entries.len();
        self.entries.retain(|e| e.kid != kid);
        if self.entries.len() == before {
            return Err(Error::UnknownKeyId(kid.into()));
        }
        Ok(())
    }

    pub fn active_kid(&self) -> Option<&str> {
        self.entries.last().map(|e| e.kid.as_str())
    }

    pub fn kids(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.kid.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn entry(&self, kid: &str) -> Option<&Entry> {
        self.entries.iter().rev().find(|e| e.kid == kid)
    }

    pub fn verifying_key(&self, kid: &str) -> Option<VerifyingKey> {
        self.entry(kid).map(|e| e.verifying)
    }

    /// Signs with the active key; returns (kid, signature).
    pub fn sign(&self, message: &[u8]) -> Result<(String, [u8; 64]), Error> {
        let e = self.entries.last().ok_or_else(|| Error::InvalidArgument("the key set is empty".into()))?;
        Ok((e.kid.clone(), e.signing.sign(message).to_bytes()))
    }

    /// PKCS#8 v1 PEM (RFC 8410 without the optional public key): the form OpenSSL,
    /// pyca/cryptography and every JOSE library read.
    pub fn private_pem(&self, kid: &str) -> Result<String, Error> {
        let e = self.entry(kid).ok_or_else(|| Error::UnknownKeyId(kid.into()))?;
        let bytes = ed25519_dalek::pkcs8::KeypairBytes { secret_key: e.signing.to_bytes(), public_key: None };
        let pem = bytes
            .to_pkcs8_pem(Default::default())
            .map_err(|_| Error::InvalidKey("cannot encode the key as PKCS#8".into()))?;
        Ok(pem.to_string())
    }

    /// The key as a JWK; with `private`, including `d`.
    pub fn jwk(&self, kid: &str, private: bool) -> Result<Value, Error> {
        let e = self.entry(kid).ok_or_else(|| Error::UnknownKeyId(kid.into()))?;
        let mut jwk = json!({
            "kty": "OKP", "crv": "Ed25519", "x": b64::encode(e.verifying.as_bytes()),
            "kid": e.kid, "alg": "EdDSA", "use": "sig",
        });
        if private {
            jwk["d"] = Value::String(b64::encode(e.signing.as_bytes()));
        }
        Ok(jwk)
    }

    /// The public JWKS of every key that can still verify, newest first.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> =
            self.entries.iter().rev().map(|e| self.jwk(&e.kid, false).expect("kid from the set")).collect();
        json!({ "keys": keys })
    }
}

/// Ed25519 `verify_strict`: rejects non-canonical S and R, small-order R and keys.
pub fn verify_ed25519(key: &VerifyingKey, message: &[u8], signature: &[u8]) -> Result<(), Rejection> {
    let sig: [u8; 64] = signature.try_into().map_err(|_| reject(Reason::BadSignature, "signature is not 64 bytes"))?;
    key.verify_strict(message, &Signature::from_bytes(&sig))
        .map_err(|_| reject(Reason::BadSignature, "signature does not verify"))
}

/// Minimum batch size for which `verify_batch_strict` uses batch verification.
pub const BATCH_THRESHOLD: usize = 4;

/// Encodings (sign bit cleared) of the eight small-order points.
fn torsion_encodings() -> &'static [[u8; 32]; 8] {
    static ENCODINGS: std::sync::OnceLock<[[u8; 32]; 8]> = std::sync::OnceLock::new();
    ENCODINGS.get_or_init(|| {
        curve25519_dalek::constants::EIGHT_TORSION.map(|p| {
            let mut y = p.compress().to_bytes();
            y[31] &= 0x7f;
            y
        })
    })
}

/// The per-signature checks `verify_strict` makes that the batch equation does not, on
/// the encoding alone (the batch decompresses R itself): canonical S (< L), canonical R
/// (y < p), R not of small order (whatever its sign bit).
fn strict_precheck(signature: &[u8; 64]) -> bool {
    use curve25519_dalek::scalar::Scalar;
    let s_ok: bool = Scalar::from_canonical_bytes(signature[32..].try_into().expect("32 bytes")).is_some().into();
    let mut y: [u8; 32] = signature[..32].try_into().expect("32 bytes");
    y[31] &= 0x7f;
    // y >= p = 2^255 - 19 exactly when bytes 1..31 are 0xff, byte 31 is 0x7f, byte 0 >= 0xed.
    let y_canonical = !(y[0] >= 0xed && y[1..31].iter().all(|&b| b == 0xff) && y[31] == 0x7f);
    s_ok && y_canonical && !torsion_encodings().contains(&y)
}

/// Verifies many Ed25519 signatures, each with `verify_strict` semantics. Batch
/// verification (random linear combination, one multiscalar multiplication) runs first
/// when the batch is large enough; any signature that fails the strict pre-checks, and
/// every signature of a batch that does not verify as a whole, is verified alone. Weak
/// keys never enter the batch. For the broker's own keys a batch pass agrees with
/// `verify_strict`; a client's DPoP key may be of mixed order, and then only the key's
/// owner can make a signature the batch accepts and `verify_strict` would not: a second
/// encoding of a proof it could sign anyway (the replay record is keyed by the signed
/// `jti`, not the signature bytes).
pub fn verify_batch_strict(items: &[(&VerifyingKey, &[u8], &[u8])]) -> Vec<Result<(), Rejection>> {
    let mut results: Vec<Option<Result<(), Rejection>>> = vec![None; items.len()];
    let mut batch: Vec<usize> = Vec::with_capacity(items.len());
    for (i, (key, message, signature)) in items.iter().enumerate() {
        match <[u8; 64]>::try_from(*signature) {
            Ok(sig) if strict_precheck(&sig) && !key.is_weak() => batch.push(i),
            _ => results[i] = Some(verify_ed25519(key, message, signature)),
        }
    }
    if batch.len() >= BATCH_THRESHOLD {
        let messages: Vec<&[u8]> = batch.iter().map(|&i| items[i].1).collect();
        let signatures: Vec<Signature> =
            batch.iter().map(|&i| Signature::from_bytes(items[i].2.try_into().expect("checked length"))).collect();
        let keys: Vec<VerifyingKey> = batch.iter().map(|&i| *items[i].0).collect();
        if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
            for &i in &batch {
                results[i] = Some(Ok(()));
            }
        }
    }
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| verify_ed25519(items[i].0, items[i].1, items[i].2)))
        .collect()
}

/// RFC 7638 thumbprint of an Ed25519 public key: base64url(SHA-256 of the canonical JWK).
pub fn okp_thumbprint(x: &[u8]) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64::encode(x));
    b64::encode(&Sha256::digest(canonical.as_bytes()))
}

/// RFC 7638 thumbprint of a P-256 public key.
pub fn ec_thumbprint(x: &[u8], y: &[u8]) -> String {
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#, b64::encode(x), b64::encode(y));
    b64::encode(&Sha256::digest(canonical.as_bytes()))
}

/// RFC 7638 thumbprint of a public JWK given as a JSON object (OKP Ed25519 or EC P-256).
pub fn jwk_thumbprint(jwk: &Map<String, Value>) -> Result<String, Error> {
    let bad = |m: &str| Error::InvalidKey(format!("JWK: {m}"));
    let get = |n: &str| {
        jwk.get(n)
            .and_then(Value::as_str)
            .and_then(|s| b64::decode(s.as_bytes()))
            .ok_or_else(|| bad(&format!("'{n}' missing or not base64url")))
    };
    match jwk.get("kty").and_then(Value::as_str) {
        Some("OKP") if jwk.get("crv").and_then(Value::as_str) == Some("Ed25519") => Ok(okp_thumbprint(&get("x")?)),
        Some("EC") if jwk.get("crv").and_then(Value::as_str) == Some("P-256") => {
            Ok(ec_thumbprint(&get("x")?, &get("y")?))
        }
        _ => Err(bad("only OKP Ed25519 and EC P-256 keys are supported")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8037_thumbprint_known_answer() {
        // RFC 8037 Appendix A.3.
        let x = b64::decode(b"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo").unwrap();
        assert_eq!(okp_thumbprint(&x), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
    }

    #[test]
    fn rotation_keeps_old_keys_for_verification() {
        let mut ks = KeySet::new();
        let first = ks.generate();
        let (kid, sig) = ks.sign(b"m").unwrap();
        assert_eq!(kid, first);
        let second = ks.rotate();
        assert_eq!(ks.active_kid(), Some(second.as_str()));
        verify_ed25519(&ks.verifying_key(&first).unwrap(), b"m", &sig).unwrap();
        assert!(ks.retire(&second).is_err());
        ks.retire(&first).unwrap();
        assert!(ks.verifying_key(&first).is_none());
    }

    #[test]
    fn pem_and_jwk_round_trip() {
        let mut ks = KeySet::new();
        let kid = ks.generate();
        let pem = ks.private_pem(&kid).unwrap();
        let jwk = ks.jwk(&kid, true).unwrap().to_string();
        let mut a = KeySet::new();
        assert_eq!(a.add_pem(&pem, None).unwrap(), kid);
        let mut b = KeySet::new();
        assert_eq!(b.add_jwk(&jwk).unwrap(), kid);
        assert!(ks.jwks()["keys"][0].get("d").is_none());
    }
}
