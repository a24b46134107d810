//! `tokenbroker._core`: the PyO3 binding of tokenbroker-core. It only converts types and
//! errors; the logic lives in the core crate. Exceptions are defined in Python
//! (`tokenbroker.errors`) and raised from here.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};
use tokenbroker_core::claims::{AccessClaims, Confirmation, MAX_CLAIM_BYTES, MAX_LIFETIME_SECS};
use tokenbroker_core::dpop::{DpopConfig, ProofKeyCache, ProofSigner as CoreProofSigner};
use tokenbroker_core::engine::{MAX_DPOP_AGE_SECS, MAX_LEEWAY_SECS};
use tokenbroker_core::keys::KeySet as CoreKeySet;
use tokenbroker_core::replay::ReplayConfig;
use tokenbroker_core::{Engine as CoreEngine, EngineConfig, Error, Reason, Rejection, Validated};

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

/// One validation request, as every door (embedded, gRPC, HTTP, CLI) hands it to the
/// engine. Empty optional fields are None: this constructor is where "" becomes None.
#[pyclass(frozen, module = "tokenbroker._core")]
struct ValidateRequest {
    #[pyo3(get)]
    token: String,
    #[pyo3(get)]
    audience: String,
    #[pyo3(get)]
    dpop_proof: Option<String>,
    #[pyo3(get)]
    http_method: Option<String>,
    #[pyo3(get)]
    http_uri: Option<String>,
    #[pyo3(get)]
    cert_thumbprint: Option<String>,
    required_scopes: Vec<String>,
    #[pyo3(get)]
    client_ip: Option<String>,
    #[pyo3(get)]
    request_id: String,
    /// What the request touches (a tool, a resource URI): detection's input, never checked here.
    #[pyo3(get)]
    resource: Option<String>,
}

/// "" and None are one thing: absent.
fn present(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// A space-separated string or an iterable of strings, deduplicated in order.
fn scope_list(scopes: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: String| {
        if !out.contains(&s) {
            out.push(s);
        }
    };
    match scopes {
        None => {}
        Some(v) if v.is_instance_of::<PyString>() => {
            v.extract::<String>()?.split_whitespace().for_each(|s| push(s.to_owned()))
        }
        Some(v) => {
            for item in v.try_iter()? {
                push(item?.extract::<String>()?);
            }
        }
    }
    Ok(out)
}

impl ValidateRequest {
    fn core(&self) -> tokenbroker_core::ValidateRequest<'_> {
        tokenbroker_core::ValidateRequest {
            token: self.token.as_bytes(),
            audience: &self.audience,
            dpop_proof: self.dpop_proof.as_deref().map(str::as_bytes),
            http_method: self.http_method.as_deref(),
            http_uri: self.http_uri.as_deref(),
            cert_thumbprint: self.cert_thumbprint.as_deref(),
            required_scopes: &self.required_scopes,
        }
    }
}

#[pymethods]
impl ValidateRequest {
    #[new]
    #[pyo3(signature = (token, *, audience, dpop_proof=None, http_method=None, http_uri=None, cert_thumbprint=None, client_ip=None, required_scopes=None, request_id=None, resource=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        token: String,
        audience: String,
        dpop_proof: Option<String>,
        http_method: Option<String>,
        http_uri: Option<String>,
        cert_thumbprint: Option<String>,
        client_ip: Option<String>,
        required_scopes: Option<&Bound<'_, PyAny>>,
        request_id: Option<String>,
        resource: Option<String>,
    ) -> PyResult<Self> {
        if audience.is_empty() {
            // One answer at every door: the caller's own resource URI is configuration,
            // not something a token can get wrong.
            return Err(InvalidArgumentError::new_err("audience (your own resource URI) is required"));
        }
        Ok(ValidateRequest {
            token,
            audience,
            dpop_proof: present(dpop_proof),
            http_method: present(http_method),
            http_uri: present(http_uri),
            cert_thumbprint: present(cert_thumbprint),
            required_scopes: scope_list(required_scopes)?,
            client_ip: present(client_ip),
            request_id: request_id.unwrap_or_default(),
            resource: present(resource),
        })
    }

    #[getter]
    fn required_scopes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.required_scopes)
    }

    fn __repr__(&self) -> String {
        // Never the token or the proof.
        format!("ValidateRequest(audience={:?}, request_id={:?})", self.audience, self.request_id)
    }
}

