"""The values the broker hands back: `IssuedToken`, `Validation`, `Session`, and the
per-client `SessionLimit`. Their reprs never show a token."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from tokenbroker.reason import Reason


class LimitPolicy(enum.StrEnum):
    """What opening one session too many does."""

    REJECT = "reject"
    EVICT_OLDEST = "evict_oldest"


@dataclass(frozen=True, slots=True)
class SessionLimit:
    """At most `max_sessions` live sessions per client; `policy` says what the next one does."""

    max_sessions: int = 10
    policy: LimitPolicy = LimitPolicy.REJECT

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        object.__setattr__(self, "policy", LimitPolicy(self.policy))


@dataclass(frozen=True, slots=True)
class IssuedToken:
    access_token: str = field(repr=False)
    token_type: str  # "DPoP" or "Bearer"
    expires_at: int
    session_id: str
    scopes: tuple[str, ...]
    jti: str


class Validation(NamedTuple):
    """The answer to a validation. `valid` is True only with `Reason.OK`.

    A NamedTuple rather than a frozen dataclass: it is built on every request, and a
    tuple builds about seven times faster (0.3 µs against 2.5 µs here)."""

    valid: bool
    reason: Reason
    detail: str = ""
    client_id: str = ""
    subject: str = ""
    session_id: str = ""
    audience: str = ""
    scopes: tuple[str, ...] = ()
    expires_at: int = 0
    jti: str = ""
    issuer: str = ""
    request_id: str = ""

    @classmethod
    def rejected(cls, reason: Reason, detail: str, request_id: str = "") -> Validation:
        return cls(False, reason, detail, request_id=request_id)

    def __bool__(self) -> bool:
        return self.valid


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    client_id: str
    audience: str
    created_at: int
    expires_at: int
    last_seen_at: int
    last_ip: str = ""
