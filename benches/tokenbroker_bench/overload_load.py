"""One load generator process of the overload bench (`benches/overload.py`): it drives one
door of a real `tokenbroker serve`, closed loop (N requests in flight, to find the
saturation rate) or open loop (requests sent on a fixed schedule whatever the answers),
and reports every answer it timed, classed as admitted, shed or error.

    python -m tokenbroker_bench.overload_load     # job JSON on stdin, result JSON on stdout

The protocol on stdin/stdout, so that several generators start their load together:
the job (one JSON line; it holds an API key, DPoP key secrets or a client's private key,
which never go on argv) -> the generator signs every request of its pool -> prints
`ready` -> reads one line, the wall-clock time (time.time()) at which the load starts ->
runs -> prints the result (one JSON line).

Doors:
- `grpc`: unary `ValidateToken` with a DPoP-bound token and a fresh proof per request, as a
  registered MCP server calls it (`authorization: ApiKey`): admitted = status OK and
  `valid`; shed = RESOURCE_EXHAUSTED.
- `http`: `POST /token`, `client_credentials` with a `private_key_jwt` assertion (EdDSA) and
  a DPoP proof per request (the token endpoint bench's requests, `token_load`): admitted =
  200 and a DPoP-bound token; shed = 503 (`temporarily_unavailable` from the broker, or
  uvicorn's own plain-text answer once `limit_concurrency` connections are open, counted
  apart).
Anything else (another status, a refused token, a timeout, a broken connection, a
request the generator could not send) is an error.

Open loop, coordinated omission avoided: request n of the run is due at
`start + n / rate` (the generators interleave: generator i of k sends n = i, i + k, ...);
each is sent at its due time whether or not earlier ones were answered, and its latency
runs from its due time, not from when it went out: a generator that falls behind, or an
HTTP request that waits for a free connection, counts as latency. The send lag (due time
to send) is reported apart, to tell a slow generator from a slow server. Outcomes are
counted for the requests due inside the timed window, after their answers came (the run
waits `drain` seconds for the last ones; what is still unanswered then is an error).

HTTP/1.1 has one request per connection at a time, so the open loop opens connections as
it needs them, up to `max_connections` (then requests wait for one, and that wait counts),
reusing the most recently used first; each connection has its own source address of
127.0.<x>.<y> (the door allows 64 connections per source address; any 127/8 address
reaches a server on 127.0.0.1 on Linux)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import grpc  # type: ignore[import-untyped,unused-ignore]

from tokenbroker import ProofSigner
from tokenbroker.v1 import broker_pb2 as pb
from tokenbroker_bench import loadgen, token_load
from tokenbroker_bench.servers import AUDIENCE, HTTP_METHOD

DOORS = ("grpc", "http")
MODES = ("closed", "open")
REQUEST_TIMEOUT = 10.0  # seconds: an answer later than this is an error (DEADLINE_EXCEEDED / timeout)
MAX_OUTSTANDING = 50_000  # open loop, per generator: requests due but unanswered; more are not sent
MAX_HEADER_BYTES = 16 * 1024
SOURCES_PER_GENERATOR = 250  # 127.0.<base + index>.1-250


@dataclass
class Job:
    """What one generator sends, to which door, how (closed or open loop) and how long."""

    door: str
    mode: str
    index: int  # this generator's number, 0 to generators - 1
    generators: int
    warmup: float
    duration: float
    pool_size: int
    concurrency: int = 0  # closed loop: requests in flight from this generator
    rate: float = 0.0  # open loop: requests per second of all generators together
    drain: float = REQUEST_TIMEOUT  # open loop: seconds to wait for answers after the last send
    # grpc
    target: str = ""
    api_key: str = ""
    credentials: list[tuple[str, str]] = field(default_factory=list)  # (token, DPoP key secret, hex)
    channels: int = 2
    # http
    token_url: str = ""
    issuer: str = ""
    audience: str = ""
    scope: str = ""
    client_id: str = ""
    algorithm: str = "EdDSA"
    private_key_pem: str = ""
    dpop_keys: int = 16  # DPoP keys of this generator (a session each)
    max_connections: int = 256  # open loop, this generator's
    source_base: int = 10  # source addresses 127.0.<source_base + index>.<1..250>

    def check(self) -> None:
        if self.door not in DOORS or self.mode not in MODES:
            raise ValueError(f"door: one of {DOORS}; mode: one of {MODES}")
        if not 0 <= self.index < self.generators or self.duration <= 0 or self.warmup < 0 or self.pool_size < 1:
            raise ValueError("a job needs its index among the generators, a positive duration and a pool")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError("a closed loop needs at least one request in flight")
        if self.mode == "open" and self.rate <= 0:
            raise ValueError("an open loop needs a positive rate")


@dataclass
class Result:
    """What one generator saw. Latencies in seconds; for the open loop, from each request's
    due time, counting only requests due in the window; for the closed loop, from its
    send, counting only answers that came in the window."""

    admitted: list[float] = field(default_factory=list)
    admitted_from_send: list[float] = field(default_factory=list)  # open loop: the same, from the send
    shed: list[float] = field(default_factory=list)
    shed_from_send: list[float] = field(default_factory=list)  # open loop: the same, from the send
    shed_by: dict[str, int] = field(default_factory=dict)  # "RESOURCE_EXHAUSTED", "503 broker", "503 uvicorn"
    errors: dict[str, int] = field(default_factory=dict)
    due: int = 0  # open loop: requests due in the window
    admitted_in_window: int = 0  # open loop: admitted answers received in the window (whenever due)
    lags: list[float] = field(default_factory=list)  # open loop: due time to send, seconds
    exhausted: bool = False
    window_s: float = 0.0
    generator_cpu_s: float = 0.0  # this process, over the window
    connections_opened: int = 0  # http
    signed: int = 0
    signing_s: float = 0.0


class _Tally:
    """Counting and timing, shared by every request of one generator."""

    def __init__(self, job: Job, origin: float) -> None:
        self.job = job
        self.start = origin + job.warmup
        self.end = self.start + job.duration
        self.result = Result()
        self.shed_by: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._cpu: dict[str, float] = {}

    def in_window(self, moment: float) -> bool:
        return self.start <= moment < self.end

    def mark(self, edge: str) -> None:
        self._cpu[edge] = time.process_time()

    def admitted(self, latency: float, from_send: float | None = None) -> None:
        self.result.admitted.append(latency)
        if from_send is not None:
            self.result.admitted_from_send.append(from_send)

    def shed(self, latency: float, how: str, from_send: float | None = None) -> None:
        self.result.shed.append(latency)
        if from_send is not None:
            self.result.shed_from_send.append(from_send)
        self.shed_by[how] += 1

    def error(self, what: str) -> None:
        self.errors[what] += 1

    def finish(self) -> Result:
        self.result.shed_by = dict(self.shed_by)
        self.result.errors = dict(self.errors)
        self.result.window_s = self.job.duration
        if "begin" in self._cpu:
            self.result.generator_cpu_s = self._cpu.get("end", time.process_time()) - self._cpu["begin"]
        return self.result


def _due_times(job: Job, origin: float) -> Any:
    """This generator's due times (perf_counter) until the window's end: request n of all
    generators is due at origin + n / rate, and this one sends n = index, index + k, ..."""
    end = origin + job.warmup + job.duration
    n = job.index
    while True:
        due = origin + n / job.rate
        if due >= end:
            return
        yield due
        n += job.generators


async def _schedule(job: Job, tally: _Tally, origin: float, pool: list[Any], send: Any) -> None:
    """The open loop: starts `send(item, due)` at each due time (late ones at once)."""
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    outstanding: set[asyncio.Task[None]] = set()
    taken = 0
    for due in _due_times(job, origin):
        wait = due - clock()
        if wait > 0.0005:
            await asyncio.sleep(wait)
        counted = tally.in_window(due)
        if counted:
            tally.result.due += 1
        if taken >= len(pool):
            tally.result.exhausted = True
            break
        if len(outstanding) >= MAX_OUTSTANDING:
            if counted:
                tally.error("not sent (generator's outstanding bound)")
            continue
        item, pool[taken] = pool[taken], None
        taken += 1
        task = loop.create_task(send(item, due, counted))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
    if outstanding:
        _, pending = await asyncio.wait(set(outstanding), timeout=job.drain)
        for task in pending:
            task.cancel()
        for _task in pending:
            tally.error("unanswered after the drain")
        await asyncio.gather(*pending, return_exceptions=True)


# -- gRPC ----------------------------------------------------------------------------------------


def _grpc_pool(job: Job) -> list[bytes]:
    credentials = [(token, bytes.fromhex(secret)) for token, secret in job.credentials]
    # Request ids (and so the numbers proofs are built from) differ between generators.
    start = job.index * 10_000_000
    items = loadgen.build_requests(credentials, AUDIENCE, HTTP_METHOD, AUDIENCE, start, job.pool_size)
    return [data for _, data in items]


def _grpc_failure(tally: _Tally, exc: Any, latency: float, from_send: float | None = None) -> None:
    """A status other than OK: shed (RESOURCE_EXHAUSTED: the broker's admission control, or
    grpc core's own bound on calls the server has not taken yet) or an error."""
    code = exc.code()
    details = str(exc.details() or "")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        how = f"{code.name} (admission)" if "bound of" in details else f"{code.name}: {details[:50]}"
        tally.shed(latency, how, from_send)
    else:
        tally.error(f"{code.name}: {details[:60]}")


def _judge_grpc(tally: _Tally, response: Any, latency: float, from_send: float | None = None) -> None:
    if response.valid:
        tally.admitted(latency, from_send)
    else:
        tally.error(f"OK but not valid: {pb.Reason.Name(response.reason)}")


async def _grpc(job: Job, pool: list[Any], origin: float, tally: _Tally) -> None:
    conn = loadgen.Connection(job.target, job.api_key, channels=job.channels)
    clock = time.perf_counter
    try:
        await conn.ready()
        calls = conn.unary
        if job.mode == "open":
            counter = [0]

            async def send(item: bytes, due: float, counted: bool) -> None:
                counter[0] += 1
                call = calls[counter[0] % len(calls)]
                sent = clock()
                if counted:
                    tally.result.lags.append(sent - due)
                try:
                    response = await call(item, metadata=conn.metadata, timeout=REQUEST_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    if counted:
                        finished = clock()
                        _grpc_failure(tally, exc, finished - due, finished - sent)
                    return
                finished = clock()
                if response.valid and tally.in_window(finished):
                    tally.result.admitted_in_window += 1
                if counted:
                    _judge_grpc(tally, response, finished - due, finished - sent)

            await _wait_until(origin)
            await _schedule(job, tally, origin, pool, send)
            return

        cursor = [0]

        async def worker(index: int) -> None:
            call = calls[index % len(calls)]
            while clock() < tally.end:
                if cursor[0] >= len(pool):
                    tally.result.exhausted = True
                    return
                item, pool[cursor[0]] = pool[cursor[0]], None
                cursor[0] += 1
                sent = clock()
                try:
                    response = await call(item, metadata=conn.metadata, timeout=REQUEST_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    if tally.in_window(clock()):
                        _grpc_failure(tally, exc, clock() - sent)
                    continue
                if tally.in_window(clock()):
                    _judge_grpc(tally, response, clock() - sent)

        await _wait_until(origin)
        await asyncio.gather(*(worker(i) for i in range(job.concurrency)))
    finally:
        await conn.close()


# -- HTTP ----------------------------------------------------------------------------------------


def _http_pool(job: Job) -> list[bytes]:
    fields = asdict(
        token_load.Job(
            token_url=job.token_url,
            issuer=job.issuer,
            audience=job.audience,
            scope=job.scope,
            client_id=job.client_id,
            algorithm=job.algorithm,
            private_key_pem=job.private_key_pem,
            dpop=True,
            expect_token_type="DPoP",
            concurrency=1,
            warmup=job.warmup,
            duration=job.duration,
            pool_size=job.pool_size,
            pids={"server": 0},
        )
    )
    secrets = [ProofSigner().secret_bytes() for _ in range(max(1, job.dpop_keys))]
    return token_load._sign_requests(fields, secrets, 0, job.pool_size)


class _Answer:
    __slots__ = ("body", "close", "sent", "status")

    def __init__(self, status: int, body: bytes, close: bool) -> None:
        self.status = status
        self.body = body
        self.close = close
        self.sent = 0.0  # when the request was written (perf_counter)


async def _read_answer(reader: asyncio.StreamReader) -> _Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError("response headers too large")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    if length is None:
        raise ValueError("a response without Content-Length")
    return _Answer(status, await reader.readexactly(length), close)


def _granted(answer: _Answer) -> bool:
    return answer.status == 200 and b'"token_type":"DPoP"' in answer.body and b'"access_token":"eyJ' in answer.body


def _judge_http(tally: _Tally, answer: _Answer, latency: float, from_send: float | None = None) -> None:
    if answer.status == 200:
        if _granted(answer):
            tally.admitted(latency, from_send)
        else:
            tally.error("200 without a DPoP token")
    elif answer.status == 503:
        broker = b"temporarily_unavailable" in answer.body
        tally.shed(latency, "503 broker" if broker else "503 other (uvicorn limit_concurrency)", from_send)
    else:
        try:
            error = str(json.loads(answer.body).get("error"))[:40]
        except (ValueError, AttributeError):
            error = "(not JSON)"
        tally.error(f"{answer.status} {error}")


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        return not (self.reader.at_eof() or self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


class _Connections:
    """This generator's HTTP connections: at most `limit`, idle ones reused newest first,
    each from a source address of its own turn."""

    def __init__(self, job: Job, tally: _Tally) -> None:
        url = urlsplit(job.token_url)
        assert url.hostname is not None
        assert url.port is not None
        self.host, self.port = url.hostname, url.port
        self.job = job
        self.tally = tally
        self.slots = asyncio.Semaphore(job.max_connections if job.mode == "open" else job.concurrency)
        self.idle: list[_Connection] = []
        self.opened = 0

    async def _open(self) -> _Connection:
        source = f"127.0.{self.job.source_base + self.job.index}.{self.opened % SOURCES_PER_GENERATOR + 1}"
        self.opened += 1
        reader, writer = await asyncio.open_connection(self.host, self.port, local_addr=(source, 0))
        return _Connection(reader, writer)

    async def exchange(self, request: bytes) -> _Answer:
        """Sends `request` on an idle connection (or a new one) and reads its answer. A
        reused connection that the server had closed (keep-alive) is retried once on a new
        one."""
        async with self.slots:
            while self.idle:
                conn = self.idle.pop()
                if conn.usable():
                    break
                conn.close()
            else:
                conn = await self._open()
            for attempt in (0, 1):
                try:
                    sent = time.perf_counter()
                    conn.writer.write(request)
                    answer = await asyncio.wait_for(_read_answer(conn.reader), REQUEST_TIMEOUT)
                    answer.sent = sent
                except (OSError, asyncio.IncompleteReadError) as exc:
                    conn.close()
                    fresh = isinstance(exc, asyncio.IncompleteReadError) and not exc.partial
                    if attempt == 0 and (fresh or isinstance(exc, ConnectionResetError)):
                        conn = await self._open()
                        continue
                    raise
                except BaseException:
                    conn.close()
                    raise
                if answer.close:
                    conn.close()
                else:
                    self.idle.append(conn)
                return answer
            raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def _http(job: Job, pool: list[Any], origin: float, tally: _Tally) -> None:
    connections = _Connections(job, tally)
    clock = time.perf_counter
    try:
        if job.mode == "open":

            async def send(item: bytes, due: float, counted: bool) -> None:
                try:
                    answer = await connections.exchange(item)
                except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    if counted:
                        tally.error(f"connection: {type(exc).__name__}")
                    return
                finished = clock()
                if _granted(answer) and tally.in_window(finished):
                    tally.result.admitted_in_window += 1
                if counted:
                    _judge_http(tally, answer, finished - due, finished - answer.sent)

            await _wait_until(origin)
            await _schedule(job, tally, origin, pool, _lagged(send, tally))
            return

        cursor = [0]

        async def client() -> None:
            while clock() < tally.end:
                if cursor[0] >= len(pool):
                    tally.result.exhausted = True
                    return
                item, pool[cursor[0]] = pool[cursor[0]], None
                cursor[0] += 1
                sent = clock()
                try:
                    answer = await connections.exchange(item)
                except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    if tally.in_window(clock()):
                        tally.error(f"connection: {type(exc).__name__}")
                    continue
                if tally.in_window(clock()):
                    _judge_http(tally, answer, clock() - sent)

        await _wait_until(origin)
        await asyncio.gather(*(client() for _ in range(job.concurrency)))
    finally:
        tally.result.connections_opened = connections.opened
        connections.close()


def _lagged(send: Any, tally: _Tally) -> Any:
    """`send`, recording each counted request's send lag as it starts (HTTP: before it
    waits for a connection, so a wait for one counts as latency, not as lag)."""
    clock = time.perf_counter

    async def sending(item: bytes, due: float, counted: bool) -> None:
        if counted:
            tally.result.lags.append(clock() - due)
        await send(item, due, counted)

    return sending


# -- the run -------------------------------------------------------------------------------------


async def _wait_until(moment: float) -> None:
    wait = moment - time.perf_counter()
    if wait > 0:
        await asyncio.sleep(wait)


async def _drive(job: Job, pool: list[Any], start_epoch: float) -> Result:
    origin = time.perf_counter() + (start_epoch - time.time())
    tally = _Tally(job, origin)
    loop = asyncio.get_running_loop()
    now = time.perf_counter()
    loop.call_later(max(0.0, tally.start - now), tally.mark, "begin")
    loop.call_later(max(0.0, tally.end - now), tally.mark, "end")
    if job.door == "grpc":
        await _grpc(job, pool, origin, tally)
    else:
        await _http(job, pool, origin, tally)
    return tally.finish()


def build_pool(job: Job) -> list[Any]:
    """Every request this generator may send, signed now (before the load starts)."""
    return _grpc_pool(job) if job.door == "grpc" else _http_pool(job)


def run(job: Job, start_epoch: float, pool: list[Any]) -> Result:
    return asyncio.run(_drive(job, pool, start_epoch))


def job_from_json(text: str) -> Job:
    raw: dict[str, Any] = json.loads(text)
    raw["credentials"] = [(token, secret) for token, secret in raw.get("credentials", [])]
    return Job(**raw)


def result_from_json(text: str) -> Result:
    return Result(**json.loads(text))


def main() -> None:
    job = job_from_json(sys.stdin.readline())
    job.check()
    began = time.perf_counter()
    pool = build_pool(job)
    signing_s = time.perf_counter() - began
    print("ready", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        return  # the orchestrator gave up
    with contextlib.suppress(KeyboardInterrupt):
        result = run(job, float(line), pool)
        result.signed = job.pool_size
        result.signing_s = signing_s
        result.admitted = [round(x, 6) for x in result.admitted]
        result.admitted_from_send = [round(x, 6) for x in result.admitted_from_send]
        result.shed = [round(x, 6) for x in result.shed]
        result.shed_from_send = [round(x, 6) for x in result.shed_from_send]
        result.lags = [round(x, 6) for x in result.lags]
        print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()


__all__ = ["DOORS", "MODES", "Job", "Result", "build_pool", "job_from_json", "main", "result_from_json", "run"]
