//! DPoP proof verification, RFC 9449 section 4.3, for EdDSA (Ed25519) and ES256 proofs.

use crate::error::{reject, Reason, Rejection};
use crate::jws::{self, str_member};
use crate::keys::{ec_thumbprint, okp_thumbprint, verify_ed25519};
use crate::{b64, json};
use ed25519_dalek::VerifyingKey;
use p256::ecdsa::signature::Verifier;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone, Copy, Debug)]
pub struct DpopConfig {
    /// How old a proof's `iat` may be, in seconds.
    pub max_age_secs: u64,
    /// Clock skew allowed in both directions, in seconds.
    pub leeway_secs: u64,
}

impl Default for DpopConfig {
    fn default() -> Self {
        DpopConfig { max_age_secs: 60, leeway_secs: 5 }
    }
}

impl DpopConfig {
    /// How long a proof stays acceptable after its `iat`: its replay record lives this long.
    pub fn window_secs(&self) -> u64 {
        self.max_age_secs + self.leeway_secs
    }
}

/// A proof that passed every check except replay (the caller records its `jti`).
#[derive(Debug)]
pub struct VerifiedProof {
    /// RFC 7638 thumbprint of the proof's public key.
    pub jkt: String,
    pub jti: String,
    pub iat: u64,
    /// The proof's `nonce` claim (RFC 9449 section 8), for the caller to check: nonces
    /// are the server's, so the engine only hands them over.
    pub nonce: Option<String>,
}

fn invalid(detail: impl Into<std::borrow::Cow<'static, str>>) -> Rejection {
    reject(Reason::ProofInvalid, detail)
}

enum ProofKey {
    Ed25519(VerifyingKey),
    P256(Box<p256::ecdsa::VerifyingKey>),
}

/// Decompressed Ed25519 proof keys by their encoding, with their RFC 7638 thumbprints. A
/// client signs every proof with the same key, and decompressing it, checking its order
/// and hashing its JWK cost about a sixth of a proof's verification (6 of 44 us measured).
/// Bounded; each value is a pure function of its key, so no entry can be wrong, only
/// missing.
pub struct ProofKeyCache {
    keys: quick_cache::sync::Cache<[u8; 32], (VerifyingKey, std::sync::Arc<str>)>,
}

impl ProofKeyCache {
    pub fn new(capacity: usize) -> Self {
        ProofKeyCache { keys: quick_cache::sync::Cache::new(capacity.max(1)) }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn ed25519(&self, x: [u8; 32]) -> Result<(ProofKey, String), Rejection> {
        if let Some((key, jkt)) = self.keys.get(&x) {
            return Ok((ProofKey::Ed25519(key), jkt.to_string()));
        }
        let key = VerifyingKey::from_bytes(&x).map_err(|_| invalid("proof jwk is not an Ed25519 point"))?;
        if key.is_weak() {
            return Err(invalid("proof jwk is a small-order Ed25519 key"));
        }
        let jkt = okp_thumbprint(&x);
        self.keys.insert(x, (key, std::sync::Arc::from(jkt.as_str())));
        Ok((ProofKey::Ed25519(key), jkt))
    }
}

/// Reads the proof's public `jwk`: OKP Ed25519 or EC P-256, never private or symmetric.
fn public_key(jwk: &Map<String, Value>, alg: &str, cache: &ProofKeyCache) -> Result<(ProofKey, String), Rejection> {
    if jwk.contains_key("d") {
        return Err(invalid("proof 'jwk' contains a private key"));
    }
    let coord = |name: &'static str, len: usize| -> Result<Vec<u8>, Rejection> {
        let s = str_member(jwk, name, "proof jwk", Reason::ProofInvalid)?;
        b64::decode(s.as_bytes())
            .filter(|v| v.len() == len)
            .ok_or_else(|| invalid(format!("proof jwk '{name}' is not {len} bytes of base64url")))
    };
    let kty = str_member(jwk, "kty", "proof jwk", Reason::ProofInvalid)?;
    let crv = jwk.get("crv").and_then(Value::as_str).unwrap_or("");
    match (alg, kty, crv) {
        ("EdDSA", "OKP", "Ed25519") => cache.ed25519(coord("x", 32)?.try_into().expect("32 bytes")),
        ("ES256", "EC", "P-256") => {
            let (x, y) = (coord("x", 32)?, coord("y", 32)?);
            let field = |v: &[u8]| p256::FieldBytes::from(<[u8; 32]>::try_from(v).expect("32 bytes"));
            let point = p256::EncodedPoint::from_affine_coordinates(&field(&x), &field(&y), false);
            let key = p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                .map_err(|_| invalid("proof jwk is not a P-256 point"))?;
            Ok((ProofKey::P256(Box::new(key)), ec_thumbprint(&x, &y)))
        }
        ("EdDSA" | "ES256", "oct", _) => Err(invalid("proof jwk is a symmetric key")),
        _ => Err(invalid("proof jwk does not match its 'alg' (EdDSA with OKP Ed25519, ES256 with EC P-256)")),
    }
}

