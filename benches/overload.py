"""Overload, measured (issue "Overload"): at saturation the broker must shed load with a fast
RESOURCE_EXHAUSTED (gRPC) or 503 (HTTP) instead of queueing without bound, and the
requests it admits must keep a bounded p99. Measured at 1x and 2x the saturation rate,
against a real `tokenbroker serve` (memory store, or `--store redis`), door by door:

  grpc   unary `ValidateToken` of a cached DPoP-bound token with a fresh proof per request,
         called as a registered MCP server (`authorization: ApiKey`): the hot path;
  http   `POST /token`, `client_credentials` with a `private_key_jwt` assertion (EdDSA) and
         a DPoP proof: what the token endpoint bench sends (`benches/token_endpoint.py`).

For each door, on a broker of its own:
1. saturation: a closed loop at each `--*-levels` total concurrency (requests in flight,
   spread over the generators); the saturation rate is the highest admitted rate seen;
2. an open loop at each `--factors` multiple of it (default 1x and 2x): requests sent on a
   schedule whatever the answers; each request's latency runs from its scheduled send time
   (no coordinated omission: a late generator or a wait for an HTTP connection counts).

Each window is `--warmup` seconds of load, then `--duration` seconds counted, from
`--*-generators` load generator processes of their own (`tokenbroker_bench.overload_load`)
that start together; every request (proof, assertion) is signed before its window opens.
Reported per window: offered and admitted rate, shed fraction, p50 / p99 latency of the
admitted answers, p99 of the shed ones (RESOURCE_EXHAUSTED / 503), every other outcome as
an error (there must be none), the generators' send lag, and the CPU the server and the
generators used. The Markdown goes to stdout (and `--markdown`), progress to stderr; the
exit status is 1 when any window saw an error.

Honesty about the machine: by default the generators run on the same cores as the server.
At 2x they send twice the requests of 1x and take CPU the server would otherwise have (a
refusal costs a Python gRPC client more than a success), so the server sheds more than a
dedicated client machine would make it. `--server-cpus` and `--generator-cpus` pin them
apart, as a client machine of its own would be (`make overload` does, on a machine with 2
CPUs or more); the server and generator CPU columns show how the cores were shared, and
the send lag shows whether the generators kept their schedule.

    .venv/bin/python benches/overload.py [--duration 10] [--warmup 2] [--store memory|redis] \\
        [--doors grpc,http] [--factors 1,2] [--json PATH] [--markdown PATH] \\
        [--server-cpus 0] [--generator-cpus 1] [--broker-env TOKENBROKER_MAX_QUEUED_RPCS=64 ...]

`--broker-env` compares settings: `TOKENBROKER_MAX_QUEUED_RPCS`, `TOKENBROKER_MAX_CONCURRENT_RPCS`,
`TOKENBROKER_HTTP_MAX_INFLIGHT`, or `TOKENBROKER_WORKERS=2` with `--store redis` and
`TOKENBROKER_HTTP_LISTEN=127.0.0.1:<port>` (the server CPU then sums the workers, and the
refusal counters are read from each worker's metrics port). About 3 minutes per store with
the defaults (2 min 40 s measured)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import grpc  # type: ignore[import-untyped,unused-ignore]
import psutil  # type: ignore[import-untyped,unused-ignore]

from tokenbroker_bench import overload_load
from tokenbroker_bench.loadgen import percentile
from tokenbroker_bench.overload_load import Job, Result
from tokenbroker_bench.servers import Deployment, ManagedProcess, ProcessSet, RedisProcess, free_port
from tokenbroker_bench.token_deployment import SCOPE, HttpServerProcess, TokenDeployment

DOORS = {"grpc": "gRPC ValidateToken (DPoP)", "http": "HTTP POST /token (private_key_jwt + DPoP)"}
# Generous guesses of each door's closed-loop rate (requests/s), only to size the pools of
# pre-signed requests; a pool that runs out makes its window run again with a larger one.
RATE_GUESS = {"grpc": 8000.0, "http": 2500.0}
POOL_MARGIN = 1.2
MAX_WINDOW_SECONDS = 40.0  # proofs are accepted for 60-65 s after they were signed
READY_TIMEOUT = 120.0  # seconds for the generators to sign their pools
START_DELAY = 0.5  # seconds from "all ready" to the load's start


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds counted per window (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each window (default 2)")
    parser.add_argument("--store", choices=("memory", "redis"), default="memory", help="the broker's store")
    parser.add_argument("--doors", default="grpc,http", help="comma-separated, of grpc, http (default both)")
    parser.add_argument("--factors", default="1,2", help="open-loop rates, multiples of saturation (default 1,2)")
    parser.add_argument(
        "--grpc-levels", default="16,64,256", help="closed-loop calls in flight, total (default 16,64,256)"
    )
    parser.add_argument("--http-levels", default="16,64", help="closed-loop connections, total (default 16,64)")
    parser.add_argument("--grpc-generators", type=int, default=2, help="gRPC generator processes (default 2)")
    parser.add_argument("--http-generators", type=int, default=2, help="HTTP generator processes (default 2)")
    parser.add_argument(
        "--http-connections",
        type=int,
        default=1200,
        help="open loop: HTTP connections the generators may open in all (default 1200, above the door's 1024)",
    )
    parser.add_argument("--tokens", type=int, default=16, help="DPoP-bound tokens validated over gRPC (default 16)")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between windows (default 2)")
    parser.add_argument(
        "--broker-env",
        action="append",
        default=[],
        metavar="TOKENBROKER_NAME=VALUE",
        help="a setting for the broker under test (repeatable), e.g. TOKENBROKER_MAX_QUEUED_RPCS=64",
    )
    parser.add_argument(
        "--server-cpus",
        help="pin the broker under test (every thread, every worker process) to these CPUs, e.g. 0 or 0-1",
    )
    parser.add_argument("--generator-cpus", help="pin the load generators to these CPUs, e.g. 1 or 2-3")
    parser.add_argument("--json", type=Path, help="also write everything measured (no raw samples) here")
    parser.add_argument("--markdown", type=Path, help="also write the Markdown here")
    args = parser.parse_args(argv)
    try:
        args.server_cpus = _cpus(args.server_cpus, "--server-cpus")
        args.generator_cpus = _cpus(args.generator_cpus, "--generator-cpus")
        args.doors = _names(args.doors, DOORS)
        args.factors = [float(x) for x in args.factors.split(",") if x.strip()]
        args.grpc_levels = [int(x) for x in args.grpc_levels.split(",") if x.strip()]
        args.http_levels = [int(x) for x in args.http_levels.split(",") if x.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    if args.duration <= 0 or args.warmup < 0 or args.duration + args.warmup > MAX_WINDOW_SECONDS:
        parser.error(f"--duration must be positive and --duration + --warmup at most {MAX_WINDOW_SECONDS:g} s")
    if not args.factors or min(args.factors) <= 0 or not args.grpc_levels or not args.http_levels:
        parser.error("--factors must be positive and --*-levels non-empty")
    generators = min(args.grpc_generators, args.http_generators)
    if generators < 1 or min(args.grpc_levels) < args.grpc_generators or min(args.http_levels) < args.http_generators:
        parser.error("at least one generator, and every level at least one request in flight per generator")
    if args.http_connections < args.http_generators or args.tokens < 1:
        parser.error("--http-connections: at least one per generator; --tokens at least 1")
    env = {}
    for item in args.broker_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("TOKENBROKER_"):
            parser.error(f"--broker-env {item!r}: TOKENBROKER_NAME=VALUE")
        env[name] = value
    args.broker_env = env
    return args


def _cpus(text: str | None, option: str) -> frozenset[int] | None:
    """A CPU list ("0", "1-3", "0,2"), each CPU one this process may run on; None: not pinned."""
    if text is None:
        return None
    cpus: set[int] = set()
    for part in (x.strip() for x in text.split(",")):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"{option} {text!r}: a CPU list such as 0, 1-3 or 0,2")
        cpus.update(range(int(low), int(high if sep else low) + 1))
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise ValueError(f"{option} {text!r}: this machine lets the bench run on CPUs {sorted(allowed)} only")
    return frozenset(cpus)


def pin(process: psutil.Process, cpus: frozenset[int] | None) -> None:
    """Pins every thread of `process` and of its children (a thread's affinity is its own
    on Linux; threads started later inherit it from the thread that starts them)."""
    if cpus is None:
        return
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread or process that just ended
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(int(tid), cpus)


def _names(text: str, known: dict[str, str]) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in known]
    if unknown or not names:
        raise ValueError(f"unknown {', '.join(unknown) or 'nothing'}: of {', '.join(known)}")
    return names


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- windows ----------------------------------------------------------------------------------


@dataclass
class Window:
    """One window, all generators merged. Latencies in ms."""

    door: str
    phase: str  # "closed c=N" or "open 2x"
    mode: str
    concurrency: int  # closed loop, total
    target_rate: float  # open loop, requests/s
    duration: float
    generators: int
    due: int  # open loop: requests scheduled in the window
    admitted: int
    shed: int
    shed_by: dict[str, int]
    errors: dict[str, int]
    admitted_ms: dict[str, float]
    admitted_from_send_ms: dict[str, float]  # open loop: from the moment each was sent
    shed_ms: dict[str, float]
    shed_from_send_ms: dict[str, float]
    lag_ms: dict[str, float]
    server_cpu_pct: float
    generator_cpu_pct: float
    connections_opened: int
    refusals: dict[str, float]  # the broker's tokenbroker_admission_refusals_total over the window, by class/reason
    admitted_in_window: int = 0  # admitted answers that came inside the window (the server's goodput)
    exhausted: bool = False

    @property
    def offered_rate(self) -> float:
        if self.mode == "open":
            return self.due / self.duration
        return (self.admitted + self.shed + sum(self.errors.values())) / self.duration

    @property
    def admitted_rate(self) -> float:
        """Admitted answers received inside the window, per second: what the server
        delivered then (for the open loop, not the admitted share of the requests due in
        it, which would count the backlog served after the window)."""
        return (self.admitted_in_window if self.mode == "open" else self.admitted) / self.duration

    @property
    def shed_fraction(self) -> float:
        total = self.due if self.mode == "open" else self.admitted + self.shed + sum(self.errors.values())
        return self.shed / total if total else 0.0

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out |= {
            "offered_rate": round(self.offered_rate, 1),
            "admitted_rate": round(self.admitted_rate, 1),
            "shed_fraction": round(self.shed_fraction, 4),
        }
        return out


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {}
    return {
        p: round(1e3 * percentile(ordered, q), 3)
        for p, q in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9), ("max", 100.0))
    }


class _Generators:
    """k generator processes of one window: started, signed, released together."""

    def __init__(self, jobs: list[Job], workdir: Path, cpus: frozenset[int] | None) -> None:
        self.processes: list[subprocess.Popen[str]] = []
        self.logs: list[IO[str]] = []
        for job in jobs:
            log = (workdir / f"generator-{job.door}-{job.index}.log").open("a+")
            self.logs.append(log)
            process = subprocess.Popen(
                [sys.executable, "-m", "tokenbroker_bench.overload_load"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            if cpus is not None:  # before it starts a thread: its threads inherit this
                os.sched_setaffinity(process.pid, cpus)
            assert process.stdin is not None
            process.stdin.write(json.dumps(asdict(job)) + "\n")
            process.stdin.flush()
            self.processes.append(process)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        for process in self.processes:
            assert process.stdout is not None
            line = process.stdout.readline()  # blocks; the generator signs first
            if line.strip() != "ready" or time.monotonic() > deadline:
                raise SystemExit(f"overload: a generator did not get ready: {line!r}\n{self._log_tail()}")

    def start(self, epoch: float) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(f"{epoch!r}\n")
            process.stdin.flush()

    def results(self, timeout: float) -> list[Result]:
        out = []
        for process in self.processes:
            assert process.stdout is not None
            try:
                text, _ = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                raise SystemExit(f"overload: a generator did not finish in time\n{self._log_tail()}") from None
            if process.returncode != 0 or not text.strip():
                raise SystemExit(f"overload: a generator failed ({process.returncode})\n{self._log_tail()}")
            out.append(overload_load.result_from_json(text.strip().splitlines()[-1]))
        return out

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in self.logs:
            log.close()

    def _log_tail(self) -> str:
        tails = []
        for log in self.logs:
            log.flush()
            log.seek(0)
            tails.append(log.read()[-1500:])
        return "\n".join(tails)


REFUSALS = "tokenbroker_admission_refusals_total{"


def _refusals(ports: list[int]) -> dict[str, float]:
    """The broker's refusal counters (its Prometheus /metrics; each worker's, with `serve
    --workers N`, summed), "call_class/reason" -> count."""
    counts: dict[str, float] = {}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        for line in text.splitlines():
            if line.startswith(REFUSALS):
                labels, _, value = line[len(REFUSALS) :].partition("} ")
                fields = {k: v.strip('"') for k, v in (part.split("=", 1) for part in labels.split(","))}
                key = f"{fields['call_class']}/{fields['reason']}"
                counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def _cpu_seconds(process: psutil.Process) -> float:
    """User+system CPU of the process and its children (`serve --workers N` runs N)."""
    total = 0.0
    for each in (process, *process.children(recursive=True)):
        try:
            times = each.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _sleep_until(moment: float) -> None:
    wait = moment - time.time()
    if wait > 0:
        time.sleep(wait)


class Bench:
    """The brokers of one run and the windows measured against them."""

    def __init__(self, args: argparse.Namespace, workdir: Path, processes: ProcessSet) -> None:
        self.args = args
        self.workdir = workdir
        self.processes = processes
        self.redis = RedisProcess.start(processes, workdir) if args.store == "redis" else None
        self.windows: list[Window] = []
        self.saturation: dict[str, float] = {}
        self.metrics_ports: list[int] = []  # the broker under test's (one per worker process)

    def _window(self, door: str, phase: str, jobs: list[Job], server_pid: int) -> Window:
        generators = _Generators(jobs, self.workdir, self.args.generator_cpus)
        refused0: dict[str, float] = {}
        refused1: dict[str, float] = {}
        try:
            generators.wait_ready()
            epoch = time.time() + START_DELAY
            generators.start(epoch)
            server = psutil.Process(server_pid)
            pin(server, self.args.server_cpus)  # again each window: grpc starts threads as it needs them
            first = jobs[0]
            _sleep_until(epoch + first.warmup)
            cpu0 = _cpu_seconds(server)
            wall0 = time.perf_counter()
            refused0 = _refusals(self.metrics_ports)
            _sleep_until(epoch + first.warmup + first.duration)
            cpu1 = _cpu_seconds(server)
            wall1 = time.perf_counter()
            refused1 = _refusals(self.metrics_ports)
            results = generators.results(timeout=first.drain + 60)
        finally:
            generators.stop()
        admitted = [x for r in results for x in r.admitted]
        shed = [x for r in results for x in r.shed]
        shed_by: dict[str, int] = {}
        errors: dict[str, int] = {}
        for r in results:
            for name, count in r.shed_by.items():
                shed_by[name] = shed_by.get(name, 0) + count
            for name, count in r.errors.items():
                errors[name] = errors.get(name, 0) + count
        return Window(
            door=door,
            phase=phase,
            mode=first.mode,
            concurrency=sum(j.concurrency for j in jobs),
            target_rate=first.rate,
            duration=first.duration,
            generators=len(jobs),
            due=sum(r.due for r in results),
            admitted=len(admitted),
            shed=len(shed),
            shed_by=shed_by,
            errors=errors,
            admitted_ms=_summary(admitted),
            admitted_from_send_ms=_summary([x for r in results for x in r.admitted_from_send]),
            shed_ms=_summary(shed),
            shed_from_send_ms=_summary([x for r in results for x in r.shed_from_send]),
            lag_ms=_summary([x for r in results for x in r.lags]),
            server_cpu_pct=round(100 * (cpu1 - cpu0) / (wall1 - wall0), 1),
            generator_cpu_pct=round(100 * sum(r.generator_cpu_s for r in results) / first.duration, 1),
            connections_opened=sum(r.connections_opened for r in results),
            refusals={k: v - refused0.get(k, 0.0) for k, v in refused1.items() if v - refused0.get(k, 0.0)},
            admitted_in_window=sum(r.admitted_in_window for r in results),
            exhausted=any(r.exhausted for r in results),
        )

    def _measure(self, door: str, phase: str, make_jobs: Any, server_pid: int) -> Window:
        """A window; again with three times the pool when a pre-signed pool ran out."""
        margin = 1.0
        for _attempt in range(3):
            window = self._window(door, phase, make_jobs(margin), server_pid)
            if not window.exhausted:
                return window
            margin *= 3
            _say(f"  {door} {phase}: a pre-signed pool ran out; again with a larger one")
            time.sleep(self.args.pause)
        raise SystemExit(f"overload: {door} {phase}: the pre-signed pools still ran out")

    def _report(self, w: Window) -> None:
        self.windows.append(w)
        errors = sum(w.errors.values())
        _say(
            f"  {w.door} {w.phase}: offered {w.offered_rate:,.0f}/s, admitted {w.admitted_rate:,.0f}/s, "
            f"shed {100 * w.shed_fraction:.1f}%, admitted p50 {w.admitted_ms.get('p50', 0):.1f} / "
            f"p99 {w.admitted_ms.get('p99', 0):.1f} ms (from send {w.admitted_from_send_ms.get('p99', 0):.1f}), "
            f"shed p99 {w.shed_ms.get('p99', 0):.1f} ms (from send {w.shed_from_send_ms.get('p99', 0):.1f}), "
            f"errors {errors}{' ' + json.dumps(w.errors) if errors else ''}, lag p99 {w.lag_ms.get('p99', 0):.1f} ms, "
            f"server {w.server_cpu_pct:.0f}% CPU, generators {w.generator_cpu_pct:.0f}%, "
            f"broker refusals {json.dumps(w.refusals)}, "
            f"load {os.getloadavg()[0]:.2f}"
        )

    def door(self, door: str) -> None:
        args = self.args
        redis_url = self.redis.url if self.redis is not None else None
        if self.redis is not None:
            self.redis.flush()
        began = time.perf_counter()
        port = free_port()
        self.metrics_ports = [port + i for i in range(int(args.broker_env.get("TOKENBROKER_WORKERS", "1")))]
        env = {**args.broker_env, "TOKENBROKER_METRICS_PORT": str(port)}
        if door == "grpc":
            deployment = Deployment.create(self._dir("grpc"), self.processes)
            process, target = deployment.start_broker(redis_url, env=env)
            credentials = deployment.issue_tokens(target, args.tokens, dpop=True)
            base = Job(
                door="grpc",
                mode="closed",
                index=0,
                generators=args.grpc_generators,
                warmup=args.warmup,
                duration=args.duration,
                pool_size=1,
                target=target,
                api_key=deployment.api_key,
                credentials=[(c.token, (c.dpop_secret or b"").hex()) for c in credentials],
            )
            levels, k = args.grpc_levels, args.grpc_generators
            server: ManagedProcess = process
        else:
            deployment_http = TokenDeployment.create(self._dir("http"), self.processes)
            serve: HttpServerProcess = deployment_http.start_serve(redis_url, env=env)
            client = deployment_http.clients["EdDSA/dpop"]
            base = Job(
                door="http",
                mode="closed",
                index=0,
                generators=args.http_generators,
                warmup=args.warmup,
                duration=args.duration,
                pool_size=1,
                token_url=serve.token_url,
                issuer=serve.url,
                audience=deployment_http.audience,
                scope=SCOPE,
                client_id=client.client_id,
                algorithm=client.algorithm,
                private_key_pem=client.private_pem(),
            )
            levels, k = args.http_levels, args.http_generators
            server = serve.process
        _say(f"{DOORS[door]}: broker started in {time.perf_counter() - began:.1f} s")
        seconds = args.warmup + args.duration
        try:
            best = 0.0
            for level in levels:

                def closed(margin: float, level: int = level) -> list[Job]:
                    share = [level // k + (1 if i < level % k else 0) for i in range(k)]
                    pool = int(margin * POOL_MARGIN * RATE_GUESS[door] * seconds / k) + 4 * max(share) + 100
                    return [
                        Job(**{**asdict(base), "index": i, "concurrency": share[i], "pool_size": pool})
                        for i in range(k)
                    ]

                w = self._measure(door, f"closed c={level}", closed, server.pid)
                self._report(w)
                best = max(best, w.admitted_rate)
                time.sleep(args.pause)
            if best <= 0:
                raise SystemExit(f"overload: {door}: nothing was admitted in the closed loop")
            self.saturation[door] = best
            for factor in args.factors:
                rate = factor * best

                def opened(margin: float, rate: float = rate) -> list[Job]:
                    pool = int(margin * (rate * seconds / k + 100))
                    per_generator = max(1, args.http_connections // k)
                    return [
                        Job(
                            **{
                                **asdict(base),
                                "mode": "open",
                                "index": i,
                                "rate": rate,
                                "pool_size": pool,
                                "max_connections": per_generator,
                            }
                        )
                        for i in range(k)
                    ]

                w = self._measure(door, f"open {factor:g}x", opened, server.pid)
                self._report(w)
                time.sleep(args.pause)
        finally:
            self.processes.stop(server)

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run(self) -> None:
        for door in self.args.doors:
            self.door(door)


# -- report -----------------------------------------------------------------------------------


def _ms(values: dict[str, float], key: str) -> str:
    return f"{values[key]:,.1f}" if key in values else "-"


def markdown(meta: dict[str, Any], windows: list[Window], saturation: dict[str, float]) -> str:
    lines = [
        "# Overload: shedding at 1x and 2x the saturation rate",
        "",
        f"{meta['started']}, {meta['cpus']} CPUs, load before {meta['load_before']}, after {meta['load_after']}; "
        f"store {meta['store']}; broker settings {meta['broker_env'] or 'defaults'}; "
        f"{meta['duration']:g} s counted per window after {meta['warmup']:g} s of load; `{meta['command']}`.",
        "",
        "Open-loop latencies run from each request's scheduled send time. Admitted/s: admitted answers received "
        "inside the window. Shed: RESOURCE_EXHAUSTED (gRPC), 503 (HTTP), as a share of the requests sent. Errors: "
        f"every other outcome (there must be none). {_placement(meta)} (server and generator CPU: percent of one "
        "core over the window).",
        "",
    ]
    for door in DOORS:
        rows = [w for w in windows if w.door == door]
        if not rows:
            continue
        lines += [
            f"## {DOORS[door]}",
            "",
            f"Saturation (best closed-loop admitted rate): **{saturation.get(door, 0):,.0f}/s**.",
            "",
            "| window | offered/s | admitted/s | shed | admitted p50 (ms) | admitted p99 (ms) | shed p99 (ms) "
            "| errors | send lag p99 (ms) | server CPU | generators CPU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for w in rows:
            errors = sum(w.errors.values())
            lines.append(
                f"| {w.phase} | {w.offered_rate:,.0f} | {w.admitted_rate:,.0f} | {100 * w.shed_fraction:.1f}% | "
                f"{_ms(w.admitted_ms, 'p50')} | **{_ms(w.admitted_ms, 'p99')}** | {_ms(w.shed_ms, 'p99')} | "
                f"{errors:,} | {_ms(w.lag_ms, 'p99')} | {w.server_cpu_pct:.0f}% | {w.generator_cpu_pct:.0f}% |"
            )
        details = [w for w in rows if w.errors or w.shed_by or w.refusals]
        if details:
            lines.append("")
        for w in details:
            parts = [f"shed {json.dumps(w.shed_by)}"] if w.shed_by else []
            parts += [f"the broker counted {json.dumps(w.refusals)}"] if w.refusals else []
            parts += [f"errors {json.dumps(w.errors)}"] if w.errors else []
            if w.door == "http" and w.mode == "open":
                parts.append(f"{w.connections_opened:,} connections opened")
            lines.append(f"- {w.phase}: {'; '.join(parts)}")
        if any(name.startswith("CANCELLED") for w in rows for name in w.errors):
            lines += [
                "",
                "CANCELLED: grpc core cancels calls itself while they wait for grpc's polling thread, before "
                'admission control sees them (`tokenbroker.service.admission`, "Overload"; '
                "`max_concurrent_rpcs` has grpc refuse them instead).",
            ]
        lines.append("")
    return "\n".join(lines)


def _placement(meta: dict[str, Any]) -> str:
    server, generators = meta.get("server_cpus"), meta.get("generator_cpus")
    if server is None and generators is None:
        return "The generators share the server's cores"
    where = f"The broker runs on CPU {server or 'any'}, the generators on CPU {generators or 'any'}"
    return where + (" (Redis is not pinned)" if meta["store"] == "redis" else "")


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    began = time.perf_counter()
    with ProcessSet() as processes, tempfile.TemporaryDirectory(prefix="tb-overload-") as tmp:
        bench = Bench(args, Path(tmp), processes)
        bench.run()
    meta = {
        "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": "benches/overload.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "store": args.store,
        "server_cpus": sorted(args.server_cpus) if args.server_cpus is not None else None,
        "generator_cpus": sorted(args.generator_cpus) if args.generator_cpus is not None else None,
        "broker_env": args.broker_env,
        "doors": args.doors,
        "factors": args.factors,
        "duration": args.duration,
        "warmup": args.warmup,
        "grpc_generators": args.grpc_generators,
        "http_generators": args.http_generators,
        "http_connections": args.http_connections,
        "total_seconds": round(time.perf_counter() - began, 1),
    }
    text = markdown(meta, bench.windows, bench.saturation)
    print(text)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
        _say(f"wrote {args.markdown}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"meta": meta, "saturation": bench.saturation, "windows": [w.as_json() for w in bench.windows]}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        _say(f"wrote {args.json}")
    failed = [w for w in bench.windows if w.errors]
    if failed:
        _say(f"overload: {len(failed)} window(s) saw errors other than shedding: {[w.phase for w in failed]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
