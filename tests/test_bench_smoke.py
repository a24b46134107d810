"""`tokenbroker bench` must not rot: `--quick` runs the real load generator for a few
seconds against real servers (`tokenbroker serve` on both stores, a redis-server, both
reference servers) and writes sane JSON, Markdown and PNG. Plus the pieces the report's
verdicts rest on, checked on their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenbroker.v1 import broker_pb2 as pb
from tokenbroker_bench import loadgen, report


def _require_redis() -> None:
    if not shutil.which("redis-server") and not os.access("/usr/bin/redis-server", os.X_OK):
        message = "redis-server is not installed (`make redis` installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    _require_redis()
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBROKER_")}
    command = [sys.executable, "-c", "from tokenbroker.cli import main; main()", "bench", "--quick", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=out)
    return out, done


def test_quick_bench_writes_sane_json_markdown_and_png(quick_run: tuple[Path, Any]) -> None:
    out, done = quick_run
    try:
        _check_quick_run(out, done)
    except AssertionError as exc:  # with what the bench said, for a failure seen only in CI
        raise AssertionError(f"{exc}\n--- tokenbroker bench stderr (end) ---\n{done.stderr[-4000:]}") from None


def _check_quick_run(out: Path, done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0
    result = json.loads((out / "grpc.json").read_text())

    servers = {r["server"] for r in result["rows"]}
    assert servers == {report.BROKER_MEMORY, report.BROKER_REDIS, report.REF_NOOP, report.REF_PYJWT}
    assert {r["mode"] for r in result["rows"]} == set(loadgen.MODES)
    for row in result["rows"]:
        where = f"{row['server']} {row['mode']} c={row['concurrency']} {row['loop']}"
        assert row["throughput"] > 0, where
        assert row["validations"] > 0, where
        assert row["valid"] == row["validations"], (where, row["reasons"])
        assert not row["errors"], (where, row["errors"])
        lat = row["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"], where
        assert row["server_cpu_pct"] > 0, where
        assert row["server_rss_mb"]["max"] > 0, where
        if row["server"] in (report.BROKER_REDIS, report.REF_PYJWT):
            assert row["redis"]["commands_per_validation"] > 0, where
    # The half-load open-loop level ran for the broker on each store.
    open_loop = {r["server"] for r in result["rows"] if r["loop"] == "open"}
    assert open_loop == {report.BROKER_MEMORY, report.BROKER_REDIS}
    # Every target was measured in this run and judged either way.
    assert len(result["targets"]) == 7
    for target in result["targets"]:
        assert target["met"] in (True, False), target
        assert isinstance(target["value"], int | float), target
    assert result["soak"]["samples"]
    assert result["soak"]["rss_mb"]["first"] > 0

    md = (out / "grpc.md").read_text()
    assert "## Targets" in md
    assert "## unary" in md
    assert "## batch" in md
    assert "## stream" in md
    assert md.count(" met |") + md.count("**missed**") == 7
    for name in ("grpc.png", "grpc-soak.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert len(png) > 10_000, name
    # stdout names the files written; no token ever reaches the output.
    assert str(out / "grpc.json") in done.stdout
    assert "eyJ" not in done.stdout + done.stderr + md


def test_batch_payload_is_a_valid_batch_request() -> None:
    items = loadgen.build_requests(
        [("token-a", None), ("token-b", None)], "https://a/mcp", "POST", "https://a/mcp", 5, 3
    )
    parsed = pb.ValidateTokenBatchRequest.FromString(loadgen.batch_payload(items))
    assert [r.token for r in parsed.requests] == ["token-b", "token-a", "token-b"]
    assert [r.request_id for r in parsed.requests] == ["5", "6", "7"]
    long = [("1", b"x" * 300)]  # a length that needs a two-byte varint
    assert loadgen.batch_payload(long)[:3] == b"\x0a\xac\x02"


def test_dpop_requests_carry_fresh_distinct_proofs() -> None:
    from tokenbroker import ProofSigner

    signer = ProofSigner()
    items = loadgen.build_requests([("tok", signer.secret_bytes())], "https://a/mcp", "POST", "https://a/mcp", 0, 3)
    proofs = [pb.ValidateTokenRequest.FromString(data).dpop_proof for _, data in items]
    assert len(set(proofs)) == 3
    assert all(proofs)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert loadgen.percentile(values, 50) == 500
    assert loadgen.percentile(values, 99) == 990
    assert loadgen.percentile(values, 99.9) == 999
    assert loadgen.percentile([], 99) == 0


def _row(server: str, mode: str, throughput: float, **extra: Any) -> dict[str, Any]:
    row = {
        "server": server,
        "mode": mode,
        "concurrency": 4,
        "loop": "closed",
        "valid": 1,
        "validations": 1,
        "rpcs": 1,
        "throughput": throughput,
        "generator_cpu_pct": 50.0,
        "latency_ms": {"p99": 1.0},
    }
    row.update(extra)
    return row


def test_targets_are_ratios_of_the_same_run_and_honest() -> None:
    rows = [
        _row(report.BROKER_MEMORY, "unary", 900.0),
        _row(report.BROKER_MEMORY, "unary", 1000.0),
        _row(report.REF_NOOP, "unary", 1200.0),
        _row(report.REF_PYJWT, "unary", 400.0),
        _row(
            report.BROKER_REDIS,
            "batch",
            60_000.0,
            redis={"round_trips_per_validation": 0.02, "commands_per_validation": 6},
        ),
        _row(
            report.BROKER_REDIS, "unary", 900.0, redis={"round_trips_per_validation": 1.2, "commands_per_validation": 6}
        ),
    ]
    by_name = {t["target"]: t for t in report.targets(rows, None)}
    noop = by_name[f"unary (memory) / {report.REF_NOOP} throughput"]
    assert noop["value"] == pytest.approx(1000 / 1200, abs=1e-3)
    assert noop["met"] is True
    pyjwt = by_name[f"unary (memory) / {report.REF_PYJWT} throughput"]
    assert pyjwt["value"] == pytest.approx(2.5)
    assert pyjwt["met"] is True
    assert by_name["batch or stream (Redis) validations/s"]["met"] is True
    assert by_name["Redis round trips per validation (worst level)"]["met"] is False  # 1.2 > 1
    assert by_name["Redis round trips per validation, pipelined (batch, worst level)"]["met"] is True
    assert by_name["unary (memory) p99 at half the max throughput"]["met"] is None  # no open-loop row
    assert by_name["RSS trend over the soak / first RSS"]["met"] is None


def test_soak_slope() -> None:
    assert report.slope_per_minute([(0.0, 100.0), (30.0, 101.0), (60.0, 102.0)]) == pytest.approx(2.0)
    assert report.slope_per_minute([(0.0, 100.0)]) == 0.0
