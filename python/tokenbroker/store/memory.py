"""`MemoryStore`: the embedded, in-process state store (one broker process, no Redis).

Thread-safe (one lock). Every table is bounded, and no operation scans a table on the hot
path: sessions and records expire through heaps, a client's live sessions are kept in
insertion order, and revoked or evicted sessions leave them at once. A continuation names
a live session only: it is dropped when its session ends, expires or is forgotten. The
store is the one exact replay record of the embedded broker (the engine's bloom filter
only marks keys). Sessions that end when idle slide their expiry (`store.base.idle_expiry`);
each slide pushes a heap entry and leaves the old one stale, so validations slide only by
`idle_step` or more. Detection state (`tokenbroker.detection.memory_watch`) lives on the
session records and in a bounded table of clients."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from tokenbroker._core import random_id
from tokenbroker.detection.memory_watch import HOUR, ClientWatches, SessionWatch
from tokenbroker.detection.memory_watch import observe as observe_validation
from tokenbroker.detection.signals import Action
from tokenbroker.errors import InvalidArgumentError, SessionLimitExceededError, SessionNotFoundError
from tokenbroker.models import LimitPolicy, Session
from tokenbroker.reason import Reason
from tokenbroker.store.base import (
    Remembered,
    SessionOpen,
    TokenCheck,
    check_opening,
    idle_expiry,
    idle_step,
    opening_expiry,
    token_checks,
)

# Expired entries forgotten per validation: more than one adds, so memory follows traffic.
_PURGE_PER_CHECK = 4


@dataclass(slots=True)
class _SessionRecord:
    session_id: str
    client_id: str
    audience: str
    created_at: int
    expires_at: int  # the current expiry: slides with activity when idle_seconds is set
    last_seen_at: int
    last_ip: str
    ends_at: int  # the hard end, created_at + ttl: the expiry never slides past it
    idle_seconds: int | None
    continuation: str | None  # the continuation that named this session when it opened
    watch: SessionWatch | None = None  # detection state, from the first observed validation

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


class _Ended(NamedTuple):
    """A revoked or evicted session, kept until its expiry to answer with its reason."""

    client_id: str
    audience: str
    expires_at: int
    reason: Reason  # SESSION_REVOKED or CLIENT_REVOKED


class MemoryStoreSizes(NamedTuple):
    """How many entries each of a `MemoryStore`'s tables holds."""

    live_sessions: int
    ended_sessions: int
    session_heap: int
    replay_records: int
    replay_heap: int
    revoked_tokens: int
    continuations: int = 0
    watched_clients: int = 0


