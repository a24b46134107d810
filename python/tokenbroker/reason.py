"""`Reason`: why a validation answered as it did. The numbers are the wire values of
`tokenbroker.v1.Reason` (without the `REASON_` prefix) and of the Rust core."""

from __future__ import annotations

import enum


class Reason(enum.IntEnum):
    UNSPECIFIED = 0
    OK = 1
    MALFORMED = 2
    TOO_LARGE = 3
    UNSUPPORTED_ALGORITHM = 4
    UNKNOWN_KEY = 5
    BAD_SIGNATURE = 6
    EXPIRED = 7
    NOT_YET_VALID = 8
    WRONG_ISSUER = 9
    WRONG_AUDIENCE = 10
    SESSION_UNKNOWN = 11
    SESSION_REVOKED = 12
    CLIENT_REVOKED = 13
    TOKEN_REVOKED = 14
    REPLAYED = 15
    PROOF_MISSING = 16
    PROOF_INVALID = 17
    BINDING_MISMATCH = 18
    INSUFFICIENT_SCOPE = 19
    REPLAY_CACHE_FULL = 20
    ANOMALY = 21  # a detection signal whose action is deny or revoke_session refused it


# By number, for the hot path (Reason(n) goes through the enum machinery).
BY_NUMBER: tuple[Reason, ...] = tuple(Reason)
