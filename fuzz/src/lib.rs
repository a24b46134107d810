//! Fixtures shared by the fuzz targets and the seed writer: one fixed signing key, one
//! fixed DPoP key and a clock that never moves, so that the tokens and proofs in the seed
//! corpus are the very ones the targets know (Ed25519 signatures are deterministic).
//!
//! Each target checks an oracle, not only "no panic": whatever the engine accepts must be
//! one of the inputs signed here, byte for byte. A fuzzer cannot forge a signature, so an
//! accepted input that differs from every signed one is a parser or verifier accepting two
//! encodings of one thing (malleability), which is a finding.

use ed25519_dalek::SigningKey;
use std::sync::{Arc, OnceLock, RwLock};
use tokenbroker_core::claims::{AccessClaims, Confirmation, ALL_HOURS};
use tokenbroker_core::dpop::ProofSigner;
use tokenbroker_core::keys::KeySet;
use tokenbroker_core::{b64, Engine, EngineConfig, ValidateRequest};

pub const NOW: u64 = 1_800_000_000;
pub const ISSUER: &str = "https://broker.example";
pub const AUDIENCE: &str = "https://mcp.example.com/mcp";
pub const METHOD: &str = "POST";
pub const URI: &str = "https://mcp.example.com/mcp";
pub const CERT_THUMBPRINT: &str = "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2";
/// Separates the fields of an `engine_validate` input (token, audience, proof, method,
/// uri, certificate thumbprint); a field that is absent is `None`.
pub const SEPARATOR: u8 = 0;

/// The engine's key (RFC 8037 appendix A.1's private key) and the client's DPoP key.
const TOKEN_KEY: [u8; 32] = [
    0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec, 0x2c, 0xc4, 0x44, 0x49, 0xc5,
    0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c, 0xae, 0x7f, 0x60,
];
const PROOF_KEY: [u8; 32] = [7; 32];

pub struct Fixtures {
    pub engine: Engine,
    /// Every token signed here: bearer, DPoP-bound, certificate-bound, single-use.
    pub tokens: Vec<String>,
    /// Every proof signed here, each for `METHOD` `URI` at `NOW`: one per DPoP token
    /// (with its `ath`) and one with no access token (the token endpoint's).
    pub proofs: Vec<String>,
    /// One accepted request per token, as `engine_validate` reads its input.
    pub requests: Vec<Vec<u8>>,
}

pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(build)
}

fn claims(jti: &str, cnf: Option<Confirmation>, once: bool) -> AccessClaims {
    AccessClaims {
        iss: ISSUER.into(),
        sub: "agent-1".into(),
        client_id: "agent-1".into(),
        aud: AUDIENCE.into(),
        sid: "sess-1".into(),
        jti: jti.into(),
        iat: NOW - 10,
        nbf: NOW - 10,
        exp: NOW + 290,
        scope: "tools:read tools:call".into(),
        cnf,
        once,
        attested_sub: None,
        usage_window: Some(ALL_HOURS),
    }
}

fn build() -> Fixtures {
    let signing = SigningKey::from_bytes(&TOKEN_KEY);
    let jwk = serde_json::json!({
        "kty": "OKP", "crv": "Ed25519", "kid": "fuzz-key",
        "x": b64::encode(signing.verifying_key().as_bytes()), "d": b64::encode(&TOKEN_KEY),
    });
    let mut keys = KeySet::new();
    keys.add_jwk(&jwk.to_string()).expect("the fixed key is valid");
    let engine = Engine::new(Arc::new(RwLock::new(keys)), EngineConfig::new(ISSUER)).expect("engine");
    let signer = ProofSigner::from_bytes(&PROOF_KEY);
    let dpop = Some(Confirmation::DpopJkt(signer.jkt().to_owned()));
    let cert = Some(Confirmation::CertThumbprint(CERT_THUMBPRINT.into()));
    let tokens: Vec<String> = [
        claims("jti-bearer", None, false),
        claims("jti-dpop", dpop.clone(), false),
        claims("jti-cert", cert, false),
        claims("jti-once", dpop, true),
    ]
    .iter()
    .map(|c| engine.sign(c).expect("sign"))
    .collect();
    let bound = |token: &str| {
        signer.sign(METHOD, URI, Some(token.as_bytes()), NOW, &format!("proof-{}", &token[token.len() - 8..]))
    };
    let proofs = vec![bound(&tokens[1]), bound(&tokens[3]), signer.sign(METHOD, URI, None, NOW, "proof-token")];
    let requests = vec![
        request(&tokens[0], AUDIENCE, None, None, None, None),
        request(&tokens[1], AUDIENCE, Some(&proofs[0]), Some(METHOD), Some(URI), None),
        request(&tokens[2], AUDIENCE, None, None, None, Some(CERT_THUMBPRINT)),
        request(&tokens[3], AUDIENCE, Some(&proofs[1]), Some(METHOD), Some(URI), None),
    ];
    Fixtures { engine, tokens, proofs, requests }
}

/// An `engine_validate` input: the fields joined by `SEPARATOR`, an absent one left out
/// (the input then has fewer fields, and the missing ones are `None`).
pub fn request(
    token: &str,
    audience: &str,
    proof: Option<&str>,
    method: Option<&str>,
    uri: Option<&str>,
    cert: Option<&str>,
) -> Vec<u8> {
    let fields = [Some(token), Some(audience), proof, method, uri, cert];
    let mut out = Vec::new();
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(SEPARATOR);
        }
        out.extend_from_slice(f.unwrap_or("").as_bytes());
    }
    out
}

/// The fields of an `engine_validate` input; an empty field is `None` (the token and
/// audience are always given, empty or not). `None` when a field is not UTF-8 where the
/// engine takes a `&str`.
pub struct Fields<'a> {
    pub token: &'a [u8],
    pub audience: &'a str,
    pub proof: Option<&'a [u8]>,
    pub method: Option<&'a str>,
    pub uri: Option<&'a str>,
    pub cert: Option<&'a str>,
}

fn text(p: Option<&[u8]>) -> Result<Option<&str>, std::str::Utf8Error> {
    p.map(std::str::from_utf8).transpose()
}

pub fn fields(data: &[u8]) -> Option<Fields<'_>> {
    let mut parts = data.splitn(6, |b| *b == SEPARATOR);
    let mut next = || parts.next().filter(|p| !p.is_empty());
    let token = next().unwrap_or(b"");
    let audience = text(next()).ok()?.unwrap_or("");
    let proof = next();
    let method = text(next()).ok()?;
    let uri = text(next()).ok()?;
    let cert = text(next()).ok()?;
    Some(Fields { token, audience, proof, method, uri, cert })
}

impl<'a> Fields<'a> {
    pub fn request(&self) -> ValidateRequest<'a> {
        ValidateRequest {
            token: self.token,
            audience: self.audience,
            dpop_proof: self.proof,
            http_method: self.method,
            http_uri: self.uri,
            cert_thumbprint: self.cert,
            required_scopes: &[],
        }
    }
}
