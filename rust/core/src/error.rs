//! Why a token was refused (`Reason`, a one-line `Rejection`) and what went wrong with an
//! argument or a key (`Error`). A rejection is an answer, not a failure: it never carries
//! token, proof or key material in its detail.

use std::borrow::Cow;

/// Validation outcome codes. The numbers are the wire values of `tokenbroker.v1.Reason`
/// and of the Python `tokenbroker.Reason`; never renumber or reuse one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reason {
    Unspecified = 0,
    Ok = 1,
    Malformed = 2,
    TooLarge = 3,
    UnsupportedAlgorithm = 4,
    UnknownKey = 5,
    BadSignature = 6,
    Expired = 7,
    NotYetValid = 8,
    WrongIssuer = 9,
    WrongAudience = 10,
    SessionUnknown = 11,
    SessionRevoked = 12,
    ClientRevoked = 13,
    TokenRevoked = 14,
    Replayed = 15,
    ProofMissing = 16,
    ProofInvalid = 17,
    BindingMismatch = 18,
    InsufficientScope = 19,
    /// The replay cache is full and cannot record this proof: rejecting is the only safe
    /// answer, since evicting a live entry would reopen a replay.
    ReplayCacheFull = 20,
    /// A detection signal whose action is deny or revoke_session refused the request
    /// (decided by the state store, never by the engine).
    Anomaly = 21,
}

impl Reason {
    pub const ALL: [Reason; 22] = [
        Reason::Unspecified,
        Reason::Ok,
        Reason::Malformed,
        Reason::TooLarge,
        Reason::UnsupportedAlgorithm,
        Reason::UnknownKey,
        Reason::BadSignature,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::WrongIssuer,
        Reason::WrongAudience,
        Reason::SessionUnknown,
        Reason::SessionRevoked,
        Reason::ClientRevoked,
        Reason::TokenRevoked,
        Reason::Replayed,
        Reason::ProofMissing,
        Reason::ProofInvalid,
        Reason::BindingMismatch,
        Reason::InsufficientScope,
        Reason::ReplayCacheFull,
        Reason::Anomaly,
    ];

    /// The name without the `REASON_` prefix, as the Python enum spells it.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Unspecified => "UNSPECIFIED",
            Reason::Ok => "OK",
            Reason::Malformed => "MALFORMED",
            Reason::TooLarge => "TOO_LARGE",
            Reason::UnsupportedAlgorithm => "UNSUPPORTED_ALGORITHM",
            Reason::UnknownKey => "UNKNOWN_KEY",
            Reason::BadSignature => "BAD_SIGNATURE",
            Reason::Expired => "EXPIRED",
            Reason::NotYetValid => "NOT_YET_VALID",
            Reason::WrongIssuer => "WRONG_ISSUER",
            Reason::WrongAudience => "WRONG_AUDIENCE",
            Reason::SessionUnknown => "SESSION_UNKNOWN",
            Reason::SessionRevoked => "SESSION_REVOKED",
            Reason::ClientRevoked => "CLIENT_REVOKED",
            Reason::TokenRevoked => "TOKEN_REVOKED",
            Reason::Replayed => "REPLAYED",
            Reason::ProofMissing => "PROOF_MISSING",
            Reason::ProofInvalid => "PROOF_INVALID",
            Reason::BindingMismatch => "BINDING_MISMATCH",
            Reason::InsufficientScope => "INSUFFICIENT_SCOPE",
            Reason::ReplayCacheFull => "REPLAY_CACHE_FULL",
            Reason::Anomaly => "ANOMALY",
        }
    }
}

/// A refused token or proof: the reason and a one-line, secret-free detail.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.name())]
pub struct Rejection {
    pub reason: Reason,
    pub detail: Cow<'static, str>,
}

impl Rejection {
    pub fn new(reason: Reason, detail: impl Into<Cow<'static, str>>) -> Self {
        Rejection { reason, detail: detail.into() }
    }
}

/// Shorthand used across the core: `Err(reject(Reason::Malformed, "..."))`.
pub fn reject(reason: Reason, detail: impl Into<Cow<'static, str>>) -> Rejection {
    Rejection::new(reason, detail)
}

/// Errors of the caller or the configuration (not of a presented token).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("unknown key id '{0}'")]
    UnknownKeyId(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}
