//! The validation path of DESIGN.md section 3, steps 1 to 6, in one call: size and
//! structure, verified-token cache, Ed25519 `verify_strict`, claims, sender constraint
//! (DPoP or certificate) and the replay keys. Step 7 (session and revocation state, and the
//! one exact replay record) belongs to the caller's store: the engine marks each replay key
//! with its bloom filter but never refuses a request as a replay. Also signs new access
//! tokens.

use crate::b64;
use crate::cache::{CachedToken, VerifiedTokenCache};
use crate::claims::{
    is_scope_token, is_thumbprint, AccessClaims, Confirmation, ALL_HOURS, MAX_CLAIM_BYTES, MAX_LIFETIME_SECS,
};
use crate::dpop::{self, DpopConfig, ParsedProof, ProofKeyCache, VerifiedProof};
use crate::error::{reject, Error, Reason, Rejection};
use crate::json;
use crate::jws::{self, str_member};
use crate::keys::{verify_batch_strict, verify_ed25519, KeySet};
use crate::replay::{Mark, ReplayCache, ReplayConfig};
use ed25519_dalek::VerifyingKey;
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use subtle::ConstantTimeEq;

/// Leeway is for clock skew, not for policy: it may not exceed this.
pub const MAX_LEEWAY_SECS: u64 = 60;
/// Distinct clients' DPoP keys kept decompressed (about 200 bytes each).
const PROOF_KEY_CACHE_CAPACITY: usize = 10_000;
/// The oldest a DPoP proof may be allowed to be (its replay record lives this long).
pub const MAX_DPOP_AGE_SECS: u64 = 600;
/// Header parameters that must never be honoured (RFC 8725 section 3.10 and DESIGN.md).
const FORBIDDEN_HEADER: [&str; 9] = ["jku", "x5u", "jwk", "crit", "b64", "cty", "x5c", "x5t", "x5t#S256"];

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub issuer: String,
    /// A token's lifetime when the issue request names none.
    pub default_ttl_secs: u64,
    pub leeway_secs: u64,
    pub dpop: DpopConfig,
    pub token_cache_capacity: usize,
    pub replay: ReplayConfig,
}

impl EngineConfig {
    pub fn new(issuer: impl Into<String>) -> Self {
        EngineConfig {
            issuer: issuer.into(),
            default_ttl_secs: 300,
            leeway_secs: 5,
            dpop: DpopConfig::default(),
            token_cache_capacity: 100_000,
            replay: ReplayConfig::default(),
        }
    }
}

/// One validation request: the fields of `ValidateTokenRequest` the engine decides on.
#[derive(Clone, Copy, Debug, Default)]
pub struct ValidateRequest<'a> {
    pub token: &'a [u8],
    pub audience: &'a str,
    pub dpop_proof: Option<&'a [u8]>,
    pub http_method: Option<&'a str>,
    pub http_uri: Option<&'a str>,
    pub cert_thumbprint: Option<&'a str>,
    /// Scopes the token must carry (see `Validated::missing_scopes`).
    pub required_scopes: &'a [String],
}

/// One issue request: the fields of `IssueTokenRequest` the engine decides on. The
/// session the token is bound to is the caller's (its store opens or continues it).
#[derive(Clone, Copy, Debug, Default)]
pub struct IssueRequest<'a> {
    pub client_id: &'a str,
    pub audience: &'a str,
    pub scopes: &'a [String],
    /// None: the engine's `default_ttl_secs`.
    pub ttl_secs: Option<u64>,
    /// A live session to continue; None opens a new one.
    pub session_id: Option<&'a str>,
    pub dpop_jkt: Option<&'a str>,
    pub cert_thumbprint: Option<&'a str>,
    pub once: bool,
    /// The subject of the attestation the client proved itself with, named in the token.
    pub attested_subject: Option<&'a str>,
    /// The client's expected usage window (an hour mask, see `AccessClaims::usage_window`).
    pub usage_window: Option<u32>,
}