class MemoryStore:
    """Sessions, revocations and single-replica replay records in this process.

    The state epoch is the store's creation (its second, from `clock`, the clock of the
    `now` values it is given): a token issued before it answers `SESSION_UNKNOWN` and a
    single-use value issued before it is `STALE`, so a restarted process cannot accept
    again what a previous one accepted. Bound: the epoch has one-second resolution, and
    trusts the issuer's clock (a value stamped d seconds ahead and used less than d
    seconds before a restart could pass once more; d is at most the assertion leeway)."""

    # Revoked or evicted sessions remembered per client, so their tokens answer
    # SESSION_REVOKED or CLIENT_REVOKED; older ones are forgotten and their tokens answer
    # SESSION_UNKNOWN (still refused: a token is only accepted with a live session).
    ENDED_SESSIONS_PER_CLIENT: Final = 1024
    # The session heap is rebuilt when its stale entries (of forgotten sessions) exceed
    # the sessions it orders plus this, so it stays within a constant factor of them.
    SESSION_HEAP_SLACK: Final = 1024

    def __init__(
        self,
        *,
        max_replay_records: int = 2_000_000,
        max_replay_records_per_client: int = 500_000,
        max_watched_clients: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`max_replay_records` bounds the replay and single-use records held at once,
        `max_replay_records_per_client` those of one client. When a bound is reached and
        none of the records under it has expired, what must record one more is refused
        (`REPLAY_CACHE_FULL`, `Remembered.FULL`): evicting a live record would reopen a
        replay. The per-client bound keeps one noisy client from refusing its neighbours.
        `max_watched_clients` bounds the clients whose detection state is kept (least
        recently used dropped: `tokenbroker.detection.memory_watch.ClientWatches`)."""
        if max_replay_records < 1 or max_replay_records_per_client < 1:
            raise InvalidArgumentError("max_replay_records and max_replay_records_per_client must be positive")
        if max_watched_clients < 1:
            raise InvalidArgumentError("max_watched_clients must be positive")
        self.epoch = int(clock())
        self._max_replay = max_replay_records
        self._max_replay_per_client = max_replay_records_per_client
        self._lock = threading.Lock()
        self._sessions: dict[str, _SessionRecord] = {}  # live sessions (maybe expired, not yet purged)
        # (client_id, continuation) -> the live session it names; dropped with that session.
        self._continuations: dict[tuple[str, str], str] = {}
        self._live_by_client: dict[str, dict[str, _SessionRecord]] = {}  # insertion (= creation) order
        self._ended: dict[str, _Ended] = {}
        self._ended_by_client: dict[str, dict[str, None]] = {}  # insertion order, for the per-client cap
        self._session_heap: list[tuple[int, str]] = []  # (expires_at, session_id), live and ended
        self._replay: dict[str, tuple[int, str]] = {}  # key -> (forget after, client_id)
        self._replay_heap: list[tuple[int, str]] = []  # (forget after, key): soonest first
        self._replay_per_client: dict[str, int] = {}
        self._revoked_tokens: dict[str, int] = {}  # jti -> forget after
        self._revoked_heap: list[tuple[int, str]] = []
        self._watches = ClientWatches(max_watched_clients)

    def sizes(self) -> MemoryStoreSizes:
        """The size of every table, for metrics and for tests of the bounds."""
        with self._lock:
            return MemoryStoreSizes(
                len(self._sessions),
                len(self._ended),
                len(self._session_heap),
                len(self._replay),
                len(self._replay_heap),
                len(self._revoked_tokens),
                len(self._continuations),
                len(self._watches),
            )

    # -- sessions -------------------------------------------------------------------

    def open_session(self, opening: SessionOpen) -> Session:
        check_opening(opening)
        client_id, audience, session_id, ttl_seconds, limit, client_ip, now, continuation, idle, hold = opening
        with self._lock:
            self._expire_sessions(now, None)
            if session_id:
                record = self._sessions.get(session_id)
                if record is None or record.client_id != client_id or record.expires_at <= now:
                    raise SessionNotFoundError(f"session {session_id!r} is unknown, expired or revoked")
                if record.audience != audience:
                    raise InvalidArgumentError(f"session {session_id!r} belongs to another audience")
                return self._continue(record, client_ip, hold, now)
            if continuation is not None:
                named = self._sessions.get(self._continuations.get((client_id, continuation), ""))
                if named is not None and named.audience == audience and named.expires_at > now:
                    return self._continue(named, client_ip, hold, now)
            live = self._live_by_client.get(client_id)
            count = len(live) if live is not None else 0
            if live is not None and count >= limit.max_sessions:
                if limit.policy is LimitPolicy.REJECT:
                    raise SessionLimitExceededError(
                        f"client {client_id!r} has {count} live sessions (limit {limit.max_sessions}): "
                        "revoke one, or let one expire, before opening another"
                    )
                for _ in range(count - limit.max_sessions + 1):
                    self._end(next(iter(live.values())), Reason.SESSION_REVOKED)
            expires_at, ends_at = opening_expiry(opening), now + ttl_seconds
            record = _SessionRecord(
                random_id(), client_id, audience, now, expires_at, now, client_ip, ends_at, idle, continuation
            )
            self._sessions[record.session_id] = record
            self._live_by_client.setdefault(client_id, {})[record.session_id] = record
            heapq.heappush(self._session_heap, (record.expires_at, record.session_id))
            if continuation is not None:
                self._continuations[(client_id, continuation)] = record.session_id
            return record.public()

    def _continue(self, record: _SessionRecord, client_ip: str, hold: int, now: int) -> Session:
        """Records an open's activity on a live session: seen now, from `client_ip` (kept
        when empty), its idle expiry slid (the session's own idle_seconds, at least `hold`)."""
        record.last_seen_at, record.last_ip = now, client_ip or record.last_ip
        self._slide(record, hold, now)
        return record.public()

    def _slide(self, record: _SessionRecord, hold: int, now: int) -> None:
        """Moves an idle-ending session's expiry to `idle_expiry`; the heap gets an entry for
        the new expiry (the old one goes stale: see _expire_sessions)."""
        expires_at = idle_expiry(record.ends_at, record.expires_at, record.idle_seconds, hold, now)
        if expires_at != record.expires_at:
            record.expires_at = expires_at
            heapq.heappush(self._session_heap, (expires_at, record.session_id))

    def _forget_continuation(self, record: _SessionRecord) -> None:
        """Drops the continuation that names `record` (not one that names a newer session)."""
        if record.continuation is not None:
            key = (record.client_id, record.continuation)
            if self._continuations.get(key) == record.session_id:
                del self._continuations[key]

    def sessions(self, client_id: str, *, now: int) -> list[Session]:
        with self._lock:
            self._expire_sessions(now, None)
            return [s.public() for s in self._live_by_client.get(client_id, {}).values()]

    def _end(self, record: _SessionRecord, reason: Reason) -> None:
        """Takes a live session out of its client's live sessions at once; remembers why."""
        sid, cid = record.session_id, record.client_id
        del self._sessions[sid]
        self._forget_continuation(record)
        live = self._live_by_client[cid]
        del live[sid]
        if not live:
            del self._live_by_client[cid]
        self._ended[sid] = _Ended(cid, record.audience, record.expires_at, reason)
        ended = self._ended_by_client.setdefault(cid, {})
        ended[sid] = None
        if len(ended) > self.ENDED_SESSIONS_PER_CLIENT:
            oldest = next(iter(ended))
            del ended[oldest]
            del self._ended[oldest]  # its heap entry is now stale: see _compact_session_heap

    def _expire_sessions(self, now: int, limit: int | None) -> None:
        """Forgets sessions (live or ended) whose expiry has come: all of them, or at most
        `limit`. Each session is forgotten once, so the cost is constant per session."""
        heap = self._session_heap
        while heap and heap[0][0] <= now and (limit is None or limit > 0):
            expires_at, sid = heapq.heappop(heap)
            if limit is not None:
                limit -= 1
            record = self._sessions.get(sid)
            if record is not None and record.expires_at == expires_at:
                del self._sessions[sid]
                self._forget_continuation(record)
                live = self._live_by_client[record.client_id]
                del live[sid]
                if not live:
                    del self._live_by_client[record.client_id]
                continue
            ended = self._ended.get(sid)
            if ended is not None and ended.expires_at == expires_at:
                del self._ended[sid]
                by_client = self._ended_by_client[ended.client_id]
                del by_client[sid]
                if not by_client:
                    del self._ended_by_client[ended.client_id]
        self._compact_session_heap()

    def _compact_session_heap(self) -> None:
        held = len(self._sessions) + len(self._ended)
        if len(self._session_heap) > 2 * held + self.SESSION_HEAP_SLACK:
            entries = [(s.expires_at, sid) for sid, s in self._sessions.items()]
            entries.extend((e.expires_at, sid) for sid, e in self._ended.items())
            heapq.heapify(entries)
            self._session_heap = entries

    # -- validation -----------------------------------------------------------------

    def check_token(self, check: TokenCheck) -> Reason:
        client_id, session_id, audience, jti, issued_at, client_ip, replay, now, observe = check
        with self._lock:
            if issued_at < self.epoch:
                return Reason.SESSION_UNKNOWN
            record = self._sessions.get(session_id)
            if record is None:
                ended = self._ended.get(session_id)
                if ended is None or ended.client_id != client_id or ended.audience != audience:
                    return Reason.SESSION_UNKNOWN
                return ended.reason
            if record.client_id != client_id or record.audience != audience or record.expires_at <= now:
                return Reason.SESSION_UNKNOWN
            if jti in self._revoked_tokens:
                return Reason.TOKEN_REVOKED
            if replay:
                records = self._replay
                for key, _ in replay:
                    held = records.get(key)
                    if held is not None and held[0] > now:
                        return Reason.REPLAYED
                self._forget_replay(now, _PURGE_PER_CHECK)
                if not self._room_for(client_id, len(replay), now):
                    return Reason.REPLAY_CACHE_FULL
            if observe is not None:
                watch = record.watch
                if watch is None or watch.hour != now // HOUR:  # the clients' table only hourly
                    watch = self._attach(record)
                action = observe_validation(watch.client, watch, observe, now, record.created_at)
                if action is not None and self._refused(record, action):
                    return Reason.ANOMALY
            # Every check passed: only now is anything written.
            for key, until in replay:
                self._record_replay(key, until, client_id)
            self._expire_sessions(now, _PURGE_PER_CHECK)
            record.last_seen_at = now
            if client_ip:
                record.last_ip = client_ip
            idle = record.idle_seconds
            if idle is not None and min(record.ends_at, now + idle) - record.expires_at >= idle_step(idle):
                self._slide(record, 0, now)
            return Reason.OK

    def _attach(self, record: _SessionRecord) -> SessionWatch:
        """The session's watch bound to its client's (`ClientWatches.attach`): on the
        session's first observation and when its hour changes, so the common request
        costs no lookup in the clients' table."""
        watch = record.watch = self._watches.attach(record.client_id, record.watch)
        return watch

    def _refused(self, record: _SessionRecord, action: Action) -> bool:
        """Whether a finding's action (`memory_watch.observe`) refuses the validation:
        deny or revoke_session (then the session is revoked here, as `revoke_session`
        does); alert lets it through."""
        if action is Action.ALERT:
            return False
        if action is Action.REVOKE_SESSION:
            self._end(record, Reason.SESSION_REVOKED)
        return True

    def check_tokens(self, checks: Sequence[TokenCheck]) -> list[Reason]:
        return [self.check_token(c) for c in token_checks(checks)]

    def usage_hours(self, client_id: str) -> list[int]:
        with self._lock:
            return self._watches.usage_hours(client_id)

    def remember(self, key: str, *, client_id: str, issued_at: int, until: int, now: int) -> Remembered:
        with self._lock:
            if issued_at < self.epoch:
                return Remembered.STALE
            held = self._replay.get(key)
            if held is not None and held[0] > now:
                return Remembered.SEEN
            self._forget_replay(now, _PURGE_PER_CHECK)
            if not self._room_for(client_id, 1, now):
                return Remembered.FULL
            self._record_replay(key, until, client_id)
            return Remembered.NEW

    def _room_for(self, client_id: str, count: int, now: int) -> bool:
        """True when `count` more records of `client_id` fit under both bounds, after
        forgetting every expired record if they would not."""
        if self._fits(client_id, count):
            return True
        self._forget_replay(now, None)
        return self._fits(client_id, count)

    def _fits(self, client_id: str, count: int) -> bool:
        return (
            len(self._replay) + count <= self._max_replay
            and self._replay_per_client.get(client_id, 0) + count <= self._max_replay_per_client
        )

    def _record_replay(self, key: str, until: int, client_id: str) -> None:
        old = self._replay.get(key)
        if old is not None:  # expired but not yet forgotten: its heap entry goes stale
            self._uncount(old[1])
        self._replay[key] = (until, client_id)
        self._replay_per_client[client_id] = self._replay_per_client.get(client_id, 0) + 1
        heapq.heappush(self._replay_heap, (until, key))

    def _uncount(self, client_id: str) -> None:
        left = self._replay_per_client[client_id] - 1
        if left:
            self._replay_per_client[client_id] = left
        else:
            del self._replay_per_client[client_id]

    def _forget_replay(self, now: int, limit: int | None) -> None:
        """Forgets replay records whose time has come: all, or at most `limit` (a stale
        heap entry, for a key recorded again later, is skipped)."""
        heap, records = self._replay_heap, self._replay
        while heap and heap[0][0] <= now and (limit is None or limit > 0):
            until, key = heapq.heappop(heap)
            if limit is not None:
                limit -= 1
            held = records.get(key)
            if held is not None and held[0] == until:
                del records[key]
                self._uncount(held[1])

    # -- revocation -----------------------------------------------------------------

    def revoke_session(self, session_id: str, *, now: int) -> int:
        with self._lock:
            record = self._sessions.get(session_id)
            if record is None or record.expires_at <= now:
                return 0
            self._end(record, Reason.SESSION_REVOKED)
            return 1

    def revoke_client(self, client_id: str, *, now: int) -> int:
        """Revokes every live session of the client, and so every token issued to it."""
        with self._lock:
            count = 0
            for record in list(self._live_by_client.get(client_id, {}).values()):
                if record.expires_at > now:
                    count += 1
                self._end(record, Reason.CLIENT_REVOKED)
            return count

    def revoke_token(self, jti: str, *, until: int, now: int) -> int:
        with self._lock:
            heap = self._revoked_heap
            while heap and heap[0][0] <= now:
                forget_after, old = heapq.heappop(heap)
                if self._revoked_tokens.get(old) == forget_after:
                    del self._revoked_tokens[old]
            if self._revoked_tokens.get(jti, 0) > now:
                return 0
            self._revoked_tokens[jti] = until
            heapq.heappush(heap, (until, jti))
            return 1

    # -- asyncio twins (nothing here blocks) ----------------------------------------

    async def aopen_session(self, opening: SessionOpen) -> Session:
        return self.open_session(opening)

    async def acheck_token(self, check: TokenCheck) -> Reason:
        return self.check_token(check)

    async def acheck_tokens(self, checks: Sequence[TokenCheck]) -> list[Reason]:
        return self.check_tokens(checks)

    async def ausage_hours(self, client_id: str) -> list[int]:
        return self.usage_hours(client_id)

    async def aremember(self, key: str, *, client_id: str, issued_at: int, until: int, now: int) -> Remembered:
        return self.remember(key, client_id=client_id, issued_at=issued_at, until=until, now=now)

    async def arevoke_session(self, session_id: str, *, now: int) -> int:
        return self.revoke_session(session_id, now=now)

    async def arevoke_client(self, client_id: str, *, now: int) -> int:
        return self.revoke_client(client_id, now=now)

    async def arevoke_token(self, jti: str, *, until: int, now: int) -> int:
        return self.revoke_token(jti, until=until, now=now)

    async def asessions(self, client_id: str, *, now: int) -> list[Session]:
        return self.sessions(client_id, now=now)
