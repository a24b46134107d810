"""The token endpoint, measured (issue 10, "Measured"): `client_credentials` grants with
`private_key_jwt` against a real `tokenbroker serve` (memory store and Redis store), next
to the same-run rate of an SDK-style token loop, and the HTTP stack chosen by measurement.

    .venv/bin/python benches/token_endpoint.py [--duration 3] [--repeat 2] [--stack-repeat 4] [--json PATH] \\
        [--extra-path DIR]   # where httptools and uvloop are importable, for the stack rows only

Rows (`tokenbroker_bench.token_report.ROWS`): EdDSA, ES256 and RS256 assertions with Bearer
tokens, EdDSA with DPoP-bound tokens, one client alone, the Redis store, and the same app
under uvicorn with h11, httptools, and httptools on uvloop. Each window drives one server
from a load generator process of its own (`tokenbroker_bench.token_load`) with N clients
whose assertions (and proofs) are all signed before the window opens, and reads the
server's CPU time at the window's edges; the SDK-style loop (`tokenbroker_bench.sdk_loop`)
runs the MCP SDK's own `PrivateKeyJWTOAuthProvider` through discovery and the token
request, once per token. Every server is started once and kept for the run; the rows
alternate, `--repeat` windows each (`--stack-repeat` for the HTTP stacks that could be
chosen, whose ratios decide it), and the report gives medians.

Every answer must be a grant: a refusal stops the run (exit status 1). The Markdown goes to
stdout, progress to stderr. About 3 minutes on 2 cores with the defaults."""

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
from importlib import metadata
from pathlib import Path

from tokenbroker_bench import sdk_loop, token_load, token_report
from tokenbroker_bench.servers import ProcessSet, RedisProcess
from tokenbroker_bench.token_deployment import SCOPE, STACKS, HttpServerProcess, TokenDeployment, probe_auto_http
from tokenbroker_bench.token_report import ROWS, SERVE, RowSpec, SdkWindow, Window

