//! RFC 9068 access-token claims in the profile of DESIGN.md section 2, read from a strict
//! JSON object. Parsing checks shape only; time, issuer and audience are checked against
//! the request by `Engine` on every call.

use crate::error::{reject, Reason, Rejection};
use serde::Serialize;
use serde_json::{Map, Value};

/// Hard maximum of a token's lifetime (DESIGN.md: default 300 s, at most 3600 s).
pub const MAX_LIFETIME_SECS: u64 = 3600;
/// The longest string claim (and issue-request id) accepted, in bytes.
pub const MAX_CLAIM_BYTES: usize = 1024;
/// Times beyond this are not plausible Unix seconds (and would overflow arithmetic).
const MAX_TIME: u64 = 1 << 40;

/// What a token's key is bound to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Confirmation {
    /// `cnf.jkt`: RFC 7638 thumbprint of the client's DPoP key (RFC 9449).
    #[serde(rename = "jkt")]
    DpopJkt(String),
    /// `cnf.x5t#S256`: SHA-256 thumbprint of the client certificate (RFC 8705).
    #[serde(rename = "x5t#S256")]
    CertThumbprint(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AccessClaims {
    pub iss: String,
    pub sub: String,
    pub client_id: String,
    pub aud: String,
    pub sid: String,
    pub jti: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub once: bool,
    /// The subject a workload attestation proved (a SPIFFE ID), when the token was
    /// issued on one (the jwt-bearer grant): who the client is, as its attester says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attested_sub: Option<String>,
    /// The client's expected usage window: bit h set = UTC hour h is usual (1 to
    /// 2^24 - 1). Detection's `outside_usage_window` compares the time of each use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_window: Option<u32>,
}

/// Every hour of the day: the widest usage window a token can carry.
pub const ALL_HOURS: u32 = (1 << 24) - 1;

fn malformed(detail: impl Into<std::borrow::Cow<'static, str>>) -> Rejection {
    reject(Reason::Malformed, detail)
}

fn string(map: &Map<String, Value>, name: &'static str) -> Result<String, Rejection> {
    match map.get(name) {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_CLAIM_BYTES => Ok(s.clone()),
        Some(Value::String(_)) => {
            Err(malformed(format!("claim '{name}' is empty or longer than {MAX_CLAIM_BYTES} bytes")))
        }
        Some(Value::Array(_)) if name == "aud" => Err(malformed("claim 'aud' must be one string, not an array")),
        Some(_) => Err(malformed(format!("claim '{name}' is not a string"))),
        None => Err(malformed(format!("claim '{name}' is missing"))),
    }
}

fn time(map: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, Rejection> {
    match map.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(t) if t < MAX_TIME => Ok(Some(t)),
            _ => Err(malformed(format!("claim '{name}' is not an integer time in range"))),
        },
        Some(_) => Err(malformed(format!("claim '{name}' is not a number"))),
    }
}

/// A base64url SHA-256 digest (43 characters): the form of `cnf.jkt` and `cnf.x5t#S256`.
pub fn is_thumbprint(s: &str) -> bool {
    s.len() == 43 && crate::b64::decode(s.as_bytes()).is_some()
}

/// RFC 6749 section 3.3 scope-token characters.
pub fn is_scope_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

