"""Server CPU per request (the "measured speed" issue, section 7): the rows
`benches/cpu_per_request.py` measures, the targets they are judged by, and the table.

Why CPU per request: the load generator shares the machine's cores with the server, so a
ratio of throughputs is pulled towards 1 (whichever server is faster leaves the generator
less CPU). The server's own user+system time over a window, divided by the requests it
answered in that window, does not depend on how much CPU the generator took.

Every row is measured `repeat` times, the rows alternating, so slow drifts of the machine's
load hit every row alike. A row's figures are the medians of its repetitions; its ratio to
the do-nothing server is the median of the per-repetition ratios, each against the
do-nothing measurement of the same repetition (the nearest in time). Pure functions only:
no process is started here."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

NOOP = "noop"
BEARER = "bearer"
DPOP = "dpop"
BATCH_MEMORY = "batch-memory"
BATCH_REDIS = "batch-redis"
# The same loads with detection off: what watching every validation costs (issue 12's
# targets: <= 5 % on gRPC unary).
BEARER_UNWATCHED = "bearer-no-detection"
DPOP_UNWATCHED = "dpop-no-detection"
# Detection's share of the Redis batch path (its signals run inside the store's script).
BATCH_REDIS_UNWATCHED = "batch-redis-no-detection"

# The targets (section 7).
BEARER_CPU_RATIO_MAX = 1.15
DPOP_CPU_RATIO_MAX = 1.4
BATCH_REDIS_RATE_MIN = 15_000.0


@dataclass(frozen=True, slots=True)
class RowSpec:
    """What one row loads and how it is judged. `cpu_ratio_max`: the most CPU per request
    it may use, as a multiple of the do-nothing server's; `rate_min`: the fewest
    validations per second it must answer."""

    name: str
    title: str
    server: str  # "noop" (reference_noop) or "broker" (`tokenbroker serve`)
    store: str  # "memory" or "redis" (the broker's store; the noop has none)
    mode: str  # "unary" or "batch"
    dpop: bool  # DPoP-bound tokens, a fresh proof per request; else bearer tokens
    cpu_ratio_max: float | None = None
    rate_min: float | None = None
    detection: bool = True  # the broker watches every validation (its default)


ROWS: dict[str, RowSpec] = {
    spec.name: spec
    for spec in (
        RowSpec(NOOP, "grpcio do-nothing server (reference)", "noop", "memory", "unary", dpop=False),
        RowSpec(
            BEARER,
            "tokenbroker, bearer token (warm)",
            "broker",
            "memory",
            "unary",
            dpop=False,
            cpu_ratio_max=BEARER_CPU_RATIO_MAX,
        ),
        RowSpec(
            DPOP,
            "tokenbroker, DPoP token (cached), fresh proof per request",
            "broker",
            "memory",
            "unary",
            dpop=True,
            cpu_ratio_max=DPOP_CPU_RATIO_MAX,
        ),
        RowSpec(
            BEARER_UNWATCHED,
            "tokenbroker, bearer token (warm), detection off",
            "broker",
            "memory",
            "unary",
            dpop=False,
            detection=False,
        ),
        RowSpec(
            DPOP_UNWATCHED,
            "tokenbroker, DPoP token (cached), fresh proof per request, detection off",
            "broker",
            "memory",
            "unary",
            dpop=True,
            detection=False,
        ),
        RowSpec(BATCH_MEMORY, "tokenbroker, ValidateTokenBatch, DPoP, memory store", "broker", "memory", "batch", True),
        RowSpec(
            BATCH_REDIS,
            "tokenbroker, ValidateTokenBatch, DPoP, Redis store",
            "broker",
            "redis",
            "batch",
            dpop=True,
            rate_min=BATCH_REDIS_RATE_MIN,
        ),
        RowSpec(
            BATCH_REDIS_UNWATCHED,
            "tokenbroker, ValidateTokenBatch, DPoP, Redis store, detection off",
            "broker",
            "redis",
            "batch",
            dpop=True,
            detection=False,
        ),
    )
}
# The order rows run in within a repetition. The do-nothing server runs second: it is sent
# the bearer row's requests (the same bytes on the wire), so the bearer broker issues them.
RUN_ORDER = (BEARER, NOOP, BEARER_UNWATCHED, DPOP, DPOP_UNWATCHED, BATCH_MEMORY, BATCH_REDIS, BATCH_REDIS_UNWATCHED)


def parse_rows(text: str) -> tuple[str, ...]:
    """A comma-separated choice of rows, in run order."""
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = chosen - set(ROWS)
    if unknown or not chosen:
        raise ValueError(f"rows: choose from {', '.join(ROWS)} (got {text!r})")
    return tuple(name for name in RUN_ORDER if name in chosen)


@dataclass(frozen=True, slots=True)
class Measurement:
    """One window of one row: the validations answered in it, its wall time, and the CPU
    seconds the server (and Redis, for the Redis row) and the generator used in it."""

    row: str
    repeat: int
    validations: int
    wall_s: float
    server_cpu_s: float
    generator_cpu_s: float
    redis_cpu_s: float | None = None

    @property
    def rate(self) -> float:
        """Validations (requests, for unary rows) per second."""
        return self.validations / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        """Server CPU microseconds per validation."""
        return 1e6 * self.server_cpu_s / self.validations if self.validations else 0.0

    @property
    def generator_pct(self) -> float:
        """The generator's CPU over the window (100 = one core)."""
        return 100.0 * self.generator_cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def redis_cpu_us(self) -> float | None:
        if self.redis_cpu_s is None or not self.validations:
            return None
        return 1e6 * self.redis_cpu_s / self.validations