/// One issue request. Its constructor checks every rule that needs no state (lifetime,
/// ids, scope tokens, the binding: a DPoP key or a certificate, never both), so a bad
/// request raises `InvalidArgumentError` before any session is opened.
#[pyclass(frozen, module = "tokenbroker._core")]
struct IssueRequest {
    #[pyo3(get)]
    client_id: String,
    #[pyo3(get)]
    audience: String,
    scopes: Vec<String>,
    #[pyo3(get)]
    ttl_seconds: Option<u64>,
    #[pyo3(get)]
    session_id: Option<String>,
    #[pyo3(get)]
    dpop_jkt: Option<String>,
    #[pyo3(get)]
    cert_thumbprint: Option<String>,
    #[pyo3(get)]
    once: bool,
    #[pyo3(get)]
    client_ip: Option<String>,
    #[pyo3(get)]
    attested_subject: Option<String>,
    #[pyo3(get)]
    usage_window: Option<u32>,
}

impl IssueRequest {
    fn core(&self) -> tokenbroker_core::IssueRequest<'_> {
        tokenbroker_core::IssueRequest {
            client_id: &self.client_id,
            audience: &self.audience,
            scopes: &self.scopes,
            ttl_secs: self.ttl_seconds,
            session_id: self.session_id.as_deref(),
            dpop_jkt: self.dpop_jkt.as_deref(),
            cert_thumbprint: self.cert_thumbprint.as_deref(),
            once: self.once,
            attested_subject: self.attested_subject.as_deref(),
            usage_window: self.usage_window,
        }
    }
}

#[pymethods]
impl IssueRequest {
    #[new]
    #[pyo3(signature = (*, client_id, audience, scopes=None, ttl_seconds=None, session_id=None, dpop_jkt=None, cert_thumbprint=None, once=false, client_ip=None, attested_subject=None, usage_window=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        client_id: String,
        audience: String,
        scopes: Option<&Bound<'_, PyAny>>,
        ttl_seconds: Option<i64>,
        session_id: Option<String>,
        dpop_jkt: Option<String>,
        cert_thumbprint: Option<String>,
        once: bool,
        client_ip: Option<String>,
        attested_subject: Option<String>,
        usage_window: Option<i64>,
    ) -> PyResult<Self> {
        let ttl_seconds = match ttl_seconds {
            None | Some(0) => None, // the broker's default lifetime
            Some(t) => Some(u64::try_from(t).map_err(|_| {
                PyErr::from(PyCoreError(Error::InvalidArgument(format!(
                    "ttl_seconds must be 1 to {MAX_LIFETIME_SECS}"
                ))))
            })?),
        };
        let request = IssueRequest {
            client_id,
            audience,
            scopes: scope_list(scopes)?,
            ttl_seconds,
            session_id: present(session_id),
            dpop_jkt: present(dpop_jkt),
            cert_thumbprint: present(cert_thumbprint),
            once,
            client_ip: present(client_ip),
            attested_subject: present(attested_subject),
            // Out of range (negative, too wide) becomes 0, which `check` refuses.
            usage_window: usage_window.map(|w| u32::try_from(w).unwrap_or(0)),
        };
        request.core().check().map_err(PyCoreError)?;
        Ok(request)
    }

    #[getter]
    fn scopes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.scopes)
    }

    fn __repr__(&self) -> String {
        format!("IssueRequest(client_id={:?}, audience={:?})", self.client_id, self.audience)
    }
}

