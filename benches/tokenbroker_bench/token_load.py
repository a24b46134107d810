"""One window of the token endpoint bench, in a load generator process of its own: N
clients, each on its own keep-alive HTTP/1.1 connection, send `client_credentials` grants
with `private_key_jwt` to `POST /token` for a warm-up and then a timed window; the
server's CPU time is read at the window's edges (psutil on its pid).

    python -m tokenbroker_bench.token_load < job.json > result.json

What each client would do per token, sign a fresh assertion (a new `jti`; and, for a
DPoP-bound token, a fresh proof), is done for every request before the server is loaded:
the pool is signed first (in worker processes when it is large), so the window measures
the server, not the clients' signing. Each request is used once: the broker refuses a
reused assertion `jti` and a reused proof. The job is JSON on stdin (it holds the client's
private key, which never goes on argv); the result is JSON on stdout.

Every answer must be a grant (200, `token_type` as expected, a JWT): anything else is
counted by status and error code, and the run that sees one is not a measurement.

The HTTP client is a few lines over asyncio streams rather than httpx: at a thousand
requests a second, on the same two cores as the server, a full client's own CPU would
crowd the server it measures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import psutil  # type: ignore[import-untyped,unused-ignore]

from tokenbroker import ProofSigner
from tokenbroker.client_assertion import load_private_key, make_client_assertion
from tokenbroker_bench.loadgen import percentile

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 120  # seconds: the pool outlives its window (the broker takes up to 300)
INLINE_SIGNING_SECONDS = 1.5  # larger pools are signed by worker processes
SIGNING_COST_S = {"EdDSA": 70e-6, "ES256": 85e-6, "RS256": 400e-6, "PS256": 400e-6}  # this machine, one core
PROOF_COST_S = 45e-6
MAX_HEADER_BYTES = 16 * 1024
REQUEST_TIMEOUT = 30.0


@dataclass
class Job:
    """What to send, to whom, how hard, and which processes' CPU to read."""

    token_url: str
    issuer: str  # the assertions' `aud`
    audience: str  # `resource`
    scope: str
    client_id: str
    algorithm: str
    private_key_pem: str
    dpop: bool  # a DPoP proof per request (one key per client connection)
    expect_token_type: str  # "Bearer" or "DPoP"
    concurrency: int
    warmup: float
    duration: float
    pool_size: int
    pids: dict[str, int] = field(default_factory=dict)  # name -> pid whose CPU is read ("server", "redis")

    def check(self) -> None:
        if self.concurrency < 1 or self.duration <= 0 or self.warmup < 0 or self.pool_size < self.concurrency:
            raise ValueError("a job needs a client, a positive duration and a pool of at least one request each")
        if "server" not in self.pids:
            raise ValueError("a job names the server's pid")


@dataclass
class Result:
    """What the window measured: grants answered in it, its wall time, CPU seconds per
    named process and of this generator, latency percentiles (ms) of the requests answered
    in it, refusals by "status error", and whether the pre-signed pool ran out."""

    grants: int
    wall_s: float
    cpu_s: dict[str, float]
    generator_cpu_s: float
    latency_ms: dict[str, float]
    refusals: dict[str, int]
    exhausted: bool
    signed: int
    signing_s: float


# -- the pool ------------------------------------------------------------------------------


def _sign_requests(job_fields: dict[str, Any], secrets: list[bytes], start: int, count: int) -> list[bytes]:
    """`count` complete HTTP requests, each with a fresh assertion (and a fresh proof, by
    the key `secrets[i % len]`, when DPoP). Runs in worker processes too."""
    job = Job(**job_fields)
    url = urlsplit(job.token_url)
    signers = [ProofSigner(secret) for secret in secrets]
    key = load_private_key(job.private_key_pem)  # once: parsing an RSA key costs more than signing
    fixed = f"grant_type=client_credentials&client_assertion_type={quote(JWT_BEARER, safe='')}"
    fixed += f"&resource={quote(job.audience, safe='')}&scope={quote(job.scope, safe='')}&client_assertion="
    head = (
        f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        "Accept: application/json\r\n"
    )
    requests = []
    for i in range(start, start + count):
        assertion = make_client_assertion(
            key, job.client_id, job.issuer, lifetime=ASSERTION_LIFETIME, algorithm=job.algorithm
        )
        body = (fixed + assertion).encode("ascii")
        proof = f"DPoP: {signers[i % len(signers)].sign('POST', job.token_url)}\r\n" if signers else ""
        requests.append(f"{head}{proof}Content-Length: {len(body)}\r\n\r\n".encode("ascii") + body)
    return requests


