"""The load generator: one asyncio event loop driving grpc.aio channels, closed loop (N
requests in flight per concurrency level) or open loop (a fixed request rate).

Open loop: latency runs from the moment a request is sent; how late the generator sent
it after its scheduled time (timer granularity, a busy event loop) is reported apart as
the send lag. Sends never wait for answers, so a stalled server cannot hide its queueing.

Requests are prebuilt before timing: serialized `ValidateTokenRequest` bytes for tokens
issued by the broker, each with a fresh DPoP proof pre-signed by `ProofSigner` (in worker
processes: signing costs about 25 us a proof and holds the GIL), so the generator
measures the server, not proof signing. Proofs live 65 s after their `iat` (the broker's
window), so pools are signed just before the levels that use them; unused requests carry
over to the next level while they are fresh. Bearer tokens need no proof and are cycled.

Modes, at concurrency N:
- unary: N `ValidateToken` calls in flight;
- batch: N `ValidateTokenBatch` calls of `batch_size` requests in flight;
- stream: ceil(N / 16) `ValidateTokenStream` streams with up to 16 requests in flight each
  (each open stream holds a server thread: the broker has 32).

Latencies are per RPC (a batch's latency is the whole batch's); throughput counts
validations."""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc  # type: ignore[import-untyped,unused-ignore]

from tokenbroker._core import ProofSigner
from tokenbroker.v1 import broker_pb2 as pb

MODES = ("unary", "stream", "batch")
STREAM_WINDOW = 16
PROOF_FRESH_SECONDS = 40.0  # leftover proofs older than this are not reused (the broker accepts 65 s)
INLINE_SIGNING_BELOW = 4000  # smaller pools are signed in this process
CYCLED_REQUESTS = 8192  # distinct requests in a cycled pool (bearer tokens, a server that checks nothing)
RPC_TIMEOUT = 30.0
OPEN_LOOP_MAX_IN_FLIGHT = 4096
_SERVICE = "/tokenbroker.v1.TokenBroker/"

# Set (by a signal handler) to end every level at once: workers stop sending.
STOP = threading.Event()

Item = tuple[str, bytes]  # (request_id, serialized ValidateTokenRequest)
CredentialTuple = tuple[str, bytes | None]  # (token, DPoP key secret or None for bearer)


# Where every bench client calls from: one network, as a steady client does.
BENCH_CLIENT_IP = "198.51.100.7"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def batch_payload(items: Sequence[Item]) -> bytes:
    """A serialized `ValidateTokenBatchRequest` of `items` (field 1, length-delimited)."""
    return b"".join(b"\x0a" + _varint(len(data)) + data for _, data in items)


def build_requests(
    credentials: Sequence[CredentialTuple], audience: str, method: str, uri: str, start: int, count: int
) -> list[Item]:
    """`count` serialized requests numbered from `start`, round-robin over `credentials`;
    each DPoP-bound one with a fresh proof (new jti, iat now). Each names the client's
    address and a resource (one of eight tools), as an MCP server's middleware relays
    them, so the broker's detection has its usual work. Runs in worker processes."""
    signers = [ProofSigner(secret) if secret is not None else None for _, secret in credentials]
    items: list[Item] = []
    for n in range(start, start + count):
        index = n % len(credentials)
        token, signer = credentials[index][0], signers[index]
        request_id = str(n)
        message = pb.ValidateTokenRequest(
            token=token,
            audience=audience,
            request_id=request_id,
            client_ip=BENCH_CLIENT_IP,
            resource=f"tools/call tool-{n % 8}",
        )
        if signer is not None:
            message.dpop_proof = signer.sign(method, uri, token)
            message.http_method = method
            message.http_uri = uri
        items.append((request_id, message.SerializeToString()))
    return items


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop


def signing_executor(workers: int) -> ProcessPoolExecutor:
    """Worker processes for `build_requests` (spawned: grpc does not survive fork)."""
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint
    )