@dataclass(frozen=True, slots=True)
class RowSummary:
    """A row over its repetitions, and its verdict (`met` None when the row has no target
    or its reference was not measured)."""

    row: str
    title: str
    repeats: int
    rate: float
    cpu_us: float
    cpu_us_min: float
    cpu_us_max: float
    ratio: float | None  # CPU per request / the do-nothing server's
    target: str
    met: bool | None


def _median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def cpu_ratios(measurements: Sequence[Measurement], row: str) -> list[float]:
    """`row`'s CPU per request over the do-nothing server's, one ratio per repetition
    in which both were measured."""
    noop = {m.repeat: m.cpu_us for m in measurements if m.row == NOOP and m.cpu_us > 0}
    return [m.cpu_us / noop[m.repeat] for m in measurements if m.row == row and m.repeat in noop]


def target_text(spec: RowSpec) -> str:
    if spec.cpu_ratio_max is not None:
        return f"<= {spec.cpu_ratio_max:.2f}x"
    if spec.rate_min is not None:
        return f">= {spec.rate_min:,.0f}/s"
    return "-"


def verdict(spec: RowSpec, rate: float, ratio: float | None) -> bool | None:
    """Met (True), missed (False), or nothing to judge (None)."""
    if spec.cpu_ratio_max is not None:
        return None if ratio is None else ratio <= spec.cpu_ratio_max
    if spec.rate_min is not None:
        return rate >= spec.rate_min
    return None


def summarise(measurements: Sequence[Measurement]) -> list[RowSummary]:
    """One summary per measured row, in the table's order (the order of `ROWS`)."""
    summaries = []
    for name, spec in ROWS.items():
        mine = [m for m in measurements if m.row == name]
        if not mine:
            continue
        rate = _median(m.rate for m in mine)
        cpu = [m.cpu_us for m in mine]
        ratios = cpu_ratios(measurements, name)
        ratio = 1.0 if name == NOOP else (_median(ratios) if ratios else None)
        summaries.append(
            RowSummary(
                row=name,
                title=spec.title,
                repeats=len(mine),
                rate=rate,
                cpu_us=_median(cpu),
                cpu_us_min=min(cpu),
                cpu_us_max=max(cpu),
                ratio=ratio,
                target=target_text(spec),
                met=verdict(spec, rate, ratio),
            )
        )
    return summaries


def _met(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "-"}[met]


def table(summaries: Sequence[RowSummary], *, batch_size: int) -> str:
    """The Markdown table of the issue: server | requests/s | CPU per request (us) | ratio
    to do-nothing | target | met?"""
    lines = [
        "| server | requests/s | CPU per request (us) | ratio to do-nothing | target | met? |",
        "|---|---:|---:|---:|---|---|",
    ]
    for s in summaries:
        title = s.title
        if ROWS[s.row].mode == "batch":
            title += f" (batches of {batch_size}; per validation)"
        ratio = "-" if s.ratio is None else f"{s.ratio:.2f}x"
        lines.append(f"| {title} | {s.rate:,.0f} | {s.cpu_us:,.1f} | {ratio} | {s.target} | {_met(s.met)} |")
    return "\n".join(lines)


