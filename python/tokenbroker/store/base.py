"""The `Store` contract: where sessions, revocations and shared replay records live.
The broker knows only this interface, never a backend's commands."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from tokenbroker.models import Session, SessionLimit
from tokenbroker.reason import Reason

# A replay record the store must set if absent: (key, Unix time it may be forgotten).
ReplayRecord = tuple[str, int]


@runtime_checkable
class Store(Protocol):
    """Sync and asyncio twins of every operation. Every method raises
    `StoreUnavailableError` when the backend cannot be reached (fail closed)."""

    def open_session(
        self,
        *,
        client_id: str,
        audience: str,
        session_id: str | None,
        ttl_seconds: int,
        limit: SessionLimit,
        client_ip: str,
        now: int,
    ) -> Session:
        """Continues `session_id` (it must be live and the client's, for this audience)
        or opens a new session under `limit`. Raises `SessionNotFoundError`,
        `SessionLimitExceededError` or `InvalidArgumentError`."""
        ...

    def check_token(
        self,
        *,
        client_id: str,
        session_id: str,
        audience: str,
        jti: str,
        client_ip: str,
        replay: tuple[ReplayRecord, ...],
        now: int,
    ) -> Reason:
        """Step 7 of the validation path: client not revoked, session live and the
        client's for this audience, token not revoked, replay records new. Records the
        session's activity. Returns `Reason.OK` or the reason to refuse."""
        ...

    def check_tokens(self, requests: Sequence[Mapping[str, Any]]) -> list[Reason]:
        """`check_token` for many requests (mappings of its keyword arguments), in order;
        a networked store sends them together (one round trip for N)."""
        ...

    def remember(self, key: str, *, until: int, now: int) -> bool:
        """Sets `key` if absent until `until`: True the first time, False while it is
        remembered. For single-use values outside validation (client assertion jtis)."""
        ...

    def revoke_session(self, session_id: str, *, now: int) -> int: ...

    def revoke_client(self, client_id: str, *, now: int) -> int: ...

    def revoke_token(self, jti: str, *, until: int, now: int) -> int: ...

    def sessions(self, client_id: str, *, now: int) -> list[Session]: ...

    async def aopen_session(
        self,
        *,
        client_id: str,
        audience: str,
        session_id: str | None,
        ttl_seconds: int,
        limit: SessionLimit,
        client_ip: str,
        now: int,
    ) -> Session: ...

    async def acheck_token(
        self,
        *,
        client_id: str,
        session_id: str,
        audience: str,
        jti: str,
        client_ip: str,
        replay: tuple[ReplayRecord, ...],
        now: int,
    ) -> Reason: ...

    async def acheck_tokens(self, requests: Sequence[Mapping[str, Any]]) -> list[Reason]: ...

    async def aremember(self, key: str, *, until: int, now: int) -> bool: ...

    async def arevoke_session(self, session_id: str, *, now: int) -> int: ...

    async def arevoke_client(self, client_id: str, *, now: int) -> int: ...

    async def arevoke_token(self, jti: str, *, until: int, now: int) -> int: ...

    async def asessions(self, client_id: str, *, now: int) -> list[Session]: ...
