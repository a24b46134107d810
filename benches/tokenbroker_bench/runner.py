"""A whole bench run: start the servers one after another (the broker on each store, then
the two references), sweep every mode and concurrency level against each, add an open-loop
level at half the best unary throughput for each broker, optionally soak, and write the
report. Only one server is under load at a time; every process is stopped on the way out,
whatever happens (errors, Ctrl-C, SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc  # type: ignore[import-untyped,unused-ignore]

from tokenbroker_bench import loadgen, report
from tokenbroker_bench.loadgen import Connection, LevelStats, RequestPool, RequestSupply
from tokenbroker_bench.servers import (
    AUDIENCE,
    HTTP_METHOD,
    Credential,
    Deployment,
    ManagedProcess,
    ProcessSet,
    RedisProcess,
)

STORES = ("memory", "redis")
BINDINGS = ("dpop", "bearer")
# Before a server's first level of a mode: a generous guess of its throughput (validations/s),
# only to size the first pool of pre-signed proofs. A pool that runs out ends its level early
# and the level is run again with a pool sized from what was measured.
FIRST_GUESS = {"unary": 4000.0, "stream": 6000.0, "batch": 30000.0}
POOL_MARGIN = 1.3
MAX_POOL = 1_500_000  # requests (about 1.1 kB each)
SOAK_CONCURRENCY = 16


class Interrupted(Exception):
    """The run was asked to stop (SIGINT, SIGTERM): raised between levels."""


def _check_stop() -> None:
    if loadgen.STOP.is_set():
        raise Interrupted("interrupted")


class Progress(Protocol):
    def advance(self, seconds: float) -> None: ...

    def describe(self, text: str) -> None: ...

    def note(self, text: str) -> None: ...


class NoProgress:
    def advance(self, seconds: float) -> None:
        pass

    def describe(self, text: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass


@dataclass
class BenchConfig:
    modes: tuple[str, ...] = loadgen.MODES
    stores: tuple[str, ...] = STORES
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    duration: float = 5.0
    warmup: float = 1.0
    batch_size: int = 64
    references: bool = True
    out: Path = Path("benches/results")
    soak: float = 0.0
    soak_warmup: float = 0.0
    binding: str = "dpop"
    tokens: int = 256
    channels: int = 1
    name: str = "grpc"
    command: str = "tokenbroker bench"

    def check(self) -> None:
        if not self.modes or any(m not in loadgen.MODES for m in self.modes):
            raise ValueError(f"modes: choose from {', '.join(loadgen.MODES)}")
        if not self.stores or any(s not in STORES for s in self.stores):
            raise ValueError(f"stores: choose from {', '.join(STORES)}")
        if not self.concurrency or any(c < 1 or c > 1024 for c in self.concurrency):
            raise ValueError("concurrency levels must be 1 to 1024")
        if self.binding not in BINDINGS:
            raise ValueError(f"binding: one of {', '.join(BINDINGS)}")
        if not 1 <= self.batch_size <= 1000:
            raise ValueError("batch size must be 1 to 1000 (the broker's limit)")
        if self.duration <= 0 or self.warmup < 0 or self.soak < 0 or self.soak_warmup < 0:
            raise ValueError("durations must be positive")

    def planned_seconds(self) -> float:
        """What the progress bar counts: the levels' seconds (not startup or signing)."""
        servers = len(self.stores) + (2 if self.references else 0)
        level = self.warmup + self.duration
        open_loop = len(self.stores) * level if "unary" in self.modes else 0.0
        soak = self.soak + self.soak_warmup if self.soak > 0 else 0.0
        return servers * len(self.modes) * len(self.concurrency) * level + open_loop + soak


@dataclass
class _Server:
    name: str
    process: ManagedProcess
    target: str
    credentials: list[Credential]
    redis: RedisProcess | None = None
    best: dict[str, float] = field(default_factory=dict)  # mode -> best validations/s


