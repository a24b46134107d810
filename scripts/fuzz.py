#!/usr/bin/env python3
"""Runs the fuzz targets for a fixed time each and reports what they did: executions,
coverage, corpus and findings. `make fuzz` calls it (60 s per target, part of `make test`);
`make fuzz FUZZ_SECONDS=3600` is the long run the README records.

Two kinds of target, both libFuzzer underneath, so one runner reads both outputs:
- `cargo fuzz` (fuzz/fuzz_targets/*.rs): the token engine, built by the nightly toolchain
  with AddressSanitizer and debug assertions;
- atheris (fuzz/python/fuzz_*.py): the Python boundary, run by the project's venv.

Each target starts from its seed corpus in the repository (read only) and a working corpus
under fuzz/target/corpus/ that a later run on the same machine goes on from. A finding
(crash, panic, oracle assertion, timeout, leak) makes the run fail, names the reproducer
libFuzzer wrote, and the other targets still run. Progress goes to stderr as it happens."""

from __future__ import annotations

import argparse
import base64
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
WORK = FUZZ / "target"
RUST_TARGETS = ("jws_parse", "json_parse", "dpop_proof", "engine_validate")
PYTHON_TARGETS = ("broker_validate", "http_forms")
# libFuzzer options for every target: a 10 s input is a hang, 2 GiB a leak.
OPTIONS = ("-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048")
# A finding prints this much of its log, and its reproducer when it is at most this long.
TAIL_LINES = 60
MAX_REPRODUCER_PRINTED = 64 * 1024


@dataclass
class Result:
    target: str
    kind: str
    seconds: float
    cpu_seconds: float  # the fuzzer's own CPU time: less than `seconds` on a shared machine
    executions: int
    coverage: int
    features: int
    corpus: int
    findings: int
    reproducer: str


def nightly_available() -> bool:
    listed = subprocess.run(["rustup", "toolchain", "list"], capture_output=True, text=True, check=False)
    return listed.returncode == 0 and any(line.startswith("nightly") for line in listed.stdout.splitlines())


def parse(target: str, kind: str, log: str, seconds: float, cpu: float, returncode: int) -> Result:
    """Reads libFuzzer's final statistics (the last `cov:` line and the `stat::` lines)."""
    executions = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    status = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    cov, ft, corp = (int(x) for x in status[-1]) if status else (0, 0, 0)
    reproducer = re.findall(r"Test unit written to (\S+)", log)
    failed = returncode != 0 or bool(reproducer)
    return Result(
        target=target,
        kind=kind,
        seconds=round(seconds, 1),
        cpu_seconds=round(cpu, 1),
        executions=int(executions[-1]) if executions else 0,
        coverage=cov,
        features=ft,
        corpus=corp,
        findings=1 if failed else 0,
        reproducer=reproducer[-1] if reproducer else ("" if not failed else f"exit {returncode}, see the log"),
    )


def run(target: str, kind: str, seconds: int) -> Result:
    corpus = WORK / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    options = [f"-max_total_time={seconds}", *OPTIONS]
    if kind == "cargo-fuzz":
        seeds = FUZZ / "corpus" / target
        artifacts = FUZZ / "artifacts" / target
        artifacts.mkdir(parents=True, exist_ok=True)
        command = ["cargo", "+nightly", "fuzz", "run", "-O", "-a", target, str(corpus), str(seeds), "--"]
        command += [*options, f"-artifact_prefix={artifacts}/"]
        cwd = FUZZ
    else:
        seeds = FUZZ / "python" / "corpus" / target
        artifacts = WORK / "artifacts" / target
        artifacts.mkdir(parents=True, exist_ok=True)
        script = FUZZ / "python" / f"fuzz_{target}.py"
        command = [sys.executable, str(script), str(corpus), str(seeds), *options, f"-artifact_prefix={artifacts}/"]
        cwd = ROOT
    started = time.monotonic()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    log_path = logs / f"{target}.log"
    with log_path.open("w") as out:
        # The watchdog only catches a fuzzer that ignores -max_total_time (a hung build).
        done = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=seconds + 900)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = used.ru_utime + used.ru_stime - children.ru_utime - children.ru_stime
    text = log_path.read_text(errors="replace")
    result = parse(target, kind, text, time.monotonic() - started, cpu, done.returncode)
    if result.findings:
        print(f"  FINDING in {target}: {result.reproducer} (log: {log_path})", file=sys.stderr)
        print(finding_report(text, result.reproducer, cwd), file=sys.stderr)
    return result


def finding_report(log: str, reproducer: str, cwd: Path) -> str:
    """What a finding was, for a run whose files are gone with it (CI's clone): the end of
    the fuzzer's log (the exception or sanitizer report) and the reproducer as base64, so
    `base64 -d > crash && fuzzer crash` replays it anywhere."""
    tail = log.splitlines()[-TAIL_LINES:]
    lines = ["  --- the end of the log ---", *(f"  | {line}" for line in tail)]
    path = Path(reproducer) if reproducer else None
    if path is not None and not path.is_absolute():
        path = cwd / path
    if path is not None and path.is_file():
        data = path.read_bytes()
        if len(data) <= MAX_REPRODUCER_PRINTED:
            lines.append(f"  reproducer ({len(data)} bytes), base64: {base64.b64encode(data).decode()}")
        else:
            lines.append(f"  reproducer: {len(data)} bytes, too long to print")
    return "\n".join(lines)


def markdown(results: list[Result]) -> str:
    lines = [
        "| target | fuzzer | seconds | CPU seconds | executions | exec/s | coverage (edges) | features | corpus "
        "| findings |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rate = r.executions / r.seconds if r.seconds else 0
        lines.append(
            f"| `{r.target}` | {r.kind} | {r.seconds:.0f} | {r.cpu_seconds:.0f} | {r.executions:,} | {rate:,.0f} "
            f"| {r.coverage:,} "
            f"| {r.features:,} | {r.corpus:,} | {r.findings} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60, help="time per target (default 60)")
    parser.add_argument("--only", nargs="+", metavar="TARGET", help="these targets only")
    parser.add_argument("--markdown", type=Path, help="write the table here too")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    if args.seconds < 1:
        parser.error("--seconds must be at least 1")
    targets = [(t, "cargo-fuzz") for t in RUST_TARGETS] + [(t, "atheris") for t in PYTHON_TARGETS]
    if args.only:
        unknown = set(args.only) - {t for t, _ in targets}
        if unknown:
            parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")
        targets = [(t, k) for t, k in targets if t in args.only]
    if any(k == "cargo-fuzz" for _, k in targets):
        if not nightly_available():
            print("cargo fuzz needs the nightly toolchain (rustup toolchain install nightly)", file=sys.stderr)
            return 2
        if shutil.which("cargo-fuzz") is None:
            print("cargo-fuzz is missing: cargo install cargo-fuzz --locked", file=sys.stderr)
            return 2
        print("building the cargo fuzz targets (nightly, AddressSanitizer)", file=sys.stderr, flush=True)
        subprocess.run(["cargo", "+nightly", "fuzz", "build", "-O", "-a"], cwd=FUZZ, check=True)
    results = []
    for i, (target, kind) in enumerate(targets, 1):
        print(f"[{i}/{len(targets)}] {target} ({kind}) for {args.seconds} s", file=sys.stderr, flush=True)
        result = run(target, kind, args.seconds)
        print(
            f"  {result.executions:,} executions, coverage {result.coverage}, corpus {result.corpus}, "
            f"findings {result.findings}",
            file=sys.stderr,
            flush=True,
        )
        results.append(result)
    table = markdown(results)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 1 if any(r.findings for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