impl IssueRequest<'_> {
    /// Every rule on an issue request that needs no state: lifetime, id and scope shapes,
    /// and the binding (a DPoP key or a certificate, never both). Returns the binding.
    /// Checked before the caller opens a session, so a bad request opens none.
    pub fn check(&self) -> Result<Option<Confirmation>, Error> {
        let arg = |m: String| Err(Error::InvalidArgument(m));
        if let Some(ttl) = self.ttl_secs {
            if ttl == 0 || ttl > MAX_LIFETIME_SECS {
                return arg(format!("ttl_seconds must be 1 to {MAX_LIFETIME_SECS}"));
            }
        }
        let ids =
            [("client_id", Some(self.client_id)), ("audience", Some(self.audience)), ("session_id", self.session_id)];
        for (name, value) in ids {
            if let Some(v) = value {
                if v.is_empty() || v.len() > MAX_CLAIM_BYTES {
                    return arg(format!("{name} must be 1 to {MAX_CLAIM_BYTES} bytes"));
                }
            }
        }
        if let Some(w) = self.usage_window {
            if w == 0 || w > ALL_HOURS {
                return arg("usage_window must be an hour mask: 1 to 2^24 - 1 (bit h: UTC hour h)".into());
            }
        }
        if let Some(bad) = self.scopes.iter().find(|s| !is_scope_token(s)) {
            return arg(format!("scope {:?} is not a valid scope token", truncate(bad)));
        }
        let thumbprint = |value: &str, name: &str| -> Result<String, Error> {
            if is_thumbprint(value) {
                Ok(value.to_owned())
            } else {
                Err(Error::InvalidArgument(format!("{name} must be a base64url SHA-256 thumbprint (43 characters)")))
            }
        };
        match (self.dpop_jkt, self.cert_thumbprint) {
            (Some(_), Some(_)) => arg("a token binds to a DPoP key or a certificate, not both".into()),
            (Some(j), None) => Ok(Some(Confirmation::DpopJkt(thumbprint(j, "dpop_jkt")?))),
            (None, Some(x)) => Ok(Some(Confirmation::CertThumbprint(thumbprint(x, "cert_thumbprint")?))),
            (None, None) => Ok(None),
        }
    }
}

/// A replay record the state store must set if absent (it is the one exact record, and
/// answers `REPLAYED` when the key is already there): the SHA-256 key of the signed `jti`,
/// the Unix time after which it may be forgotten, and the bloom filter's advisory mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayRecord {
    pub key: [u8; 32],
    pub until: u64,
    pub mark: Mark,
}

/// A token that passed steps 1 to 6, with the replay records step 7 must set.
#[derive(Clone, Debug)]
pub struct Validated {
    pub claims: Arc<AccessClaims>,
    /// At most two: the DPoP proof's and a single-use token's. The caller must record them
    /// in its store before accepting the token.
    pub replay: Vec<ReplayRecord>,
    /// When the token lacks a required scope: the `INSUFFICIENT_SCOPE` detail. The caller
    /// still checks the token's state (a revoked token is answered as revoked), then
    /// refuses; `replay` is empty, so nothing is recorded for the refused request.
    pub missing_scopes: Option<String>,
}

/// The sender-constraint step of one request, split so that a batch verifies every
/// Ed25519 proof signature together. Lives for one request, on the stack or in the
/// batch's vector: boxing the large variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Binding<'a> {
    /// Nothing left to check (a bearer or certificate-bound token).
    Done,
    /// A DPoP proof parsed up to its signature (the token is DPoP-bound).
    Proof { parsed: ParsedProof<'a>, method: &'a str, uri: &'a str },
}

/// A token parsed up to its signature check.
struct Unverified {
    cache_key: [u8; 32],
    kid: Arc<str>,
    key: VerifyingKey,
    signing_input_len: usize,
    payload: Vec<u8>,
    signature: Vec<u8>,
}

enum Lookup {
    Cached(Arc<AccessClaims>),
    Parsed(Box<Unverified>),
}