class RequestPool:
    """Requests for one level, each used once (or cycled, for bearer tokens)."""

    def __init__(self, items: list[Item], *, cycle: bool = False) -> None:
        if cycle and not items:
            raise ValueError("a cycled pool needs items")
        self._items = items
        self._next = 0
        self._cycle = cycle
        self.exhausted = False
        self.signed_at = time.monotonic()  # when its oldest proof was signed

    def take(self) -> Item | None:
        if self._next >= len(self._items):
            if not self._cycle:
                self.exhausted = True
                return None
            self._next = 0
        item = self._items[self._next]
        self._next += 1
        return item

    def take_many(self, count: int) -> list[Item]:
        if self._cycle:
            return [item for item in (self.take() for _ in range(count)) if item is not None]
        chunk = self._items[self._next : self._next + count]
        self._next += len(chunk)
        if not chunk:
            self.exhausted = True
        return chunk

    def extend(self, items: list[Item]) -> None:
        self._items.extend(items)

    @property
    def remaining(self) -> int:
        return len(self._items) - self._next

    def rest(self) -> list[Item]:
        return [] if self._cycle else self._items[self._next :]


class RequestSupply:
    """Fresh requests for one server's credentials: `pool(count)` before each level."""

    def __init__(
        self,
        credentials: Sequence[CredentialTuple],
        *,
        audience: str,
        method: str,
        uri: str,
        executor: Callable[[], ProcessPoolExecutor | None] = lambda: None,
        workers: int = 2,
        reusable: bool = False,
    ) -> None:
        """`reusable`: the server checks no proof (the do-nothing reference), so a fixed
        set of requests, the same bytes on the wire, is cycled instead of signing more."""
        if not credentials:
            raise ValueError("no credentials to build requests from")
        self._credentials = list(credentials)
        self._args = (audience, method, uri)
        self._executor = executor
        self._workers = max(1, workers)
        self._counter = 0
        self._leftover: list[Item] = []
        self._leftover_signed_at = 0.0
        self.bearer = all(secret is None for _, secret in self._credentials)
        self.cycle = self.bearer or reusable
        self._cycled: list[Item] = []
        self.signed = 0
        self.signing_seconds = 0.0

    def _build(self, count: int) -> list[Item]:
        started = time.perf_counter()
        start, self._counter = self._counter, self._counter + count
        executor = self._executor() if count >= INLINE_SIGNING_BELOW and not self.bearer else None
        if executor is None:
            items = build_requests(self._credentials, *self._args, start, count)
        else:
            size = math.ceil(count / self._workers)
            futures = [
                executor.submit(build_requests, self._credentials, *self._args, s, min(size, start + count - s))
                for s in range(start, start + count, size)
            ]
            items = [item for future in futures for item in future.result()]
        if not self.bearer:
            self.signed += count
            self.signing_seconds += time.perf_counter() - started
        return items

    def pool(self, count: int) -> RequestPool:
        """At least `count` unused requests (or a cycled set, see `cycle`)."""
        if self.cycle:
            if not self._cycled:
                self._cycled = self._build(max(CYCLED_REQUESTS, 4 * len(self._credentials)))
            return RequestPool(self._cycled, cycle=True)
        now = time.monotonic()
        items, signed_at = self._leftover, self._leftover_signed_at
        self._leftover = []
        if not items or now - signed_at >= PROOF_FRESH_SECONDS:
            items, signed_at = [], now
        if len(items) < count:
            items = items + self._build(count - len(items))
        pool = RequestPool(items)
        pool.signed_at = signed_at
        return pool

    def give_back(self, pool: RequestPool) -> None:
        """Keeps a pool's unused requests for the next level, while they are fresh."""
        self._leftover = pool.rest()
        self._leftover_signed_at = pool.signed_at

    async def refill(self, pool: RequestPool, count: int) -> None:
        """Adds `count` fresh requests to `pool` without blocking the event loop."""
        loop = asyncio.get_running_loop()
        start, self._counter = self._counter, self._counter + count
        executor = self._executor()
        items = await loop.run_in_executor(executor, build_requests, self._credentials, *self._args, start, count)
        self.signed += count
        pool.extend(items)


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class LevelStats:
    """What one level measured in its timed window."""

    mode: str
    concurrency: int
    rate: float | None = None  # open loop: the requested rate (validations/s)
    elapsed: float = 0.0
    rpcs: int = 0
    validations: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, one per RPC
    reasons: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    exhausted: bool = False
    late: int = 0  # open loop: requests not sent at all (too many in flight)
    lags: list[float] = field(default_factory=list)  # open loop: seconds each send started after its time
    generator_cpu: float = 0.0  # CPU seconds of this process over the level

    def record(self, started: float, finished: float, responses: Sequence[Any]) -> None:
        self.rpcs += 1
        self.validations += len(responses)
        self.latencies.append(finished - started)
        for response in responses:
            self.reasons[response.reason] += 1

    @property
    def valid(self) -> int:
        return self.reasons.get(pb.REASON_OK, 0)


