"""`MemoryStore`: the embedded, in-process state store (one broker process, no Redis).
Thread-safe; memory is bounded by the session limits and by the token lifetime."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenbroker import _core
from tokenbroker.errors import InvalidArgumentError, SessionLimitExceededError, SessionNotFoundError
from tokenbroker.models import LimitPolicy, Session, SessionLimit
from tokenbroker.reason import Reason
from tokenbroker.store.base import ReplayRecord

# Revoked jtis are remembered for the longest token lifetime plus clock leeway.
_PURGE_EVERY = 4096
# Expired replay records forgotten per check: more than a check adds, so memory follows traffic.
_PURGE_PER_CHECK = 4


@dataclass(slots=True)
class _SessionRecord:
    session_id: str
    client_id: str
    audience: str
    created_at: int
    expires_at: int
    last_seen_at: int
    last_ip: str
    revoked: Reason | None = None  # SESSION_REVOKED or CLIENT_REVOKED once revoked

    def live(self, now: int) -> bool:
        return self.revoked is None and self.expires_at > now

    def public(self) -> Session:
        return Session(
            self.session_id,
            self.client_id,
            self.audience,
            self.created_at,
            self.expires_at,
            self.last_seen_at,
            self.last_ip,
        )


class MemoryStore:
    """Sessions, revocations and single-replica replay records in this process."""

    def __init__(self, *, max_replay_records: int = 2_000_000) -> None:
        """`max_replay_records` bounds the replay records held at once: when it is reached
        and none has expired, validations that must record one are refused
        (`REPLAY_CACHE_FULL`): evicting a live record would reopen a replay."""
        self._max_replay = max_replay_records
        self._lock = threading.Lock()
        self._sessions: dict[str, _SessionRecord] = {}
        self._by_client: dict[str, dict[str, None]] = {}  # insertion-ordered session ids
        self._revoked_tokens: dict[str, int] = {}  # jti -> forget after
        self._replay: dict[str, int] = {}  # key -> forget after
        self._replay_by_expiry: list[tuple[int, str]] = []  # heap: soonest first
        self._writes = 0

    # -- sessions -------------------------------------------------------------------

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
        with self._lock:
            self._maybe_purge(now)
            if session_id:
                record = self._sessions.get(session_id)
                if record is None or record.client_id != client_id or not record.live(now):
                    raise SessionNotFoundError(f"session {session_id!r} is unknown, expired or revoked")
                if record.audience != audience:
                    raise InvalidArgumentError(f"session {session_id!r} belongs to another audience")
                record.last_seen_at, record.last_ip = now, client_ip or record.last_ip
                return record.public()
            live = [s for s in self._client_sessions(client_id) if s.live(now)]
            if len(live) >= limit.max_sessions:
                if limit.policy is LimitPolicy.REJECT:
                    raise SessionLimitExceededError(
                        f"client {client_id!r} has {len(live)} live sessions (limit {limit.max_sessions})"
                    )
                for oldest in sorted(live, key=lambda s: s.created_at)[: len(live) - limit.max_sessions + 1]:
                    oldest.revoked = Reason.SESSION_REVOKED
            record = _SessionRecord(_core.random_id(), client_id, audience, now, now + ttl_seconds, now, client_ip)
            self._sessions[record.session_id] = record
            self._by_client.setdefault(client_id, {})[record.session_id] = None
            return record.public()

    def _client_sessions(self, client_id: str) -> list[_SessionRecord]:
        return [self._sessions[sid] for sid in self._by_client.get(client_id, ())]

    def sessions(self, client_id: str, *, now: int) -> list[Session]:
        with self._lock:
            return [s.public() for s in self._client_sessions(client_id) if s.live(now)]

    # -- validation -----------------------------------------------------------------

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
        with self._lock:
            record = self._sessions.get(session_id)
            if record is None or record.client_id != client_id or record.audience != audience:
                return Reason.SESSION_UNKNOWN
            if record.revoked is not None:
                return record.revoked
            if record.expires_at <= now:
                return Reason.SESSION_UNKNOWN
            if jti in self._revoked_tokens:
                return Reason.TOKEN_REVOKED
            for key, _ in replay:
                if self._replay.get(key, 0) > now:
                    return Reason.REPLAYED
            self._forget_replay(now, _PURGE_PER_CHECK)
            if replay and len(self._replay) + len(replay) > self._max_replay:
                self._forget_replay(now, len(self._replay_by_expiry))
                if len(self._replay) + len(replay) > self._max_replay:
                    return Reason.REPLAY_CACHE_FULL
            for key, until in replay:
                self._record_replay(key, until)
            self._writes += len(replay)
            record.last_seen_at = now
            if client_ip:
                record.last_ip = client_ip
            return Reason.OK

    def remember(self, key: str, *, until: int, now: int) -> bool:
        with self._lock:
            self._maybe_purge(now)
            if self._replay.get(key, 0) > now:
                return False
            self._forget_replay(now, _PURGE_PER_CHECK)
            if len(self._replay) >= self._max_replay:
                self._forget_replay(now, len(self._replay_by_expiry))
                if len(self._replay) >= self._max_replay:
                    from tokenbroker.errors import StoreUnavailableError

                    raise StoreUnavailableError("replay records are full; refusing rather than forgetting one")
            self._record_replay(key, until)
            return True

    def check_tokens(self, requests: Sequence[Mapping[str, Any]]) -> list[Reason]:
        return [self.check_token(**r) for r in requests]

    # -- revocation -----------------------------------------------------------------

    def revoke_session(self, session_id: str, *, now: int) -> int:
        with self._lock:
            record = self._sessions.get(session_id)
            if record is None or not record.live(now):
                return 0
            record.revoked = Reason.SESSION_REVOKED
            return 1

    def revoke_client(self, client_id: str, *, now: int) -> int:
        """Revokes every live session of the client, and so every token issued to it."""
        with self._lock:
            count = 0
            for record in self._client_sessions(client_id):
                if record.live(now):
                    record.revoked = Reason.CLIENT_REVOKED
                    count += 1
            return count

    def revoke_token(self, jti: str, *, until: int, now: int) -> int:
        with self._lock:
            self._maybe_purge(now)
            if self._revoked_tokens.get(jti, 0) > now:
                return 0
            self._revoked_tokens[jti] = until
            self._writes += 1
            return 1

    def _record_replay(self, key: str, until: int) -> None:
        self._replay[key] = until
        heapq.heappush(self._replay_by_expiry, (until, key))

    def _forget_replay(self, now: int, limit: int) -> None:
        """Forgets at most `limit` replay records whose time has come (a stale heap entry,
        for a key recorded again later, is skipped)."""
        heap = self._replay_by_expiry
        while limit > 0 and heap and heap[0][0] <= now:
            until, key = heapq.heappop(heap)
            if self._replay.get(key) == until:
                del self._replay[key]
            limit -= 1

    def _maybe_purge(self, now: int) -> None:
        """Drops what can no longer matter: expired sessions and old records."""
        self._writes += 1
        if self._writes < _PURGE_EVERY:
            return
        self._writes = 0
        for sid in [sid for sid, s in self._sessions.items() if s.expires_at <= now]:
            record = self._sessions.pop(sid)
            by_client = self._by_client.get(record.client_id)
            if by_client is not None:
                by_client.pop(sid, None)
                if not by_client:
                    del self._by_client[record.client_id]
        self._revoked_tokens = {j: t for j, t in self._revoked_tokens.items() if t > now}
        self._forget_replay(now, len(self._replay_by_expiry))

    # -- asyncio twins (nothing here blocks) ----------------------------------------

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
    ) -> Session:
        return self.open_session(
            client_id=client_id,
            audience=audience,
            session_id=session_id,
            ttl_seconds=ttl_seconds,
            limit=limit,
            client_ip=client_ip,
            now=now,
        )

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
    ) -> Reason:
        return self.check_token(
            client_id=client_id,
            session_id=session_id,
            audience=audience,
            jti=jti,
            client_ip=client_ip,
            replay=replay,
            now=now,
        )

    async def acheck_tokens(self, requests: Sequence[Mapping[str, Any]]) -> list[Reason]:
        return self.check_tokens(requests)

    async def aremember(self, key: str, *, until: int, now: int) -> bool:
        return self.remember(key, until=until, now=now)

    async def arevoke_session(self, session_id: str, *, now: int) -> int:
        return self.revoke_session(session_id, now=now)

    async def arevoke_client(self, client_id: str, *, now: int) -> int:
        return self.revoke_client(client_id, now=now)

    async def arevoke_token(self, jti: str, *, until: int, now: int) -> int:
        return self.revoke_token(jti, until=until, now=now)

    async def asessions(self, client_id: str, *, now: int) -> list[Session]:
        return self.sessions(client_id, now=now)
