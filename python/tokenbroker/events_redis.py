"""The events of every replica in one Redis stream: a sink (`XADD`) and the source
WatchEvents reads (`XRANGE` for the kept ones, then `XREAD BLOCK`), so a broker shows the
events its siblings emitted too, within about a second.

The stream is `<prefix>:{events}:stream` (one cluster slot), bounded by
`XADD MAXLEN ~ max_len` (Redis trims whole nodes, so it may hold up to about a hundred
more). Each entry holds one field, `e`: the event as JSON (`Event.as_dict`, already
scrubbed of anything secret). Entries that are not events (someone else wrote to the key)
are skipped.

Writes run on the events' delivery thread, never on a request's: a Redis that is down or
slow costs the broker dropped events (counted and logged by `tokenbroker.events`), never
a blocked validation. The writer has its own client with short timeouts; readers block
up to `BLOCK_MS` per read, on a client whose read timeout outlasts that. A read that
fails is `StoreUnavailableError` (WatchEvents answers UNAVAILABLE)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Generator, Iterator
from typing import Any

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from tokenbroker.events import Event
from tokenbroker.store.redis_errors import STORE_ERRORS, FailClosed

FIELD = "e"
BLOCK_MS = 1000
PAGE = 500
WRITE_TIMEOUT_SECONDS = 1.0
READ_TIMEOUT_SECONDS = BLOCK_MS / 1000 + 2.0


def stream_key(prefix: str = "tb") -> str:
    if not prefix or "{" in prefix or "}" in prefix:
        raise ValueError("prefix must be non-empty and hold no '{' or '}' (they would move the hash tag)")
    return f"{prefix}:{{events}}:stream"


def _client(url: str, *, cluster: bool, timeout: float) -> Any:
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": WRITE_TIMEOUT_SECONDS,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }
    if cluster:
        return redis.cluster.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def _entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """The (id, fields) pairs of an XREAD reply (RESP2: [[key, entries]]; RESP3: {key: entries})."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (entries for _key, entries in reply)
    found: list[tuple[str, dict[str, str]]] = []
    for entries in streams:
        found.extend(entries)
    return found


class RedisEventStream:
    """The Redis stream of events (module doc): `deliver` appends, `watch` reads."""

    name = "redis"

    def __init__(self, writer: Any, reader: Any, *, max_len: int = 10_000, key: str | None = None) -> None:
        if max_len < 1:
            raise ValueError("max_len must be at least 1")
        self._writer = writer
        self._reader = reader
        self.key = key or stream_key()
        self.max_len = max_len

    @classmethod
    def from_url(
        cls, url: str, *, cluster: bool = False, max_len: int = 10_000, prefix: str = "tb"
    ) -> RedisEventStream:
        """The stream on the Redis (or Redis Cluster) at `url`. Connects on first use."""
        return cls(
            _client(url, cluster=cluster, timeout=WRITE_TIMEOUT_SECONDS),
            _client(url, cluster=cluster, timeout=READ_TIMEOUT_SECONDS),
            max_len=max_len,
            key=stream_key(prefix),
        )

    def deliver(self, event: Event) -> None:
        text = json.dumps(event.as_dict(), separators=(",", ":"), default=str)
        self._writer.xadd(self.key, {FIELD: text}, maxlen=self.max_len, approximate=True)

    def watch(
        self, client_id: str | None = None, *, follow: bool = False, active: Callable[[], bool] = lambda: True
    ) -> Generator[Event, None, None]:
        """The stream's events (of `client_id` only, when given), oldest first, read a page
        at a time; with `follow`, then each new one until `active()` is false (checked at
        least every `BLOCK_MS`). Raises `StoreUnavailableError` when Redis fails."""
        last = "0-0"
        while True:
            with FailClosed("reading the events stream"):
                page = self._reader.xrange(self.key, min=f"({last}" if last != "0-0" else "-", max="+", count=PAGE)
            yield from self._events(page, client_id)
            if page:
                last = page[-1][0]
            if len(page) < PAGE:
                break
        while follow and active():
            with FailClosed("following the events stream"):
                reply = self._reader.xread({self.key: last}, count=PAGE, block=BLOCK_MS)
            entries = _entries(reply)
            if entries:
                last = entries[-1][0]
            yield from self._events(entries, client_id)

    @staticmethod
    def _events(entries: list[tuple[str, dict[str, str]]], client_id: str | None) -> Iterator[Event]:
        for _entry_id, fields in entries:
            try:
                event = Event.from_dict(json.loads(fields.get(FIELD, "")))
            except ValueError:  # json.JSONDecodeError is one: not an event of ours
                continue
            if client_id is None or event.client_id == client_id:
                yield event

    def length(self) -> int:
        """How many entries the stream holds now (for tests and operators)."""
        with FailClosed("reading the events stream"):
            return int(self._reader.xlen(self.key))

    def close(self) -> None:
        for client in (self._writer, self._reader):
            with contextlib.suppress(*STORE_ERRORS):  # closing a broken connection: nothing left to do
                client.close()


__all__ = ["BLOCK_MS", "FIELD", "RedisEventStream", "stream_key"]
