"""The `Store` contract: where sessions, revocations and shared replay records live.
The broker knows only this interface, never a backend's commands."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from tokenbroker.detection.observe import Observe
from tokenbroker.errors import InvalidArgumentError
from tokenbroker.models import Session, SessionLimit
from tokenbroker.reason import Reason

# A replay record the store must set if absent: (key, Unix time it may be forgotten).
ReplayRecord = tuple[str, int]


class SessionOpen(NamedTuple):
    """What the store needs to open a session, or to continue one (`session_id`, else
    `continuation`): one type from the broker's issuance to the backend, as `TokenCheck`
    is for validation.

    `continuation` lets a door without session ids (HTTP `POST /token`) continue: an
    opaque string the broker computes (say, a hash of client, audience and DPoP key).
    With `session_id` None, a live session it names (same client and audience) is
    continued; otherwise a new one is opened under `limit` and the continuation names it
    from then on. Atomic: concurrent opens with one continuation open one session.

    `idle_seconds` (fixed when the session opens; None: no idle end) ends a session that
    has seen no activity (an open or continue, a successful validation) for that long:
    its expiry slides, `min(created_at + ttl_seconds, last activity + idle_seconds)`, so
    an idle session leaves the live count like an expired one. `token_ttl_seconds` is
    the lifetime of the token about to be issued: an open or continue of an idle-ending
    session keeps it live at least that long (within its hard end), so a token is never
    issued that its session's idle end would cut short."""

    client_id: str
    audience: str
    session_id: str | None  # None opens a new session under `limit` (or continues `continuation`'s)
    ttl_seconds: int  # the session's hard lifetime: its expiry never slides past created_at + this
    limit: SessionLimit
    client_ip: str
    now: int
    continuation: str | None = None
    idle_seconds: int | None = None
    token_ttl_seconds: int = 0


def idle_expiry(ends_at: int, expires_at: int, idle_seconds: int | None, hold: int, now: int) -> int:
    """A session's expiry after activity at `now`: slid to `now + max(idle, hold)`, never
    past its hard end `ends_at`, never earlier than it was (a live token keeps it)."""
    if idle_seconds is None:
        return expires_at
    return max(expires_at, min(ends_at, now + max(idle_seconds, hold)))


def opening_expiry(opening: SessionOpen) -> int:
    """The expiry of a session that `opening` opens: its hard end, or sooner when it ends
    when idle (opening is its first activity)."""
    now, idle = opening.now, opening.idle_seconds
    ends_at = now + opening.ttl_seconds
    return ends_at if idle is None else idle_expiry(ends_at, now, idle, opening.token_ttl_seconds, now)


