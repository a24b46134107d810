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
"suppressed":N,...}`, so the log says how many it does not hold.

Lines written to a file or a stream are hash-chained (summary lines too): each ends with
`"seq"` (1, 2, ...) and `"prev"`, the hex SHA-256 of the previous line's exact bytes
(without its newline; 64 zeros before the first line), so `tokenbroker audit verify`
finds an edited, removed or reordered line (`tokenbroker.audit_chain`, which also says
what the chain alone cannot see: the last lines cut off). A file that already exists is
continued: its last line, read from the end in bounded memory, gives the `seq` and hash
to go on from. Several writers may share one file (the workers of `serve --workers N`
do, and two `AuditLog`s in one process may): each line is appended under an exclusive
`flock` of the file, after re-reading the file's last line when someone else appended
since this writer's last line, so the chain stays one chain. Writers that append to the
file without that lock (`echo >> audit.jsonl`) break it, and `verify` says where. A
stream starts a new chain (it cannot be read back). Lines sent to structlog (no
`audit_file`) are not chained: the log pipeline owns those bytes."""

from __future__ import annotations

import fcntl
import io
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import structlog

from tokenbroker.audit_chain import Link, tail_of
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


def scrub(value: Any) -> Any:
    """`value` with credentials redacted, for nested dicts and lists too (what `AuditLog`
    writes, and what `tokenbroker audit why` prints of a file it did not write)."""
    if isinstance(value, str):
        return _JWT_TEXT.sub(REDACTED, value) if "eyJ" in value else value
    if isinstance(value, bytes | bytearray | memoryview):
        return scrub(bytes(value).decode("utf-8", "replace"))
    if isinstance(value, dict):
        return {str(k): REDACTED if _SENSITIVE_NAME.search(str(k)) else scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v) for v in value]
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
        self._fd: int | None = None  # a file sink (read back: see _append)
        self._binary: IO[bytes] | None = None
        self._text: IO[str] | None = None
        self._logger: Any = None
        if sink is None:
            self._logger = structlog.get_logger("tokenbroker.audit")
        elif isinstance(sink, str | os.PathLike):
            path = Path(sink)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Readable too: the last line of the file gives the chain to continue.
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        elif isinstance(sink, io.TextIOBase) or not _is_binary(sink):
            self._text = sink  # type: ignore[assignment]
        else:
            self._binary = sink  # type: ignore[assignment]
        self.sink_name = "structlog" if sink is None else str(getattr(sink, "name", sink))
        self._link = Link()  # the end of the chain: this writer's last line
        self._file_end: int | None = None  # the file's size after this writer's last line

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
        """The (redacted) event as it will be written (a file's or stream's line then
        ends with the chain's `seq` and `prev`)."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be 'grant' or 'refuse', not {decision!r}")
        extra = scrub(fields)
        return {
            "time": _utc_now(self._clock),
            "event": event,
            "client": scrub(client_id or ""),
            "audience": scrub(audience or ""),
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

    def record_event(self, entry: Mapping[str, Any]) -> None:
        """Writes one line that records no decision: a detection or governance event
        (`tokenbroker.events_sinks`), `time` and `event` first, then its other fields,
        redacted like every line and chained like every line. Never rate-limited: events
        are bounded where they are made. Suppressed lines are summarised before it."""
        fields = scrub(dict(entry))
        line = {"time": str(fields.pop("time", "") or _utc_now(self._clock)), "event": str(fields.pop("event", ""))}
        self._flush_suppressed()
        self._write({**line, **{k: v for k, v in fields.items() if k not in ("seq", "prev")}})

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
        with self._lock:
            if self._fd is not None:
                self._append(self._fd, entry)
                return
            line, link = self._link.chain(entry)
            if self._binary is not None:
                self._binary.write(line + b"\n")
                self._binary.flush()
            elif self._text is not None:
                self._text.write(line.decode("utf-8") + "\n")
                self._text.flush()
            self._link = link

    def _append(self, fd: int, entry: dict[str, Any]) -> None:
        """Appends `entry`'s line to the file, chained to the file's last line, under an
        exclusive `flock` (other writers, other processes: module doc). The last line is
        read back only when the file is not as this writer left it."""
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            end = os.fstat(fd).st_size
            newline = b""
            if end != self._file_end:  # the first line, another writer's, or a truncated file
                tail = tail_of(fd, end)
                self._link, newline = tail.link, b"\n" if tail.torn else b""
            line, link = self._link.chain(entry)
            data = newline + line + b"\n"
            self._file_end = None  # unknown until the whole line is written
            _write_all(fd, data)
            self._link, self._file_end = link, end + len(data)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Writes the summary of suppressed lines, if any, and closes a file sink."""
        self._flush_suppressed()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __repr__(self) -> str:
        return f"AuditLog({self.sink_name!r})"


# The fields `entry` sets, and the chain's (`seq`, `prev`): a caller's field of these names is dropped.
_FIXED = frozenset(("time", "event", "client", "audience", "decision", "rule", "source_ip", "seq", "prev"))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _is_binary(stream: Any) -> bool:
    if isinstance(stream, io.RawIOBase | io.BufferedIOBase):
        return True
    mode = getattr(stream, "mode", "")
    return isinstance(mode, str) and "b" in mode and stream is not sys.stderr and stream is not sys.stdout


__all__ = ["ISSUE_EVENT", "REDACTED", "AuditLog", "scrub"]