impl AccessClaims {
    pub fn from_json(map: &Map<String, Value>) -> Result<Self, Rejection> {
        let sub = string(map, "sub")?;
        let client_id = string(map, "client_id")?;
        if sub != client_id {
            return Err(malformed("claims 'sub' and 'client_id' differ"));
        }
        let jti = string(map, "jti")?;
        if jti.len() < 16 {
            return Err(malformed("claim 'jti' is shorter than 16 characters (128 random bits)"));
        }
        let iat = time(map, "iat")?.ok_or_else(|| malformed("claim 'iat' is missing"))?;
        let exp = time(map, "exp")?.ok_or_else(|| malformed("claim 'exp' is missing"))?;
        let nbf = time(map, "nbf")?.unwrap_or(iat);
        if exp <= iat || exp - iat > MAX_LIFETIME_SECS {
            return Err(malformed(format!("token lifetime must be 1 to {MAX_LIFETIME_SECS} seconds")));
        }
        if nbf >= exp {
            return Err(malformed("claim 'nbf' is not before 'exp'"));
        }
        let scope = match map.get("scope") {
            None => String::new(),
            Some(Value::String(s)) if s.is_empty() || s.split(' ').all(is_scope_token) => s.clone(),
            Some(_) => return Err(malformed("claim 'scope' is not a space-separated list of scope tokens")),
        };
        let cnf = match map.get("cnf") {
            None => None,
            Some(Value::Object(c)) => Some(confirmation(c)?),
            Some(_) => return Err(malformed("claim 'cnf' is not an object")),
        };
        let once = match map.get("once") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(malformed("claim 'once' is not a boolean")),
        };
        let attested_sub = match map.get("attested_sub") {
            None => None,
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_CLAIM_BYTES => Some(s.clone()),
            Some(_) => return Err(malformed("claim 'attested_sub' is not a non-empty string")),
        };
        let usage_window = match map.get("usage_window") {
            None => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(w) if (1..=u64::from(ALL_HOURS)).contains(&w) => Some(w as u32),
                _ => return Err(malformed("claim 'usage_window' is not an hour mask (1 to 2^24 - 1)")),
            },
            Some(_) => return Err(malformed("claim 'usage_window' is not an hour mask (1 to 2^24 - 1)")),
        };
        Ok(AccessClaims {
            iss: string(map, "iss")?,
            sub,
            client_id,
            aud: string(map, "aud")?,
            sid: string(map, "sid")?,
            jti,
            iat,
            nbf,
            exp,
            scope,
            cnf,
            once,
            attested_sub,
            usage_window,
        })
    }

    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.split(' ').filter(|s| !s.is_empty())
    }
}

fn confirmation(c: &Map<String, Value>) -> Result<Confirmation, Rejection> {
    let thumb = |v: &Value| match v {
        Value::String(s) if is_thumbprint(s) => Ok(s.clone()),
        _ => Err(malformed("'cnf' thumbprint is not a base64url SHA-256 digest")),
    };
    match (c.len(), c.get("jkt"), c.get("x5t#S256")) {
        (1, Some(j), None) => Ok(Confirmation::DpopJkt(thumb(j)?)),
        (1, None, Some(x)) => Ok(Confirmation::CertThumbprint(thumb(x)?)),
        _ => Err(malformed("'cnf' must hold exactly one of 'jkt' or 'x5t#S256'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"iss":"https://b","sub":"c","client_id":"c","aud":"https://s","sid":"s1",
               "jti":"0123456789abcdefghij","iat":100,"nbf":100,"exp":400,"scope":"read write"})
    }

    fn parse(v: Value) -> Result<AccessClaims, Rejection> {
        AccessClaims::from_json(v.as_object().unwrap())
    }

    #[test]
    fn parses_the_profile() {
        let c = parse(base()).unwrap();
        assert_eq!(c.scopes().collect::<Vec<_>>(), ["read", "write"]);
        assert!(c.cnf.is_none() && !c.once);
    }

    #[test]
    fn rejects_variants() {
        let cases: Vec<(&str, Value)> = vec![
            ("aud", json!(["https://s"])),
            ("sub", json!("other")),
            ("exp", json!(400.5)),
            ("exp", json!(-1)),
            ("exp", json!(100)),
            ("exp", json!(100 + MAX_LIFETIME_SECS + 1)),
            ("iat", json!("100")),
            ("jti", json!("short")),
            ("scope", json!("a  b")),
            ("scope", json!(["a"])),
            ("cnf", json!({"jkt": "x"})),
            ("cnf", json!({"jkt": "0".repeat(43), "x5t#S256": "0".repeat(43)})),
            ("once", json!("true")),
            ("iss", json!("")),
        ];
        for (name, value) in cases {
            let mut v = base();
            v[name] = value.clone();
            assert_eq!(parse(v).unwrap_err().reason, Reason::Malformed, "{name} = {value}");
        }
        for name in ["iss", "sub", "client_id", "aud", "sid", "jti", "iat", "exp"] {
            let mut v = base();
            v.as_object_mut().unwrap().remove(name);
            assert_eq!(parse(v).unwrap_err().reason, Reason::Malformed, "missing {name}");
        }
    }
}
