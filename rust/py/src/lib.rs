//! `tokenbroker._core`: the PyO3 binding of tokenbroker-core. It only converts types and
//! errors; the logic lives in the core crate. Exceptions are defined in Python
//! (`tokenbroker.errors`) and raised from here.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};
use tokenbroker_core::claims::{AccessClaims, Confirmation};
use tokenbroker_core::dpop::{DpopConfig, ProofSigner as CoreProofSigner};
use tokenbroker_core::keys::KeySet as CoreKeySet;
use tokenbroker_core::replay::ReplayConfig;
use tokenbroker_core::{
    Engine as CoreEngine, EngineConfig, Error, IssueRequest, Reason, Rejection, ReplayRecord, ValidateRequest,
    Validated,
};

pyo3::import_exception!(tokenbroker.errors, InvalidKeyError);
pyo3::import_exception!(tokenbroker.errors, UnknownKeyIdError);
pyo3::import_exception!(tokenbroker.errors, InvalidArgumentError);

/// The one conversion from core errors to Python exceptions.
struct PyCoreError(Error);

impl From<Error> for PyCoreError {
    fn from(e: Error) -> Self {
        PyCoreError(e)
    }
}

impl From<PyCoreError> for PyErr {
    fn from(e: PyCoreError) -> PyErr {
        let message = e.0.to_string();
        match e.0 {
            Error::InvalidKey(_) => InvalidKeyError::new_err(message),
            Error::UnknownKeyId(_) => UnknownKeyIdError::new_err(message),
            Error::InvalidArgument(_) => InvalidArgumentError::new_err(message),
        }
    }
}

type CoreResult<T> = Result<T, PyCoreError>;

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The broker's signing keys (shared with every `Engine` built on it).
#[pyclass(frozen, module = "tokenbroker._core")]
struct KeySet {
    inner: Arc<RwLock<CoreKeySet>>,
}

impl KeySet {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, CoreKeySet> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, CoreKeySet> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl KeySet {
    #[new]
    fn new() -> Self {
        KeySet { inner: Arc::new(RwLock::new(CoreKeySet::new())) }
    }

    fn generate(&self) -> String {
        self.write().generate()
    }

    #[pyo3(signature = (pem, kid=None))]
    fn add_pem(&self, pem: &str, kid: Option<String>) -> CoreResult<String> {
        Ok(self.write().add_pem(pem, kid)?)
    }

    fn add_jwk(&self, jwk_json: &str) -> CoreResult<String> {
        Ok(self.write().add_jwk(jwk_json)?)
    }

    fn rotate(&self) -> String {
        self.write().rotate()
    }

    fn retire(&self, kid: &str) -> CoreResult<()> {
        Ok(self.write().retire(kid)?)
    }

    #[getter]
    fn active_kid(&self) -> Option<String> {
        self.read().active_kid().map(str::to_owned)
    }

    fn kids(&self) -> Vec<String> {
        self.read().kids()
    }

    fn private_pem(&self, kid: &str) -> CoreResult<String> {
        Ok(self.read().private_pem(kid)?)
    }

    #[pyo3(signature = (kid, private=false))]
    fn jwk_json(&self, kid: &str, private: bool) -> CoreResult<String> {
        Ok(self.read().jwk(kid, private)?.to_string())
    }

    fn jwks_json(&self) -> String {
        self.read().jwks().to_string()
    }
}

/// The outcome of steps 1 to 6 of a validation: a reason and, when the token's signature
/// verified, its claims.
#[pyclass(frozen, module = "tokenbroker._core")]
struct Verdict {
    reason: Reason,
    detail: String,
    claims: Option<Arc<AccessClaims>>,
    replay: Vec<ReplayRecord>,
}

impl Verdict {
    fn from_result(result: Result<Validated, Rejection>) -> Self {
        match result {
            Ok(v) => Verdict { reason: Reason::Ok, detail: String::new(), claims: Some(v.claims), replay: v.replay },
            Err(r) => Verdict { reason: r.reason, detail: r.detail.into_owned(), claims: None, replay: Vec::new() },
        }
    }