FIRST_GUESS = 1000.0  # grants/s, to size a row's first pool (or the best rate of any row so far, if higher)
POOL_MARGIN = 1.5
MAX_WINDOW_SECONDS = 60.0  # a pool is signed before its window, and assertions live 120 s


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds timed per window (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each window (default 1)")
    parser.add_argument("--repeat", type=int, default=2, help="windows per row, rows alternating (default 2)")
    parser.add_argument(
        "--stack-repeat", type=int, default=4, help="windows per candidate HTTP stack row, which decide it (default 4)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="clients in flight (default 16)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--no-sdk", action="store_true", help="skip the SDK-style loop")
    parser.add_argument(
        "--extra-path",
        help="a directory put first on PYTHONPATH of the stack servers only (e.g. `pip install --target DIR "
        "httptools uvloop`); `tokenbroker serve` never gets it",
    )
    parser.add_argument("--json", type=Path, help="also write everything measured to this file")
    args = parser.parse_args(argv)
    try:
        args.rows = token_report.parse_rows(args.rows)
    except ValueError as exc:
        parser.error(str(exc))
    if args.duration <= 0 or args.warmup < 0 or args.duration + args.warmup > MAX_WINDOW_SECONDS:
        parser.error(f"--duration must be positive and --duration + --warmup at most {MAX_WINDOW_SECONDS:g} s")
    if args.repeat < 1 or args.stack_repeat < 1 or args.concurrency < 1:
        parser.error("--repeat, --stack-repeat and --concurrency must be at least 1")
    if args.extra_path is not None and not Path(args.extra_path).is_dir():
        parser.error(f"--extra-path {args.extra_path} is not a directory")
    return args


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _importable(module: str, extra_path: str | None) -> str | None:
    """The version of `module` where the stack servers would import it, or None."""
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


class Bench:
    """The servers of one run and the windows measured against them."""

    def __init__(self, args: argparse.Namespace, workdir: Path, processes: ProcessSet) -> None:
        self.args = args
        self.processes = processes
        self.deployment = TokenDeployment.create(workdir, processes, extra_path=args.extra_path)
        self.versions = {name: _importable(name, args.extra_path) for name in ("httptools", "uvloop")}
        self.rows = [ROWS[name] for name in args.rows if self._runnable(ROWS[name])]
        self.servers: dict[tuple[str, str], HttpServerProcess] = {}
        self.redis = None
        if any(spec.store == "redis" for spec in self.rows):
            self.redis = RedisProcess.start(processes, workdir)
        self.best: dict[str, float] = {}
        self.windows: list[Window] = []
        self.sdk_windows: list[SdkWindow] = []
        self.resource: HttpServerProcess | None = None

    def _runnable(self, spec: RowSpec) -> bool:
        if spec.server == SERVE:
            return True
        http, loop, _ = STACKS[spec.server]
        missing = [name for name in {http, loop} & {"httptools", "uvloop"} if self.versions[name] is None]
        if missing:
            _say(f"  {spec.name}: skipped, {' and '.join(missing)} not importable (see --extra-path)")
        return not missing

    def server(self, spec: RowSpec) -> HttpServerProcess:
        """The row's server, started on first use and kept for the run."""
        key = (spec.server, spec.store)
        if key not in self.servers:
            redis_url = self.redis.url if spec.store == "redis" and self.redis is not None else None
            began = time.perf_counter()
            if spec.server == SERVE:
                self.servers[key] = self.deployment.start_serve(redis_url)
            else:
                self.servers[key] = self.deployment.start_stack(spec.server, redis_url)
            _say(f"  started {self.servers[key].label} in {time.perf_counter() - began:.1f} s")
        return self.servers[key]

    # -- one window -----------------------------------------------------------------------

    def _pool_size(self, spec: RowSpec) -> int:
        rate = self.best.get(spec.name) or max([FIRST_GUESS, *self.best.values()])
        seconds: float = self.args.warmup + self.args.duration
        clients: int = self.args.concurrency
        return int(POOL_MARGIN * rate * seconds) + 4 * clients + 100

    def window(self, spec: RowSpec, repeat: int) -> Window:
        server = self.server(spec)
        client = self.deployment.clients[spec.client]
        concurrency = spec.concurrency or self.args.concurrency
        pids = {"server": server.pid}
        if spec.store == "redis" and self.redis is not None:
            pids["redis"] = self.redis.process.pid
        pool_size = self._pool_size(spec)
        for _attempt in range(3):
            job = token_load.Job(
                token_url=server.token_url,
                issuer=server.url,
                audience=self.deployment.audience,
                scope=SCOPE,
                client_id=client.client_id,
                algorithm=client.algorithm,
                private_key_pem=client.private_pem(),
                dpop=client.binding == "dpop",
                expect_token_type="DPoP" if client.binding == "dpop" else "Bearer",
                concurrency=concurrency,
                warmup=self.args.warmup,
                duration=self.args.duration,
                pool_size=pool_size,
                pids=pids,
            )
            result = token_load.result_from_json(self._generate(job, "tokenbroker_bench.token_load"))
            if result.refusals:
                raise SystemExit(
                    f"token_endpoint: {spec.name}: not every answer was a grant: {result.refusals}\n"
                    f"server log: {server.process.log_tail(1500)}"
                )
            if not result.exhausted:
                break
            pool_size *= 3
            _say(f"  {spec.name}: the pre-signed pool ran out; again with {pool_size}")
        else:
            raise SystemExit(f"token_endpoint: {spec.name}: {pool_size} pre-signed requests still ran out")
        window = Window(
            row=spec.name,
            repeat=repeat,
            concurrency=concurrency,
            grants=result.grants,
            wall_s=result.wall_s,
            server_cpu_s=result.cpu_s["server"],
            generator_cpu_s=result.generator_cpu_s,
            p50_ms=result.latency_ms["p50"],
            p99_ms=result.latency_ms["p99"],
            redis_cpu_s=result.cpu_s.get("redis"),
        )
        if not window.grants:
            raise SystemExit(f"token_endpoint: {spec.name}: no grant in the window")
        self.best[spec.name] = max(self.best.get(spec.name, 0.0), window.rate)
        return window

    def sdk_window(self, repeat: int) -> SdkWindow:
        server = self.server(ROWS[token_report.HEADLINE])
        if self.resource is None:
            self.resource = self.deployment.start_resource(server.url)
        client = self.deployment.clients["RS256/bearer"]  # RS256: SignedJWTParameters' default
        job = sdk_loop.Job(
            resource=self.deployment.audience,
            issuer=server.url,
            client_id=client.client_id,
            private_key_pem=client.private_pem(),
            algorithm="RS256",
            warmup=self.args.warmup,
            duration=self.args.duration,
            pids={"server": server.pid, "resource": self.resource.pid},
        )
        result = sdk_loop.result_from_json(self._generate(job, "tokenbroker_bench.sdk_loop"))
        if result.failures or not result.tokens:
            raise SystemExit(f"token_endpoint: the SDK-style loop failed: {result.failures or 'no token'}")
        return SdkWindow(
            repeat=repeat,
            tokens=result.tokens,
            wall_s=result.wall_s,
            loop_cpu_s=result.loop_cpu_s,
            broker_cpu_s=result.cpu_s["server"],
            resource_cpu_s=result.cpu_s["resource"],
            p50_ms=result.latency_ms["p50"],
            p99_ms=result.latency_ms["p99"],
            requests_per_token=result.requests_per_token,
        )

    def _generate(self, job: token_load.Job | sdk_loop.Job, module: str) -> str:
        """Runs `module` with `job` as JSON on stdin (keys never on argv); its stdout."""
        budget = self.args.warmup + self.args.duration + 120
        done = subprocess.run(
            [sys.executable, "-m", module],
            input=json.dumps(asdict(job)),
            capture_output=True,
            text=True,
            timeout=budget,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"token_endpoint: {module} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done.stdout

    def _repeats(self, spec: RowSpec) -> int:
        return int(self.args.stack_repeat if spec.candidate else self.args.repeat)

    def run(self) -> None:
        rounds = max([self.args.repeat, *(self._repeats(spec) for spec in self.rows)])
        for repeat in range(rounds):
            for spec in self.rows:
                if repeat >= self._repeats(spec):
                    continue
                w = self.window(spec, repeat)
                self.windows.append(w)
                _say(
                    f"{repeat + 1}/{self._repeats(spec)} {spec.name}: {w.rate:,.0f} grants/s, p50 {w.p50_ms:.1f} ms, "
                    f"p99 {w.p99_ms:.1f} ms, server {w.cpu_us:,.0f} us per grant, generator "
                    f"{w.generator_pct:.0f}% CPU, load {os.getloadavg()[0]:.2f}"
                )
            if not self.args.no_sdk and repeat < self.args.repeat:
                s = self.sdk_window(repeat)
                self.sdk_windows.append(s)
                _say(
                    f"{repeat + 1}/{self.args.repeat} sdk-loop: {s.rate:,.1f} tokens/s, p50 {s.p50_ms:.0f} ms, "
                    f"SDK client {s.per_token_ms(s.loop_cpu_s):.1f} ms CPU per token, broker "
                    f"{s.per_token_ms(s.broker_cpu_s):.2f} ms"
                )


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    began = time.perf_counter()
    with ProcessSet() as processes, tempfile.TemporaryDirectory(prefix="tb-token-") as tmp:
        bench = Bench(args, Path(tmp), processes)
        bench.run()
        auto_http = probe_auto_http()
    meta = {
        "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": "benches/token_endpoint.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "uvicorn": metadata.version("uvicorn"),
        "httptools": bench.versions["httptools"] or "not installed",
        "uvloop": bench.versions["uvloop"] or "not installed",
        "auto_http": auto_http,
        "rows": [spec.name for spec in bench.rows],
        "duration": args.duration,
        "warmup": args.warmup,
        "repeat": args.repeat,
        "stack_repeat": args.stack_repeat,
        "concurrency": args.concurrency,
        "total_seconds": round(time.perf_counter() - began, 1),
    }
    summaries = token_report.summarise(bench.windows)
    sdk = token_report.summarise_sdk(bench.sdk_windows)
    choice = token_report.stack_choice(bench.windows)
    print(token_report.markdown(meta, summaries, bench.windows, sdk, choice))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = token_report.result_json(meta, summaries, bench.windows, bench.sdk_windows, choice)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        _say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
