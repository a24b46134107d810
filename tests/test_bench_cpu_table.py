"""scripts/bench_cpu_table.py (`make bench-cpu`) on criterion output it did not measure itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_cpu_table.py"


def write_estimate(criterion: Path, bench_id: str, mean_ns: float, half_width_ns: float) -> Path:
    """An `estimates.json` as criterion writes it, reduced to the fields the script reads."""
    path = criterion / bench_id / "new" / "estimates.json"
    path.parent.mkdir(parents=True)
    low, high = mean_ns - half_width_ns, mean_ns + half_width_ns
    interval = {"confidence_level": 0.95, "lower_bound": low, "upper_bound": high}
    path.write_text(json.dumps({"mean": {"confidence_interval": interval, "point_estimate": mean_ns}}))
    return path


def table(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_both_builds_stand_side_by_side_with_the_native_speedup(tmp_path: Path) -> None:
    portable, native = tmp_path / "portable", tmp_path / "native"
    write_estimate(portable, "ed25519_verify_strict_raw", 50_000, 100)
    write_estimate(native, "ed25519_verify_strict_raw", 40_000, 100)
    write_estimate(portable, "validate_batch_cold/64", 2_000_000, 400_000)
    write_estimate(native, "validate_batch_cold/64", 1_900_000, 400_000)
    write_estimate(portable, "issue", 900, 10)

    result = table(portable, native)

    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| `")}
    assert "| 50 µs ± 100 ns | 40 µs ± 100 ns | 1.25x |" in rows["`ed25519_verify_strict_raw`"]
    assert "1.05x (within noise)" in rows["`validate_batch_cold/64`"]  # the intervals overlap
    assert rows["`issue`"].endswith("| 900 ns ± 10 ns | not run | not run |")  # measured in one build only


def test_estimates_older_than_the_run_are_left_out(tmp_path: Path) -> None:
    portable, native = tmp_path / "portable", tmp_path / "native"
    stale = write_estimate(portable, "validate_warm", 1_000, 10)
    os.utime(stale, (0, 0))
    started = tmp_path / "started"
    started.touch()
    write_estimate(portable, "validate_cold", 60_000, 100)
    write_estimate(native, "validate_cold", 55_000, 100)

    result = table(portable, native, "--since", started, "-o", tmp_path / "out.md")

    assert result.returncode == 0, result.stderr
    assert "validate_cold" in result.stdout
    assert "validate_warm" not in result.stdout
    assert (tmp_path / "out.md").read_text() == result.stdout


def test_no_estimates_at_all_is_an_error(tmp_path: Path) -> None:
    result = table(tmp_path / "portable", tmp_path / "native")

    assert result.returncode == 1
    assert "no criterion estimates" in result.stderr
