//! tokenbroker's token engine: strict JWS parsing, Ed25519 signing and verification,
//! RFC 9068 access-token claims, RFC 9449 DPoP proofs, the replay cache and the
//! verified-token cache. Pure Rust: it knows nothing of Python, gRPC or Redis.

pub mod b64;
pub mod cache;
pub mod claims;
pub mod dpop;
pub mod engine;
pub mod error;
pub mod json;
pub mod jws;
pub mod keys;
pub mod replay;

pub use engine::{Engine, EngineConfig, IssueRequest, ReplayRecord, ValidateRequest, Validated};
pub use error::{Error, Reason, Rejection};
