"""`AuditLog`: one JSON line per policy decision, saying which rule granted or refused it.

    {"time":"2025-01-01T12:00:00.000Z","event":"issue","client":"agent-7",
     "audience":"https://mcp.example.com/mcp","decision":"grant","rule":"client.approved",
     "source_ip":"10.0.0.7","session":"...","jti":"..."}

Credentials never reach the log: a field whose name says token, secret, assertion, proof,
password, key or authorization is redacted, and so is any value that looks like a JWT.

Refusals of callers that never proved who they are (`authenticated=False`) cost an
attacker nothing, so their lines are rate-limited: a token bucket per process
(`refusal_burst` lines, refilled at `refusal_rate` per second). Suppressed lines are
counted (`on_suppressed`, the Prometheus counter) and the next line written is preceded
by one summary line, `{"event":"audit_suppressed","rule":"audit.rate_limited",
"suppressed":N,...}`, so the log says how many it does not hold."""

from __future__ import annotations

import io
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from tokenbroker.ratelimit import TokenBucket

REDACTED = "[redacted]"
DECISIONS = ("grant", "refuse")
SUPPRESSED_EVENT = "audit_suppressed"
ISSUE_EVENT = "issue"  # a token request's decision, at every door (gRPC IssueToken, HTTP /token)
SUPPRESSED_RULE = "audit.rate_limited"
# Field names that carry credentials. `jti` and `session` are identifiers, not credentials.
_SENSITIVE_NAME = re.compile(
    r"token|secret|assertion|proof|passw|api_?key|private|authorization|credential|cookie|bearer", re.IGNORECASE
)
# A JWS/JWT compact serialization (header starts with '{"' -> "eyJ"), anywhere in a value.
_JWT_TEXT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")


def _scrub(value: Any) -> Any:
    """`value` with credentials redacted, for nested dicts and lists too."""
    if isinstance(value, str):
        return _JWT_TEXT.sub(REDACTED, value) if "eyJ" in value else value
    if isinstance(value, bytes | bytearray | memoryview):
        return _scrub(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, dict):
        return {str(k): REDACTED if _SENSITIVE_NAME.search(str(k)) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v) for v in value]
    return value


def _utc_now(clock: Callable[[], float]) -> str:
    return datetime.fromtimestamp(clock(), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Writes audit events to `sink`: a file path (appended to, created 0600), a stream
    (text or binary), or None for the structlog logger "tokenbroker.audit". Thread-safe.
    Lines of unauthenticated refusals are rate-limited (see module doc)."""

    def __init__(
        self,
        sink: str | os.PathLike[str] | IO[str] | IO[bytes] | None = None,
        *,
        clock: Callable[[], float] | None = None,
        refusal_burst: int = 200,
        refusal_rate: float = 20.0,
        on_suppressed: Callable[[int], None] | None = None,
    ) -> None:
        self._clock = clock or time.time
        self._lock = threading.Lock()
        self._refusals = TokenBucket(rate=refusal_rate, burst=refusal_burst)
        self._on_suppressed = on_suppressed
        self._suppressed = 0
        self._suppressed_since: str | None = None
        self._owned: IO[bytes] | None = None
        self._binary: IO[bytes] | None = None
        self._text: IO[str] | None = None
        self._logger: Any = None
        if sink is None:
            self._logger = structlog.get_logger("tokenbroker.audit")
        elif isinstance(sink, str | os.PathLike):
            path = Path(sink)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._owned = self._binary = os.fdopen(fd, "ab", buffering=0)
        elif isinstance(sink, io.TextIOBase) or not _is_binary(sink):
            self._text = sink  # type: ignore[assignment]
        else:
            self._binary = sink  # type: ignore[assignment]
        self.sink_name = "structlog" if sink is None else str(getattr(sink, "name", sink))

    def entry(
        self,
        *,
        event: str,
        client_id: str,
        audience: str,
        decision: str,
        rule: str,
        source_ip: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """The (redacted) event as it will be written."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be 'grant' or 'refuse', not {decision!r}")
        extra = _scrub(fields)
        return {
            "time": _utc_now(self._clock),
            "event": event,
            "client": _scrub(client_id or ""),
            "audience": _scrub(audience or ""),
            "decision": decision,
            "rule": rule,
            "source_ip": source_ip or "",
            **{k: v for k, v in extra.items() if k not in _FIXED},
        }

    def record(
        self,
        *,
        event: str,
        client_id: str,
        audience: str,
        decision: str,
        rule: str,
        source_ip: str | None = None,
        authenticated: bool = True,
        **fields: Any,
    ) -> None:
        """Writes one event. Fields named like a credential are redacted (see module doc).
        A refusal with `authenticated=False` (the caller never proved who it is) is
        written only while the refusal rate allows; otherwise it is counted."""
        if not authenticated and decision == "refuse" and not self._refusals.take():
            with self._lock:
                self._suppressed += 1
                if self._suppressed_since is None:
                    self._suppressed_since = _utc_now(self._clock)
            if self._on_suppressed is not None:
                self._on_suppressed(1)
            return
        self._flush_suppressed()
        self._write(
            self.entry(
                event=event,
                client_id=client_id,
                audience=audience,
                decision=decision,
                rule=rule,
                source_ip=source_ip,
                **fields,
            )
        )

    @property
    def suppressed(self) -> int:
        """Lines suppressed since the last summary line."""
        return self._suppressed

    def _flush_suppressed(self) -> None:
        """Writes the summary line of the lines suppressed so far, if any."""
        if not self._suppressed:
            return
        with self._lock:
            count, since = self._suppressed, self._suppressed_since
            self._suppressed, self._suppressed_since = 0, None
        if count:
            self._write(
                self.entry(
                    event=SUPPRESSED_EVENT,
                    client_id="",
                    audience="",
                    decision="refuse",
                    rule=SUPPRESSED_RULE,
                    suppressed=count,
                    since=since,
                )
            )

    def _write(self, entry: dict[str, Any]) -> None:
        if self._logger is not None:
            name = entry.pop("event")
            entry.pop("time")  # the structlog pipeline adds its own timestamp
            self._logger.info(name, audit=True, **entry)
            return
        line = orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE)
        with self._lock:
            if self._binary is not None:
                self._binary.write(line)
                self._binary.flush()
            elif self._text is not None:
                self._text.write(line.decode("utf-8"))
                self._text.flush()

    def close(self) -> None:
        """Writes the summary of suppressed lines, if any, and closes a file sink."""
        self._flush_suppressed()
        with self._lock:
            if self._owned is not None:
                self._owned.close()
                self._owned = self._binary = None

    def __repr__(self) -> str:
        return f"AuditLog({self.sink_name!r})"


_FIXED = frozenset(("time", "event", "client", "audience", "decision", "rule", "source_ip"))


def _is_binary(stream: Any) -> bool:
    if isinstance(stream, io.RawIOBase | io.BufferedIOBase):
        return True
    mode = getattr(stream, "mode", "")
    return isinstance(mode, str) and "b" in mode and stream is not sys.stderr and stream is not sys.stdout


__all__ = ["ISSUE_EVENT", "REDACTED", "AuditLog"]
