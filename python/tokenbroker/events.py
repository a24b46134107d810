"""Events: what the broker noticed and did, as one record type for every producer.

Governance events (a client pending approval, a client document whose keys changed, an
approval or a key that expired) and the detection signals share the shape DESIGN names:
`event`, `signal`, `severity`, `client_id`, `session_id`, `source_ip`, `action`,
`evidence` (never a token or a secret: it is scrubbed here), `time` (ISO 8601 UTC).

`Events.emit` is called on the validation path, so it is cheap, never blocks and never
raises into its caller: it builds the record, keeps it in a bounded ring (`keep`), hands
it to the in-process followers and queues it (bounded: `queue_max`; a full queue drops
the event and counts it, the ring still holds it) for one delivery thread. That thread
gives each event to every sink in turn: the structured log line (logger
"tokenbroker.events") first, then the sinks given (`tokenbroker.events_sinks` the audit
log, `tokenbroker.events_redis` the Redis stream, `tokenbroker.events_webhook` the
webhook). A sink that fails is counted (`on_dropped(sink name)`) and logged at most once
a minute; the others still get the event. The thread starts with the first event, ends
after `IDLE_SECONDS` with nothing to do (so the many `Events` of embedded brokers and
tests hold no thread while quiet) and for good at `close()`, which delivers what is
queued first (a bounded wait).

Readers: `recent(client_id)` is the ring; `watch(client_id, follow=..., active=...)` is
what WatchEvents streams: from `source` when one is given (the Redis stream, which holds
every replica's events), else the ring and then, when following, each new event. A
follower that falls `follower_backlog` events behind loses the oldest and is told by an
`events_lost` event (`tokenbroker.events_follow`)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from tokenbroker.audit import scrub
from tokenbroker.events_follow import Followers
from tokenbroker.events_sinks import LogSink

GOVERNANCE = "governance"
CLIENT_PENDING = "client_pending"
CLIENT_DOCUMENT_CHANGED = "client_document_changed"
APPROVAL_EXPIRED = "approval_expired"
KEY_EXPIRED = "key_expired"
CREDENTIAL_LEAKED = "credential_leaked"  # `tokenbroker leaked`: a minted secret or API key was exposed

EVENTS_LOST = "events_lost"  # a follower fell behind and lost the oldest events (tokenbroker.events_follow)
IDLE_SECONDS = 5.0  # the delivery thread ends after this long with nothing to deliver
CLOSE_SECONDS = 5.0  # how long `close()` waits for the queued events to be delivered
FAILURE_LOG_SECONDS = 60.0  # a failing sink is logged at most once per this

log = structlog.get_logger("tokenbroker.events")


@dataclass(frozen=True, slots=True)
class Event:
    event: str
    signal: str
    severity: str  # "info", "warning" or "critical"
    client_id: str
    action: str  # "alert", "deny" or "revoke_session"
    evidence: Mapping[str, Any] = field(default_factory=dict)
    session_id: str = ""
    source_ip: str = ""
    time: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """The event `as_dict` gave (read back from the Redis stream). Raises `ValueError`
        for anything else: a field missing or of the wrong type."""
        if not isinstance(data, Mapping):
            raise ValueError("not an event: an event is a JSON object")
        names = ("event", "signal", "severity", "client_id", "action", "session_id", "source_ip", "time")
        text = {name: data.get(name, "") for name in names}
        evidence = data.get("evidence", {})
        if not all(isinstance(value, str) for value in text.values()) or not isinstance(evidence, dict):
            raise ValueError("not an event: its fields are strings and its evidence an object")
        if not text["event"]:
            raise ValueError("not an event: it has no name")
        return cls(evidence=evidence, **text)


class Sink(Protocol):
    """Where the delivery thread hands each event (module doc). `deliver` may raise: the
    failure is counted under `name` and logged, and the next sink still gets the event."""

    name: str

    def deliver(self, event: Event) -> None: ...

    def close(self) -> None: ...


class Source(Protocol):
    """Where `watch` reads events from instead of the ring (the Redis stream)."""

    def watch(
        self, client_id: str | None, *, follow: bool, active: Callable[[], bool]
    ) -> Generator[Event, None, None]: ...


class Events:
    """Emits events (see module doc). Thread-safe; keeps the last `keep` of them.

    `sinks` get every event after the log line; `source`, when given, is what `watch`
    reads. `on_dropped(where)` counts an event that did not reach a sink ("queue": the
    delivery queue was full; a sink's name: it failed; "follower": a slow follower lost
    it). `count(signal, action)` counts each governance event (detection findings are
    counted by `tokenbroker.detection` itself, those its cooldown keeps from becoming
    events included)."""

    def __init__(
        self,
        *,
        keep: int = 10_000,
        clock: Callable[[], float] = time.time,
        sinks: Sequence[Sink] = (),
        source: Source | None = None,
        queue_max: int = 10_000,
        follower_backlog: int = 1_000,
        max_followers: int = 64,
        on_dropped: Callable[[str], None] | None = None,
        count: Callable[[str, str], None] | None = None,
    ) -> None:
        if keep < 1 or queue_max < 1:
            raise ValueError("keep and queue_max must be at least 1")
        self._ring: deque[Event] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._clock = clock
        self._sinks: tuple[Sink, ...] = (LogSink(), *sinks)
        self._source = source
        self._queue: deque[Event] = deque()
        self._queue_max = queue_max
        self._worker: threading.Thread | None = None
        self._closed = False
        self._on_dropped = on_dropped
        self._count = count
        self._failure_logged: dict[str, float] = {}
        self._followers = Followers(
            max_followers=max_followers, backlog=follower_backlog, clock=self._stamp, on_lost=self._dropped
        )

    def _stamp(self) -> str:
        return datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def emit(
        self,
        event: str,
        *,
        client_id: str,
        action: str,
        severity: str = "warning",
        signal: str = GOVERNANCE,
        evidence: Mapping[str, Any] | None = None,
        session_id: str = "",
        source_ip: str = "",
    ) -> Event:
        record = Event(
            event,
            signal,
            severity,
            client_id,
            action,
            scrub(dict(evidence or {})),
            session_id,
            source_ip,
            self._stamp(),
        )
        queued = False
        with self._lock:
            self._ring.append(record)
            self._followers.offer(record)
            if not self._closed and len(self._queue) < self._queue_max:
                self._queue.append(record)
                queued = True
                self._wake.notify()
                if self._worker is None:
                    self._start_worker()
        if self._count is not None and signal == GOVERNANCE:
            self._count(signal, action)
        if not queued:
            if self._closed:  # nobody delivers any more: the log line, at least, here
                self._deliver(record, self._sinks[:1])
            else:
                self._dropped("queue")
        return record

    def recent(self, client_id: str | None = None) -> list[Event]:
        with self._lock:
            return [e for e in self._ring if client_id is None or e.client_id == client_id]

    def watch(
        self, client_id: str | None = None, *, follow: bool = False, active: Callable[[], bool] = lambda: True
    ) -> Generator[Event, None, None]:
        """The kept events (of `client_id` only, when given), oldest first; with `follow`,
        then each new one until `active()` is false (checked at least once a second).
        Raises `RateLimitedError` when `max_followers` already follow."""
        if self._source is not None:
            yield from self._source.watch(client_id, follow=follow, active=active)
            return
        if not follow:
            yield from self.recent(client_id)
            return
        with self._lock:  # the snapshot and the follower in one step: no event missed or repeated
            kept = [e for e in self._ring if client_id is None or e.client_id == client_id]
            follower = self._followers.open(client_id)
        try:
            yield from kept
            while active():
                yield from follower.take(timeout=1.0)
        finally:
            self._followers.close(follower)

    def close(self) -> None:
        """Delivers what is queued (waiting at most `CLOSE_SECONDS`), stops the delivery
        thread and closes the sinks. Later events are kept and logged, not delivered."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join(CLOSE_SECONDS)
        with self._lock:
            left = len(self._queue)
            self._queue.clear()
        for _ in range(left):
            self._dropped("queue")
        for sink in self._sinks:
            try:
                sink.close()
            except Exception as exc:  # one sink's failure must not keep the others open
                log.warning("event sink failed to close", sink=sink.name, error=type(exc).__name__)

    # -- the delivery thread ----------------------------------------------------------

    def _start_worker(self) -> None:
        """Starts the delivery thread (with `_lock` held). A thread that cannot start
        leaves the events queued for the next emit to try again."""
        worker = threading.Thread(target=self._run, name="tb-events", daemon=True)
        try:
            worker.start()
        except RuntimeError:
            log.warning("cannot start the event delivery thread: events wait in the queue")
            return
        self._worker = worker

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue and not self._closed:
                    self._wake.wait(IDLE_SECONDS)
                if not self._queue:  # idle, or closed with everything delivered
                    self._worker = None
                    return
                event = self._queue.popleft()  # one at a time: the queue alone holds what waits
            self._deliver(event, self._sinks)

    def _deliver(self, event: Event, sinks: Sequence[Sink]) -> None:
        for sink in sinks:
            try:
                sink.deliver(event)
            except Exception as exc:
                self._dropped(sink.name)
                self._log_failure(sink.name, exc)

    def _log_failure(self, name: str, exc: Exception) -> None:
        """Logs a failing sink at most once a minute (a Redis outage would log every event)."""
        now = time.monotonic()
        last = self._failure_logged.get(name)
        if last is not None and now - last < FAILURE_LOG_SECONDS:
            return
        self._failure_logged[name] = now
        log.warning(
            "an event did not reach its sink (logged once a minute; tokenbroker_events_dropped_total counts them)",
            sink=name,
            error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
        )

    def _dropped(self, where: str) -> None:
        if self._on_dropped is not None:
            try:
                self._on_dropped(where)
            except Exception:  # a counter must not break delivery
                log.warning("counting a dropped event failed", where=where)


__all__ = [
    "APPROVAL_EXPIRED",
    "CLIENT_DOCUMENT_CHANGED",
    "CLIENT_PENDING",
    "CREDENTIAL_LEAKED",
    "EVENTS_LOST",
    "GOVERNANCE",
    "KEY_EXPIRED",
    "Event",
    "Events",
    "Sink",
    "Source",
]