def runs_table(measurements: Sequence[Measurement]) -> str:
    """Every window, so the spread behind each median can be seen."""
    lines = [
        "| row | repeat | requests/s | server CPU per request (us) | redis CPU per request (us) | generator CPU % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in sorted(measurements, key=lambda m: (list(ROWS).index(m.row), m.repeat)):
        redis = "-" if m.redis_cpu_us is None else f"{m.redis_cpu_us:,.1f}"
        lines.append(
            f"| {m.row} | {m.repeat + 1} | {m.rate:,.0f} | {m.cpu_us:,.1f} | {redis} | {m.generator_pct:.0f} |"
        )
    return "\n".join(lines)


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


def markdown(meta: Mapping[str, Any], summaries: Sequence[RowSummary], measurements: Sequence[Measurement]) -> str:
    load = ", ".join(f"{x:.2f}" for x in meta["load_before"])
    load_after = ", ".join(f"{x:.2f}" for x in meta["load_after"])
    return "\n".join(
        [
            f"# Server CPU per request ({meta['started']})",
            "",
            f"`{meta['command']}`: {meta['cpus']} CPUs, load average {load} before and {load_after} after; "
            f"Python {meta['python']}, grpcio {meta['grpcio']}. Each row: {meta['warmup']:g} s of warm-up, then "
            f"{meta['duration']:g} s timed, {_times(int(meta['repeat']))} (rows alternating); unary rows "
            f"{meta['concurrency']} `ValidateToken` calls in flight, batch rows {meta['batch_concurrency']} "
            f"`ValidateTokenBatch` calls of {meta['batch_size']} in flight; {meta['tokens']} distinct tokens. "
            "The generator is a process of its own; each server is started afresh for each window.",
            "",
            table(summaries, batch_size=int(meta["batch_size"])),
            "",
            "- CPU per request: the server process's user+system CPU time over the timed window, divided by "
            "the requests it answered in it (validations, for batches); the median of the repetitions.",
            "- Ratio: the median over repetitions of the row's CPU per request divided by the do-nothing "
            "server's in the same repetition. Requests/s is the median rate, the generator sharing the cores.",
            "- Cold validate >= 0.9x the core's raw Ed25519 verify is not measured here: it is the embedded "
            "pytest-benchmark (`benches/report.py`, from `pytest benches --benchmark-enable` and criterion).",
            "",
            "## Every window",
            "",
            runs_table(measurements),
            "",
        ]
    )


def result_json(
    meta: Mapping[str, Any], summaries: Sequence[RowSummary], measurements: Sequence[Measurement]
) -> dict[str, Any]:
    return {
        "run": dict(meta),
        "rows": [asdict(s) for s in summaries],
        "measurements": [
            {**asdict(m), "rate": m.rate, "cpu_us": m.cpu_us, "generator_pct": m.generator_pct} for m in measurements
        ],
    }


def answer_problems(
    row: str, *, validations: int, valid: int, reasons: Mapping[str, int], errors: Mapping[str, int]
) -> str:
    """Why a window cannot be counted, or "" when every answer was valid: an RPC error,
    an invalid answer (every broker answer must be valid=true), or no answer at all."""
    problems = []
    if errors:
        problems.append(f"RPC errors {dict(errors)}")
    if valid != validations:
        bad = {name: count for name, count in reasons.items() if name != "OK"}
        problems.append(f"{validations - valid} of {validations} answers not valid {bad}")
    if not validations:
        problems.append("no answers in the window")
    return f"{row}: " + "; ".join(problems) if problems else ""


__all__ = [
    "BATCH_MEMORY",
    "BATCH_REDIS",
    "BEARER",
    "DPOP",
    "NOOP",
    "ROWS",
    "RUN_ORDER",
    "Measurement",
    "RowSpec",
    "RowSummary",
    "answer_problems",
    "cpu_ratios",
    "markdown",
    "parse_rows",
    "result_json",
    "runs_table",
    "summarise",
    "table",
    "target_text",
    "verdict",
]
