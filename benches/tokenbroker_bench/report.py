"""Measuring the servers (psutil: CPU and RSS of each server process during each level)
and reporting a run: JSON (everything), Markdown (tables and the targets), PNG charts
(matplotlib, Agg backend: throughput against p99 latency per mode; RSS over the soak).

Every ratio and verdict is computed here from the rows of the same run; the thresholds
are the issue's targets, not measurements."""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]

from tokenbroker.v1 import broker_pb2 as pb
from tokenbroker_bench.loadgen import LevelStats, percentile

MB = 1024 * 1024

# The targets of the "measured speed" issue.
UNARY_VS_NOOP_MIN = 0.8
UNARY_VS_PYJWT_MIN = 2.0
P99_AT_HALF_MAX_MS = 2.0
REDIS_PIPELINED_MIN_VPS = 50_000.0
REDIS_ROUND_TRIPS_MAX = 1.0
SOAK_GROWTH_MAX = 0.05  # RSS trend over the soak, as a fraction of its first sample

BROKER_MEMORY = "tokenbroker-memory"
BROKER_REDIS = "tokenbroker-redis"
REF_NOOP = "grpcio-noop"
REF_PYJWT = "pyjwt-redis"
SERVER_TITLES = {
    BROKER_MEMORY: "tokenbroker, memory store",
    BROKER_REDIS: "tokenbroker, Redis store",
    REF_NOOP: "grpcio do-nothing reference",
    REF_PYJWT: "PyJWT + redis-py reference",
}


# -- sampling ---------------------------------------------------------------------------------


