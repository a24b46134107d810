"""What one client can make the HTTP door hold: connections, and the time they may take.

uvicorn bounds the connections it serves (`limit_concurrency`) but starts no timer when a
connection opens (its keep-alive timer runs only after a response), so 1,024 connections
that never send a byte used to answer every honest request with 503, with no credential
at all; and a request whose headers trickle in a byte at a time held its connection as
long as it liked. This protocol, uvicorn's httptools one with three bounds, closes that:

- a connection must start a request within `IDLE_SECONDS` of opening (and of its last
  response, uvicorn's own keep-alive timer);
- a request's headers must be complete within `HEADERS_SECONDS` of their first byte;
- one source address (IPv6: its /64) holds at most `MAX_PER_SOURCE` connections; more are
  closed at once, so one address cannot take the whole `limit_concurrency`.

The body has its own deadline where it is read (`tokenbroker.http.forms`). Hand-written
because uvicorn has none of these knobs (0.55), and a proxy in front is not always there."""

from __future__ import annotations

import asyncio
from collections import Counter

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tokenbroker.ratelimit import source_key

IDLE_SECONDS = 5.0
HEADERS_SECONDS = 10.0
MAX_PER_SOURCE = 64


def guarded_protocol(*, max_per_source: int | None = None) -> type[HttpToolsProtocol]:
    """A protocol class for one server (its own count of connections per source)."""
    per_source: Counter[str] = Counter()
    limit = MAX_PER_SOURCE if max_per_source is None else max_per_source

    class GuardedProtocol(HttpToolsProtocol):
        _source = ""
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            client = self.client[0] if self.client else ""
            self._source = source_key(str(client))
            per_source[self._source] += 1
            if per_source[self._source] > limit:
                transport.close()
                return
            self._arm(IDLE_SECONDS)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            per_source[self._source] -= 1
            if per_source[self._source] <= 0:
                del per_source[self._source]
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._disarm()  # the connection is in use: from now on the headers' deadline
            self._arm(HEADERS_SECONDS)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def _arm(self, seconds: float) -> None:
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.cycle is None or self.cycle.response_complete:  # never cut an answer short
                self.transport.close()

    return GuardedProtocol


__all__ = ["HEADERS_SECONDS", "IDLE_SECONDS", "MAX_PER_SOURCE", "guarded_protocol"]