/// A verified token's claims, converted to Python objects once.
#[pyclass(frozen, module = "tokenbroker._core", get_all)]
struct Claims {
    client_id: Py<PyString>,
    subject: Py<PyString>,
    session_id: Py<PyString>,
    audience: Py<PyString>,
    issuer: Py<PyString>,
    jti: Py<PyString>,
    scopes: Py<PyTuple>,
    issued_at: u64,
    expires_at: u64,
    once: bool,
    /// The usage window the token carries (an hour mask, bit h = UTC hour h), if any.
    usage_window: Option<u32>,
    /// ("jkt" or "x5t#S256", thumbprint) when the token is sender-constrained.
    confirmation: Option<(&'static str, String)>,
}

impl Claims {
    fn new(py: Python<'_>, c: &AccessClaims) -> PyResult<Self> {
        let client_id = PyString::new(py, &c.client_id).unbind();
        Ok(Claims {
            // `sub` equals `client_id` (the claims parser refuses a token where they differ).
            subject: client_id.clone_ref(py),
            client_id,
            session_id: PyString::new(py, &c.sid).unbind(),
            audience: PyString::new(py, &c.aud).unbind(),
            issuer: PyString::new(py, &c.iss).unbind(),
            jti: PyString::new(py, &c.jti).unbind(),
            scopes: PyTuple::new(py, c.scopes().collect::<Vec<_>>())?.unbind(),
            issued_at: c.iat,
            expires_at: c.exp,
            once: c.once,
            usage_window: c.usage_window,
            confirmation: match c.cnf.as_ref() {
                Some(Confirmation::DpopJkt(j)) => Some(("jkt", j.clone())),
                Some(Confirmation::CertThumbprint(x)) => Some(("x5t#S256", x.clone())),
                None => None,
            },
        })
    }
}

/// The outcome of steps 1 to 6 of a validation: a reason and, when the token passed
/// them, its claims and the replay records the store must set.
#[pyclass(frozen, module = "tokenbroker._core", get_all)]
struct Verdict {
    /// The `Reason` number.
    reason: u8,
    ok: bool,
    detail: String,
    claims: Option<Py<Claims>>,
    /// Replay records the state store must set if absent: (hex key, forget after).
    replay: Py<PyTuple>,
    /// The `INSUFFICIENT_SCOPE` detail when the token lacks a required scope: refuse after
    /// the state check (which then sets no replay record: `replay` is empty).
    missing_scopes: Option<String>,
}

impl Verdict {
    fn from_result(py: Python<'_>, result: Result<Validated, Rejection>) -> PyResult<Self> {
        Ok(match result {
            Ok(v) => Verdict {
                reason: Reason::Ok as u8,
                ok: true,
                detail: String::new(),
                claims: Some(Py::new(py, Claims::new(py, &v.claims)?)?),
                replay: PyTuple::new(py, v.replay.iter().map(|r| (hex(&r.key), r.until)))?.unbind(),
                missing_scopes: v.missing_scopes,
            },
            Err(r) => Verdict {
                reason: r.reason as u8,
                ok: false,
                detail: r.detail.into_owned(),
                claims: None,
                replay: PyTuple::empty(py).unbind(),
                missing_scopes: None,
            },
        })
    }
}

#[pymethods]
impl Verdict {
    fn __repr__(&self) -> String {
        let name = Reason::ALL.iter().find(|r| **r as u8 == self.reason).map_or("?", |r| r.name());
        format!("Verdict(reason={name}, detail={:?})", self.detail)
    }
}

/// The engine's counters, for metrics and tests. It holds no exact replay record: the
/// store does.
#[pyclass(frozen, module = "tokenbroker._core", get_all)]
struct EngineStats {
    /// Verified tokens in the cache.
    cached_tokens: u64,
    /// Replay keys the bloom filter has marked.
    replay_marked: u64,
    /// The bloom filter's memory.
    bloom_bytes: u64,
    /// Keys the bloom filter marked "maybe seen".
    maybe_seen: u64,
}

/// The bounds the engine enforces, for the layers that describe them (settings, CLI).
#[pyclass(frozen, module = "tokenbroker._core", get_all)]
struct Limits {
    max_token_bytes: usize,
    max_lifetime_seconds: u64,
    max_claim_bytes: usize,
    max_leeway_seconds: u64,
    max_dpop_age_seconds: u64,
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

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (keys, issuer, *, default_ttl_seconds=300, leeway_seconds=5, dpop_max_age_seconds=60, token_cache_capacity=100_000, replay_capacity=1_000_000, replay_fp_rate=0.001))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        keys: &KeySet,
        issuer: String,
        default_ttl_seconds: u64,
        leeway_seconds: u64,
        dpop_max_age_seconds: u64,
        token_cache_capacity: usize,
        replay_capacity: usize,
        replay_fp_rate: f64,
    ) -> CoreResult<Self> {
        let cfg = EngineConfig {
            issuer,
            default_ttl_secs: default_ttl_seconds,
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

    /// Signs a token for `request`, bound to `session_id` and ending by `not_after` (the
    /// session's end) at the latest.
    #[pyo3(signature = (request, *, session_id, not_after, now=None))]
    fn issue(
        &self,
        request: &IssueRequest,
        session_id: &str,
        not_after: u64,
        now: Option<u64>,
    ) -> CoreResult<SignedToken> {
        let (access_token, claims) =
            self.inner.issue(&request.core(), session_id, not_after, now.unwrap_or_else(unix_now))?;
        Ok(SignedToken {
            access_token,
            jti: claims.jti,
            issued_at: claims.iat,
            expires_at: claims.exp,
            scope: claims.scope,
        })
    }

    /// Steps 1 to 6 of the validation path, the GIL released around signature checks;
    /// never raises for a bad token.
    #[pyo3(signature = (request, now=None))]
    fn validate(&self, py: Python<'_>, request: &ValidateRequest, now: Option<u64>) -> PyResult<Verdict> {
        let req = request.core();
        let now = now.unwrap_or_else(unix_now);
        let engine = &self.inner;
        // A cached token without a proof is answered with the GIL held: releasing and
        // taking it back would cost more, among the server's threads, than the work.
        let result = match engine.validate_cached(&req, now) {
            Some(result) => result,
            None => py.allow_threads(|| engine.validate(&req, now)),
        };
        Verdict::from_result(py, result)
    }

    /// RFC 7662 introspection for `audience`: everything but the token's binding (the
    /// caller checks the proof against the claims' confirmation); records nothing.
    #[pyo3(signature = (token, audience, now=None))]
    fn introspect(&self, py: Python<'_>, token: &str, audience: &str, now: Option<u64>) -> PyResult<Verdict> {
        let now = now.unwrap_or_else(unix_now);
        let engine = &self.inner;
        let result = py.allow_threads(|| engine.introspect(token.as_bytes(), audience, now));
        Verdict::from_result(py, result)
    }

    /// Many validations in one call, the GIL released throughout: token signatures, then
    /// Ed25519 proof signatures, each verified as one batch.
    #[pyo3(signature = (requests, now=None))]
    fn validate_batch(
        &self,
        py: Python<'_>,
        requests: Vec<PyRef<'_, ValidateRequest>>,
        now: Option<u64>,
    ) -> PyResult<Vec<Verdict>> {
        let reqs: Vec<tokenbroker_core::ValidateRequest> = requests.iter().map(|r| r.core()).collect();
        let now = now.unwrap_or_else(unix_now);
        let engine = &self.inner;
        let results = py.allow_threads(|| engine.validate_batch(&reqs, now));
        results.into_iter().map(|r| Verdict::from_result(py, r)).collect()
    }

    /// Drops every cached verification (after a key is retired elsewhere, say).
    fn clear_cache(&self) {
        self.inner.token_cache().clear();
    }

    /// The engine's counters.
    fn stats(&self) -> EngineStats {
        let (replay_marked, maybe_seen) = self.inner.replay_cache().stats();
        EngineStats {
            cached_tokens: self.inner.token_cache().len() as u64,
            replay_marked,
            bloom_bytes: self.inner.replay_cache().bloom().memory_bytes() as u64,
            maybe_seen,
        }
    }
}

/// Lower-case hex, by table: on the validation path, where `format!` per byte cost about
/// a microsecond a key.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
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

    #[pyo3(signature = (http_method, http_uri, access_token=None, *, iat=None, jti=None, nonce=None))]
    fn sign(
        &self,
        http_method: &str,
        http_uri: &str,
        access_token: Option<&str>,
        iat: Option<u64>,
        jti: Option<String>,
        nonce: Option<&str>,
    ) -> String {
        let jti = jti.unwrap_or_else(tokenbroker_core::engine::random_id);
        let iat = iat.unwrap_or_else(unix_now);
        self.inner.sign_with_nonce(http_method, http_uri, access_token.map(str::as_bytes), iat, &jti, nonce)
    }

    fn __repr__(&self) -> String {
        format!("ProofSigner(jkt={:?})", self.inner.jkt())
    }
}