def idle_step(idle_seconds: int) -> int:
    """How far a validation must move a session's expiry before it is written: a busy
    session writes it at most about ten times per idle window, and the expiry stays at
    least `idle_seconds - step` ahead of its last use, so it never ends while used."""
    return max(1, idle_seconds // 10)


def check_opening(opening: SessionOpen) -> None:
    """The rules every store applies to an opening before touching its state."""
    if opening.ttl_seconds < 1:
        raise InvalidArgumentError("ttl_seconds must be positive")
    if opening.idle_seconds is not None and opening.idle_seconds < 1:
        raise InvalidArgumentError("idle_seconds must be positive, or None for sessions that never end when idle")
    if opening.token_ttl_seconds < 0:
        raise InvalidArgumentError("token_ttl_seconds must be >= 0")
    if opening.continuation is not None and not opening.continuation:
        raise InvalidArgumentError("continuation must be a non-empty string, or None")


class TokenCheck(NamedTuple):
    """What the store checks for one validation (step 7): one type from the broker's
    hot path to the backend. The broker builds it positionally (cheaper than keyword
    arguments or a dict), a batch is a sequence of them, and the Redis store queues and
    pipelines them as they are."""

    client_id: str
    session_id: str
    audience: str
    jti: str
    issued_at: int  # the token's iat: earlier than the store's state epoch is SESSION_UNKNOWN
    client_ip: str
    replay: tuple[ReplayRecord, ...]
    now: int
    # What detection watches in this validation (None: nothing, e.g. an introspection).
    # Observed only when every check passed; the store may then answer ANOMALY
    # (`tokenbroker.detection.signals` says what each signal watches and does).
    observe: Observe | None = None


def token_checks(checks: Sequence[object]) -> list[TokenCheck]:
    """A batch's checks, once every one is a `TokenCheck`: anything else (a mapping from an
    untyped caller, say) is `InvalidArgumentError` before any of the batch is checked."""
    found = [c for c in checks if isinstance(c, TokenCheck)]
    if len(found) != len(checks):
        raise InvalidArgumentError(f"a store check must be a TokenCheck with the fields {TokenCheck._fields}")
    return found


class Remembered(enum.StrEnum):
    """What `Store.remember` did with a single-use value."""

    NEW = "new"  # recorded now: the first use
    SEEN = "seen"  # already recorded and still inside its lifetime: a replay
    STALE = "stale"  # issued before the store's current state epoch: its earlier use may be lost
    FULL = "full"  # this client's quota of records is used up: refused rather than forgetting one


@runtime_checkable
class Store(Protocol):
    """Sync and asyncio twins of every operation. Every method raises
    `StoreUnavailableError` when the backend cannot be reached (fail closed)."""

    def open_session(self, opening: SessionOpen) -> Session:
        """Continues `opening.session_id` (it must be live and the client's, for this
        audience), else the live session `opening.continuation` names, else opens a new
        session under `opening.limit` (named by the continuation from then on). Raises
        `SessionNotFoundError`, `SessionLimitExceededError` or `InvalidArgumentError`."""
        ...

    def check_token(self, check: TokenCheck) -> Reason:
        """Step 7 of the validation path: client not revoked, session live and the
        client's for this audience, token not revoked, token issued (`issued_at`, its
        `iat`) no earlier than the store's state epoch (else `SESSION_UNKNOWN`), replay
        records new (else `REPLAYED`) and within the client's quota (else
        `REPLAY_CACHE_FULL`). The store is the single exact replay record. Nothing is
        written unless every check passed; then the replay records and the session's
        activity are recorded (and an idle-ending session's expiry slides: `idle_step`).
        Returns `Reason.OK` or the reason to refuse."""
        ...

    def check_tokens(self, checks: Sequence[TokenCheck]) -> list[Reason]:
        """`check_token` for many checks, in order; a networked store sends them together
        (one round trip for N). `InvalidArgumentError` if one is not a `TokenCheck`."""
        ...

    def remember(self, key: str, *, client_id: str, issued_at: int, until: int, now: int) -> Remembered:
        """Records the single-use value `key` (a client assertion's jti) of `client_id`
        until `until`, if absent. `NEW` the first time; `SEEN` while it is remembered;
        `STALE` when `issued_at` predates the store's state epoch (its first use may
        have been lost with the old state); `FULL` when the client's quota of records is
        used up. Only `NEW` means the value may be accepted."""
        ...

    def usage_hours(self, client_id: str) -> list[int]:
        """The client's 24 usage-hour counters (index h: UTC hour h), from observed
        validations: one per session per hour it was observed in (the learned usage window
        is drawn from them). Zeros for a client never observed."""
        ...

    def revoke_session(self, session_id: str, *, now: int) -> int: ...

    def revoke_client(self, client_id: str, *, now: int) -> int: ...

    def revoke_token(self, jti: str, *, until: int, now: int) -> int: ...

    def sessions(self, client_id: str, *, now: int) -> list[Session]: ...

    async def aopen_session(self, opening: SessionOpen) -> Session: ...

    async def acheck_token(self, check: TokenCheck) -> Reason: ...

    async def acheck_tokens(self, checks: Sequence[TokenCheck]) -> list[Reason]: ...

    async def aremember(self, key: str, *, client_id: str, issued_at: int, until: int, now: int) -> Remembered: ...

    async def ausage_hours(self, client_id: str) -> list[int]: ...

    async def arevoke_session(self, session_id: str, *, now: int) -> int: ...

    async def arevoke_client(self, client_id: str, *, now: int) -> int: ...

    async def arevoke_token(self, jti: str, *, until: int, now: int) -> int: ...

    async def asessions(self, client_id: str, *, now: int) -> list[Session]: ...