class ProcessSampler:
    """CPU and RSS of some processes between `begin()` and `end()`: CPU from their CPU
    times (100 % = one core), RSS sampled every `interval` seconds by a thread."""

    def __init__(self, pids: Mapping[str, int], interval: float = 0.25) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._interval = interval
        self._cpu: dict[str, float] = {}
        self._began = 0.0
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in self._procs}
        self.cpu_pct: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _cpu_seconds(self, name: str) -> float:
        try:
            times = self._procs[name].cpu_times()
            return float(times.user + times.system)
        except psutil.Error:
            return 0.0

    def _sample(self) -> None:
        moment = time.perf_counter() - self._began
        for name, proc in self._procs.items():
            with contextlib.suppress(psutil.Error):
                self.samples[name].append((moment, proc.memory_info().rss / MB))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def begin(self) -> None:
        self._began = time.perf_counter()
        self._cpu = {name: self._cpu_seconds(name) for name in self._procs}
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def end(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()
        wall = max(1e-9, time.perf_counter() - self._began)
        self.cpu_pct = {name: 100.0 * (self._cpu_seconds(name) - before) / wall for name, before in self._cpu.items()}

    def rss(self, name: str) -> dict[str, float]:
        values = [rss for _, rss in self.samples.get(name, [])]
        if not values:
            return {"first": 0.0, "last": 0.0, "max": 0.0}
        return {"first": round(values[0], 1), "last": round(values[-1], 1), "max": round(max(values), 1)}


# -- rows ---------------------------------------------------------------------------------------


def _round(value: float, digits: int = 3) -> float:
    return round(float(value), digits)


def reason_names(reasons: Mapping[int, int]) -> dict[str, int]:
    names = {}
    for number, count in sorted(reasons.items()):
        try:
            name = pb.Reason.Name(number).removeprefix("REASON_")
        except ValueError:
            name = str(number)
        names[name] = count
    return names


def level_row(
    server: str,
    stats: LevelStats,
    *,
    wall: float,
    sampler: ProcessSampler,
    redis_delta: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """One JSON row for one level of one server."""
    latencies = sorted(stats.latencies)
    elapsed = stats.elapsed
    row: dict[str, Any] = {
        "server": server,
        "mode": stats.mode,
        "concurrency": stats.concurrency,
        "loop": "open" if stats.rate is not None else "closed",
        "target_rate": _round(stats.rate, 1) if stats.rate is not None else None,
        "duration_s": _round(elapsed),
        "rpcs": stats.rpcs,
        "validations": stats.validations,
        "valid": stats.valid,
        "reasons": reason_names(stats.reasons),
        "errors": dict(stats.errors),
        "throughput": _round(stats.validations / elapsed, 1) if elapsed > 0 else 0.0,
        "rpc_rate": _round(stats.rpcs / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": {
            "p50": _round(percentile(latencies, 50) * 1000),
            "p90": _round(percentile(latencies, 90) * 1000),
            "p99": _round(percentile(latencies, 99) * 1000),
            "p99.9": _round(percentile(latencies, 99.9) * 1000),
            "max": _round((latencies[-1] if latencies else 0.0) * 1000),
            "mean": _round((sum(latencies) / len(latencies) if latencies else 0.0) * 1000),
        },
        "server_cpu_pct": _round(sampler.cpu_pct.get("server", 0.0), 1),
        "server_rss_mb": sampler.rss("server"),
        "generator_cpu_pct": _round(100.0 * stats.generator_cpu / wall, 1) if wall > 0 else 0.0,
        "pool_exhausted": stats.exhausted,
        "late": stats.late,
    }
    if stats.rate is not None:
        lags = sorted(stats.lags)
        row["send_lag_ms"] = {"p50": _round(percentile(lags, 50) * 1000), "p99": _round(percentile(lags, 99) * 1000)}
    if "redis" in sampler.cpu_pct:
        row["redis_cpu_pct"] = _round(sampler.cpu_pct["redis"], 1)
    if redis_delta is not None and stats.validations:
        row["redis"] = {
            "commands": redis_delta.get("total_commands_processed", 0),
            "reads": redis_delta.get("total_reads_processed", 0),
            "commands_per_validation": _round(redis_delta.get("total_commands_processed", 0) / stats.validations, 4),
            "round_trips_per_validation": _round(redis_delta.get("total_reads_processed", 0) / stats.validations, 4),
        }
    return row


def slope_per_minute(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute (0 for < 2 points)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 60.0 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def soak_row(
    server: str, stats: LevelStats, samples: Sequence[tuple[float, float]], *, warmup: float = 0.0
) -> dict[str, Any]:
    values = [v for _, v in samples]
    half = [p for p in samples if p[0] >= (samples[-1][0] / 2 if samples else 0)]
    duration = samples[-1][0] - samples[0][0] if len(samples) > 1 else 0.0
    slope = slope_per_minute(samples)
    first = values[0] if values else 0.0
    trend = slope * duration / 60.0
    return {
        "server": server,
        "mode": stats.mode,
        "concurrency": stats.concurrency,
        "duration_s": _round(stats.elapsed),
        "warmup_s": _round(warmup),
        "validations": stats.validations,
        "valid": stats.valid,
        "reasons": reason_names(stats.reasons),
        "errors": dict(stats.errors),
        "throughput": _round(stats.validations / stats.elapsed, 1) if stats.elapsed > 0 else 0.0,
        "rss_mb": {
            "first": _round(first, 1),
            "last": _round(values[-1] if values else 0.0, 1),
            "max": _round(max(values) if values else 0.0, 1),
        },
        "slope_mb_per_min": _round(slope, 3),
        "slope_second_half_mb_per_min": _round(slope_per_minute(half), 3),
        "trend_mb": _round(trend, 2),
        "growth_fraction": _round(trend / first, 4) if first else 0.0,
        "samples": [[_round(t, 2), _round(v, 2)] for t, v in samples],
    }


# -- targets ------------------------------------------------------------------------------------


def _rows(rows: Iterable[Mapping[str, Any]], server: str, modes: Iterable[str], loop: str = "closed") -> list[Any]:
    wanted = set(modes)
    return [r for r in rows if r["server"] == server and r["mode"] in wanted and r["loop"] == loop and r["valid"]]


def _best(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return max(rows, key=lambda r: r["throughput"]) if rows else None


def _target(name: str, value: float | None, threshold: float, op: str, unit: str, detail: str) -> dict[str, Any]:
    met: bool | None
    if value is None:
        met = None
    elif op == ">=":
        met = value >= threshold
    elif op == "<":
        met = value < threshold
    else:
        met = value <= threshold
    return {
        "target": name,
        "value": None if value is None else _round(value, 3),
        "threshold": threshold,
        "op": op,
        "unit": unit,
        "met": met,
        "detail": detail,
    }


def targets(rows: Sequence[Mapping[str, Any]], soak: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Each target of the issue, met / missed / not measured, from this run's rows."""
    out = []
    broker = _best(_rows(rows, BROKER_MEMORY, ["unary"]))
    noop = _best(_rows(rows, REF_NOOP, ["unary"]))
    pyjwt = _best(_rows(rows, REF_PYJWT, ["unary"]))
    for ref, label, threshold in ((noop, REF_NOOP, UNARY_VS_NOOP_MIN), (pyjwt, REF_PYJWT, UNARY_VS_PYJWT_MIN)):
        if broker is not None and ref is not None and ref["throughput"] > 0:
            ratio: float | None = broker["throughput"] / ref["throughput"]
            detail = (
                f"best unary: {broker['throughput']:.0f}/s (c={broker['concurrency']}) vs "
                f"{ref['throughput']:.0f}/s (c={ref['concurrency']})"
            )
            if label == REF_NOOP and ref["generator_cpu_pct"] >= 90:
                detail += f"; generator at {ref['generator_cpu_pct']:.0f}% CPU: the ceiling may be the client's"
        else:
            ratio, detail = None, "not measured (needs unary, memory store and --references)"
        out.append(_target(f"unary (memory) / {label} throughput", ratio, threshold, ">=", "x", detail))

    half = [r for r in rows if r["server"] == BROKER_MEMORY and r["mode"] == "unary" and r["loop"] == "open"]
    if half:
        r = half[0]
        p99: float | None = r["latency_ms"]["p99"]
        detail = (
            f"open loop at {r['target_rate']:.0f}/s (half the best unary), {r['throughput']:.0f}/s served; "
            f"generator send lag p99 {r['send_lag_ms']['p99']:.2f} ms (not in the latency)"
        )
        if r["late"]:
            detail += f", {r['late']} requests could not be sent on time"
    else:
        p99, detail = None, "not measured (needs unary on the memory store)"
    out.append(_target("unary (memory) p99 at half the max throughput", p99, P99_AT_HALF_MAX_MS, "<=", "ms", detail))

    redis_best = _best(_rows(rows, BROKER_REDIS, ["batch", "stream"]))
    out.append(
        _target(
            "batch or stream (Redis) validations/s",
            redis_best["throughput"] if redis_best else None,
            REDIS_PIPELINED_MIN_VPS,
            ">=",
            "/s",
            f"best: {redis_best['mode']} at c={redis_best['concurrency']}"
            if redis_best
            else "not measured (needs batch or stream with the Redis store)",
        )
    )

    measured = [r for r in _rows(rows, BROKER_REDIS, ["unary", "stream", "batch"]) if "redis" in r]
    worst = max(measured, key=lambda r: r["redis"]["round_trips_per_validation"]) if measured else None
    out.append(
        _target(
            "Redis round trips per validation (worst level)",
            # Judged to two decimals: the server-wide counters also see a few reads that are
            # no validation's (the revocation subscriber's keepalive, the INFO calls).
            round(worst["redis"]["round_trips_per_validation"], 2) if worst else None,
            REDIS_ROUND_TRIPS_MAX,
            "<=",
            "",
            f"worst: {worst['mode']} c={worst['concurrency']} "
            f"({worst['redis']['commands_per_validation']:.2f} commands/validation)"
            if worst
            else "not measured (needs the Redis store)",
        )
    )
    pipelined = [r for r in measured if r["mode"] == "batch"]
    worst_batch = max(pipelined, key=lambda r: r["redis"]["round_trips_per_validation"]) if pipelined else None
    out.append(
        _target(
            "Redis round trips per validation, pipelined (batch, worst level)",
            worst_batch["redis"]["round_trips_per_validation"] if worst_batch else None,
            REDIS_ROUND_TRIPS_MAX,
            "<",
            "",
            f"batches of {round(worst_batch['validations'] / max(1, worst_batch['rpcs']))}: fewer than one"
            if worst_batch
            else "not measured (needs batch with the Redis store)",
        )
    )

    if soak is not None and soak.get("rss_mb", {}).get("first"):
        growth: float | None = soak["growth_fraction"]
        detail = (
            f"{soak['duration_s']:.0f} s of {soak['mode']} c={soak['concurrency']} on {soak['server']}"
            f" after {soak['warmup_s']:.0f} s of the same load: "
            f"RSS {soak['rss_mb']['first']:.1f} -> {soak['rss_mb']['last']:.1f} MB "
            f"(max {soak['rss_mb']['max']:.1f}), slope {soak['slope_mb_per_min']:+.2f} MB/min"
        )
    else:
        growth, detail = None, "not measured (run with --soak SECONDS)"
    out.append(_target("RSS trend over the soak / first RSS", growth, SOAK_GROWTH_MAX, "<=", "", detail))
    return out


# -- writing ------------------------------------------------------------------------------------


def write_json(path: Path, result: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(result, indent=2) + "\n")


def _verdict(target: Mapping[str, Any]) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[target["met"]]


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.3f}"


def markdown(result: Mapping[str, Any]) -> str:
    meta, rows = result["run"], result["rows"]
    lines = [
        f"# gRPC load test ({meta['started']})",
        "",
        f"`{meta['command']}`: {meta['cpus']} CPUs, load average {meta['load_before']} before and "
        f"{meta['load_after']} after; Python {meta['python']}, grpcio {meta['grpcio']}; "
        f"{meta['binding']} tokens ({meta['tokens']} distinct), {meta['duration']} s per level after "
        f"{meta['warmup']} s of warm-up, batches of {meta['batch_size']}. One generator process "
        "(grpc.aio); every server is a separate process on 127.0.0.1.",
        "",
        "## Targets",
        "",
        "| target | value | threshold | verdict | detail |",
        "|---|---|---|---|---|",
    ]
    for t in result["targets"]:
        threshold = f"{t['op']} {_fmt(t['threshold'], t['unit'])}"
        lines.append(f"| {t['target']} | {_fmt(t['value'], t['unit'])} | {threshold} | {_verdict(t)} | {t['detail']} |")
    for mode in meta["modes"]:
        mode_rows = [r for r in rows if r["mode"] == mode]
        if not mode_rows:
            continue
        lines += [
            "",
            f"## {mode}",
            "",
            "| server | in flight | validations/s | p50 ms | p90 ms | p99 ms | p99.9 ms | server CPU % | "
            "server RSS MB | redis CPU % | redis cmds/val | round trips/val | generator CPU % | valid |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in mode_rows:
            lat, redis = r["latency_ms"], r.get("redis")
            flight = f"{r['concurrency']}" if r["loop"] == "closed" else f"open @ {r['target_rate']:.0f}/s"
            valid = f"{r['valid']}/{r['validations']}" + (" (pool ran out)" if r["pool_exhausted"] else "")
            if r["errors"]:
                valid += " errors: " + ", ".join(f"{k} {v}" for k, v in r["errors"].items())
            lines.append(
                f"| {r['server']} | {flight} | {r['throughput']:,.0f} | {lat['p50']:.2f} | {lat['p90']:.2f} | "
                f"{lat['p99']:.2f} | {lat['p99.9']:.2f} | {r['server_cpu_pct']:.0f} | "
                f"{r['server_rss_mb']['max']:.0f} | "
                + (f"{r['redis_cpu_pct']:.0f}" if "redis_cpu_pct" in r else "-")
                + " | "
                + (
                    f"{redis['commands_per_validation']:.3f} | {redis['round_trips_per_validation']:.3f}"
                    if redis
                    else "- | -"
                )
                + f" | {r['generator_cpu_pct']:.0f} | {valid} |"
            )
    soak = result.get("soak")
    if soak:
        lines += [
            "",
            "## Soak",
            "",
            f"{soak['server']}, {soak['mode']} with {soak['concurrency']} in flight for {soak['duration_s']:.0f} s "
            f"(after {soak['warmup_s']:.0f} s of the same load, unrecorded) "
            f"({soak['throughput']:,.0f} validations/s, {soak['valid']}/{soak['validations']} valid): RSS first "
            f"{soak['rss_mb']['first']:.1f} MB, last {soak['rss_mb']['last']:.1f} MB, "
            f"max {soak['rss_mb']['max']:.1f} MB; "
            f"slope {soak['slope_mb_per_min']:+.2f} MB/min (second half {soak['slope_second_half_mb_per_min']:+.2f}).",
        ]
    lines += [
        "",
        "## How to read this",
        "",
        "- Closed loop: N requests in flight (stream: ceil(N/16) streams of up to 16). Latency is per RPC; a "
        "batch's latency is the whole batch's. The open-loop row sends at a fixed rate, never waiting for answers "
        "(no coordinated omission); its latency runs from the actual send, the generator's lag behind the "
        "schedule is in the targets' detail.",
        "- CPU %: 100 = one core (the machine has "
        f"{meta['cpus']}). A generator near 100 % means the client, not the server, may be the limit.",
        "- Redis: `total_commands_processed` and `total_reads_processed` (INFO stats) over the timed window, "
        "divided by validations; a read is one request (or pipeline) arriving on a connection: a round trip. "
        "Commands include those a Lua script runs. The counters are the whole server's, so a few reads that "
        "are no validation's (a subscriber's keepalive) are in them: the round-trip target is judged to two "
        "decimals.",
        "- Soak: DPoP proofs' replay records live 65 s (the proof window), so the RSS of a broker under a new "
        "load grows by design for its first 65 s; a soak after `--soak-warmup 65` or more shows the steady "
        "state.",
        "- References: `grpcio-noop` answers a fixed valid response (the transport's ceiling); `pyjwt-redis` "
        "checks the API key, verifies the token with PyJWT and the DPoP proof's signature and claims, and sets "
        "the proof's jti with `SET NX EX` (no sessions, no revocation).",
    ]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, result: Mapping[str, Any]) -> None:
    path.write_text(markdown(result))


def write_chart(path: Path, result: Mapping[str, Any]) -> None:
    """Throughput against p99 latency, one panel per mode, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    modes = [m for m in result["run"]["modes"] if any(r["mode"] == m for r in result["rows"])]
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(5.5 * max(1, len(modes)), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=False):
        for server in SERVER_TITLES:
            rows = sorted(
                (r for r in result["rows"] if r["server"] == server and r["mode"] == mode and r["loop"] == "closed"),
                key=lambda r: r["concurrency"],
            )
            rows = [r for r in rows if r["throughput"] > 0]
            if not rows:
                continue
            xs = [r["throughput"] for r in rows]
            ys = [max(r["latency_ms"]["p99"], 1e-3) for r in rows]
            (line,) = ax.plot(xs, ys, marker="o", label=SERVER_TITLES[server])
            for r, x, y in zip(rows, xs, ys, strict=True):
                ax.annotate(str(r["concurrency"]), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
            for r in result["rows"]:
                if r["server"] == server and r["mode"] == mode and r["loop"] == "open" and r["throughput"] > 0:
                    ax.plot(
                        [r["throughput"]], [max(r["latency_ms"]["p99"], 1e-3)], marker="*", markersize=12,
                        color=line.get_color(), linestyle="none",
                    )  # fmt: skip
        star = "; star: open loop at half the best" if mode == "unary" else ""
        ax.set_title(f"{mode} (labels: requests in flight{star})", fontsize=9)
        ax.set_xlabel("validations/s")
        ax.set_ylabel("p99 latency (ms)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis, fmt in ((ax.xaxis, "{:,.0f}"), (ax.yaxis, "{:g}")):
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _, f=fmt: f.format(v)))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"tokenbroker gRPC, {result['run']['started']} ({result['run']['cpus']} CPUs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_soak_chart(path: Path, soak: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    samples = soak["samples"]
    ax.plot([t for t, _ in samples], [v for _, v in samples], marker=".")
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MB)")
    ax.set_title(f"soak: {soak['server']}, {soak['mode']} c={soak['concurrency']}", fontsize=9)
    low = min(v for _, v in samples) if samples else 0.0
    ax.set_ylim(bottom=max(0.0, math.floor(low * 0.9)))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = [
    "ProcessSampler",
    "level_row",
    "markdown",
    "slope_per_minute",
    "soak_row",
    "targets",
    "write_chart",
    "write_json",
    "write_markdown",
    "write_soak_chart",
]