class Runner:
    def __init__(self, config: BenchConfig, progress: Progress | None = None) -> None:
        config.check()
        self.config = config
        self.progress: Progress = progress or NoProgress()
        self.rows: list[dict[str, Any]] = []
        self.soak: dict[str, Any] | None = None
        self._seen: dict[str, float] = {}  # mode -> best validations/s of any server
        self._executor: ProcessPoolExecutor | None = None
        self._signed = 0
        self._signing_seconds = 0.0
        self._api_key = ""
        self.paths: dict[str, Path] = {}

    # -- plumbing -----------------------------------------------------------------------------

    def executor(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = loadgen.signing_executor(self._workers())
        return self._executor

    @staticmethod
    def _workers() -> int:
        return max(1, min(4, os.cpu_count() or 1))

    def _supply(self, server: _Server) -> RequestSupply:
        return RequestSupply(
            [(c.token, c.dpop_secret) for c in server.credentials],
            audience=AUDIENCE,
            method=HTTP_METHOD,
            uri=AUDIENCE,
            executor=self.executor,
            workers=self._workers(),
            reusable=server.name == report.REF_NOOP,
        )

    def _account(self, supply: RequestSupply) -> None:
        self._signed += supply.signed
        self._signing_seconds += supply.signing_seconds

    def _pool_size(self, server: _Server, mode: str, rate: float | None = None) -> int:
        estimate = rate or server.best.get(mode) or self._seen.get(mode) or FIRST_GUESS[mode]
        seconds = self.config.warmup + self.config.duration
        return int(min(MAX_POOL, max(1000, POOL_MARGIN * estimate * seconds + self.config.batch_size)))

    # -- one level ----------------------------------------------------------------------------

    async def _level(
        self,
        server: _Server,
        conn: Connection,
        supply: RequestSupply,
        mode: str,
        concurrency: int,
        *,
        rate: float | None = None,
    ) -> dict[str, Any]:
        _check_stop()
        label = f"{server.name} {mode} " + (f"c={concurrency}" if rate is None else f"open loop {rate:.0f}/s")
        self.progress.describe(label)
        size = self._pool_size(server, mode, rate)
        for attempt in range(2):
            pool = supply.pool(size)
            row, stats = await self._measure(server, conn, pool, mode, concurrency, rate)
            _check_stop()
            supply.give_back(pool)
            if not stats.exhausted or stats.elapsed >= 0.8 * self.config.duration or attempt == 1:
                break
            # The guess was too low: size the next pool from what this one did, run again.
            used = size - pool.remaining
            seconds = max(0.05, self.config.warmup + stats.elapsed)
            size = int(min(MAX_POOL, POOL_MARGIN * 2 * used / seconds * (self.config.warmup + self.config.duration)))
            self.progress.note(f"{label}: the pre-signed pool ran out; again with {size} requests")
        if row["valid"]:
            server.best[mode] = max(server.best.get(mode, 0.0), row["throughput"])
            self._seen[mode] = max(self._seen.get(mode, 0.0), row["throughput"])
        lat = row["latency_ms"]
        self.progress.note(
            f"{label}: {row['throughput']:,.0f} validations/s, p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
            f"server CPU {row['server_cpu_pct']:.0f}%, generator CPU {row['generator_cpu_pct']:.0f}%, "
            f"{row['valid']}/{row['validations']} valid"
        )
        return row

    async def _measure(
        self,
        server: _Server,
        conn: Connection,
        pool: RequestPool,
        mode: str,
        concurrency: int,
        rate: float | None,
    ) -> tuple[dict[str, Any], LevelStats]:
        pids = {"server": server.process.pid}
        if server.redis is not None:
            pids["redis"] = server.redis.process.pid
        sampler = report.ProcessSampler(pids)
        counters: list[dict[str, int]] = []

        def begin() -> None:
            if server.redis is not None:
                counters.append(server.redis.counters())
            sampler.begin()

        def end() -> None:
            sampler.end()
            if server.redis is not None:
                counters.append(server.redis.counters())

        started = time.perf_counter()
        stats = await loadgen.run_level(
            conn,
            pool,
            mode=mode,
            concurrency=concurrency,
            duration=self.config.duration,
            warmup=self.config.warmup,
            batch_size=self.config.batch_size,
            rate=rate,
            on_begin=begin,
            on_end=end,
            on_tick=self.progress.advance,
        )
        wall = time.perf_counter() - started
        delta = None
        if len(counters) == 2:
            # Less the INFO commands themselves: the second one's read, the first one's command.
            delta = {k: counters[1][k] - counters[0].get(k, 0) - 1 for k in counters[1]}
        row = report.level_row(server.name, stats, wall=wall, sampler=sampler, redis_delta=delta)
        return row, stats

    # -- one server ---------------------------------------------------------------------------

    async def _sweep(self, server: _Server, *, open_loop: bool) -> list[dict[str, Any]]:
        config = self.config
        conn = Connection(server.target, self._api_key, channels=config.channels)
        supply = self._supply(server)
        rows = []
        try:
            await conn.ready()
            for mode in config.modes:
                for concurrency in config.concurrency:
                    rows.append(await self._level(server, conn, supply, mode, concurrency))
            if open_loop and "unary" in config.modes and server.best.get("unary"):
                half = server.best["unary"] / 2
                rows.append(await self._level(server, conn, supply, "unary", 0, rate=half))
        finally:
            self._account(supply)
            await conn.close()
        return rows

    async def _soak(self, server: _Server) -> dict[str, Any]:
        """Unary load for `soak_warmup` + `soak` seconds, server RSS sampled every second
        of the latter; proofs are signed in chunks by the worker processes while it runs
        (they live 65 s). A proof's replay record lives 65 s too, so RSS grows by design
        for the first 65 s of a load: `soak_warmup` >= 65 measures the steady state."""
        config = self.config
        concurrency = min(SOAK_CONCURRENCY, max(config.concurrency))
        self.progress.describe(f"{server.name} soak unary c={concurrency}")
        rate = server.best.get("unary") or FIRST_GUESS["unary"]
        chunk = max(2000, int(rate * 10))
        conn = Connection(server.target, self._api_key, channels=config.channels)
        supply = self._supply(server)
        pool = supply.pool(2 * chunk)
        sampler = report.ProcessSampler({"server": server.process.pid}, interval=1.0)
        done = asyncio.Event()

        async def refill() -> None:
            while not done.is_set():
                if not supply.cycle and pool.remaining < chunk:
                    await supply.refill(pool, chunk)
                else:
                    await asyncio.sleep(0.2)

        refilling = asyncio.create_task(refill())
        try:
            await conn.ready()
            stats = await loadgen.run_level(
                conn,
                pool,
                mode="unary",
                concurrency=concurrency,
                duration=config.soak,
                warmup=config.soak_warmup,
                on_begin=sampler.begin,
                on_end=sampler.end,
                on_tick=self.progress.advance,
            )
        finally:
            done.set()
            refilling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await refilling
            self._account(supply)
            await conn.close()
        _check_stop()
        row = report.soak_row(server.name, stats, sampler.samples["server"], warmup=config.soak_warmup)
        self.progress.note(
            f"{server.name} soak: {row['throughput']:,.0f} validations/s, RSS {row['rss_mb']['first']:.1f} -> "
            f"{row['rss_mb']['last']:.1f} MB (slope {row['slope_mb_per_min']:+.2f} MB/min)"
        )
        return row

    # -- the run ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _started(
        self, processes: ProcessSet, start: Callable[[], tuple[ManagedProcess, str]]
    ) -> Iterator[tuple[ManagedProcess, str]]:
        _check_stop()
        process, target = start()
        try:
            yield process, target
        finally:
            processes.stop(process)

    async def _run(self, workdir: Path, processes: ProcessSet) -> None:
        config = self.config
        deployment = Deployment.create(workdir, processes)
        self._api_key = deployment.api_key
        redis = RedisProcess.start(processes, workdir) if "redis" in config.stores or config.references else None
        reference_credentials: list[Credential] = []
        for store in config.stores:
            redis_url = redis.url if store == "redis" and redis is not None else None
            with self._started(processes, functools.partial(deployment.start_broker, redis_url)) as (process, target):
                self.progress.describe(f"tokenbroker-{store}: issuing {config.tokens} tokens")
                credentials = deployment.issue_tokens(target, config.tokens, dpop=config.binding == "dpop")
                reference_credentials = reference_credentials or credentials
                server = _Server(
                    f"tokenbroker-{store}", process, target, credentials, redis if store == "redis" else None
                )
                self.rows += await self._sweep(server, open_loop=True)
                if config.soak > 0 and self.soak is None:
                    self.soak = await self._soak(server)
        if config.references:
            assert redis is not None
            for kind, name in (("noop", report.REF_NOOP), ("pyjwt", report.REF_PYJWT)):
                url = redis.url if kind == "pyjwt" else None
                start = functools.partial(deployment.start_reference, kind, url)
                with self._started(processes, start) as (process, target):
                    server = _Server(name, process, target, reference_credentials, redis if kind == "pyjwt" else None)
                    self.rows += await self._sweep(server, open_loop=False)

    @staticmethod
    def interrupt() -> None:
        """Asks the run to stop (from a signal handler): the level in flight ends at once,
        `run()` stops every process and raises KeyboardInterrupt."""
        loadgen.STOP.set()

    def run(self) -> dict[str, Any]:
        """Runs the bench and writes the report; returns the result (the JSON)."""
        config = self.config
        loadgen.STOP.clear()
        started = dt.datetime.now(dt.UTC)
        load_before = os.getloadavg()
        began = time.perf_counter()
        with ProcessSet() as processes, tempfile.TemporaryDirectory(prefix="tb-bench-") as tmp:
            try:
                asyncio.run(self._run(Path(tmp), processes))
            except Interrupted:
                raise KeyboardInterrupt from None
            finally:
                processes.stop_all()
                if self._executor is not None:
                    self._executor.shutdown(wait=True, cancel_futures=True)
        result = {
            "run": {
                "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
                "command": config.command,
                "cpus": os.cpu_count(),
                "load_before": [round(x, 2) for x in load_before],
                "load_after": [round(x, 2) for x in os.getloadavg()],
                "python": platform.python_version(),
                "grpcio": grpc.__version__,
                "platform": platform.platform(),
                "binding": config.binding,
                "tokens": config.tokens,
                "modes": list(config.modes),
                "stores": list(config.stores),
                "concurrency": list(config.concurrency),
                "duration": config.duration,
                "warmup": config.warmup,
                "batch_size": config.batch_size,
                "references": config.references,
                "channels": config.channels,
                "proofs_signed": self._signed,
                "signing_seconds": round(self._signing_seconds, 2),
                "total_seconds": round(time.perf_counter() - began, 1),
            },
            "rows": self.rows,
            "soak": self.soak,
            "targets": report.targets(self.rows, self.soak),
        }
        self.write(result)
        return result

    def write(self, result: dict[str, Any]) -> dict[str, Path]:
        out = self.config.out
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": out / f"{self.config.name}.json",
            "markdown": out / f"{self.config.name}.md",
            "chart": out / f"{self.config.name}.png",
        }
        report.write_json(paths["json"], result)
        report.write_markdown(paths["markdown"], result)
        report.write_chart(paths["chart"], result)
        if result.get("soak"):
            paths["soak_chart"] = out / f"{self.config.name}-soak.png"
            report.write_soak_chart(paths["soak_chart"], result["soak"])
        self.paths = paths
        return paths


def run_bench(config: BenchConfig, progress: Progress | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    runner = Runner(config, progress)
    result = runner.run()
    return result, runner.paths


__all__ = ["BINDINGS", "STORES", "BenchConfig", "Interrupted", "NoProgress", "Progress", "Runner", "run_bench"]
