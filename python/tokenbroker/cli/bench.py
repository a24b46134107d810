"""`tokenbroker bench`: the gRPC load test. The suite itself is the separate
`tokenbroker-bench` distribution (benches/ in a checkout), not part of the wheel: this
command only parses options and imports it when it runs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from tokenbroker.cli._errors import fail, one_line
from tokenbroker.cli._output import info

if TYPE_CHECKING:
    from tokenbroker_bench.runner import BenchConfig, Runner

NOT_INSTALLED = "the benchmark suite is not installed: from a checkout run `pip install -e benches` (or `make venv`)"


def _load_runner() -> ModuleType:
    """`tokenbroker_bench.runner`, or one line saying what to install."""
    try:
        return importlib.import_module("tokenbroker_bench.runner")
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] == "tokenbroker_bench":
            fail(NOT_INSTALLED)
        fail(f"the bench needs the `bench` extra (matplotlib, psutil): {exc}")
    except ImportError as exc:
        fail(f"the bench needs the `bench` extra (matplotlib, psutil): {exc}")


def _csv(value: str, what: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not items:
        raise click.BadParameter(f"give at least one {what}, comma-separated")
    return items


class _BenchProgress:
    """click's progress bar over the planned seconds of load, with one line per level
    (printed above the bar on a terminal, as plain lines otherwise)."""

    def __init__(self, bar: Any, tty: bool) -> None:
        self._bar = bar
        self._tty = tty
        self._pending = 0.0

    def advance(self, seconds: float) -> None:
        self._pending += seconds * 10
        step = int(self._pending)
        remaining = self._bar.length - self._bar.pos
        if step > 0 and remaining > 0:
            self._bar.update(min(step, remaining))
        self._pending -= step

    def describe(self, text: str) -> None:
        if self._tty:  # (click prints every new label as a line when stderr is not a terminal)
            self._bar.label = text.ljust(38)[:38]
            self._bar.render_progress()

    def note(self, text: str) -> None:
        if self._tty:
            click.echo("\r\x1b[K" + text, err=True)
            self._bar.render_progress()
        else:
            click.echo(text, err=True)


@click.command()
@click.option("--modes", default="unary,stream,batch", show_default=True, help="Validation RPCs to load.")
@click.option("--stores", default="memory,redis", show_default=True, help="The broker's stores to test.")
@click.option("--concurrency", default="1,4,16,64", show_default=True, help="Requests in flight, per level.")
@click.option("--duration", type=click.FloatRange(0.1, 600), default=5.0, show_default=True, help="Seconds per level.")
@click.option(
    "--warmup", type=click.FloatRange(0, 60), default=1.0, show_default=True, help="Unrecorded seconds first."
)
@click.option("--batch-size", type=click.IntRange(1, 1000), default=64, show_default=True, help="Requests per batch.")
@click.option("--references/--no-references", default=True, show_default=True, help="Also load the reference servers.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("benches/results"),
    show_default=True,
    help="Directory for the JSON, Markdown and PNG files.",
)
@click.option("--name", default="grpc", show_default=True, help="Base name of the result files.")
@click.option(
    "--soak", type=click.FloatRange(0, 3600), default=0.0, help="Then N seconds of unary load, RSS per second."
)
@click.option(
    "--soak-warmup",
    type=click.FloatRange(0, 3600),
    default=0.0,
    show_default=True,
    help="Unrecorded seconds of soak load first (replay records live 65 s: RSS grows until then).",
)
@click.option(
    "--binding", type=click.Choice(["dpop", "bearer"]), default="dpop", show_default=True, help="Token binding."
)
@click.option("--tokens", type=click.IntRange(1, 100_000), default=256, show_default=True, help="Distinct tokens.")
@click.option("--channels", type=click.IntRange(1, 64), default=1, show_default=True, help="gRPC channels per server.")
@click.option(
    "--quick", is_flag=True, help="A few seconds in all (a smoke test): short levels, concurrency 1,8, batch 16."
)
@click.pass_context
def bench(
    ctx: click.Context,
    modes: str,
    stores: str,
    concurrency: str,
    duration: float,
    warmup: float,
    batch_size: int,
    references: bool,
    out: Path,
    name: str,
    soak: float,
    soak_warmup: float,
    binding: str,
    tokens: int,
    channels: int,
    quick: bool,
) -> None:
    """Load-test the gRPC service: real `tokenbroker serve` processes (memory store and a
    redis-server of its own), and the two reference servers, from this separate process.
    Writes OUT/NAME.json, .md and .png: throughput, latency percentiles, server CPU and
    RSS, Redis round trips, and the issue's targets, met or missed."""
    import signal

    suite = _load_runner()

    def default(param: str) -> bool:
        return ctx.get_parameter_source(param) in (click.core.ParameterSource.DEFAULT, None)

    if quick:
        duration = 0.3 if default("duration") else duration
        warmup = 0.1 if default("warmup") else warmup
        concurrency = "1,8" if default("concurrency") else concurrency
        tokens = 16 if default("tokens") else tokens
        # Small batches: a slow reference server must answer some within a 0.3 s level.
        batch_size = 16 if default("batch_size") else batch_size
        soak = 2.0 if default("soak") else soak
    try:
        levels = tuple(int(c) for c in _csv(concurrency, "concurrency level"))
    except ValueError:
        raise click.BadParameter(
            "concurrency levels are integers, e.g. 1,4,16,64", param_hint="--concurrency"
        ) from None
    config: BenchConfig = suite.BenchConfig(
        modes=_csv(modes, "mode"),
        stores=_csv(stores, "store"),
        concurrency=levels,
        duration=duration,
        warmup=warmup,
        batch_size=batch_size,
        references=references,
        out=out,
        soak=soak,
        soak_warmup=soak_warmup,
        binding=binding,
        tokens=tokens,
        channels=channels,
        name=name,
        command="tokenbroker bench " + " ".join(sys.argv[sys.argv.index("bench") + 1 :] if "bench" in sys.argv else []),
    )
    config.check()

    def terminate(signum: int, frame: Any) -> None:
        # Our own handler for both signals (asyncio's would only cancel a task): the first
        # ends the level in flight and unwinds, stopping every process; a second raises.
        if stopping:
            raise KeyboardInterrupt
        stopping.append(signum)
        info("stopping: ending the current level and the servers (again to force)")
        suite.Runner.interrupt()

    stopping: list[int] = []
    previous = {signum: signal.signal(signum, terminate) for signum in (signal.SIGINT, signal.SIGTERM)}
    tty = sys.stderr.isatty()
    try:
        with click.progressbar(
            length=max(1, int(config.planned_seconds() * 10)), label="starting".ljust(38), file=sys.stderr, width=24
        ) as bar:
            runner: Runner = suite.Runner(config, _BenchProgress(bar, tty))
            result = runner.run()
    except RuntimeError as exc:
        fail(one_line(exc))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    paths = runner.paths
    for target in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        value = "-" if target["value"] is None else f"{target['value']:,.3f}{target['unit']}"
        info(f"{verdict:>12}  {target['target']}: {value} ({target['op']} {target['threshold']:,}{target['unit']})")
    for path in paths.values():
        click.echo(str(path))
