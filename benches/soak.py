"""The soak: `--minutes` (10) of the chaos suite's mixed load, with no fault, on two real
`tokenbroker serve` processes sharing one real redis-server: IssueToken, ValidateToken
with DPoP, replayed proofs, RevokeSession, OAuth `/token` and replayed assertions, every
answer judged as in the chaos suite (tests/support/chaos.py).

It reports, per minute: answers, errors (anything but a correct decision: UNAVAILABLE,
failures, rule violations), p50 and p99 of the answers; and for the whole run: the
brokers' RSS slope (least squares over the samples after the first minute, MiB per
minute, per broker) and their threads at the start and the end. It exits 1 on any error.

    .venv/bin/python benches/soak.py [--minutes 10] [--json out.json] [--markdown out.md]

`make soak` runs it (not part of CI: it takes the whole machine for ten minutes)."""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support.chaos import FAILED, OK, REFUSED, UNAVAILABLE, ChaosDeployment, Traffic  # type: ignore[import-not-found,unused-ignore]  # noqa: E402
from support.redis_servers import RedisServer  # type: ignore[import-not-found,unused-ignore]  # noqa: E402


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(traffic: Traffic, started: float, minutes: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for minute in range(minutes):
        lo, hi = started + 60 * minute, started + 60 * (minute + 1)
        answers = [a for a in traffic.answers if lo <= a.sent < hi]
        in_minute = [stats for t, stats in traffic.samples if lo <= t < hi]
        errors = [a for a in answers if a.outcome not in (OK, REFUSED)]
        latencies = [a.latency * 1000 for a in answers]
        rows.append(
            {
                "minute": minute + 1,
                "answers": len(answers),
                "errors": len(errors),
                "p50_ms": round(percentile(latencies, 0.50), 2),
                "p99_ms": round(percentile(latencies, 0.99), 2),
                # The brokers' RSS at the minute's last sample, MiB, one per broker.
                "rss_mib": [round(b[1] / 1024, 1) for b in in_minute[-1]] if in_minute else [],
            }
        )
    brokers = len(traffic.samples[0][1]) if traffic.samples else 0
    slopes, late_slopes, threads = [], [], []
    for b in range(brokers):
        points = [((t - started) / 60, s[b][1] / 1024) for t, s in traffic.samples if t - started >= 60 and s[b][1]]
        slopes.append(round(slope(points), 3))
        late = [(x, y) for x, y in points if x >= minutes / 2]
        late_slopes.append(round(slope(late), 3))
        threads.append((traffic.samples[0][1][b][0], traffic.samples[-1][1][b][0]))
    rss = [[round(s[b][1] / 1024, 1) for b in range(brokers)] for _, s in (traffic.samples[0], traffic.samples[-1])]
    p99s = [r["p99_ms"] for r in rows if r["answers"]]
    return {
        "minutes": minutes,
        "answers": len(traffic.answers),
        "errors": sum(r["errors"] for r in rows),
        "violations": list(traffic.violations),
        "unavailable": sum(1 for a in traffic.answers if a.outcome == UNAVAILABLE),
        "failed": sum(1 for a in traffic.answers if a.outcome == FAILED),
        "per_minute": rows,
        "rss_slope_mib_per_minute": slopes,
        "rss_slope_second_half_mib_per_minute": late_slopes,
        "rss_start_end_mib": rss,
        "threads_start_end": threads,
        "p99_min_max_ms": [min(p99s, default=0), max(p99s, default=0)],
    }


def markdown(s: dict[str, Any]) -> str:
    lines = [
        f"{s['minutes']} minutes, {s['answers']:,} answers checked, {s['errors']} errors "
        f"({s['unavailable']} UNAVAILABLE, {s['failed']} failed, {len(s['violations'])} rule violations).",
        "",
        "| minute | answers | errors | p50 | p99 | broker RSS (MiB) |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['minute']} | {r['answers']:,} | {r['errors']} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms "
        f"| {' / '.join(f'{x:.0f}' for x in r['rss_mib'])} |"
        for r in s["per_minute"]
    ]
    slopes = ", ".join(f"{x:+.3f}" for x in s["rss_slope_mib_per_minute"])
    late = ", ".join(f"{x:+.3f}" for x in s["rss_slope_second_half_mib_per_minute"])
    (start, end) = s["rss_start_end_mib"]
    lines += [
        "",
        f"Broker RSS slope after the first minute: {slopes} MiB/min (one per broker); over the second half: "
        f"{late} MiB/min; RSS at start {start} MiB, "
        f"at end {end} MiB. Threads start/end: {s['threads_start_end']}. p99 per minute between "
        f"{s['p99_min_max_ms'][0]:.2f} and {s['p99_min_max_ms'][1]:.2f} ms.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4, help="load threads (default 4)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.minutes < 1 or args.workers < 1:
        parser.error("--minutes and --workers must be at least 1")
    redis = RedisServer().start()
    with tempfile.TemporaryDirectory(prefix="tb-soak-") as workdir:
        deployment = ChaosDeployment(Path(workdir), {"TOKENBROKER_REDIS_URL": redis.url})
        try:
            deployment.start_brokers(2)
            traffic = Traffic(deployment, workers=args.workers).start()
            started = time.monotonic()
            for minute in range(args.minutes):
                traffic.run_for(60)
                # The judge keeps every answer: without this, the load generator's own
                # garbage collections walk a heap that grows all run and slow the load.
                gc.collect()
                gc.freeze()
                done = [a for a in traffic.answers if a.sent >= started + 60 * minute]
                bad = sum(1 for a in done if a.outcome not in (OK, REFUSED))
                print(f"minute {minute + 1}/{args.minutes}: {len(done):,} answers, {bad} errors", file=sys.stderr)
            traffic.stop()
            summary = summarise(traffic, started, args.minutes)
        finally:
            deployment.stop()
            redis.stop()
    text = markdown(summary)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if summary["errors"] or summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