/// The proof keys `verify_dpop_proof` has decompressed (bounded, like the engine's own).
static TOKEN_ENDPOINT_PROOF_KEYS: std::sync::OnceLock<ProofKeyCache> = std::sync::OnceLock::new();

/// Verifies a DPoP proof sent without an access token (to the token endpoint, RFC 9449
/// section 5): structure, `typ`, `alg` (EdDSA or ES256), `jwk`, signature, `jti`, `htm`,
/// `htu` and the `iat` window. Returns (jkt, jti, iat, nonce); the caller records the
/// `jti` (replay) and checks the nonce. Raises ValueError with a one-line reason that
/// never contains key material.
#[pyfunction]
#[pyo3(signature = (proof, http_method, http_uri, *, now=None, max_age_seconds=60, leeway_seconds=5))]
fn verify_dpop_proof(
    py: Python<'_>,
    proof: &str,
    http_method: &str,
    http_uri: &str,
    now: Option<u64>,
    max_age_seconds: u64,
    leeway_seconds: u64,
) -> PyResult<(String, String, u64, Option<String>)> {
    if max_age_seconds > MAX_DPOP_AGE_SECS || leeway_seconds > MAX_LEEWAY_SECS {
        return Err(PyValueError::new_err(format!(
            "max_age_seconds is at most {MAX_DPOP_AGE_SECS} and leeway_seconds at most {MAX_LEEWAY_SECS}"
        )));
    }
    let cfg = DpopConfig { max_age_secs: max_age_seconds, leeway_secs: leeway_seconds };
    let keys = TOKEN_ENDPOINT_PROOF_KEYS.get_or_init(|| ProofKeyCache::new(10_000));
    let now = now.unwrap_or_else(unix_now);
    let verified = py.allow_threads(|| {
        tokenbroker_core::dpop::verify_proof(proof.as_bytes(), http_method, http_uri, None, now, &cfg, keys)
    });
    match verified {
        Ok(v) => Ok((v.jkt, v.jti, v.iat, v.nonce)),
        Err(r) => Err(PyValueError::new_err(r.detail.into_owned())),
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
    m.add_class::<Claims>()?;
    m.add_class::<ValidateRequest>()?;
    m.add_class::<IssueRequest>()?;
    m.add_class::<EngineStats>()?;
    m.add_class::<Limits>()?;
    m.add_class::<SignedToken>()?;
    m.add_class::<ProofSigner>()?;
    m.add_function(wrap_pyfunction!(random_id, m)?)?;
    m.add_function(wrap_pyfunction!(reason_names, m)?)?;
    m.add_function(wrap_pyfunction!(jwk_thumbprint, m)?)?;
    m.add_function(wrap_pyfunction!(normalize_htu, m)?)?;
    m.add_function(wrap_pyfunction!(verify_dpop_proof, m)?)?;
    let limits = Limits {
        max_token_bytes: tokenbroker_core::jws::MAX_COMPACT_BYTES,
        max_lifetime_seconds: MAX_LIFETIME_SECS,
        max_claim_bytes: MAX_CLAIM_BYTES,
        max_leeway_seconds: MAX_LEEWAY_SECS,
        max_dpop_age_seconds: MAX_DPOP_AGE_SECS,
    };
    m.add("LIMITS", Py::new(m.py(), limits)?)?;
    Ok(())
}