/// Normalises an `htu` or request URI for comparison: scheme and host lower-cased,
/// default port dropped, dot segments resolved (WHATWG URL), query and fragment removed.
pub fn normalize_htu(uri: &str) -> Option<String> {
    let mut url = url::Url::parse(uri).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return None;
    }
    url.set_query(None);
    url.set_fragment(None);
    Some(url.into())
}

/// `ath`: base64url(SHA-256(access token)).
pub fn access_token_hash(token: &[u8]) -> String {
    b64::encode(&Sha256::digest(token))
}

/// A proof parsed up to its signature check: header, public key and thumbprint. The
/// signature is checked alone (`verify_signature`) or, for Ed25519, with others in one
/// batch (`ed25519_item`); only then are its claims read (`check_claims`).
pub struct ParsedProof<'a> {
    key: ProofKey,
    /// RFC 7638 thumbprint of the proof's public key.
    pub jkt: String,
    signing_input: &'a [u8],
    signature: Vec<u8>,
    payload: Vec<u8>,
}

/// Steps of RFC 9449 section 4.3 before the signature: structure, `typ`, `alg`, `jwk`.
pub fn parse_proof<'a>(proof: &'a [u8], keys: &ProofKeyCache) -> Result<ParsedProof<'a>, Rejection> {
    let compact = jws::parse(proof, "proof", Reason::ProofInvalid)?;
    let h = &compact.header;
    if str_member(h, "typ", "proof header", Reason::ProofInvalid)? != "dpop+jwt" {
        return Err(invalid("proof 'typ' is not dpop+jwt"));
    }
    let alg = str_member(h, "alg", "proof header", Reason::ProofInvalid)?;
    if alg != "EdDSA" && alg != "ES256" {
        return Err(invalid("proof 'alg' is not EdDSA or ES256"));
    }
    if let Some(name) = h.keys().find(|k| !matches!(k.as_str(), "typ" | "alg" | "jwk")) {
        return Err(invalid(format!("proof header parameter '{}' is not allowed", truncate(name))));
    }
    let jwk = match h.get("jwk") {
        Some(Value::Object(j)) => j,
        _ => return Err(invalid("proof 'jwk' is missing or not an object")),
    };
    let (key, jkt) = public_key(jwk, alg, keys)?;
    Ok(ParsedProof {
        key,
        jkt,
        signing_input: compact.signing_input,
        signature: compact.signature,
        payload: compact.payload,
    })
}

/// The one answer for a proof whose signature does not verify, however it was checked.
pub fn bad_signature() -> Rejection {
    invalid("proof signature does not verify")
}

impl<'a> ParsedProof<'a> {
    /// (key, message, signature) for `keys::verify_batch_strict`, when the proof is
    /// Ed25519. The key is the client's own and is never weak (`public_key` refuses small
    /// order keys); whatever a batch accepts that `verify_strict` would not is a second
    /// encoding of a signature by that key, which the key's owner could make anyway, and
    /// the replay record is keyed by the signed `jti`, not by the signature bytes.
    pub fn ed25519_item(&self) -> Option<(&VerifyingKey, &[u8], &[u8])> {
        match &self.key {
            ProofKey::Ed25519(k) => Some((k, self.signing_input, self.signature.as_slice())),
            ProofKey::P256(_) => None,
        }
    }

