"""Structured logs: one JSON object per line on stderr (orjson), with an ISO-8601 UTC
timestamp and the level. Nothing here logs a token, key or secret; callers must not pass
them either (the audit log redacts them; plain logs do not check)."""

from __future__ import annotations

import logging
import sys
from typing import IO, Any, BinaryIO, TextIO, cast

import orjson
import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")


class _Stderr:
    """Whatever `sys.stderr` is at write time (it is swapped by test runners and CLI
    harnesses); `.buffer` gives the bytes side for the JSON renderer."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    @property
    def buffer(self) -> _StderrBytes:
        return _StderrBytes()


class _StderrBytes:
    def write(self, data: bytes) -> int:
        buffer = getattr(sys.stderr, "buffer", None)
        if buffer is None:  # a text-only stderr (e.g. io.StringIO)
            return sys.stderr.write(data.decode("utf-8", "replace"))
        written: int = buffer.write(data)
        return written

    def flush(self) -> None:
        buffer = getattr(sys.stderr, "buffer", sys.stderr)
        buffer.flush()


def configure_logging(level: str = "info", json: bool = True, *, stream: IO[Any] | None = None) -> None:
    """Configures structlog for the whole process. `json=False` gives human-readable
    console lines. `stream` defaults to stderr, so a command's stdout stays its output."""
    name = level.lower()
    if name not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    target: Any = stream if stream is not None else _Stderr()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    logger_factory: Any
    if json:
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        binary = cast(BinaryIO, getattr(target, "buffer", target))
        logger_factory = structlog.BytesLoggerFactory(file=binary)
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
        logger_factory = structlog.PrintLoggerFactory(file=cast(TextIO, target))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[name.upper()]),
        logger_factory=logger_factory,
        # Not cached: reconfiguring (tests, `serve` after option parsing) takes effect at once.
        cache_logger_on_first_use=False,
    )


__all__ = ["LEVELS", "configure_logging"]