    fn claim<T>(&self, f: impl FnOnce(&AccessClaims) -> T) -> Option<T> {
        self.claims.as_deref().map(f)
    }
}

#[pymethods]
impl Verdict {
    /// The `Reason` number.
    #[getter]
    fn reason(&self) -> u8 {
        self.reason as u8
    }

    #[getter]
    fn ok(&self) -> bool {
        self.reason == Reason::Ok
    }

    #[getter]
    fn detail(&self) -> &str {
        &self.detail
    }

    #[getter]
    fn client_id(&self) -> Option<String> {
        self.claim(|c| c.client_id.clone())
    }

    #[getter]
    fn subject(&self) -> Option<String> {
        self.claim(|c| c.sub.clone())
    }

    #[getter]
    fn session_id(&self) -> Option<String> {
        self.claim(|c| c.sid.clone())
    }

    #[getter]
    fn audience(&self) -> Option<String> {
        self.claim(|c| c.aud.clone())
    }

    #[getter]
    fn issuer(&self) -> Option<String> {
        self.claim(|c| c.iss.clone())
    }

    #[getter]
    fn jti(&self) -> Option<String> {
        self.claim(|c| c.jti.clone())
    }

    #[getter]
    fn scope(&self) -> Option<String> {
        self.claim(|c| c.scope.clone())
    }

    #[getter]
    fn issued_at(&self) -> Option<u64> {
        self.claim(|c| c.iat)
    }

    #[getter]
    fn expires_at(&self) -> Option<u64> {
        self.claim(|c| c.exp)
    }

    #[getter]
    fn once(&self) -> Option<bool> {
        self.claim(|c| c.once)
    }

    /// ("jkt" or "x5t#S256", thumbprint) when the token is sender-constrained.
    #[getter]
    fn confirmation(&self) -> Option<(&'static str, String)> {
        match self.claims.as_deref()?.cnf.as_ref()? {
            Confirmation::DpopJkt(j) => Some(("jkt", j.clone())),
            Confirmation::CertThumbprint(x) => Some(("x5t#S256", x.clone())),
        }
    }

    /// Replay records the state store must set if absent: (hex key, forget after).
    #[getter]
    fn replay(&self) -> Vec<(String, u64)> {
        self.replay.iter().map(|r| (hex(&r.key), r.until)).collect()
    }