    /// Checks the signature alone.
    pub fn verify_signature(&self) -> Result<(), Rejection> {
        match &self.key {
            ProofKey::Ed25519(k) => verify_ed25519(k, self.signing_input, &self.signature).map_err(|_| bad_signature()),
            ProofKey::P256(k) => {
                let sig = p256::ecdsa::Signature::from_slice(&self.signature)
                    .map_err(|_| invalid("proof signature is not a 64-byte ES256 signature"))?;
                k.verify(self.signing_input, &sig).map_err(|_| bad_signature())
            }
        }
    }

    /// After the signature verified: `jti`, `htm`, `htu`, `iat` window and, when the proof
    /// comes with an access token, `ath`. Without one (a proof sent to the token endpoint,
    /// RFC 9449 section 5) there is nothing for `ath` to cover and it is not read.
    pub fn check_claims(
        self,
        http_method: &str,
        http_uri: &str,
        access_token: Option<&[u8]>,
        now: u64,
        cfg: &DpopConfig,
    ) -> Result<VerifiedProof, Rejection> {
        let claims = json::parse_object(&self.payload).map_err(|e| invalid(format!("proof claims: {e}")))?;
        let jti = str_member(&claims, "jti", "proof claim", Reason::ProofInvalid)?;
        if jti.is_empty() || jti.len() > 256 {
            return Err(invalid("proof 'jti' must be 1 to 256 characters"));
        }
        if str_member(&claims, "htm", "proof claim", Reason::ProofInvalid)? != http_method {
            return Err(invalid("proof 'htm' does not match the request method"));
        }
        let htu = str_member(&claims, "htu", "proof claim", Reason::ProofInvalid)?;
        match (normalize_htu(htu), normalize_htu(http_uri)) {
            (Some(a), Some(b)) if a == b => {}
            (_, None) => return Err(reject(Reason::Malformed, "the request URI is not an absolute http(s) URI")),
            _ => return Err(invalid("proof 'htu' does not match the request URI")),
        }
        let iat = claims
            .get("iat")
            .and_then(Value::as_u64)
            .ok_or_else(|| invalid("proof 'iat' is missing or not an integer"))?;
        if iat > now + cfg.leeway_secs {
            return Err(invalid("proof 'iat' is in the future"));
        }
        if iat + cfg.window_secs() < now {
            return Err(invalid("proof is too old"));
        }
        if let Some(token) = access_token {
            let ath = str_member(&claims, "ath", "proof claim", Reason::ProofInvalid)?;
            if !bool::from(ath.as_bytes().ct_eq(access_token_hash(token).as_bytes())) {
                return Err(invalid("proof 'ath' does not match the access token"));
            }
        }
        let nonce = match claims.get("nonce") {
            None => None,
            Some(Value::String(n)) if !n.is_empty() && n.len() <= 256 => Some(n.clone()),
            Some(_) => return Err(invalid("proof 'nonce' must be a string of 1 to 256 characters")),
        };
        Ok(VerifiedProof { jkt: self.jkt, jti: jti.to_owned(), iat, nonce })
    }
}

/// Verifies a DPoP proof for one request (with the access token it presents, or none at
/// the token endpoint). `now` is Unix seconds.
pub fn verify_proof(
    proof: &[u8],
    http_method: &str,
    http_uri: &str,
    access_token: Option<&[u8]>,
    now: u64,
    cfg: &DpopConfig,
    keys: &ProofKeyCache,
) -> Result<VerifiedProof, Rejection> {
    let parsed = parse_proof(proof, keys)?;
    parsed.verify_signature()?;
    parsed.check_claims(http_method, http_uri, access_token, now, cfg)
}

/// Header names come from the attacker: keep details one short line.
fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

/// The client side of DPoP: an Ed25519 key that signs one proof per request.
pub struct ProofSigner {
    key: ed25519_dalek::SigningKey,
    jwk: Value,
    jkt: String,
}

