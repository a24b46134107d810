"""The rows of the token endpoint bench (`benches/token_endpoint.py`), the figures drawn
from its windows, the verdicts and the Markdown. Pure functions only: no process is
started here.

Every row is measured `repeat` times, the rows alternating, so a slow drift of the
machine's load hits every row alike; a row's figures are the medians of its windows.
Server CPU per grant (the server process's user+system time over the window, divided by
the grants it answered in it) does not depend on how much CPU the load generator took,
which is why it, not the rate, decides the HTTP stack; grants/s per vCPU is its inverse."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Keycloak's published sizing (High Availability guide, "Concepts for sizing CPU and memory
# resources"): one vCPU per 120 client credential grants per second, "tested with up to
# 2000 per second"; each of their clients runs one request, so "most CPU time goes into
# creating new TLS connections". Their figure, not measured here.
KEYCLOAK_GRANTS_PER_VCPU = 120.0
SERVE = "serve"  # `tokenbroker serve`, as shipped (uvicorn pinned to httptools)


@dataclass(frozen=True, slots=True)
class RowSpec:
    """What one row loads: the server (`serve` or a stack of `token_deployment.STACKS`), its
    store, the client (`"EdDSA/bearer"`, ...) and the clients in flight (None: the run's).
    `group` "stack": a row of the HTTP stack comparison, judged against `stack-h11`;
    `candidate`: a stack `serve` could be given (the proto0-socket row only shows a cost)."""

    name: str
    title: str
    server: str
    store: str
    client: str
    concurrency: int | None = None
    group: str = "main"
    candidate: bool = False


def _stack(name: str, title: str, server: str, *, concurrency: int | None = None, candidate: bool = True) -> RowSpec:
    return RowSpec(name, title, server, "memory", "EdDSA/bearer", concurrency, "stack", candidate)


ROWS: dict[str, RowSpec] = {
    spec.name: spec
    for spec in (
        RowSpec("eddsa-bearer", "EdDSA assertion, Bearer token", SERVE, "memory", "EdDSA/bearer"),
        RowSpec("es256-bearer", "ES256 assertion, Bearer token", SERVE, "memory", "ES256/bearer"),
        RowSpec("rs256-bearer", "RS256 assertion, Bearer token", SERVE, "memory", "RS256/bearer"),
        RowSpec("eddsa-dpop", "EdDSA assertion, DPoP-bound token (fresh proof)", SERVE, "memory", "EdDSA/dpop"),
        RowSpec("eddsa-bearer-c1", "EdDSA assertion, Bearer token, one client", SERVE, "memory", "EdDSA/bearer", 1),
        RowSpec("redis-eddsa-bearer", "Redis store: EdDSA assertion, Bearer token", SERVE, "redis", "EdDSA/bearer"),
        RowSpec("redis-eddsa-dpop", "Redis store: EdDSA assertion, DPoP-bound token", SERVE, "redis", "EdDSA/dpop"),
        _stack(
            "stack-h11-proto0-socket",
            "h11, asyncio, a protocol-0 socket (`serve`'s before the fix: no TCP_NODELAY)",
            "h11-proto0-socket",
            candidate=False,
        ),
        _stack("stack-h11", "h11, asyncio", "h11"),
        _stack("stack-h11-c1", "h11, asyncio, one client", "h11", concurrency=1, candidate=False),
        _stack("stack-httptools", "httptools, asyncio", "httptools"),
        _stack("stack-httptools-uvloop", "httptools, uvloop", "httptools+uvloop"),
    )
}
HEADLINE = "eddsa-bearer"


def parse_rows(text: str) -> tuple[str, ...]:
    """A comma-separated choice of rows, in the order of `ROWS`."""
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = chosen - set(ROWS)
    if unknown or not chosen:
        raise ValueError(f"rows: choose from {', '.join(ROWS)} (got {text!r})")
    return tuple(name for name in ROWS if name in chosen)


@dataclass(frozen=True, slots=True)
class Window:
    """One timed window of one row."""

    row: str
    repeat: int
    concurrency: int
    grants: int
    wall_s: float
    server_cpu_s: float
    generator_cpu_s: float
    p50_ms: float
    p99_ms: float
    redis_cpu_s: float | None = None

    @property
    def rate(self) -> float:
        return self.grants / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        """Server CPU microseconds per grant."""
        return 1e6 * self.server_cpu_s / self.grants if self.grants else 0.0

    @property
    def redis_cpu_us(self) -> float | None:
        return None if self.redis_cpu_s is None or not self.grants else 1e6 * self.redis_cpu_s / self.grants

    @property
    def generator_pct(self) -> float:
        return 100.0 * self.generator_cpu_s / self.wall_s if self.wall_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class SdkWindow:
    """One window of the SDK-style loop: tokens, wall time, CPU seconds of the loop itself,
    of the broker and of the resource stub, and its latency per token."""

    repeat: int
    tokens: int
    wall_s: float
    loop_cpu_s: float
    broker_cpu_s: float
    resource_cpu_s: float
    p50_ms: float
    p99_ms: float
    requests_per_token: float

    @property
    def rate(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def per_token_ms(self, seconds: float) -> float:
        return 1e3 * seconds / self.tokens if self.tokens else 0.0


@dataclass(frozen=True, slots=True)
class RowSummary:
    row: str
    title: str
    server: str
    store: str
    concurrency: int
    windows: int
    rate: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    cpu_us_min: float
    cpu_us_max: float
    redis_cpu_us: float | None
    generator_pct: float

    @property
    def per_vcpu(self) -> float:
        """Grants a second one vCPU of the server would answer: 1 / CPU per grant."""
        return 1e6 / self.cpu_us if self.cpu_us > 0 else 0.0


def _median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def summarise(windows: Sequence[Window]) -> list[RowSummary]:
    summaries = []
    for name, spec in ROWS.items():
        mine = [w for w in windows if w.row == name]
        if not mine:
            continue
        cpu = [w.cpu_us for w in mine]
        redis = [w.redis_cpu_us for w in mine if w.redis_cpu_us is not None]
        summaries.append(
            RowSummary(
                row=name,
                title=spec.title,
                server=spec.server,
                store=spec.store,
                concurrency=mine[0].concurrency,
                windows=len(mine),
                rate=_median(w.rate for w in mine),
                p50_ms=_median(w.p50_ms for w in mine),
                p99_ms=_median(w.p99_ms for w in mine),
                cpu_us=_median(cpu),
                cpu_us_min=min(cpu),
                cpu_us_max=max(cpu),
                redis_cpu_us=_median(redis) if redis else None,
                generator_pct=_median(w.generator_pct for w in mine),
            )
        )
    return summaries


@dataclass(frozen=True, slots=True)
class SdkSummary:
    windows: int
    rate: float
    p50_ms: float
    p99_ms: float
    loop_cpu_ms: float  # the SDK client's own CPU per token
    broker_cpu_ms: float
    resource_cpu_ms: float
    requests_per_token: float


def summarise_sdk(windows: Sequence[SdkWindow]) -> SdkSummary | None:
    if not windows:
        return None
    return SdkSummary(
        windows=len(windows),
        rate=_median(w.rate for w in windows),
        p50_ms=_median(w.p50_ms for w in windows),
        p99_ms=_median(w.p99_ms for w in windows),
        loop_cpu_ms=_median(w.per_token_ms(w.loop_cpu_s) for w in windows),
        broker_cpu_ms=_median(w.per_token_ms(w.broker_cpu_s) for w in windows),
        resource_cpu_ms=_median(w.per_token_ms(w.resource_cpu_s) for w in windows),
        requests_per_token=_median(w.requests_per_token for w in windows),
    )


@dataclass(frozen=True, slots=True)
class StackChoice:
    """The candidate HTTP stack with the least server CPU per grant, and each stack row's
    CPU per grant relative to `stack-h11` (median of per-repetition ratios: each against
    h11's window of the same repetition)."""

    best: str
    ratios: dict[str, float]


def stack_choice(windows: Sequence[Window]) -> StackChoice | None:
    h11 = {w.repeat: w.cpu_us for w in windows if w.row == "stack-h11" and w.cpu_us > 0}
    ratios: dict[str, float] = {}
    for name, spec in ROWS.items():
        per_repeat = [w.cpu_us / h11[w.repeat] for w in windows if w.row == name and w.repeat in h11]
        if spec.group == "stack" and per_repeat:
            ratios[name] = _median(per_repeat)
    candidates = [name for name in ratios if ROWS[name].candidate]
    if len(candidates) < 2:
        return None
    return StackChoice(best=min(candidates, key=lambda name: ratios[name]), ratios=ratios)


# -- Markdown -------------------------------------------------------------------------------


def _redis(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def rows_table(summaries: Sequence[RowSummary], server_labels: Mapping[str, str]) -> str:
    lines = [
        "| row | server | clients | grants/s | p50 ms | p99 ms | server CPU per grant (us) | grants/s per vCPU "
        "| vs Keycloak's 120 | Redis CPU per grant (us) | generator CPU % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        server = server_labels.get(s.server, s.server) + ("" if s.store == "memory" else f", {s.store}")
        lines.append(
            f"| {s.title} | {server} | {s.concurrency} | {s.rate:,.0f} | {s.p50_ms:.1f} | {s.p99_ms:.1f} "
            f"| {s.cpu_us:,.0f} ({s.cpu_us_min:,.0f}-{s.cpu_us_max:,.0f}) | {s.per_vcpu:,.0f} "
            f"| {s.per_vcpu / KEYCLOAK_GRANTS_PER_VCPU:.1f}x | {_redis(s.redis_cpu_us)} | {s.generator_pct:.0f} |"
        )
    return "\n".join(lines)


def windows_table(windows: Sequence[Window]) -> str:
    lines = [
        "| row | repeat | clients | grants/s | p50 ms | p99 ms | server CPU per grant (us) | Redis (us) "
        "| generator % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in sorted(windows, key=lambda w: (list(ROWS).index(w.row), w.repeat)):
        lines.append(
            f"| {w.row} | {w.repeat + 1} | {w.concurrency} | {w.rate:,.0f} | {w.p50_ms:.1f} | {w.p99_ms:.1f} "
            f"| {w.cpu_us:,.0f} | {_redis(w.redis_cpu_us)} | {w.generator_pct:.0f} |"
        )
    return "\n".join(lines)


def _find(summaries: Sequence[RowSummary], row: str) -> RowSummary | None:
    return next((s for s in summaries if s.row == row), None)


def _ratio_line(summaries: Sequence[RowSummary], row: str, base: str, what: str) -> str | None:
    mine, theirs = _find(summaries, row), _find(summaries, base)
    if mine is None or theirs is None or not theirs.cpu_us:
        return None
    return (
        f"- {what}: {mine.cpu_us:,.0f} vs {theirs.cpu_us:,.0f} us of server CPU per grant "
        f"(**{mine.cpu_us / theirs.cpu_us:.2f}x**), {mine.rate:,.0f} vs {theirs.rate:,.0f} grants/s."
    )


def comparisons(summaries: Sequence[RowSummary]) -> list[str]:
    lines = [
        _ratio_line(summaries, "es256-bearer", "eddsa-bearer", "ES256 against EdDSA assertions"),
        _ratio_line(summaries, "rs256-bearer", "eddsa-bearer", "RS256 (2048-bit) against EdDSA assertions"),
        _ratio_line(summaries, "eddsa-dpop", "eddsa-bearer", "DPoP-bound against Bearer tokens"),
        _ratio_line(summaries, "redis-eddsa-bearer", "eddsa-bearer", "Redis store against the memory store (Bearer)"),
        _ratio_line(summaries, "redis-eddsa-dpop", "eddsa-dpop", "Redis store against the memory store (DPoP)"),
        _ratio_line(
            summaries,
            "eddsa-bearer",
            "stack-httptools",
            "`tokenbroker serve` (the gRPC server beside the HTTP door, in one process) against the HTTP app alone "
            "(httptools)",
        ),
        _ratio_line(
            summaries,
            "stack-h11-proto0-socket",
            "stack-h11",
            "h11 on a protocol-0 socket (`serve` before the TCP_NODELAY fix) against h11 on an IPPROTO_TCP socket",
        ),
    ]
    return [line for line in lines if line]


def sdk_lines(sdk: SdkSummary | None, summaries: Sequence[RowSummary]) -> list[str]:
    if sdk is None:
        return ["Not measured in this run."]
    head = _find(summaries, HEADLINE)
    lines = [
        "| SDK-style loop (one client) | tokens/s | p50 ms per token | p99 ms | HTTP requests per token "
        "| SDK client CPU per token (ms) | broker CPU per token (ms) | resource CPU per token (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| `PrivateKeyJWTOAuthProvider`, RS256 | {sdk.rate:,.1f} | {sdk.p50_ms:.1f} | {sdk.p99_ms:.1f} "
        f"| {sdk.requests_per_token:.1f} | {sdk.loop_cpu_ms:.1f} | {sdk.broker_cpu_ms:.2f} "
        f"| {sdk.resource_cpu_ms:.2f} |",
        "",
    ]
    if head is not None and sdk.rate > 0:
        spent = sdk.broker_cpu_ms + sdk.loop_cpu_ms + sdk.resource_cpu_ms
        share = 100.0 * sdk.broker_cpu_ms / spent if spent > 0 else 0.0
        lines.append(
            f"One SDK client gets **{sdk.rate:,.1f} tokens/s**; the broker answered **{head.rate:,.0f} grants/s** "
            f"({head.concurrency} clients, same run), **{head.rate / sdk.rate:,.1f}x** that. Of the CPU one SDK "
            f"token cost in this run, the broker's share (its metadata and the grant) was {share:.0f}%, the SDK "
            f"client's own {100.0 * sdk.loop_cpu_ms / spent if spent > 0 else 0.0:.0f}%."
        )
        if head.rate > sdk.rate and share < 50.0:
            lines.append(
                "So the ceiling an SDK client meets is its own per-token work (discovery again for every token, "
                "the assertion's RS256 signature with the key parsed from PEM each time, the SDK's parsing and "
                "validation), not the broker."
            )
        else:
            lines.append("In this run the broker, not the SDK client, was the larger cost of a token.")
    return lines


def stack_lines(choice: StackChoice | None, summaries: Sequence[RowSummary], auto_http: str) -> list[str]:
    if choice is None:
        return ["The HTTP stacks were not all measured in this run (httptools or uvloop not importable?)."]
    lines = []
    for name, ratio in sorted(choice.ratios.items(), key=lambda item: item[1]):
        s = _find(summaries, name)
        if s is not None:
            lines.append(
                f"- {s.title}: {s.cpu_us:,.0f} us of server CPU per grant, {s.rate:,.0f} grants/s, p50 "
                f"{s.p50_ms:.1f} ms ({s.concurrency} client{'s' if s.concurrency > 1 else ''}); "
                f"**{ratio:.2f}x** h11's CPU per grant."
            )
    best = _find(summaries, choice.best)
    title = best.title if best is not None else choice.best
    lines += [
        "",
        f"Least server CPU per grant in this run: **{title}** ({choice.ratios[choice.best]:.2f}x h11; ratios are "
        'medians of per-repetition ratios). `tokenbroker serve` pins `http="httptools"` (this comparison chose it; '
        f"uvicorn's `auto` would pick {auto_http} in this environment).",
    ]
    return lines


def stall_lines(summaries: Sequence[RowSummary]) -> list[str]:
    """One client alone shows what a request waits for besides the server's work: against
    `serve` and against the same app on a TCP_NODELAY socket."""
    served, fixed = _find(summaries, "eddsa-bearer-c1"), _find(summaries, "stack-h11-c1")
    if served is None or fixed is None:
        return []
    lines = [
        f"- One client alone: p50 **{served.p50_ms:.1f} ms** per grant against `tokenbroker serve` "
        f"({served.rate:,.0f} grants/s), **{fixed.p50_ms:.1f} ms** against the same app under h11 on a socket "
        f"made with IPPROTO_TCP ({fixed.rate:,.0f} grants/s); the server's CPU per grant is "
        f"{served.cpu_us / 1e3:.1f} and {fixed.cpu_us / 1e3:.1f} ms."
    ]
    head = _find(summaries, HEADLINE)
    if served.p50_ms > 10 * served.cpu_us / 1e3 and served.p50_ms > 5 * fixed.p50_ms:
        cap = (
            f" (here {head.concurrency} / {served.p50_ms:.0f} ms = {head.concurrency / served.p50_ms * 1e3:,.0f})"
            if head
            else ""
        )
        lines.append(
            "  **`serve`'s answers wait for the client's delayed ACK.** Its HTTP socket is made with protocol 0, "
            "so asyncio sets no TCP_NODELAY on its connections (`_set_nodelay` wants `proto == IPPROTO_TCP`), "
            "and an answer written in two parts (head, then body) holds the second back (Nagle) until the "
            "client acknowledges the first, about 40 ms on Linux. So `serve` answers at most one grant per "
            f"connection per stall, clients / stall a second{cap}, whatever its CPU: the `serve` rows "
            "measure that cap, not the server's capacity, and their CPU per grant includes an idle loop's "
            "wake-ups. The `stack-` rows are the app without the stall."
        )
    return lines


def markdown(
    meta: Mapping[str, Any],
    summaries: Sequence[RowSummary],
    windows: Sequence[Window],
    sdk: SdkSummary | None,
    choice: StackChoice | None,
) -> str:
    labels = {SERVE: "`tokenbroker serve` (uvicorn, httptools)"}
    head = _find(summaries, HEADLINE)
    verdict = "-"
    if head is not None:
        met = head.per_vcpu >= KEYCLOAK_GRANTS_PER_VCPU
        verdict = (
            f"`tokenbroker serve`, {head.per_vcpu:,.0f} grants/s per vCPU (EdDSA, Bearer, memory store): "
            f"**{head.per_vcpu / KEYCLOAK_GRANTS_PER_VCPU:.1f}x** Keycloak's published 120, "
            + ("met" if met else "**missed**")
        )
        for row in ("stack-h11", "redis-eddsa-dpop"):
            other = _find(summaries, row)
            if other is not None:
                verdict += (
                    f"; {other.title} ({'the app alone' if row.startswith('stack') else '`serve`'}): "
                    f"{other.per_vcpu:,.0f} ({other.per_vcpu / KEYCLOAK_GRANTS_PER_VCPU:.1f}x)"
                )
    load = ", ".join(f"{x:.2f}" for x in meta["load_before"])
    load_after = ", ".join(f"{x:.2f}" for x in meta["load_after"])
    return "\n".join(
        [
            f"# Token endpoint: client credentials with private_key_jwt ({meta['started']})",
            "",
            f"`{meta['command']}`: {meta['cpus']} CPUs, load average {load} before and {load_after} after; "
            f"Python {meta['python']}, uvicorn {meta['uvicorn']}, httptools {meta['httptools']}, uvloop "
            f"{meta['uvloop']}; {meta['total_seconds']:.0f} s in all. Each window: {meta['warmup']:g} s of warm-up, "
            f"then {meta['duration']:g} s timed, {meta['repeat']} times (the candidate HTTP stacks "
            f"{meta.get('stack_repeat', meta['repeat'])} times), rows alternating; "
            f"{meta['concurrency']} clients in flight unless the row says otherwise, each on its own keep-alive "
            "connection, from a load generator process of its own on the same two cores.",
            "",
            f"**Peer figure:** {verdict}. Keycloak's figure is their published sizing (one vCPU per 120 client "
            "credential grants/s, tested to 2,000/s), not measured here; their clients each run one request over "
            "a new TLS connection, which they say is most of the CPU. Here: plain HTTP on loopback, keep-alive, "
            "one registered client per row; grants/s per vCPU = 1 / server CPU per grant.",
            "",
            "## Grants",
            "",
            rows_table(summaries, labels),
            "",
            "- Every request is a `client_credentials` grant with a `private_key_jwt` assertion signed for it "
            "alone (fresh `jti`; DPoP rows: a fresh proof too, one key per client), all signed before the "
            "window opens (interpretation (a)): the load generator only sends. Every answer must be a grant "
            "(200, the expected `token_type`, a JWT), else the run stops.",
            "- Server CPU per grant: the server process's user+system time over the window (psutil), divided by "
            "the grants in it; the median of the windows (min-max in brackets). Rates are medians too; the "
            "generator shares the cores, so CPU per grant is the figure to compare.",
            "- Every grant opens or continues a session and writes its audit line, as in production.",
            "",
            *stall_lines(summaries),
            "",
            *comparisons(summaries),
            "",
            "## The SDK-style loop, same run",
            "",
            *sdk_lines(sdk, summaries),
            "",
            "## HTTP stack, by measurement",
            "",
            "The same app (`build_http_app(build_components(settings))`, the uvicorn bounds of "
            "`tokenbroker.http.server`), without the gRPC server beside it, EdDSA assertions, Bearer tokens; "
            "every stack on a socket made with IPPROTO_TCP (so asyncio sets TCP_NODELAY) except the row that "
            "says `serve`'s socket:",
            "",
            *stack_lines(choice, summaries, str(meta["auto_http"])),
            "",
            "## Every window",
            "",
            windows_table(windows),
            "",
        ]
    )


def result_json(
    meta: Mapping[str, Any],
    summaries: Sequence[RowSummary],
    windows: Sequence[Window],
    sdk_windows: Sequence[SdkWindow],
    choice: StackChoice | None,
) -> dict[str, Any]:
    return {
        "run": dict(meta),
        "keycloak_grants_per_vcpu": KEYCLOAK_GRANTS_PER_VCPU,
        "rows": [asdict(s) | {"per_vcpu": s.per_vcpu} for s in summaries],
        "windows": [asdict(w) | {"rate": w.rate, "cpu_us": w.cpu_us} for w in windows],
        "sdk": [asdict(w) | {"rate": w.rate} for w in sdk_windows],
        "sdk_summary": asdict(s) if (s := summarise_sdk(sdk_windows)) is not None else None,
        "stack_choice": asdict(choice) if choice is not None else None,
    }


__all__ = [
    "HEADLINE",
    "KEYCLOAK_GRANTS_PER_VCPU",
    "ROWS",
    "SERVE",
    "RowSpec",
    "RowSummary",
    "SdkSummary",
    "SdkWindow",
    "StackChoice",
    "Window",
    "comparisons",
    "markdown",
    "parse_rows",
    "result_json",
    "rows_table",
    "sdk_lines",
    "stack_choice",
    "stack_lines",
    "stall_lines",
    "summarise",
    "summarise_sdk",
    "windows_table",
]
