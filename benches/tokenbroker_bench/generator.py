"""One measurement of `benches/cpu_per_request.py`, in a generator process of its own: it
drives one server for a warm-up and then a timed window, and reads the server's CPU time
at the window's edges.

Why a process of its own: the orchestrator starts servers, issues tokens and keeps the
results; none of that may share an event loop (or a GIL) with the requests being timed.
Why the server's CPU is read here: the edges of the window are the moments this event loop
starts and stops counting answers, so the CPU time and the answers cover the same seconds.

    python -m tokenbroker_bench.generator < job.json > result.json

The job (JSON on stdin, so the API key and the DPoP key secrets never appear in argv) is
a `Job`; the result (JSON on stdout) is a `Result`. Requests are built before the server
is loaded: bearer ones (and any for the do-nothing server) are cycled, DPoP ones each
carry a proof signed for that one request (worker processes sign large pools)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]

from tokenbroker_bench import loadgen, report
from tokenbroker_bench.servers import AUDIENCE, HTTP_METHOD

MODES = ("unary", "batch")


@dataclass
class Job:
    """What to drive, how hard, and which processes' CPU to read."""

    target: str
    api_key: str
    mode: str  # "unary" (ValidateToken) or "batch" (ValidateTokenBatch)
    concurrency: int  # RPCs in flight
    duration: float  # seconds timed
    warmup: float  # seconds first, not counted
    credentials: list[tuple[str, str | None]]  # (token, DPoP key secret in hex, or None for bearer)
    pool_size: int  # requests to pre-sign (DPoP); a cycled pool ignores it
    reusable: bool = False  # the server checks nothing: cycle a fixed set of requests
    batch_size: int = 64
    pids: dict[str, int] = field(default_factory=dict)  # name -> pid whose CPU is read ("server", "redis")

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: one of {', '.join(MODES)}")
        if self.concurrency < 1 or self.duration <= 0 or self.warmup < 0 or not self.credentials:
            raise ValueError("a job needs credentials, at least one RPC in flight and a positive duration")
        if "server" not in self.pids:
            raise ValueError("a job names the server's pid")


@dataclass
class Result:
    """What one window measured. `validations` counts the answers received in the window
    (a batch's answers each count); `cpu_s` is user+system CPU time per named process over
    the same window; `generator_cpu_s` this process's own."""

    validations: int
    rpcs: int
    valid: int
    reasons: dict[str, int]
    errors: dict[str, int]
    exhausted: bool
    wall_s: float
    cpu_s: dict[str, float]
    generator_cpu_s: float
    signed: int
    signing_s: float


def _cpu_seconds(process: psutil.Process) -> float:
    """User+system time of the process: every thread of it (`tokenbroker serve` with one
    worker is one process; its threads are all in these times)."""
    times = process.cpu_times()
    return float(times.user + times.system)


class _Edges:
    """CPU times and the clock, read at the window's two edges."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.at: dict[str, tuple[float, float, dict[str, float]]] = {}
        for name, process in self._processes.items():
            if process.children():  # e.g. `serve --workers N`: the workers' CPU would be missed
                raise RuntimeError(f"{name} (pid {process.pid}) has child processes: its CPU would be undercounted")

    def mark(self, edge: str) -> None:
        cpu = {name: _cpu_seconds(process) for name, process in self._processes.items()}
        self.at[edge] = (time.perf_counter(), time.process_time(), cpu)

    def deltas(self) -> tuple[float, float, dict[str, float]]:
        """(wall seconds, this process's CPU seconds, CPU seconds per named process)."""
        (wall0, own0, cpu0), (wall1, own1, cpu1) = self.at["begin"], self.at["end"]
        return wall1 - wall0, own1 - own0, {name: cpu1[name] - cpu0[name] for name in cpu1}


def _pool(job: Job) -> tuple[loadgen.RequestPool, loadgen.RequestSupply]:
    """The job's requests, all built (and signed) before the server sees any load."""
    executor: list[ProcessPoolExecutor] = []
    workers = max(1, os.cpu_count() or 1)

    def make_executor() -> ProcessPoolExecutor:
        if not executor:
            executor.append(loadgen.signing_executor(workers))
        return executor[0]

    credentials = [(token, bytes.fromhex(secret) if secret else None) for token, secret in job.credentials]
    supply = loadgen.RequestSupply(
        credentials,
        audience=AUDIENCE,
        method=HTTP_METHOD,
        uri=AUDIENCE,
        executor=make_executor,
        workers=workers,
        reusable=job.reusable,
    )
    try:
        pool = supply.pool(job.pool_size)
    finally:
        # The signing workers are gone before the window opens: nothing of this process
        # but the event loop and grpc's threads runs while the server is timed.
        for pending in executor:
            pending.shutdown(wait=True)
    return pool, supply


async def _drive(job: Job, pool: loadgen.RequestPool) -> tuple[loadgen.LevelStats, _Edges]:
    edges = _Edges(job.pids)
    conn = loadgen.Connection(job.target, job.api_key)
    try:
        await conn.ready()
        stats = await loadgen.run_level(
            conn,
            pool,
            mode=job.mode,
            concurrency=job.concurrency,
            duration=job.duration,
            warmup=job.warmup,
            batch_size=job.batch_size,
            on_begin=lambda: edges.mark("begin"),
            on_end=lambda: edges.mark("end"),
        )
    finally:
        await conn.close()
    return stats, edges


def run(job: Job) -> Result:
    """Builds the job's requests, drives the server, returns what the window measured."""
    job.check()
    pool, supply = _pool(job)
    stats, edges = asyncio.run(_drive(job, pool))
    wall, own, cpu = edges.deltas()
    return Result(
        validations=stats.validations,
        rpcs=stats.rpcs,
        valid=stats.valid,
        reasons=report.reason_names(stats.reasons),
        errors=dict(stats.errors),
        exhausted=stats.exhausted,
        wall_s=wall,
        cpu_s=cpu,
        generator_cpu_s=own,
        signed=supply.signed,
        signing_s=supply.signing_seconds,
    )


def job_from_json(text: str) -> Job:
    raw: dict[str, Any] = json.loads(text)
    raw["credentials"] = [(token, secret) for token, secret in raw["credentials"]]
    return Job(**raw)


def result_from_json(text: str) -> Result:
    return Result(**json.loads(text))


__all__ = ["MODES", "Job", "Result", "job_from_json", "result_from_json", "run"]


def main() -> None:
    job = job_from_json(sys.stdin.read())
    print(json.dumps(asdict(run(job))))


if __name__ == "__main__":
    main()