@dataclass(frozen=True, slots=True)
class Window:
    """The timed window of a level: [start, end) on time.perf_counter()."""

    start: float
    end: float

    def contains(self, moment: float) -> bool:
        return self.start <= moment <= self.end


class Connection:
    """grpc.aio channels to one server and its three validation methods (raw bytes in)."""

    def __init__(self, target: str, api_key: str, *, channels: int = 1) -> None:
        options = [
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.use_local_subchannel_pool", 1),  # one connection per channel
        ]
        self.target = target
        # Built once: a tuple would be converted to a grpc.aio.Metadata on every call.
        self.metadata = grpc.aio.Metadata(("authorization", f"ApiKey {api_key}"))
        self._channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(max(1, channels))]
        # Registered methods (as the generated stubs register theirs): the channel resolves
        # each method's path once, not on every call. No request serializer: requests are
        # sent as the bytes the pool holds.
        self.unary = [
            c.unary_unary(
                _SERVICE + "ValidateToken",
                response_deserializer=pb.ValidateTokenResponse.FromString,
                _registered_method=True,
            )
            for c in self._channels
        ]
        self.batch = [
            c.unary_unary(
                _SERVICE + "ValidateTokenBatch",
                response_deserializer=pb.ValidateTokenBatchResponse.FromString,
                _registered_method=True,
            )
            for c in self._channels
        ]
        self.stream = [
            c.stream_stream(
                _SERVICE + "ValidateTokenStream",
                response_deserializer=pb.ValidateTokenResponse.FromString,
                _registered_method=True,
            )
            for c in self._channels
        ]

    async def ready(self, timeout: float = 10.0) -> None:
        for channel in self._channels:
            await asyncio.wait_for(channel.channel_ready(), timeout)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


Hook = Callable[[], None]


