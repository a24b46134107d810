"""scripts/fuzz.py, the runner `make fuzz` (and so `make test`) uses: it must read a
finding from libFuzzer's output and report it whole, since CI's clone and its reproducer
are gone once the run has failed."""

from __future__ import annotations

import base64
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_runner", ROOT / "scripts" / "fuzz.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


FINDING_LOG = """INFO: Seed: 123
#2613	NEW    cov: 2301 ft: 9001 corp: 141/52Kb exec/s: 594 rss: 120Mb
=== Uncaught Python exception: ===
Finding: validate_batch #1 answered (False, <Reason.DPOP_REPLAYED: 12>, 'req-1'), validate (True, ...)
==1234== ERROR: libFuzzer: fuzz target exited
MS: 2 ChangeByte-CopyPart-; base unit: 0123
artifact_prefix='{prefix}'; Test unit written to {path}
stat::number_of_executed_units: 2613
"""


def test_a_finding_is_read_and_reported_with_its_message_and_reproducer(tmp_path: Path) -> None:
    fuzz = runner()
    crash = tmp_path / "crash-a8a21d91"
    crash.write_bytes(b"\x00\x01 the input \xff")
    log = FINDING_LOG.format(prefix=tmp_path, path=crash)
    result = fuzz.parse("broker_validate", "atheris", log, 4.0, 4.0, 1)
    assert (result.findings, result.executions, result.coverage, result.reproducer) == (1, 2613, 2301, str(crash))
    report = fuzz.finding_report(log, result.reproducer, tmp_path)
    assert "Finding: validate_batch #1 answered" in report
    encoded = report.split("base64: ")[1].strip()
    assert base64.b64decode(encoded) == crash.read_bytes()


def test_a_relative_reproducer_is_read_from_the_fuzzers_directory_and_a_huge_one_is_not_printed(
    tmp_path: Path,
) -> None:
    fuzz = runner()
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "crash-1").write_bytes(b"x" * (fuzz.MAX_REPRODUCER_PRINTED + 1))
    report = fuzz.finding_report("one line\n", "artifacts/crash-1", tmp_path)
    assert "too long to print" in report
    assert "base64:" not in report
    assert "| one line" in report


def test_a_clean_run_has_no_finding_and_a_failed_one_without_reproducer_says_so() -> None:
    fuzz = runner()
    clean = "#100\tDONE   cov: 10 ft: 20 corp: 3/1Kb\nstat::number_of_executed_units: 100\n"
    assert fuzz.parse("t", "atheris", clean, 1.0, 1.0, 0).findings == 0
    failed = fuzz.parse("t", "atheris", clean, 1.0, 1.0, 77)
    assert (failed.findings, failed.reproducer) == (1, "exit 77, see the log")
