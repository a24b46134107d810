"""Followers: the in-process readers of new events (`Events.watch(follow=True)`, and so
`WatchEvents` / `tokenbroker events --follow` on a broker without Redis).

Memory stays bounded however slow a reader is: at most `max_followers` follow at once
(one more is `RateLimitedError`, RESOURCE_EXHAUSTED), and each keeps at most `backlog`
events it has not taken yet. A follower that falls further behind loses the oldest of
them, each counted (`on_lost`, "follower"), and the next thing it takes is an
`events_lost` event saying how many: a reader never mistakes a gap for quiet."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenbroker.errors import RateLimitedError

if TYPE_CHECKING:
    from tokenbroker.events import Event

LOST_SIGNAL = "delivery"


class Follower:
    """One reader's queue of new events (of `client_id` only, when given)."""

    def __init__(self, client_id: str | None, backlog: int, clock: Callable[[], str]) -> None:
        self.client_id = client_id
        self._backlog = backlog
        self._clock = clock
        self._queue: deque[Event] = deque()
        self._lost = 0
        self._ready = threading.Condition(threading.Lock())

    def offer(self, event: Event) -> bool:
        """Queues `event` when this follower wants it; False when that pushed the oldest
        out (the follower is `backlog` behind)."""
        if self.client_id is not None and event.client_id != self.client_id:
            return True
        with self._ready:
            kept = True
            if len(self._queue) >= self._backlog:
                self._queue.popleft()
                self._lost += 1
                kept = False
            self._queue.append(event)
            self._ready.notify()
        return kept

    def take(self, timeout: float) -> list[Event]:
        """The events queued since the last take (waiting up to `timeout` seconds for
        one), preceded by an `events_lost` event when some were lost since."""
        from tokenbroker.events import EVENTS_LOST, Event

        with self._ready:
            if not self._queue:
                self._ready.wait(timeout)
            taken, lost = list(self._queue), self._lost
            self._queue.clear()
            self._lost = 0
        if not lost:
            return taken
        notice = Event(
            EVENTS_LOST,
            LOST_SIGNAL,
            "warning",
            self.client_id or "",
            "alert",
            {"lost": lost, "why": f"this reader fell {self._backlog} events behind: the oldest were dropped"},
            time=self._clock(),
        )
        return [notice, *taken]


class Followers:
    """The open followers of one `Events` (module doc). `offer` is called under the
    events' lock, so a follower opened under it misses nothing and sees nothing twice."""

    def __init__(
        self,
        *,
        max_followers: int,
        backlog: int,
        clock: Callable[[], str],
        on_lost: Callable[[str], None],
    ) -> None:
        if max_followers < 1 or backlog < 1:
            raise ValueError("max_followers and backlog must be at least 1")
        self._max = max_followers
        self._backlog = backlog
        self._clock = clock
        self._on_lost = on_lost
        self._open: list[Follower] = []
        self._lock = threading.Lock()

    def open(self, client_id: str | None) -> Follower:
        follower = Follower(client_id, self._backlog, self._clock)
        with self._lock:
            if len(self._open) >= self._max:
                raise RateLimitedError(
                    f"{self._max} readers already follow this broker's events: close one, or read without --follow"
                )
            self._open = [*self._open, follower]  # copied: `offer` reads it without the lock
        return follower

    def close(self, follower: Follower) -> None:
        with self._lock:
            self._open = [f for f in self._open if f is not follower]

    def offer(self, event: Event) -> None:
        for follower in self._open:
            if not follower.offer(event):
                self._on_lost("follower")

    def __len__(self) -> int:
        return len(self._open)


__all__ = ["LOST_SIGNAL", "Follower", "Followers"]
