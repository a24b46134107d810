"""Events: what the broker noticed and did, as one record type for every producer.

Governance events (a client pending approval, a client document whose keys changed, an
approval or a key that expired) and, later, the detection signals share the shape DESIGN
names: `event`, `signal`, `severity`, `client_id`, `session_id`, `source_ip`, `action`,
`evidence` (never a token or a secret), `time` (ISO 8601 UTC).

`Events` writes each one as a structured log line (logger "tokenbroker.events") and keeps
the latest ones in a bounded ring, for whoever reads them in process (tests, the events
stream to come)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from tokenbroker.audit import scrub

GOVERNANCE = "governance"
CLIENT_PENDING = "client_pending"
CLIENT_DOCUMENT_CHANGED = "client_document_changed"
APPROVAL_EXPIRED = "approval_expired"
KEY_EXPIRED = "key_expired"

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


class Events:
    """Emits events (see module doc). Thread-safe; keeps the last `keep` of them."""

    def __init__(self, *, keep: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self._ring: deque[Event] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._clock = clock

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
        stamp = datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        record = Event(
            event, signal, severity, client_id, action, scrub(dict(evidence or {})), session_id, source_ip, stamp
        )
        with self._lock:
            self._ring.append(record)
        log.warning(event, **{k: v for k, v in record.as_dict().items() if k != "event"})
        return record

    def recent(self, client_id: str | None = None) -> list[Event]:
        with self._lock:
            return [e for e in self._ring if client_id is None or e.client_id == client_id]


__all__ = [
    "APPROVAL_EXPIRED",
    "CLIENT_DOCUMENT_CHANGED",
    "CLIENT_PENDING",
    "GOVERNANCE",
    "KEY_EXPIRED",
    "Event",
    "Events",
]
