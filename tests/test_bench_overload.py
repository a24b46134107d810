"""`benches/overload.py` must not rot: one short run of both doors against real `tokenbroker
serve` processes, well under saturation (nothing to shed, nothing may fail), writing sane
JSON and Markdown and no secret; and the open loop's schedule, checked on its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tokenbroker_bench.overload_load import Job, _due_times

pytestmark = pytest.mark.timeout(240)

SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "overload.py"
JWT = re.compile(r"eyJ[\w-]{8,}\.[\w-]+\.")  # a JWS compact serialization (a token, an assertion, a proof)


def test_overload_bench_runs_end_to_end(tmp_path: Path) -> None:
    out, md = tmp_path / "overload.json", tmp_path / "overload.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBROKER_")}
    cpus = sorted(os.sched_getaffinity(0))  # the broker on the first, the generators on the last
    command = [
        sys.executable,
        str(SCRIPT),
        *("--duration", "1", "--warmup", "0.3", "--pause", "0.2", "--factors", "0.3"),
        *("--grpc-levels", "4", "--http-levels", "4", "--http-connections", "16"),
        *("--server-cpus", str(cpus[0]), "--generator-cpus", str(cpus[-1])),
        *("--json", str(out), "--markdown", str(md)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=200, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert (result["meta"]["server_cpus"], result["meta"]["generator_cpus"]) == ([cpus[0]], [cpus[-1]])
    assert f"The broker runs on CPU [{cpus[0]}], the generators on CPU [{cpus[-1]}]" in md.read_text()
    assert set(result["saturation"]) == {"grpc", "http"}
    windows = {(w["door"], w["phase"]): w for w in result["windows"]}
    assert set(windows) == {(d, p) for d in ("grpc", "http") for p in ("closed c=4", "open 0.3x")}
    for (door, phase), w in windows.items():
        assert w["errors"] == {}, (door, phase)
        assert w["admitted"] > 0, (door, phase)
        assert 0 < w["admitted_ms"]["p50"] <= w["admitted_ms"]["p99"], (door, phase)
        assert w["server_cpu_pct"] > 0, (door, phase)
    for door in ("grpc", "http"):
        opened = windows[door, "open 0.3x"]
        assert opened["target_rate"] == pytest.approx(0.3 * result["saturation"][door])
        assert opened["offered_rate"] == pytest.approx(opened["target_rate"], rel=0.05)
        assert opened["due"] == opened["admitted"] + opened["shed"]  # every request due was answered
    assert done.stdout == md.read_text() + "\n" or done.stdout == md.read_text()
    assert "| window | offered/s | admitted/s | shed |" in done.stdout
    for text in (done.stdout, done.stderr, out.read_text()):
        assert not JWT.search(text)


def test_the_generators_share_one_schedule() -> None:
    """Request n of the run is due at origin + n / rate, and generator i of k sends n = i,
    i + k, ...: together they send each n once, on time."""
    rate, k = 1000.0, 3
    jobs = [
        Job(door="grpc", mode="open", index=i, generators=k, warmup=0.1, duration=0.2, pool_size=1) for i in range(k)
    ]
    for job in jobs:
        job.rate = rate
    due = sorted(t for job in jobs for t in _due_times(job, origin=10.0))
    assert len(due) == 300
    assert due == pytest.approx([10.0 + n / rate for n in range(300)])


@pytest.mark.parametrize("cpus", ["", "x", "1-", "-1", "100000"])
def test_a_cpu_list_it_cannot_use_is_refused_at_once(cpus: str) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--server-cpus", cpus], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--server-cpus" in done.stderr
