"""Side-by-side table of the core's criterion benches built portable and with
`-C target-cpu=native` (`make bench-cpu`), to show what the native flags are worth.

    python scripts/bench_cpu_table.py PORTABLE_DIR NATIVE_DIR [--since FILE] [-o OUT.md]

Each directory is a criterion output folder (`target/portable/criterion`): the mean of
every `<bench id>/new/estimates.json` in it, with criterion's 95 % confidence interval.
`--since FILE` leaves out estimates older than FILE, so a run filtered to a few benches
does not show an earlier run's figures as its own. Exits 1 when no bench is found.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Estimate:
    """Criterion's mean time per iteration of one bench, in nanoseconds, and its 95 % interval."""

    mean_ns: float
    low_ns: float
    high_ns: float

    def overlaps(self, other: Estimate) -> bool:
        return self.low_ns <= other.high_ns and other.low_ns <= self.high_ns


def load_estimates(directory: Path, since: float) -> dict[str, Estimate]:
    """The benches under `directory` measured at or after `since` (Unix time), by criterion
    id: `validate_warm`, or `group/function` such as `validate_batch_cold/64`."""
    found = {}
    for path in sorted(directory.glob("**/new/estimates.json")):
        if path.stat().st_mtime < since:
            continue
        mean = json.loads(path.read_text())["mean"]
        interval = mean["confidence_interval"]
        bench_id = path.parent.parent.relative_to(directory).as_posix()
        found[bench_id] = Estimate(
            float(mean["point_estimate"]), float(interval["lower_bound"]), float(interval["upper_bound"])
        )
    return found


def duration(ns: float) -> str:
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def cell(estimate: Estimate | None) -> str:
    if estimate is None:
        return "not run"
    half_width = (estimate.high_ns - estimate.low_ns) / 2
    return f"{duration(estimate.mean_ns)} ± {duration(half_width)}"


def speedup(portable: Estimate | None, native: Estimate | None) -> str:
    """How many times faster the native build is; within noise when the intervals overlap."""
    if portable is None or native is None:
        return "not run"
    ratio = f"{portable.mean_ns / native.mean_ns:.2f}x"
    return f"{ratio} (within noise)" if portable.overlaps(native) else ratio


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def render(portable: dict[str, Estimate], native: dict[str, Estimate]) -> str:
    rows = [
        f"| `{bench_id}` | {cell(portable.get(bench_id))} | {cell(native.get(bench_id))} | "
        f"{speedup(portable.get(bench_id), native.get(bench_id))} |"
        for bench_id in sorted(portable.keys() | native.keys())
    ]
    return "\n".join(
        [
            "# Rust core: portable build vs `-C target-cpu=native`",
            "",
            f"`cargo bench -p tokenbroker-core --bench core`, both builds in one run on {cpu_model()}. "
            "Mean time per iteration, ± half criterion's 95 % confidence interval; the speed-up is "
            "portable mean / native mean.",
            "",
            "| bench | portable | native | native speed-up |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("portable", type=Path, help="criterion directory of the portable build")
    parser.add_argument("native", type=Path, help="criterion directory of the native build")
    parser.add_argument("--since", type=Path, help="leave out estimates older than this file")
    parser.add_argument("-o", "--output", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    since = args.since.stat().st_mtime if args.since else 0.0
    portable, native = load_estimates(args.portable, since), load_estimates(args.native, since)
    if not portable and not native:
        print(f"no criterion estimates under {args.portable} or {args.native}", file=sys.stderr)
        return 1
    table = render(portable, native)
    print(table, end="")
    if args.output:
        args.output.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
