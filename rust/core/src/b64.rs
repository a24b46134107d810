//! Strict base64url (RFC 7515 section 2): URL-safe alphabet only, no padding, and the
//! unused trailing bits must be zero, so every byte string has exactly one encoding.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;

const STRICT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(false),
);

/// Decodes canonical unpadded base64url; `None` for anything else (padding, `+`, `/`,
/// whitespace, non-zero trailing bits, impossible lengths).
pub fn decode(input: &[u8]) -> Option<Vec<u8>> {
    STRICT.decode(input).ok()
}

pub fn encode(bytes: &[u8]) -> String {
    STRICT.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for n in 0..40u8 {
            let bytes: Vec<u8> = (0..n).collect();
            assert_eq!(decode(encode(&bytes).as_bytes()).unwrap(), bytes);
        }
    }

    #[test]
    fn rejects_padding_alphabet_and_trailing_bits() {
        assert!(decode(b"QQ==").is_none());
        assert!(decode(b"QQ").is_some());
        assert!(decode(b"QR").is_none(), "non-zero trailing bits");
        assert!(decode(b"a+b/").is_none());
        assert!(decode(b"QQ\n").is_none());
        assert!(decode(b"Q").is_none());
    }
}
