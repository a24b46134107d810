"""Server CPU per request, the way the "measured speed" issue (section 7) asks: the
do-nothing grpcio server, the broker with a warm bearer token, the broker with a cached
DPoP token and a fresh proof per request, all unary at 16 in flight on the memory store;
then `ValidateTokenBatch` with DPoP on the memory and the Redis store (validations/s).

    .venv/bin/python benches/cpu_per_request.py [--duration 10] [--repeat 3] [--json PATH]

One run, one machine, the same settings for every row. Each window starts its server
afresh (the broker as `tokenbroker serve` runs it, through `servers.Deployment`), warms it,
and drives it from a generator process of its own (`tokenbroker_bench.generator`), which
reads the server's user+system CPU time at the window's edges. The rows alternate
`--repeat` times and the table gives medians (see `tokenbroker_bench.server_cpu`). Every
answer must be valid: an RPC error or an invalid answer stops the run (exit status 1).
The Markdown goes to stdout, progress to stderr."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import grpc  # type: ignore[import-untyped,unused-ignore]

from tokenbroker_bench import server_cpu
from tokenbroker_bench.generator import Job, Result, result_from_json
from tokenbroker_bench.server_cpu import ROWS, Measurement, RowSpec
from tokenbroker_bench.servers import Credential, Deployment, ManagedProcess, ProcessSet, RedisProcess

# A guess of each mode's rate (validations/s), only to size the first pool of pre-signed
# proofs; later windows of a row size theirs from its best rate so far. A pool that runs
# out makes its window run again with a larger one.
FIRST_GUESS = {"unary": 6000.0, "batch": 25000.0}
POOL_MARGIN = 1.3
# A proof is accepted for 65 s after it was signed, and a pool is signed before its window.
MAX_WINDOW_SECONDS = 40.0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds timed per window (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each window (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="windows per row, rows alternating (default 3)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)} (default all)")
    parser.add_argument("--concurrency", type=int, default=16, help="unary calls in flight (default 16)")
    parser.add_argument("--batch-size", type=int, default=64, help="validations per batch (default 64)")
    parser.add_argument("--batch-concurrency", type=int, default=4, help="batch calls in flight (default 4)")
    parser.add_argument("--tokens", type=int, default=16, help="distinct tokens per broker (default 16)")
    parser.add_argument("--json", type=Path, help="also write everything measured to this file")
    args = parser.parse_args(argv)
    try:
        args.rows = server_cpu.parse_rows(args.rows)
    except ValueError as exc:
        parser.error(str(exc))
    if args.duration <= 0 or args.warmup < 0 or args.duration + args.warmup > MAX_WINDOW_SECONDS:
        parser.error(f"--duration must be positive and --duration + --warmup at most {MAX_WINDOW_SECONDS:g} s")
    if args.repeat < 1 or args.concurrency < 1 or args.batch_concurrency < 1 or args.tokens < 1:
        parser.error("--repeat, --concurrency, --batch-concurrency and --tokens must be at least 1")
    if not 1 <= args.batch_size <= 1000:
        parser.error("--batch-size must be 1 to 1000 (the broker's limit)")
    return args


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Bench:
    """The servers of one run and the windows measured against them."""

    def __init__(self, args: argparse.Namespace, workdir: Path, processes: ProcessSet) -> None:
        self.args = args
        self.processes = processes
        self.deployment = Deployment.create(workdir, processes)
        needs_redis = any(ROWS[name].store == "redis" for name in args.rows)
        self.redis = RedisProcess.start(processes, workdir) if needs_redis else None
        self.best: dict[str, float] = {}  # row -> best rate so far
        self.bearer_credentials: list[Credential] = []  # the do-nothing server is sent these
        self.measurements: list[Measurement] = []
        self.proofs_signed = 0
        self.signing_seconds = 0.0

    # -- servers ------------------------------------------------------------------------------

    def _start(self, spec: RowSpec) -> tuple[ManagedProcess, str, list[Credential]]:
        """The row's server, started afresh, and the tokens to send it."""
        if spec.server == "noop":
            credentials = self.bearer_credentials or self._issue_elsewhere()
            process, target = self.deployment.start_reference("noop")
            return process, target, credentials
        redis_url = None
        if spec.store == "redis":
            assert self.redis is not None
            self.redis.flush()  # each window's broker starts from an empty Redis
            redis_url = self.redis.url
        process, target = self.deployment.start_broker(redis_url, detection=spec.detection)
        try:
            credentials = self.deployment.issue_tokens(target, self.args.tokens, dpop=spec.dpop)
        except BaseException:
            self.processes.stop(process)
            raise
        if not spec.dpop:
            self.bearer_credentials = credentials
        return process, target, credentials

    def _issue_elsewhere(self) -> list[Credential]:
        """Bearer tokens from a broker started for that alone (a run without the bearer row)."""
        process, target = self.deployment.start_broker(None)
        try:
            self.bearer_credentials = self.deployment.issue_tokens(target, self.args.tokens, dpop=False)
        finally:
            self.processes.stop(process)
        return self.bearer_credentials

    # -- one window ---------------------------------------------------------------------------

    def _pool_size(self, spec: RowSpec) -> int:
        rate = self.best.get(spec.name) or FIRST_GUESS[spec.mode]
        in_flight = self.args.batch_size * self.args.batch_concurrency if spec.mode == "batch" else 0
        return int(POOL_MARGIN * rate * (self.args.warmup + self.args.duration)) + in_flight + 1000

    def _job(self, spec: RowSpec, target: str, credentials: list[Credential], pids: dict[str, int]) -> Job:
        args = self.args
        return Job(
            target=target,
            api_key=self.deployment.api_key,
            mode=spec.mode,
            concurrency=args.batch_concurrency if spec.mode == "batch" else args.concurrency,
            duration=args.duration,
            warmup=args.warmup,
            credentials=[(c.token, c.dpop_secret.hex() if c.dpop_secret else None) for c in credentials],
            pool_size=self._pool_size(spec),
            reusable=spec.server == "noop",
            batch_size=args.batch_size,
            pids=pids,
        )

    def _generate(self, job: Job) -> Result:
        """Runs the job in a generator process of its own (secrets on stdin, not argv)."""
        signing = job.pool_size / 20_000  # seconds, generously, on one core
        done = subprocess.run(
            [sys.executable, "-m", "tokenbroker_bench.generator"],
            input=json.dumps(asdict(job)),
            capture_output=True,
            text=True,
            timeout=job.warmup + job.duration + signing + 60,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"cpu_per_request: the generator failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return result_from_json(done.stdout)

    def window(self, spec: RowSpec, repeat: int) -> Measurement:
        process, target, credentials = self._start(spec)
        try:
            pids = {"server": process.pid}
            if spec.store == "redis" and self.redis is not None:
                pids["redis"] = self.redis.process.pid
            for attempt in range(2):
                job = self._job(spec, target, credentials, pids)
                if attempt:
                    job.pool_size *= 3
                result = self._generate(job)
                self.proofs_signed += result.signed
                self.signing_seconds += result.signing_s
                if not result.exhausted:
                    break
                if attempt:
                    raise SystemExit(f"cpu_per_request: {spec.name}: {job.pool_size} pre-signed requests ran out")
                _say(f"  {spec.name}: the pre-signed pool ran out; again with a larger one")
                # A new server: the first one has seen the exhausted pool's proofs.
                self.processes.stop(process)
                process, target, credentials = self._start(spec)
                pids["server"] = process.pid
        finally:
            self.processes.stop(process)
        problem = server_cpu.answer_problems(
            spec.name,
            validations=result.validations,
            valid=result.valid,
            reasons=result.reasons,
            errors=result.errors,
        )
        if problem:
            raise SystemExit(f"cpu_per_request: {problem}")
        measurement = Measurement(
            row=spec.name,
            repeat=repeat,
            validations=result.validations,
            wall_s=result.wall_s,
            server_cpu_s=result.cpu_s["server"],
            generator_cpu_s=result.generator_cpu_s,
            redis_cpu_s=result.cpu_s.get("redis"),
        )
        self.best[spec.name] = max(self.best.get(spec.name, 0.0), measurement.rate)
        return measurement

    def run(self) -> None:
        for repeat in range(self.args.repeat):
            for name in self.args.rows:
                m = self.window(ROWS[name], repeat)
                self.measurements.append(m)
                _say(
                    f"{repeat + 1}/{self.args.repeat} {name}: {m.rate:,.0f}/s, server {m.cpu_us:,.1f} us per "
                    f"request, generator {m.generator_pct:.0f}% CPU, load {os.getloadavg()[0]:.2f}"
                )


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    began = time.perf_counter()
    with ProcessSet() as processes, tempfile.TemporaryDirectory(prefix="tb-cpu-") as tmp:
        bench = Bench(args, Path(tmp), processes)
        bench.run()
    meta = {
        "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": "benches/cpu_per_request.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "rows": list(args.rows),
        "duration": args.duration,
        "warmup": args.warmup,
        "repeat": args.repeat,
        "concurrency": args.concurrency,
        "batch_concurrency": args.batch_concurrency,
        "batch_size": args.batch_size,
        "tokens": args.tokens,
        "proofs_signed": bench.proofs_signed,
        "signing_seconds": round(bench.signing_seconds, 1),
        "total_seconds": round(time.perf_counter() - began, 1),
    }
    summaries = server_cpu.summarise(bench.measurements)
    print(server_cpu.markdown(meta, summaries, bench.measurements))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = server_cpu.result_json(meta, summaries, bench.measurements)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        _say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
