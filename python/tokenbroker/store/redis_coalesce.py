"""The Redis store's validations on their way to Redis: batches of `TokenCheck`s, and
coalescing. Concurrent `check_token` calls from threads (the sync gRPC
server's workers) and concurrent `acheck_token` calls share pipelines: while one pipeline
is in flight, new calls wait in a bounded queue and go together in the next one; each
caller gets its own answer or exception."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Awaitable, Callable

from tokenbroker.errors import StoreUnavailableError
from tokenbroker.reason import Reason
from tokenbroker.store.base import TokenCheck
from tokenbroker.store.redis_errors import unavailable


def raise_first_error(results: list[Reason | StoreUnavailableError]) -> list[Reason]:
    """A batch's answers, or the first error among them: a batch answers all or raises."""
    reasons: list[Reason] = []
    for result in results:
        if isinstance(result, StoreUnavailableError):
            raise result
        reasons.append(result)
    return reasons


def _errors_for_each(exc: Exception, count: int) -> list[Reason | StoreUnavailableError]:
    """What each of `count` callers gets when sending their batch raised `exc`: an error of
    its own (never one instance shared by callers); a bug still refuses rather than hangs."""
    if isinstance(exc, StoreUnavailableError):
        return [StoreUnavailableError(*exc.args) for _ in range(count)]
    return [unavailable("check_token", exc) for _ in range(count)]


def _overloaded(max_pending: int) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"Redis store overloaded during check_token: {max_pending} validations already wait for Redis"
    )


class CheckCoalescer:
    """Sends concurrent `acheck_token` calls together: one pipeline is in flight at a time;
    calls that arrive meanwhile queue (at most `max_pending`) and go in the next pipeline
    (at most `max_batch` each). Every caller gets its own answer or exception."""

    def __init__(
        self,
        send: Callable[[list[TokenCheck]], Awaitable[list[Reason | StoreUnavailableError]]],
        *,
        max_batch: int,
        max_pending: int,
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._pending: deque[tuple[TokenCheck, asyncio.Future[Reason]]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()
        self.pipelines = 0  # pipelines sent, for tests and metrics

    async def check(self, check: TokenCheck) -> Reason:
        if len(self._pending) >= self._max_pending:
            raise _overloaded(self._max_pending)
        future: asyncio.Future[Reason] = self.loop.create_future()
        self._pending.append((check, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = self.loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        batch: list[tuple[TokenCheck, asyncio.Future[Reason]]] = []
        try:
            while self._pending:
                count = min(len(self._pending), self._max_batch)
                batch = [self._pending.popleft() for _ in range(count)]
                batch = [(c, f) for c, f in batch if not f.done()]  # callers that gave up
                if not batch:
                    continue
                self.pipelines += 1
                try:
                    results: list[Reason | StoreUnavailableError] = await self._send([c for c, _ in batch])
                except Exception as exc:
                    results = _errors_for_each(exc, len(batch))
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, StoreUnavailableError):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
        except BaseException:
            # Cancelled (the loop is shutting down): nobody may wait forever.
            for _, future in [*batch, *self._pending]:
                if not future.done():
                    future.set_exception(unavailable("check_token"))
            self._pending.clear()
            raise


class _Waiter:
    """A thread waiting in `ThreadCheckCoalescer` for its answer, or for the lead."""

    __slots__ = ("check", "done", "event", "lead", "result")

    def __init__(self, check: TokenCheck) -> None:
        self.check = check
        self.event = threading.Event()
        self.lead = False  # told to send the next pipeline
        self.done = False
        self.result: Reason | StoreUnavailableError = Reason.UNSPECIFIED


class ThreadCheckCoalescer:
    """The thread twin of `CheckCoalescer`, for the sync gRPC server's worker threads.
    A caller that finds no pipeline in flight leads: it sends the queued checks (at most
    `max_batch`) as one pipeline, answers each, then hands the lead to the oldest waiter
    still queued, so no thread keeps flushing for the others. Every caller gets its own
    answer or exception; past `max_pending` queued checks callers are refused at once."""

    def __init__(
        self,
        send: Callable[[list[TokenCheck]], list[Reason | StoreUnavailableError]],
        *,
        max_batch: int,
        max_pending: int,
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: deque[_Waiter] = deque()
        self._leading = False
        self.pipelines = 0  # pipelines sent, for tests and metrics

    def check(self, check: TokenCheck) -> Reason:
        waiter = _Waiter(check)
        with self._lock:
            if len(self._pending) >= self._max_pending:
                raise _overloaded(self._max_pending)
            self._pending.append(waiter)
            if not self._leading:
                self._leading = waiter.lead = True
        while True:
            if waiter.lead:
                waiter.lead = False
                self._lead_once()
            if not waiter.done:
                waiter.event.wait()
                waiter.event.clear()
            if waiter.done:
                if isinstance(waiter.result, StoreUnavailableError):
                    raise waiter.result
                return waiter.result

    def _lead_once(self) -> None:
        with self._lock:
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), self._max_batch))]
        try:
            self.pipelines += 1
            try:
                results = self._send([w.check for w in batch])
            except Exception as exc:
                results = _errors_for_each(exc, len(batch))
            for waiter, result in zip(batch, results, strict=True):
                waiter.result, waiter.done = result, True
                waiter.event.set()
        finally:
            with self._lock:
                if self._pending:
                    successor = self._pending[0]
                    successor.lead = True
                    successor.event.set()
                else:
                    self._leading = False
