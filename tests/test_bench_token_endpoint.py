"""`benches/token_endpoint.py` must not rot: one short run of the bench body against real
processes (`tokenbroker serve` on both stores, a redis-server, the app under uvicorn h11,
the MCP SDK's own `PrivateKeyJWTOAuthProvider` through discovery), writing sane JSON and
Markdown; the load generator counting a refusal instead of timing it; and the pure pieces
the report's conclusions rest on, checked on their own."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tokenbroker_bench import token_load, token_report
from tokenbroker_bench.servers import ProcessSet
from tokenbroker_bench.token_deployment import SCOPE, HttpServerProcess, TokenDeployment
from tokenbroker_bench.token_report import Window

SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "token_endpoint.py"
QUICK_ROWS = "eddsa-bearer,eddsa-dpop,redis-eddsa-bearer,stack-h11"
JWT = re.compile(r"eyJ[\w-]{8,}\.[\w-]+\.")  # a JWS compact serialization (a token, an assertion, a proof)


def _require_redis() -> None:
    if not shutil.which("redis-server") and not os.access("/usr/bin/redis-server", os.X_OK):
        message = "redis-server is not installed (`make redis` installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_token_endpoint_bench_runs_end_to_end(tmp_path: Path) -> None:
    """Half a second a row, once, and the SDK-style loop (about 15 s in all)."""
    _require_redis()
    out = tmp_path / "token-endpoint.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBROKER_")}
    command = [
        sys.executable,
        str(SCRIPT),
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--repeat",
        "1",
        "--stack-repeat",
        "1",
    ]
    command += ["--rows", QUICK_ROWS, "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())

    rows = {row["row"]: row for row in result["rows"]}
    assert set(rows) == set(QUICK_ROWS.split(","))
    for name, row in rows.items():
        assert row["rate"] > 0, name
        assert row["cpu_us"] > 0, name
        assert 0 < row["p50_ms"] <= row["p99_ms"], name
        assert row["per_vcpu"] == pytest.approx(1e6 / row["cpu_us"]), name
    assert rows["redis-eddsa-bearer"]["redis_cpu_us"] > 0
    assert rows["eddsa-bearer"]["redis_cpu_us"] is None

    sdk = result["sdk_summary"]
    assert sdk["rate"] > 0
    # 401 from the resource, its metadata, the broker's metadata, the token, the request again.
    assert sdk["requests_per_token"] == 5
    assert result["sdk"][0]["tokens"] >= 1
    assert result["run"]["auto_http"] in ("h11", "httptools")

    md = done.stdout
    for heading in ("## Grants", "## The SDK-style loop, same run", "## HTTP stack, by measurement", "## Every window"):
        assert heading in md
    assert "Keycloak's published 120" in md
    assert "not measured here" in md
    # No token, assertion or key ever reaches the output.
    for text in (md, done.stderr, out.read_text()):
        assert not JWT.search(text)
        assert "PRIVATE KEY" not in text


# -- the load generator against a real broker ---------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TokenDeployment, HttpServerProcess]]:
    workdir = tmp_path_factory.mktemp("token-load")
    with ProcessSet() as processes:
        deployment = TokenDeployment.create(workdir, processes)
        yield deployment, deployment.start_serve()


def _job(deployment: TokenDeployment, server: HttpServerProcess, client: str, **changes: object) -> token_load.Job:
    bench_client = deployment.clients[client]
    job = token_load.Job(
        token_url=server.token_url,
        issuer=server.url,
        audience=deployment.audience,
        scope=SCOPE,
        client_id=bench_client.client_id,
        algorithm=bench_client.algorithm,
        private_key_pem=bench_client.private_pem(),
        dpop=bench_client.binding == "dpop",
        expect_token_type="DPoP" if bench_client.binding == "dpop" else "Bearer",
        concurrency=2,
        warmup=0.0,
        duration=0.5,
        pool_size=40,
        pids={"server": server.pid},
    )
    return replace(job, **changes)  # type: ignore[arg-type]


def test_load_generator_grants_then_exhausts_its_pool(served: tuple[TokenDeployment, HttpServerProcess]) -> None:
    deployment, server = served
    result = token_load.run(_job(deployment, server, "EdDSA/dpop", pool_size=6, duration=3.0))
    assert result.refusals == {}
    assert result.exhausted  # 6 grants take far less than the window
    assert result.grants == 0  # so the window is not counted as a measurement
    assert result.signed == 6


def test_load_generator_counts_refusals_and_never_times_them(
    served: tuple[TokenDeployment, HttpServerProcess],
) -> None:
    deployment, server = served
    job = _job(deployment, server, "EdDSA/bearer", concurrency=1)
    pool, _ = token_load.build_pool(job)
    replayed = token_load.drive(job, [pool[0], pool[0], *pool[1:3]])  # the same assertion twice
    assert replayed.refusals == {"401 invalid_client": 1}

    stranger = ed25519.Ed25519PrivateKey.generate()  # not the registered key
    pem = stranger.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    wrong_key = token_load.run(_job(deployment, server, "EdDSA/bearer", private_key_pem=pem, pool_size=3))
    assert wrong_key.refusals == {"401 invalid_client": 3}
    assert wrong_key.grants == 0

    # A Bearer client expecting a DPoP token: a grant of the wrong kind is not a grant.
    wrong_kind = token_load.run(_job(deployment, server, "EdDSA/bearer", expect_token_type="DPoP", pool_size=3))
    assert wrong_kind.refusals == {"200 but token_type 'Bearer'": 3}


# -- the report's pure pieces ----------------------------------------------------------------


def _window(row: str, repeat: int, cpu_us: float, *, rate: float = 500.0, p50_ms: float = 10.0) -> Window:
    grants = int(rate * 2)
    return Window(row, repeat, 16, grants, 2.0, cpu_us * grants / 1e6, 0.2, p50_ms, 2 * p50_ms)


def test_stack_choice_pairs_repetitions_and_never_picks_a_non_candidate() -> None:
    windows = [
        _window("stack-h11", 0, 1000.0),
        _window("stack-httptools", 0, 800.0),
        _window("stack-h11-shipped-socket", 0, 500.0),  # cheapest, but not a stack one could choose
        _window("stack-h11", 1, 2000.0),  # a busier repetition: every row slower alike
        _window("stack-httptools", 1, 1700.0),
        _window("stack-h11-shipped-socket", 1, 1000.0),
    ]
    choice = token_report.stack_choice(windows)
    assert choice is not None
    assert choice.best == "stack-httptools"
    assert choice.ratios["stack-httptools"] == pytest.approx((0.8 + 0.85) / 2)
    assert choice.ratios["stack-h11"] == pytest.approx(1.0)
    assert token_report.stack_choice([_window("stack-h11", 0, 1000.0)]) is None  # one candidate: no choice


def test_summary_takes_medians_and_per_vcpu_is_the_inverse_of_cpu_per_grant() -> None:
    windows = [_window("eddsa-bearer", r, cpu) for r, cpu in enumerate((1000.0, 4000.0, 2000.0))]
    (summary,) = token_report.summarise(windows)
    assert summary.cpu_us == pytest.approx(2000.0)
    assert (summary.cpu_us_min, summary.cpu_us_max) == pytest.approx((1000.0, 4000.0))
    assert summary.per_vcpu == pytest.approx(500.0)
    table = token_report.rows_table([summary], {token_report.SERVE: "serve"})
    assert "| 500 | 4.2x |" in table  # 500 grants/s per vCPU against Keycloak's 120


def test_stall_is_reported_only_when_one_client_waits_far_longer_than_the_server_works() -> None:
    def summaries(serve_p50: float) -> list[token_report.RowSummary]:
        windows = [
            _window("eddsa-bearer", 0, 1000.0, rate=360.0, p50_ms=44.0),
            replace(_window("eddsa-bearer-c1", 0, 1500.0, rate=22.0, p50_ms=serve_p50), concurrency=1),
            replace(_window("stack-h11-c1", 0, 900.0, rate=600.0, p50_ms=1.1), concurrency=1),
        ]
        return token_report.summarise(windows)

    stalled = "\n".join(token_report.stall_lines(summaries(44.0)))
    assert "delayed ACK" in stalled
    assert "16 / 44 ms = 364" in stalled
    healthy = "\n".join(token_report.stall_lines(summaries(1.6)))
    assert "p50 **1.6 ms**" in healthy
    assert "delayed ACK" not in healthy


def test_rows_parse_in_table_order() -> None:
    assert token_report.parse_rows("stack-h11, eddsa-bearer") == ("eddsa-bearer", "stack-h11")
    for bad in ("", "eddsa-bearer,warp"):
        with pytest.raises(ValueError, match="rows"):
            token_report.parse_rows(bad)