pub struct Engine {
    keys: Arc<RwLock<KeySet>>,
    cfg: EngineConfig,
    cache: VerifiedTokenCache,
    proof_keys: ProofKeyCache,
    replay: ReplayCache,
}

/// 128 random bits, base64url: for `jti` and session ids. Never starts with `-`, so an
/// id can be passed to a command line without being read as an option.
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    loop {
        OsRng.fill_bytes(&mut bytes);
        let id = b64::encode(&bytes);
        if !id.starts_with('-') {
            return id;
        }
    }
}

fn replay_key(domain: &str, scope: &str, jti: &str) -> [u8; 32] {
    // Length-prefixed parts, so ("ab", "c") and ("a", "bc") never collide.
    let mut h = Sha256::new();
    for part in [domain, scope, jti] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

impl Engine {
    pub fn new(keys: Arc<RwLock<KeySet>>, cfg: EngineConfig) -> Result<Self, Error> {
        if cfg.issuer.is_empty() {
            return Err(Error::InvalidArgument("issuer must not be empty".into()));
        }
        if cfg.leeway_secs > MAX_LEEWAY_SECS {
            return Err(Error::InvalidArgument(format!("leeway must be at most {MAX_LEEWAY_SECS} seconds")));
        }
        if cfg.default_ttl_secs == 0 || cfg.default_ttl_secs > MAX_LIFETIME_SECS {
            return Err(Error::InvalidArgument(format!("default_ttl_seconds must be 1 to {MAX_LIFETIME_SECS}")));
        }
        if cfg.dpop.max_age_secs == 0 || cfg.dpop.max_age_secs > MAX_DPOP_AGE_SECS {
            return Err(Error::InvalidArgument(format!("DPoP proof max age must be 1 to {MAX_DPOP_AGE_SECS} seconds")));
        }
        if cfg.replay.capacity == 0 || !(cfg.replay.fp_rate > 0.0 && cfg.replay.fp_rate < 0.5) {
            return Err(Error::InvalidArgument("replay capacity must be positive and fp rate in (0, 0.5)".into()));
        }
        let mut replay = cfg.replay;
        replay.window_secs = replay.window_secs.max(cfg.dpop.window_secs() + cfg.dpop.leeway_secs);
        let cache = VerifiedTokenCache::new(cfg.token_cache_capacity);
        let proof_keys = ProofKeyCache::new(PROOF_KEY_CACHE_CAPACITY);
        Ok(Engine { keys, cache, proof_keys, replay: ReplayCache::new(replay), cfg })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn keys(&self) -> &Arc<RwLock<KeySet>> {
        &self.keys
    }

    pub fn replay_cache(&self) -> &ReplayCache {
        &self.replay
    }

    pub fn token_cache(&self) -> &VerifiedTokenCache {
        &self.cache
    }

    /// Signs a new access token with the active key, bound to `session_id`, expiring at
    /// the request's lifetime or at `not_after` (the session's end), whichever is first.
    /// Returns the token and its claims.
    pub fn issue(
        &self,
        req: &IssueRequest,
        session_id: &str,
        not_after: u64,
        now: u64,
    ) -> Result<(String, AccessClaims), Error> {
        let cnf = req.check()?;
        if session_id.is_empty() || session_id.len() > MAX_CLAIM_BYTES {
            return Err(Error::InvalidArgument(format!("session_id must be 1 to {MAX_CLAIM_BYTES} bytes")));
        }
        let exp = now.saturating_add(req.ttl_secs.unwrap_or(self.cfg.default_ttl_secs)).min(not_after);
        if exp <= now {
            return Err(Error::InvalidArgument("the session has ended: no token can outlive it".into()));
        }
        let claims = AccessClaims {
            iss: self.cfg.issuer.clone(),
            sub: req.client_id.to_owned(),
            client_id: req.client_id.to_owned(),
            aud: req.audience.to_owned(),
            sid: session_id.to_owned(),
            jti: random_id(),
            iat: now,
            nbf: now,
            exp,
            scope: req.scopes.join(" "),
            cnf,
            once: req.once,
            attested_sub: req.attested_subject.map(str::to_owned),
            usage_window: req.usage_window,
        };
        let token = self.sign(&claims)?;
        Ok((token, claims))
    }

    /// Signs any claim set as an `at+jwt` with the active key (tests use it for variants).
    pub fn sign(&self, claims: &impl serde::Serialize) -> Result<String, Error> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let kid = keys.active_kid().ok_or_else(|| Error::InvalidArgument("the key set is empty".into()))?;
        let header = serde_json::json!({"alg": "EdDSA", "typ": "at+jwt", "kid": kid});
        let payload = serde_json::to_vec(claims).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let mut token = b64::encode(header.to_string().as_bytes());
        token.push('.');
        token.push_str(&b64::encode(&payload));
        let (_, sig) = keys.sign(token.as_bytes())?;
        token.push('.');
        token.push_str(&b64::encode(&sig));
        Ok(token)
    }

    /// Steps 1 to 6 of the validation path. `now` is Unix seconds.
    pub fn validate(&self, req: &ValidateRequest, now: u64) -> Result<Validated, Rejection> {
        let claims = self.verified_claims(req.token, now)?;
        let proof = match self.binding(&claims, req, now)? {
            Binding::Done => None,
            Binding::Proof { parsed, method, uri } => {
                parsed.verify_signature()?;
                Some(self.proof_claims(&claims, parsed, method, uri, req, now)?)
            }
        };
        Ok(self.validated(claims, req, proof, now))
    }

    /// Many validations in one call: the same checks and answers as `validate`, with the
    /// signatures of uncached tokens verified together, then those of the Ed25519 DPoP
    /// proofs together (`verify_batch_strict`).
    pub fn validate_batch(&self, reqs: &[ValidateRequest], now: u64) -> Vec<Result<Validated, Rejection>> {
        let mut claims: Vec<Option<Result<Arc<AccessClaims>, Rejection>>> = Vec::with_capacity(reqs.len());
        let mut pending: Vec<(usize, Box<Unverified>)> = Vec::new();
        for (i, req) in reqs.iter().enumerate() {
            match self.cached_or_parsed(req.token, now) {
                Ok(Lookup::Cached(c)) => claims.push(Some(Ok(c))),
                Ok(Lookup::Parsed(u)) => {
                    claims.push(None);
                    pending.push((i, u));
                }
                Err(r) => claims.push(Some(Err(r))),
            }
        }
        let items: Vec<(&VerifyingKey, &[u8], &[u8])> = pending
            .iter()
            .map(|(i, u)| (&u.key, &reqs[*i].token[..u.signing_input_len], u.signature.as_slice()))
            .collect();
        let verified = verify_batch_strict(&items);
        for ((i, u), outcome) in pending.into_iter().zip(verified) {
            claims[i] = Some(outcome.and_then(|()| self.accept(u, now)));
        }
        let claims: Vec<Result<Arc<AccessClaims>, Rejection>> =
            claims.into_iter().map(|c| c.expect("every request answered")).collect();
        // The sender constraint up to each proof's signature, then the Ed25519 proof
        // signatures in one batch (ES256 ones alone), then each proof's claims.
        let mut bindings: Vec<Result<Binding, Rejection>> = claims
            .iter()
            .zip(reqs)
            .map(|(c, req)| match c {
                Ok(c) => self.binding(c, req, now),
                Err(r) => Err(r.clone()),
            })
            .collect();
        let proofs: Vec<usize> = (0..bindings.len())
            .filter(|&i| matches!(&bindings[i], Ok(Binding::Proof { parsed, .. }) if parsed.ed25519_item().is_some()))
            .collect();
        let proof_items: Vec<(&VerifyingKey, &[u8], &[u8])> = proofs
            .iter()
            .filter_map(|&i| match &bindings[i] {
                Ok(Binding::Proof { parsed, .. }) => parsed.ed25519_item(),
                _ => None,
            })
            .collect();
        let proof_signatures = verify_batch_strict(&proof_items);
        drop(proof_items);
        // One answer per proof, or every proof refused: a proof without an answer must
        // never pass as verified (fail closed).
        let all_answered = proof_signatures.len() == proofs.len();
        for (n, &i) in proofs.iter().enumerate() {
            if !all_answered || !matches!(proof_signatures.get(n), Some(Ok(()))) {
                bindings[i] = Err(dpop::bad_signature());
            }
        }
        let proven: Vec<usize> = proofs;
        claims
            .into_iter()
            .zip(bindings)
            .zip(reqs)
            .enumerate()
            .map(|(i, ((c, binding), req))| {
                let claims = c?;
                let proof = match binding? {
                    Binding::Done => None,
                    Binding::Proof { parsed, method, uri } => {
                        if proven.binary_search(&i).is_err() {
                            parsed.verify_signature()?; // ES256: verified alone
                        }
                        Some(self.proof_claims(&claims, parsed, method, uri, req, now)?)
                    }
                };
                Ok(self.validated(claims, req, proof, now))
            })
            .collect()
    }

    /// `validate`, when it needs no signature check: a cached token presented without a
    /// DPoP proof (the answer is then a few microseconds of work). None when a signature
    /// must be verified: the caller calls `validate`, and may release its own locks for it.
    pub fn validate_cached(&self, req: &ValidateRequest, now: u64) -> Option<Result<Validated, Rejection>> {
        if req.dpop_proof.is_some_and(|p| !p.is_empty()) || req.token.len() > jws::MAX_COMPACT_BYTES {
            return None;
        }
        let claims = self.cache_hit(&Sha256::digest(req.token).into(), now)?;
        Some(match self.binding(&claims, req, now) {
            Ok(Binding::Done) => Ok(self.validated(claims, req, None, now)),
            Ok(Binding::Proof { .. }) => return None, // not reached: no proof was presented
            Err(r) => Err(r),
        })
    }

    /// The cached claims of the token whose SHA-256 is `cache_key`, when its key is still
    /// the one that verified it.
    fn cache_hit(&self, cache_key: &[u8; 32], now: u64) -> Option<Arc<AccessClaims>> {
        let hit = self.cache.get(cache_key, now, self.cfg.leeway_secs)?;
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.verifying_key(&hit.kid).is_some_and(|k| k.as_bytes() == &hit.key).then_some(hit.claims)
    }

    /// Structure, header, signature and claim shape: from the cache or checked now.
    fn verified_claims(&self, token: &[u8], now: u64) -> Result<Arc<AccessClaims>, Rejection> {
        match self.cached_or_parsed(token, now)? {
            Lookup::Cached(claims) => Ok(claims),
            Lookup::Parsed(u) => {
                verify_ed25519(&u.key, &token[..u.signing_input_len], &u.signature)?;
                self.accept(u, now)
            }
        }
    }

    /// A cache hit, or the token parsed up to (not including) its signature check.
    fn cached_or_parsed(&self, token: &[u8], now: u64) -> Result<Lookup, Rejection> {
        if token.len() > jws::MAX_COMPACT_BYTES {
            return Err(reject(Reason::TooLarge, format!("token is larger than {} bytes", jws::MAX_COMPACT_BYTES)));
        }
        let cache_key: [u8; 32] = Sha256::digest(token).into();
        if let Some(claims) = self.cache_hit(&cache_key, now) {
            return Ok(Lookup::Cached(claims));
        }
        let compact = jws::parse(token, "token", Reason::Malformed)?;
        let h = &compact.header;
        if str_member(h, "alg", "token header", Reason::UnsupportedAlgorithm)? != "EdDSA" {
            return Err(reject(Reason::UnsupportedAlgorithm, "token 'alg' is not EdDSA"));
        }
        if let Some(name) = h.keys().find(|k| !matches!(k.as_str(), "alg" | "typ" | "kid")) {
            let detail = if FORBIDDEN_HEADER.contains(&name.as_str()) {
                format!("token header parameter '{name}' is not allowed")
            } else {
                format!("token header parameter '{}' is not supported", truncate(name))
            };
            return Err(reject(Reason::Malformed, detail));
        }
        if str_member(h, "typ", "token header", Reason::Malformed)? != "at+jwt" {
            return Err(reject(Reason::Malformed, "token 'typ' is not at+jwt"));
        }
        let kid = str_member(h, "kid", "token header", Reason::Malformed)?;
        let key = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .verifying_key(kid)
            .ok_or_else(|| reject(Reason::UnknownKey, "token 'kid' is not a key of this broker"))?;
        Ok(Lookup::Parsed(Box::new(Unverified {
            cache_key,
            kid: Arc::from(kid),
            key,
            signing_input_len: compact.signing_input.len(),
            payload: compact.payload,
            signature: compact.signature,
        })))
    }

    /// After the signature verified: the claims' shape, then into the cache.
    fn accept(&self, u: Box<Unverified>, now: u64) -> Result<Arc<AccessClaims>, Rejection> {
        let payload =
            json::parse_object(&u.payload).map_err(|e| reject(Reason::Malformed, format!("token claims: {e}")))?;
        let claims = Arc::new(AccessClaims::from_json(&payload)?);
        let cached = CachedToken { claims: claims.clone(), kid: u.kid, key: u.key.to_bytes() };
        self.cache.insert(u.cache_key, cached, now, self.cfg.leeway_secs);
        Ok(claims)
    }

    /// Lifetime, issuer and audience: the checks every use of a token starts with.
    fn check_lifetime_and_audience(&self, claims: &AccessClaims, audience: &str, now: u64) -> Result<(), Rejection> {
        let leeway = self.cfg.leeway_secs;
        if now >= claims.exp.saturating_add(leeway) {
            return Err(reject(Reason::Expired, "token has expired"));
        }
        if claims.nbf > now + leeway || claims.iat > now + leeway {
            return Err(reject(Reason::NotYetValid, "token is not valid yet"));
        }
        if claims.iss != self.cfg.issuer {
            return Err(reject(Reason::WrongIssuer, "token was issued by another issuer"));
        }
        if audience.is_empty() {
            return Err(reject(Reason::WrongAudience, "no audience given to validate for"));
        }
        if claims.aud != audience {
            return Err(reject(Reason::WrongAudience, "token was issued for another audience"));
        }
        Ok(())
    }

    /// RFC 7662 introspection: the token's signature, shape, lifetime, issuer and
    /// audience, but not its binding. The caller (a resource server) checks the proof
    /// against the `cnf` it is given; nothing is recorded (no replay, no `once` use).
    pub fn introspect(&self, token: &[u8], audience: &str, now: u64) -> Result<Validated, Rejection> {
        let claims = self.verified_claims(token, now)?;
        self.check_lifetime_and_audience(&claims, audience, now)?;
        Ok(Validated { claims, replay: Vec::new(), missing_scopes: None })
    }

    /// Everything that depends on the request or the clock, up to a DPoP proof's
    /// signature: run on every call (a cached token skips only its own signature).
    fn binding<'r>(
        &self,
        claims: &AccessClaims,
        req: &ValidateRequest<'r>,
        now: u64,
    ) -> Result<Binding<'r>, Rejection> {
        self.check_lifetime_and_audience(claims, req.audience, now)?;
        let proof = req.dpop_proof.filter(|p| !p.is_empty());
        match &claims.cnf {
            Some(Confirmation::DpopJkt(_)) => {
                let proof = proof
                    .ok_or_else(|| reject(Reason::ProofMissing, "token is DPoP-bound; no DPoP proof presented"))?;
                let (method, uri) = match (req.http_method, req.http_uri) {
                    (Some(m), Some(u)) if !m.is_empty() && !u.is_empty() => (m, u),
                    _ => {
                        return Err(reject(
                            Reason::Malformed,
                            "a DPoP proof needs the request's http_method and http_uri",
                        ))
                    }
                };
                Ok(Binding::Proof { parsed: dpop::parse_proof(proof, &self.proof_keys)?, method, uri })
            }
            // A token binds to a DPoP key or a certificate, never both: a proof presented
            // with a certificate-bound token claims a binding the token does not have.
            Some(Confirmation::CertThumbprint(_)) if proof.is_some() => Err(reject(
                Reason::BindingMismatch,
                "a DPoP proof was presented with a token bound to a client certificate",
            )),
            Some(Confirmation::CertThumbprint(x5t)) => match req.cert_thumbprint {
                Some(presented) if bool::from(presented.as_bytes().ct_eq(x5t.as_bytes())) => Ok(Binding::Done),
                Some(_) => Err(reject(Reason::BindingMismatch, "client certificate does not match the token")),
                None => Err(reject(Reason::BindingMismatch, "token is bound to a client certificate; none presented")),
            },
            // RFC 9449 section 7.1: a DPoP proof claims a DPoP-bound token; an unbound one is
            // refused rather than the proof being silently ignored.
            None if proof.is_some() => {
                Err(reject(Reason::BindingMismatch, "a DPoP proof was presented with a token that is not DPoP-bound"))
            }
            None => Ok(Binding::Done),
        }
    }

    /// After the proof's signature verified: its claims, and its key against `cnf.jkt`.
    fn proof_claims(
        &self,
        claims: &AccessClaims,
        parsed: ParsedProof,
        method: &str,
        uri: &str,
        req: &ValidateRequest,
        now: u64,
    ) -> Result<VerifiedProof, Rejection> {
        let jkt = match &claims.cnf {
            Some(Confirmation::DpopJkt(jkt)) => jkt.as_str(),
            // Not reached (a proof is parsed only for a DPoP-bound token): fail closed, never panic.
            _ => return Err(reject(Reason::BindingMismatch, "token is not DPoP-bound")),
        };
        let verified = parsed.check_claims(method, uri, Some(req.token), now, &self.cfg.dpop)?;
        if !bool::from(verified.jkt.as_bytes().ct_eq(jkt.as_bytes())) {
            return Err(reject(Reason::BindingMismatch, "DPoP proof key is not the key the token is bound to"));
        }
        Ok(verified)
    }

    /// The scope check, then the replay records (none for a token that lacks a scope).
    fn validated(
        &self,
        claims: Arc<AccessClaims>,
        req: &ValidateRequest,
        proof: Option<VerifiedProof>,
        now: u64,
    ) -> Validated {
        let missing_scopes = missing_scopes(&claims, req.required_scopes);
        let mut replay = Vec::new();
        if missing_scopes.is_none() {
            if let Some(p) = proof {
                // Exclusive: the proof is accepted through second iat + window, so its record
                // must still be live then (a record is live while until > now), whatever the
                // leeway.
                let until = p.iat + self.cfg.dpop.window_secs() + self.cfg.dpop.leeway_secs + 1;
                replay.push(self.replay_record(replay_key("dpop", &p.jkt, &p.jti), until, now));
            }
            if claims.once {
                let until = claims.exp + self.cfg.leeway_secs;
                replay.push(self.replay_record(replay_key("once", &claims.iss, &claims.jti), until, now));
            }
        }
        Validated { claims, replay, missing_scopes }
    }

    /// The record the store must set, marked by the bloom filter (advisory only).
    fn replay_record(&self, key: [u8; 32], until: u64, now: u64) -> ReplayRecord {
        ReplayRecord { key, until, mark: self.replay.mark(&key, now) }
    }
}

/// The `INSUFFICIENT_SCOPE` detail when `claims` lack one of `required`: the missing
/// scopes sorted, at most 200 characters of them.
fn missing_scopes(claims: &AccessClaims, required: &[String]) -> Option<String> {
    if required.is_empty() {
        return None;
    }
    let held: BTreeSet<&str> = claims.scopes().collect();
    let missing: BTreeSet<&str> = required.iter().map(String::as_str).filter(|s| !held.contains(s)).collect();
    if missing.is_empty() {
        return None;
    }
    let list: String = missing.into_iter().collect::<Vec<_>>().join(" ").chars().take(200).collect();
    Some(format!("token lacks scope: {list}"))
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}
