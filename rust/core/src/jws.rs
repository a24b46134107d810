//! JWS compact serialization (RFC 7515 section 7.1), parsed strictly: a size cap, exactly
//! three non-empty segments, strict base64url, strict JSON header.

use crate::error::{reject, Reason, Rejection};
use crate::{b64, json};
use serde_json::{Map, Value};

/// Tokens and proofs larger than this are refused before any parsing.
pub const MAX_COMPACT_BYTES: usize = 8 * 1024;

/// A compact JWS split into its parts; nothing in it is verified yet.
pub struct Compact<'a> {
    /// `BASE64URL(header) '.' BASE64URL(payload)`: the bytes the signature covers.
    pub signing_input: &'a [u8],
    pub header: Map<String, Value>,
    pub payload: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Splits and decodes a compact JWS. `what` names it in details ("token", "proof") and
/// `malformed` is the reason for a structural fault.
pub fn parse<'a>(input: &'a [u8], what: &'static str, malformed: Reason) -> Result<Compact<'a>, Rejection> {
    if input.len() > MAX_COMPACT_BYTES {
        let reason = if malformed == Reason::Malformed { Reason::TooLarge } else { malformed };
        return Err(reject(reason, format!("{what} is larger than {MAX_COMPACT_BYTES} bytes")));
    }
    let mut dots = input.iter().enumerate().filter(|(_, b)| **b == b'.').map(|(i, _)| i);
    let (first, second) = match (dots.next(), dots.next(), dots.next()) {
        (Some(a), Some(b), None) => (a, b),
        _ => return Err(reject(malformed, format!("{what} is not a compact JWS of three segments"))),
    };
    let (h, p, s) = (&input[..first], &input[first + 1..second], &input[second + 1..]);
    if h.is_empty() || p.is_empty() || s.is_empty() {
        return Err(reject(malformed, format!("{what} has an empty segment")));
    }
    let header_bytes =
        b64::decode(h).ok_or_else(|| reject(malformed, format!("{what} header is not canonical base64url")))?;
    let payload =
        b64::decode(p).ok_or_else(|| reject(malformed, format!("{what} payload is not canonical base64url")))?;
    let signature =
        b64::decode(s).ok_or_else(|| reject(malformed, format!("{what} signature is not canonical base64url")))?;
    let header = json::parse_object(&header_bytes).map_err(|e| reject(malformed, format!("{what} header: {e}")))?;
    Ok(Compact { signing_input: &input[..second], header, payload, signature })
}

/// Returns the member as a string, or a rejection naming it.
pub fn str_member<'m>(
    map: &'m Map<String, Value>,
    name: &'static str,
    what: &'static str,
    reason: Reason,
) -> Result<&'m str, Rejection> {
    match map.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(reject(reason, format!("{what} '{name}' is not a string"))),
        None => Err(reject(reason, format!("{what} '{name}' is missing"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_three_segments() {
        let c = parse(b"eyJhIjoxfQ.eA.eQ", "token", Reason::Malformed).unwrap();
        assert_eq!(c.signing_input, b"eyJhIjoxfQ.eA");
        assert_eq!(c.payload, b"x");
        assert_eq!(c.signature, b"y");
    }

    #[test]
    fn rejects_wrong_shapes() {
        for bad in [&b"a.b"[..], b"a.b.c.d", b"..", b"eyJhIjoxfQ..eQ", b"eyJhIjoxfQ.eA.eQ=", b"eyJhIjoxfQ.eA.e Q"] {
            assert_eq!(parse(bad, "token", Reason::Malformed).err().unwrap().reason, Reason::Malformed);
        }
        let big = vec![b'a'; MAX_COMPACT_BYTES + 1];
        assert_eq!(parse(&big, "token", Reason::Malformed).err().unwrap().reason, Reason::TooLarge);
    }
}
