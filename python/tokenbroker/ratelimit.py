"""Token buckets for the service boundary: one per process (`TokenBucket`), or one per key
(a client id, a source address) in a table bounded by LRU eviction (`KeyedBuckets`).

A key that is not in the table has a full bucket, so evicting the least recently used
entry forgets at most some refill time of a key nobody has charged for a while. Every
method is thread-safe and O(1)."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """`burst` tokens, refilled at `rate` per second. `take()` spends one if there is one."""

    def __init__(self, *, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0 or burst < 1:
            raise ValueError("a token bucket needs rate >= 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._level = self.burst
        self._stamp = clock()
        self._lock = threading.Lock()

    def _refill(self, now: float) -> None:
        self._level = min(self.burst, self._level + max(0.0, now - self._stamp) * self.rate)
        self._stamp = now

    def take(self) -> bool:
        """Spends one token: True when there was one."""
        with self._lock:
            self._refill(self._clock())
            if self._level >= 1.0:
                self._level -= 1.0
                return True
            return False


class KeyedBuckets:
    """A token bucket per key, at most `max_keys` of them (least recently used evicted).

    `allowed(key)` only looks (is a token left?); `charge(key)` spends one, down to zero:
    callers look before doing work and charge after it failed, so only failures count."""

    def __init__(
        self, *, rate: float, burst: float, max_keys: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate < 0 or burst < 1 or max_keys < 1:
            raise ValueError("keyed token buckets need rate >= 0, burst >= 1 and max_keys >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self._clock = clock
        self._table: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (level, stamp)
        self._lock = threading.Lock()

    def _level(self, key: str, now: float) -> float:
        entry = self._table.get(key)
        if entry is None:
            return self.burst
        level, stamp = entry
        return min(self.burst, level + max(0.0, now - stamp) * self.rate)

    def allowed(self, key: str) -> bool:
        """True while `key` has a token left (nothing is spent)."""
        with self._lock:
            return self._level(key, self._clock()) >= 1.0

    def charge(self, key: str) -> None:
        """Spends one of `key`'s tokens (none left: stays empty)."""
        with self._lock:
            now = self._clock()
            level = max(0.0, self._level(key, now) - 1.0)
            self._table[key] = (level, now)
            self._table.move_to_end(key)
            while len(self._table) > self.max_keys:
                self._table.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._table)


def source_key(address: str | None) -> str:
    """The rate-limit key of a source address: the address itself for IPv4, its /64 for
    IPv6 (one host usually holds a whole /64), "" when there is none."""
    if not address:
        return ""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(parsed) >> 64 << 64, 64)))
    return str(parsed)


__all__ = ["KeyedBuckets", "TokenBucket", "source_key"]