    fn __repr__(&self) -> String {
        format!("Verdict(reason={}, detail={:?})", self.reason.name(), self.detail)
    }
}

/// A token the engine signed, with the claims a caller records.
#[pyclass(frozen, module = "tokenbroker._core", get_all)]
struct SignedToken {
    access_token: String,
    jti: String,
    issued_at: u64,
    expires_at: u64,
    scope: String,
}

/// Validation and signing; one per broker.
#[pyclass(frozen, module = "tokenbroker._core")]
struct Engine {
    inner: Arc<CoreEngine>,
}

type BatchItem = (String, String, Option<String>, Option<String>, Option<String>, Option<String>);

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (keys, issuer, *, leeway_seconds=5, dpop_max_age_seconds=60, token_cache_capacity=100_000, replay_capacity=1_000_000, replay_fp_rate=0.001))]
    fn new(
        keys: &KeySet,
        issuer: String,
        leeway_seconds: u64,
        dpop_max_age_seconds: u64,
        token_cache_capacity: usize,
        replay_capacity: usize,
        replay_fp_rate: f64,
    ) -> CoreResult<Self> {
        let cfg = EngineConfig {
            issuer,
            leeway_secs: leeway_seconds,
            dpop: DpopConfig { max_age_secs: dpop_max_age_seconds, leeway_secs: leeway_seconds },
            token_cache_capacity,
            replay: ReplayConfig { capacity: replay_capacity, fp_rate: replay_fp_rate, window_secs: 1 },
        };
        Ok(Engine { inner: Arc::new(CoreEngine::new(keys.inner.clone(), cfg)?) })
    }

    #[getter]
    fn issuer(&self) -> &str {
        &self.inner.config().issuer
    }

    #[pyo3(signature = (*, client_id, audience, session_id, scopes, ttl_seconds, dpop_jkt=None, cert_thumbprint=None, once=false, now=None))]
    #[allow(clippy::too_many_arguments)]
    fn issue(
        &self,
        client_id: &str,
        audience: &str,
        session_id: &str,
        scopes: Vec<String>,
        ttl_seconds: u64,
        dpop_jkt: Option<String>,
        cert_thumbprint: Option<String>,
        once: bool,
        now: Option<u64>,
    ) -> CoreResult<SignedToken> {
        let cnf = match (dpop_jkt, cert_thumbprint) {
            (Some(_), Some(_)) => {
                return Err(
                    Error::InvalidArgument("a token binds to a DPoP key or a certificate, not both".into()).into()
                )
            }
            (Some(j), None) => Some(Confirmation::DpopJkt(check_thumbprint(j, "dpop_jkt")?)),
            (None, Some(x)) => Some(Confirmation::CertThumbprint(check_thumbprint(x, "cert_thumbprint")?)),
            (None, None) => None,
        };
        let req = IssueRequest { client_id, audience, session_id, scopes: &scopes, ttl_secs: ttl_seconds, cnf, once };
        let (access_token, claims) = self.inner.issue(&req, now.unwrap_or_else(unix_now))?;
        Ok(SignedToken {
            access_token,
            jti: claims.jti,
            issued_at: claims.iat,
            expires_at: claims.exp,
            scope: claims.scope,
        })
    }

    /// Steps 1 to 6 of the validation path; never raises for a bad token.
    #[pyo3(signature = (token, audience, dpop_proof=None, http_method=None, http_uri=None, cert_thumbprint=None, now=None))]
    #[allow(clippy::too_many_arguments)]
    fn validate(
        &self,
        py: Python<'_>,
        token: &str,
        audience: &str,
        dpop_proof: Option<&str>,
        http_method: Option<&str>,
        http_uri: Option<&str>,
        cert_thumbprint: Option<&str>,
        now: Option<u64>,
    ) -> Verdict {
        let req = ValidateRequest {
            token: token.as_bytes(),
            audience,
            dpop_proof: dpop_proof.map(str::as_bytes),
            http_method,
            http_uri,
            cert_thumbprint,
        };
        let now = now.unwrap_or_else(unix_now);
        let engine = &self.inner;
        Verdict::from_result(py.allow_threads(|| engine.validate(&req, now)))
    }

    /// Many validations in one call, the GIL released throughout. Each item is
    /// `(token, audience, dpop_proof, http_method, http_uri, cert_thumbprint)`.
    #[pyo3(signature = (requests, now=None))]
    fn validate_batch(&self, py: Python<'_>, requests: Vec<BatchItem>, now: Option<u64>) -> Vec<Verdict> {
        let reqs: Vec<ValidateRequest> = requests
            .iter()
            .map(|(token, audience, proof, method, uri, cert)| ValidateRequest {
                token: token.as_bytes(),
                audience,
                dpop_proof: proof.as_deref().map(str::as_bytes),
                http_method: method.as_deref(),
                http_uri: uri.as_deref(),
                cert_thumbprint: cert.as_deref(),
            })
            .collect();
        let now = now.unwrap_or_else(unix_now);
        let engine = &self.inner;
        let results = py.allow_threads(|| engine.validate_batch(&reqs, now));
        results.into_iter().map(Verdict::from_result).collect()
    }

    /// Drops every cached verification (after a key is retired elsewhere, say).
    fn clear_cache(&self) {
        self.inner.token_cache().clear();
    }

    /// Counters for metrics and tests: (cached tokens, replay keys marked, bloom filter
    /// bytes, keys the bloom filter marked "maybe seen"). The engine holds no exact replay
    /// record: the store does.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let (marked, maybe_seen) = self.inner.replay_cache().stats();
        PyTuple::new(
            py,
            [
                self.inner.token_cache().len() as u64,
                marked,
                self.inner.replay_cache().bloom().memory_bytes() as u64,
                maybe_seen,
            ],
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_thumbprint(value: String, name: &str) -> Result<String, PyCoreError> {
    if value.len() == 43 && tokenbroker_core::b64::decode(value.as_bytes()).is_some() {
        Ok(value)
    } else {
        Err(Error::InvalidArgument(format!("{name} must be a base64url SHA-256 thumbprint (43 characters)")).into())
    }
}

/// A client's DPoP key: signs one proof per request.
#[pyclass(frozen, module = "tokenbroker._core")]
struct ProofSigner {
    inner: CoreProofSigner,
}

#[pymethods]
impl ProofSigner {
    #[new]
    #[pyo3(signature = (secret=None))]
    fn new(secret: Option<&[u8]>) -> PyResult<Self> {
        let inner = match secret {
            None => CoreProofSigner::generate(),
            Some(s) => CoreProofSigner::from_bytes(
                s.try_into().map_err(|_| PyValueError::new_err("a DPoP secret key is 32 bytes"))?,
            ),
        };
        Ok(ProofSigner { inner })
    }

    #[getter]
    fn jkt(&self) -> &str {
        self.inner.jkt()
    }

    #[getter]
    fn public_jwk_json(&self) -> String {
        self.inner.public_jwk().to_string()
    }

    /// The private key: keep it as secret as the client's own key.
    fn secret_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, pyo3::types::PyBytes> {
        pyo3::types::PyBytes::new(py, &self.inner.secret_bytes())
    }

    #[pyo3(signature = (http_method, http_uri, access_token=None, *, iat=None, jti=None))]
    fn sign(
        &self,
        http_method: &str,
        http_uri: &str,
        access_token: Option<&str>,
        iat: Option<u64>,
        jti: Option<String>,
    ) -> String {
        let jti = jti.unwrap_or_else(tokenbroker_core::engine::random_id);
        self.inner.sign(http_method, http_uri, access_token.map(str::as_bytes), iat.unwrap_or_else(unix_now), &jti)
    }

    fn __repr__(&self) -> String {
        format!("ProofSigner(jkt={:?})", self.inner.jkt())
    }
}

/// 128 random bits, base64url.
#[pyfunction]
fn random_id() -> String {
    tokenbroker_core::engine::random_id()
}

/// (number, name) of every validation reason, for the Python enum to check itself against.
#[pyfunction]
fn reason_names() -> Vec<(u8, &'static str)> {
    Reason::ALL.iter().map(|r| (*r as u8, r.name())).collect()
}

/// RFC 7638 thumbprint of a public JWK (OKP Ed25519 or EC P-256) given as JSON.
#[pyfunction]
fn jwk_thumbprint(jwk_json: &str) -> CoreResult<String> {
    let map = tokenbroker_core::json::parse_object(jwk_json.as_bytes())
        .map_err(|e| Error::InvalidKey(format!("JWK: {e}")))?;
    Ok(tokenbroker_core::keys::jwk_thumbprint(&map)?)
}

/// The `htu` form of a request URI, or None if it is not an absolute http(s) URI.
#[pyfunction]
fn normalize_htu(uri: &str) -> Option<String> {
    tokenbroker_core::dpop::normalize_htu(uri)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<KeySet>()?;
    m.add_class::<Engine>()?;
    m.add_class::<Verdict>()?;
    m.add_class::<SignedToken>()?;
    m.add_class::<ProofSigner>()?;
    m.add_function(wrap_pyfunction!(random_id, m)?)?;
    m.add_function(wrap_pyfunction!(reason_names, m)?)?;
    m.add_function(wrap_pyfunction!(jwk_thumbprint, m)?)?;
    m.add_function(wrap_pyfunction!(normalize_htu, m)?)?;
    m.add("MAX_TOKEN_BYTES", tokenbroker_core::jws::MAX_COMPACT_BYTES)?;
    m.add("MAX_LIFETIME_SECONDS", tokenbroker_core::claims::MAX_LIFETIME_SECS)?;
    Ok(())
}
