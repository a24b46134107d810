"""The two local sinks of events (`tokenbroker.events`): the structured log line and the
audit log.

The log line is the one events always had (logger "tokenbroker.events", the event's name
as the message), at the level its severity says. The audit line makes the audit file
the one record of what was decided and what was noticed: `{"time", "event", "signal",
"severity", "client_id", "session_id", "source_ip", "action", "evidence"}` plus the
chain's `seq` and `prev` (`AuditLog.record_event`: chained like every line, never
rate-limited, since events are bounded where they are made)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import structlog

if TYPE_CHECKING:
    from tokenbroker.events import Event

log = structlog.get_logger("tokenbroker.events")

_LEVELS = {"info": "info", "warning": "warning", "critical": "critical"}


class LogSink:
    """Each event as one structured log line."""

    name = "log"

    def deliver(self, event: Event) -> None:
        fields = event.as_dict()
        name = fields.pop("event")
        getattr(log, _LEVELS.get(event.severity, "warning"))(name, **fields)

    def close(self) -> None:
        return None


class AuditLogLike(Protocol):
    """`tokenbroker.audit.AuditLog`, as the audit sink uses it."""

    def record_event(self, entry: Mapping[str, Any]) -> None: ...


class AuditSink:
    """Each event as one audit line (module doc). The audit log is closed by its owner."""

    name = "audit"

    def __init__(self, audit: AuditLogLike) -> None:
        self._audit = audit

    def deliver(self, event: Event) -> None:
        self._audit.record_event(event.as_dict())

    def close(self) -> None:
        return None


__all__ = ["AuditLogLike", "AuditSink", "LogSink"]