async def _unary_worker(conn: Connection, index: int, pool: RequestPool, window: Window, stats: LevelStats) -> None:
    call = conn.unary[index % len(conn.unary)]
    clock = time.perf_counter
    while clock() < window.end and not STOP.is_set():
        item = pool.take()
        if item is None:
            stats.exhausted = True
            return
        started = clock()
        try:
            response = await call(item[1], metadata=conn.metadata, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return  # the run is being stopped
            if window.contains(clock()):
                stats.errors[exc.code().name] += 1
            continue
        finished = clock()
        if window.contains(finished):
            stats.record(started, finished, (response,))


async def _batch_worker(
    conn: Connection, index: int, pool: RequestPool, window: Window, stats: LevelStats, batch_size: int
) -> None:
    call = conn.batch[index % len(conn.batch)]
    clock = time.perf_counter
    while clock() < window.end and not STOP.is_set():
        items = pool.take_many(batch_size)
        if not items:
            stats.exhausted = True
            return
        payload = batch_payload(items)
        started = clock()
        try:
            response = await call(payload, metadata=conn.metadata, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return  # the run is being stopped
            if window.contains(clock()):
                stats.errors[exc.code().name] += 1
            continue
        finished = clock()
        if window.contains(finished):
            stats.record(started, finished, response.responses)


async def _stream_worker(
    conn: Connection, index: int, pool: RequestPool, window: Window, stats: LevelStats, in_flight: int
) -> None:
    clock = time.perf_counter
    call = conn.stream[index % len(conn.stream)](metadata=conn.metadata, timeout=window.end - clock() + RPC_TIMEOUT)
    slots = asyncio.Semaphore(in_flight)
    sent: dict[str, float] = {}

    async def write() -> None:
        try:
            while True:
                await slots.acquire()
                if clock() >= window.end or STOP.is_set():
                    break
                item = pool.take()
                if item is None:
                    stats.exhausted = True
                    break
                sent[item[0]] = clock()
                await call.write(item[1])
        finally:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.done_writing()

    writer = asyncio.create_task(write())
    try:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                break
            finished = clock()
            started = sent.pop(response.request_id, None)
            slots.release()
            if started is not None and window.contains(finished):
                stats.record(started, finished, (response,))
    except grpc.aio.AioRpcError as exc:
        stats.errors[exc.code().name] += 1
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer


async def _open_loop(conn: Connection, pool: RequestPool, window: Window, stats: LevelStats, rate: float) -> None:
    """Unary requests sent at `rate` per second from now until the window ends."""
    clock = time.perf_counter
    call = conn.unary
    tasks: set[asyncio.Task[None]] = set()

    async def send(item: Item, intended: float, index: int) -> None:
        started = clock()
        try:
            response = await call[index % len(call)](item[1], metadata=conn.metadata, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if window.contains(clock()):
                stats.errors[exc.code().name] += 1
            return
        finished = clock()
        if intended >= window.start:
            stats.record(started, finished, (response,))
            stats.lags.append(started - intended)

    origin = clock()
    sent = 0
    while True:
        now = clock()
        if now >= window.end or STOP.is_set():
            break
        due = int((now - origin) * rate) + 1  # request n is due at origin + n / rate
        while sent < due:
            intended = origin + sent / rate
            sent += 1
            if len(tasks) >= OPEN_LOOP_MAX_IN_FLIGHT:
                if intended >= window.start:
                    stats.late += 1
                continue
            item = pool.take()
            if item is None:
                stats.exhausted = True
                break
            task = asyncio.create_task(send(item, intended, sent))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if stats.exhausted:
            break
        await asyncio.sleep(max(0.0, origin + sent / rate - clock()))
    if tasks:
        await asyncio.wait(tasks, timeout=RPC_TIMEOUT)


async def run_level(
    conn: Connection,
    pool: RequestPool,
    *,
    mode: str,
    concurrency: int,
    duration: float,
    warmup: float,
    batch_size: int = 64,
    rate: float | None = None,
    on_begin: Hook | None = None,
    on_end: Hook | None = None,
    on_tick: Callable[[float], None] | None = None,
) -> LevelStats:
    """Runs one level: `warmup` seconds unrecorded, then `duration` seconds timed.
    `on_begin`/`on_end` run at the edges of the timed window (samplers), `on_tick`
    about five times a second with the seconds elapsed since the last tick."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    stats = LevelStats(mode=mode, concurrency=concurrency, rate=rate)
    clock = time.perf_counter
    loop = asyncio.get_running_loop()
    now = clock()
    window = Window(now + warmup, now + warmup + duration)
    cpu_before = time.process_time()
    edges = {"begin": False, "end": False}

    def edge(name: str, hook: Hook | None) -> None:
        if not edges[name]:
            edges[name] = True
            if hook is not None:
                hook()

    # The hooks run on the event loop's clock at the window's edges (not at the next tick),
    # so samplers and Redis counters cover the same seconds as the validations counted.
    begin_at = loop.call_later(warmup, edge, "begin", on_begin)
    end_at = loop.call_later(warmup + duration, edge, "end", on_end)

    async def ticker() -> None:
        last = clock()
        while True:
            await asyncio.sleep(0.2)
            moment = clock()
            if on_tick is not None:
                on_tick(moment - last)
            last = moment

    ticking = asyncio.create_task(ticker())
    if rate is not None:
        workers = [_open_loop(conn, pool, window, stats, rate)]
    elif mode == "unary":
        workers = [_unary_worker(conn, i, pool, window, stats) for i in range(concurrency)]
    elif mode == "batch":
        workers = [_batch_worker(conn, i, pool, window, stats, batch_size) for i in range(concurrency)]
    else:
        streams = max(1, math.ceil(concurrency / STREAM_WINDOW))
        shares = [concurrency // streams + (1 if i < concurrency % streams else 0) for i in range(streams)]
        workers = [_stream_worker(conn, i, pool, window, stats, share) for i, share in enumerate(shares)]
    try:
        await asyncio.gather(*workers)
    finally:
        finished = clock()
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking
        begin_at.cancel()
        end_at.cancel()
    # A level that ended early (pool exhausted, stopped) still closes its window.
    edge("begin", on_begin)
    edge("end", on_end)
    stats.elapsed = max(0.0, min(finished, window.end) - window.start)
    stats.generator_cpu = time.process_time() - cpu_before
    return stats


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(round(p * len(sorted_values) / 100.0, 9)))  # (99.9 * 1000 / 100 is 999.0000000000001)
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


__all__ = [
    "MODES",
    "STOP",
    "STREAM_WINDOW",
    "Connection",
    "LevelStats",
    "RequestPool",
    "RequestSupply",
    "batch_payload",
    "build_requests",
    "percentile",
    "run_level",
    "signing_executor",
]