def build_pool(job: Job) -> tuple[list[bytes], float]:
    """Every request of the window, signed now; and the seconds signing took."""
    began = time.perf_counter()
    secrets = [ProofSigner().secret_bytes() for _ in range(job.concurrency)] if job.dpop else []
    fields = asdict(job)
    per_request = SIGNING_COST_S.get(job.algorithm, 400e-6) + (PROOF_COST_S if job.dpop else 0.0)
    workers = os.cpu_count() or 1
    if job.pool_size * per_request <= INLINE_SIGNING_SECONDS or workers == 1:
        return _sign_requests(fields, secrets, 0, job.pool_size), time.perf_counter() - began
    chunk = -(-job.pool_size // workers)
    context = multiprocessing.get_context("spawn")  # nothing of this process is forked into them
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as executor:
        parts = [
            executor.submit(_sign_requests, fields, secrets, start, min(chunk, job.pool_size - start))
            for start in range(0, job.pool_size, chunk)
        ]
        pool = [request for part in parts for request in part.result()]
    return pool, time.perf_counter() - began


# -- the window ----------------------------------------------------------------------------


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class _Window:
    """The shared state of the N clients: the pool, the window's edges, what was seen."""

    def __init__(self, job: Job, pool: list[bytes]) -> None:
        self.job = job
        self.pool = pool
        self.next = 0
        self.exhausted = False
        self.stopping = False
        self.open = False  # inside the timed window
        self.grants = 0
        self.latencies: list[float] = []
        self.refusals: Counter[str] = Counter()
        self.processes = {name: psutil.Process(pid) for name, pid in job.pids.items()}
        self.edges: dict[str, tuple[float, float, dict[str, float]]] = {}

    def take(self) -> bytes | None:
        if self.stopping:
            return None
        if self.next >= len(self.pool):
            self.exhausted = True
            return None
        request = self.pool[self.next]
        self.pool[self.next] = b""  # used once: let it go
        self.next += 1
        return request

    def mark(self, edge: str) -> None:
        cpu = {name: _cpu_seconds(process) for name, process in self.processes.items()}
        self.edges[edge] = (time.perf_counter(), time.process_time(), cpu)
        self.open = edge == "begin"

    def judge(self, status: int, body: bytes) -> str | None:
        """None for a grant, else what the answer was ("400 invalid_request")."""
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            return f"{status} (not JSON)"
        if not isinstance(answer, dict):
            return f"{status} (not an object)"
        if status != 200:
            return f"{status} {str(answer.get('error'))[:40]}"
        token = answer.get("access_token")
        if answer.get("token_type") != self.job.expect_token_type or not str(token).startswith("eyJ"):
            return f"200 but token_type {str(answer.get('token_type'))[:10]!r}"
        return None


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError("response headers too large")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length is None:
        raise ValueError("a response without Content-Length")
    return status, await reader.readexactly(length)


async def _client(window: _Window, host: str, port: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (request := window.take()) is not None:
            sent = time.perf_counter()
            writer.write(request)
            status, body = await asyncio.wait_for(_read_answer(reader), REQUEST_TIMEOUT)
            elapsed = time.perf_counter() - sent
            refusal = window.judge(status, body)
            if refusal is not None:
                window.refusals[refusal] += 1
            elif window.open:
                window.grants += 1
                window.latencies.append(elapsed)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _drive(window: _Window) -> None:
    url = urlsplit(window.job.token_url)
    assert url.hostname is not None
    assert url.port is not None
    clients = [asyncio.create_task(_client(window, url.hostname, url.port)) for _ in range(window.job.concurrency)]
    try:
        await asyncio.sleep(window.job.warmup)
        window.mark("begin")
        await asyncio.sleep(window.job.duration)
        window.mark("end")
    finally:
        window.stopping = True
        for outcome in await asyncio.gather(*clients, return_exceptions=True):
            if isinstance(outcome, BaseException):
                window.refusals[f"client error {type(outcome).__name__}"] += 1
    if window.exhausted:  # the window ended early: its edges are not those of the load
        window.grants = 0


def drive(job: Job, pool: list[bytes], signing_s: float = 0.0) -> Result:
    """Sends `pool` (each request once) to the server for the job's warm-up and window."""
    window = _Window(job, pool)
    asyncio.run(_drive(window))
    if "end" not in window.edges:
        window.mark("end")
    (wall0, own0, cpu0), (wall1, own1, cpu1) = window.edges.get("begin", window.edges["end"]), window.edges["end"]
    latencies = sorted(window.latencies)
    return Result(
        grants=window.grants,
        wall_s=wall1 - wall0,
        cpu_s={name: cpu1[name] - cpu0[name] for name in cpu1},
        generator_cpu_s=own1 - own0,
        latency_ms={p: 1e3 * percentile(latencies, float(p[1:])) for p in ("p50", "p90", "p99")}
        | {"max": 1e3 * (latencies[-1] if latencies else 0.0)},
        refusals=dict(window.refusals),
        exhausted=window.exhausted,
        signed=len(pool),
        signing_s=signing_s,
    )


def run(job: Job) -> Result:
    """Signs the pool, drives the server, returns what the window measured."""
    job.check()
    pool, signing_s = build_pool(job)
    return drive(job, pool, signing_s)


def job_from_json(text: str) -> Job:
    return Job(**json.loads(text))


def result_from_json(text: str) -> Result:
    return Result(**json.loads(text))


def main() -> None:
    print(json.dumps(asdict(run(job_from_json(sys.stdin.read())))))


if __name__ == "__main__":
    main()


__all__ = ["Job", "Result", "build_pool", "drive", "job_from_json", "result_from_json", "run"]