impl ProofSigner {
    pub fn generate() -> Self {
        Self::from_signing_key(ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng))
    }

    pub fn from_bytes(secret: &[u8; 32]) -> Self {
        Self::from_signing_key(ed25519_dalek::SigningKey::from_bytes(secret))
    }

    fn from_signing_key(key: ed25519_dalek::SigningKey) -> Self {
        let x = key.verifying_key().to_bytes();
        let jwk = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": b64::encode(&x)});
        ProofSigner { jkt: okp_thumbprint(&x), key, jwk }
    }

    /// RFC 7638 thumbprint: the `dpop_jkt` to bind tokens to.
    pub fn jkt(&self) -> &str {
        &self.jkt
    }

    pub fn public_jwk(&self) -> &Value {
        &self.jwk
    }

    pub fn secret_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// A proof for one request: fresh `jti`, `htm`, `htu` (query and fragment dropped),
    /// `iat`, and `ath` when an access token is given.
    pub fn sign(&self, http_method: &str, http_uri: &str, access_token: Option<&[u8]>, iat: u64, jti: &str) -> String {
        self.sign_with_nonce(http_method, http_uri, access_token, iat, jti, None)
    }

    /// `sign`, with the server's `nonce` (RFC 9449 section 8) when it asked for one.
    pub fn sign_with_nonce(
        &self,
        http_method: &str,
        http_uri: &str,
        access_token: Option<&[u8]>,
        iat: u64,
        jti: &str,
        nonce: Option<&str>,
    ) -> String {
        use ed25519_dalek::Signer;
        let header = serde_json::json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": self.jwk});
        let htu = normalize_htu(http_uri).unwrap_or_else(|| http_uri.to_owned());
        let mut claims = serde_json::json!({"jti": jti, "htm": http_method, "htu": htu, "iat": iat});
        if let Some(token) = access_token {
            claims["ath"] = Value::String(access_token_hash(token));
        }
        if let Some(nonce) = nonce {
            claims["nonce"] = Value::String(nonce.to_owned());
        }
        let mut proof = b64::encode(header.to_string().as_bytes());
        proof.push('.');
        proof.push_str(&b64::encode(claims.to_string().as_bytes()));
        let sig = self.key.sign(proof.as_bytes());
        proof.push('.');
        proof.push_str(&b64::encode(&sig.to_bytes()));
        proof
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htu_normalisation() {
        assert_eq!(
            normalize_htu("HTTPS://Server.Example.COM:443/a/../mcp?x=1#f").unwrap(),
            "https://server.example.com/mcp"
        );
        assert_eq!(normalize_htu("http://h:80/"), normalize_htu("http://h/"));
        assert_ne!(normalize_htu("http://h:8080/"), normalize_htu("http://h/"));
        assert!(normalize_htu("ftp://h/").is_none());
        assert!(normalize_htu("/relative").is_none());
    }

    #[test]
    fn token_endpoint_proofs_carry_their_nonce_and_need_no_ath() {
        let keys = ProofKeyCache::new(8);
        let cfg = DpopConfig::default();
        let signer = ProofSigner::generate();
        let uri = "https://as.example/token";
        let plain = signer.sign("POST", uri, None, 1000, "j1");
        let v = verify_proof(plain.as_bytes(), "POST", uri, None, 1000, &cfg, &keys).unwrap();
        assert_eq!((v.jkt.as_str(), v.jti.as_str(), v.nonce), (signer.jkt(), "j1", None));
        let with_nonce = signer.sign_with_nonce("POST", uri, None, 1000, "j2", Some("n-1"));
        let v = verify_proof(with_nonce.as_bytes(), "POST", uri, None, 1000, &cfg, &keys).unwrap();
        assert_eq!(v.nonce.as_deref(), Some("n-1"));
        // A resource request still needs its ath.
        let err = verify_proof(plain.as_bytes(), "POST", uri, Some(b"tok"), 1000, &cfg, &keys).unwrap_err();
        assert_eq!(err.reason, Reason::ProofInvalid);
        // Another endpoint, method or a stale proof is refused.
        assert!(verify_proof(plain.as_bytes(), "POST", "https://as.example/other", None, 1000, &cfg, &keys).is_err());
        assert!(verify_proof(plain.as_bytes(), "GET", uri, None, 1000, &cfg, &keys).is_err());
        assert!(verify_proof(plain.as_bytes(), "POST", uri, None, 1000 + cfg.window_secs() + 1, &cfg, &keys).is_err());
    }
}
