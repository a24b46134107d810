"""What a fetched document is, how long it may be reused, and the bounded table of the
last good document of each URL.

Two lifetimes per document:
- `fresh_until`: until then `fetch` answers from the cache without any traffic. It is what
  `Cache-Control: max-age` says (minus `Age`), at most `max_cache_seconds` (24 h);
  `no-store`, `no-cache` or no `max-age` make it the fetch time (reused by no later call).
- `usable_until`: `fetched_at + max_cache_seconds`. Until then the document is the "last
  good" one: when a refetch fails (any `CimdFetchError`: the origin is down, answers 500,
  now resolves to a refused address, or the broker is rate limiting it) `fetch` answers
  with it marked `stale=True` and the refetch's `failure` reason, so an already approved
  client is not locked out by an outage. No document older than `max_cache_seconds` is
  ever served. The last good document is kept even under `no-store`: this is the broker's
  record of what it approved, not a shared HTTP cache.

The table is bounded (`max_entries` per tier, least recently used evicted) and holds the
exact bytes only (at most `max_bytes` each), parsed again for each caller: a caller that
changes its document changes nobody else's, and the memory is at most
2 x max_entries x max_bytes plus the table. Two tiers, so that unknown URLs (anyone can
make the broker fetch one) cannot evict the last good document of approved clients: a
URL fetched with `approved=True` moves to the approved tier, which only such fetches fill."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tokenbroker.cimd.errors import FetchFailure
from tokenbroker.cimd.jsonbody import parse_json_object

_SECONDS = re.compile(r"[0-9]+")
# A lifetime of more digits than this is beyond any cap (and int() of a header-sized run of
# digits would be slow or refused).
_MAX_DIGITS = 12


@dataclass(frozen=True)
class FetchedDocument:
    """A document as fetched: the parsed object (the caller's own copy), its exact bytes
    and their SHA-256 (hex) fingerprint, and its lifetimes (seconds since the epoch)."""

    url: str
    document: dict[str, Any]
    body: bytes
    fingerprint: str
    fetched_at: float
    fresh_until: float
    usable_until: float
    from_cache: bool = False  # answered without a request to the origin
    stale: bool = False  # a refetch failed and this is the last good copy (within usable_until)
    failure: FetchFailure | None = None  # why the refetch failed, when stale


@dataclass(frozen=True)
class CachedBody:
    """What the table keeps of a document: its bytes, fingerprint and lifetimes."""

    url: str
    host: str
    body: bytes
    fingerprint: str
    fetched_at: float
    fresh_until: float
    usable_until: float

    def open(self, *, from_cache: bool, stale: bool = False, failure: FetchFailure | None = None) -> FetchedDocument:
        """The document again, parsed into a new object for this caller."""
        return FetchedDocument(
            url=self.url,
            document=parse_json_object(self.body, host=self.host),
            body=self.body,
            fingerprint=self.fingerprint,
            fetched_at=self.fetched_at,
            fresh_until=self.fresh_until,
            usable_until=self.usable_until,
            from_cache=from_cache,
            stale=stale,
            failure=failure,
        )


def _seconds(value: str) -> int | None:
    value = value.strip().strip('"')
    if not _SECONDS.fullmatch(value):
        return None
    return int(value) if len(value) <= _MAX_DIGITS else 10**_MAX_DIGITS


def freshness_seconds(cache_control: Iterable[str], age: Iterable[str], *, max_seconds: float) -> float:
    """How long a document may be reused without asking again, from its `Cache-Control`
    and `Age` header values: `max-age` minus `Age`, at most `max_seconds`; 0 for
    `no-store`, `no-cache`, no `max-age`, or a `max-age` that is given twice or unreadable."""
    max_ages: list[int | None] = []
    for value in cache_control:
        for directive in value.split(","):
            name, _, argument = directive.strip().partition("=")
            name = name.strip().lower()
            if name in ("no-store", "no-cache"):
                return 0.0
            if name == "max-age":
                max_ages.append(_seconds(argument))
    if len(max_ages) != 1 or max_ages[0] is None:
        return 0.0
    ages = [_seconds(value) for value in age]
    current_age = ages[0] if len(ages) == 1 and ages[0] is not None else 0
    return float(max(0, min(max_ages[0] - current_age, max_seconds)))


class LastGoodCache:
    """The last good document of each URL, in two LRU tiers (approved clients', others').
    Thread-safe; every operation is O(1)."""

    def __init__(self, *, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("the CIMD cache needs cache_max_entries >= 1")
        self.max_entries = max_entries
        self._approved: OrderedDict[str, CachedBody] = OrderedDict()
        self._others: OrderedDict[str, CachedBody] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, url: str, *, approved: bool = False) -> CachedBody | None:
        """The last good document of `url`, if kept; `approved` moves it to the approved tier."""
        with self._lock:
            entry = self._approved.get(url)
            if entry is not None:
                self._approved.move_to_end(url)
                return entry
            entry = self._others.get(url)
            if entry is None:
                return None
            if approved:
                del self._others[url]
                self._keep(self._approved, entry)
            else:
                self._others.move_to_end(url)
            return entry

    def put(self, entry: CachedBody, *, approved: bool = False) -> None:
        """Keeps `entry` as the last good document of its URL (in the approved tier when
        `approved` or when the URL is already there)."""
        with self._lock:
            if approved or entry.url in self._approved:
                self._others.pop(entry.url, None)
                self._keep(self._approved, entry)
            else:
                self._keep(self._others, entry)

    def _keep(self, table: OrderedDict[str, CachedBody], entry: CachedBody) -> None:
        table[entry.url] = entry
        table.move_to_end(entry.url)
        while len(table) > self.max_entries:
            table.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._approved) + len(self._others)
