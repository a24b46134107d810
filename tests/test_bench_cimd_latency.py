"""`benches/cimd_latency.py` must not rot: one short run against real processes (a
`tokenbroker serve`, the CLI, a local HTTPS document server), writing sane JSON and
Markdown, with the fetch accounting that tells a cached request from an uncached one; and
its percentile, checked on its own."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.timeout(120)

SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "cimd_latency.py"
JWT = re.compile(r"eyJ[\w-]{8,}\.[\w-]+\.")  # a JWS compact serialization (a token, an assertion, a proof)


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cimd_latency_bench", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_cimd_latency_bench_runs_end_to_end(tmp_path: Path) -> None:
    out, md = tmp_path / "cimd-latency.json", tmp_path / "cimd-latency.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBROKER_")}
    command = [sys.executable, str(SCRIPT), "-n", "30", "--warmup", "3", "--json", str(out), "--markdown", str(md)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=100, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())

    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == ["registered", "cimd-cached", "cimd-uncached"]
    for name, row in rows.items():
        assert row["requests"] == 30, name
        assert 0 < row["p50_ms"] <= row["p99_ms"], name
        assert row["mean_ms"] > 0, name
    assert rows["registered"]["added_p50_ms"] is None
    assert rows["registered"]["document_fetches"] == 0
    assert rows["cimd-cached"]["document_fetches"] == 0  # answered from the broker's cache
    assert rows["cimd-uncached"]["document_fetches"] == 30  # one fetch per request
    for name in ("cimd-cached", "cimd-uncached"):
        added = rows[name]["p50_ms"] - rows["registered"]["p50_ms"]
        assert rows[name]["added_p50_ms"] == pytest.approx(added, abs=0.002), name
    assert result["run"]["n"] == 30

    assert done.stdout == md.read_text()
    assert "| row | requests | document fetches | p50 ms | p99 ms |" in done.stdout
    assert re.search(r"^\| cimd-uncached \| 30 \| 30 \| \d+\.\d\d \| \d+\.\d\d \|", done.stdout, re.MULTILINE)
    assert "Method:" in done.stdout
    assert not JWT.search(done.stdout + done.stderr + out.read_text())


def test_bench_refuses_unbounded_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "-n", "0"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    assert "-n and --warmup must be from 1 to" in done.stderr


def test_percentile_is_nearest_rank() -> None:
    percentile = _bench().percentile
    samples = [float(x) for x in range(100, 0, -1)]  # 1..100, unordered
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    assert percentile(samples, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 0)
