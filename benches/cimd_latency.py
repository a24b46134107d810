"""The latency a Client ID Metadata Document adds to a token request (issue 11, "Measured"):
`POST /token` round trips of three clients of one real `tokenbroker serve` (memory store),
sequential and interleaved, in the same run:

  registered     a client registered in the registry file (Ed25519 key, binding dpop): the
                 baseline;
  cimd-cached    a CIMD client (approved, pinned) whose document is served with
                 `Cache-Control: max-age=3600`: after its first request the broker answers
                 from its document cache;
  cimd-uncached  a CIMD client whose document is served with `max-age=0`: every request
                 fetches it again (a new TCP connection and TLS handshake to the document's
                 host, one GET, the JSON and key checks).

Every request carries a fresh `private_key_jwt` assertion (EdDSA) and a DPoP proof, signed
before its timer starts; the timer covers the HTTP round trip over a kept-alive loopback
connection. The rows take turns request by request (the first row of each round rotates),
so load from elsewhere on the machine hits them alike. The document server is a local
HTTPS server on 127.0.0.1 (tests/support/https_servers.py, a throwaway test CA passed as
`cimd_ca_file`, `cimd_allow_loopback`), in a thread of this process.

The broker's document fetcher limits fetches per host (a burst of 10, then 1 a second) and
answers its last good copy when a refetch is refused: measured as is, most "uncached"
requests would be cached ones. The broker is therefore started with that limit raised
(`tokenbroker.app.cimd_fetcher` replaced before `serve` runs; nothing else changes), and
the run checks that the document server saw exactly one fetch per uncached request and
none for the cached client while it was measured. Every answer must be a DPoP-bound
grant: anything else stops the run (exit status 1).

    .venv/bin/python benches/cimd_latency.py [-n 200] [--warmup 20] [--json PATH] [--markdown PATH]

The Markdown goes to stdout (and --markdown), progress to stderr. About 10 s."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tokenbroker import Keyring, ProofSigner
from tokenbroker.client_assertion import make_client_assertion, public_jwk
from tokenbroker_bench.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support.https_servers import HttpsServer, Reply, make_test_ca  # type: ignore[import-not-found,unused-ignore]  # noqa: E402

ROWS = ("registered", "cimd-cached", "cimd-uncached")
BASELINE = "registered"
AUDIENCE = "http://127.0.0.1:9/mcp"
SCOPE = "tools:call"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CACHE_CONTROL = {"cimd-cached": "max-age=3600", "cimd-uncached": "max-age=0"}
MAX_REQUESTS = 5000  # per row: the run stays bounded
REGISTRY_RELOAD_SECONDS = 1.1  # the broker stats its registry file at most once a second
# `serve`, with the document fetcher's per-host rate limit raised (see the module doc).
LAUNCH = """
import tokenbroker.app as app
from tokenbroker.cimd import CimdFetcher

def unthrottled(settings):
    return CimdFetcher(ca_file=settings.cimd_ca_file, allow_loopback=settings.cimd_allow_loopback,
                       per_host_rate=1e6, per_host_burst=1_000_000)

app.cimd_fetcher = unthrottled
from tokenbroker.cli import main
main()
"""


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank `q`-th percentile (0 < q <= 100): the smallest sample with at least
    q% of the samples at or below it."""
    if not samples:
        raise ValueError("no samples")
    if not 0 < q <= 100:
        raise ValueError(f"q must be in (0, 100], not {q}")
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Client:
    row: str
    client_id: str
    key: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)
    path: str | None = None
    # One DPoP key per client, as one client instance holds: each request continues its session.
    dpop: ProofSigner = field(default_factory=ProofSigner)  # a CIMD client's document path on the HTTPS server


class Broker:
    """A `tokenbroker serve` process (LAUNCH) on free loopback ports, and its CLI."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.http_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TOKENBROKER_")},
            "TOKENBROKER_LISTEN": f"127.0.0.1:{free_port()}",
            "TOKENBROKER_HTTP_LISTEN": f"127.0.0.1:{self.http_port}",
            "TOKENBROKER_ISSUER": self.url,
            "TOKENBROKER_KEY_FILE": str(workdir / "keys.json"),
            "TOKENBROKER_REGISTRY_FILE": str(workdir / "registry.toml"),
            "TOKENBROKER_LOG_LEVEL": "warning",
            **env,
        }
        self.log = workdir / "broker.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def cli(self, *args: str) -> str:
        command = [sys.executable, "-c", "from tokenbroker.cli import main; main()", *args]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise SystemExit(f"cimd_latency: tokenbroker {' '.join(args[:2])} failed: {done.stderr[-2000:]}")
        return done.stdout

    @contextmanager
    def running(self, timeout: float = 30.0) -> Iterator[Broker]:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", LAUNCH, "serve"], env=self.env, cwd=self.workdir, stdout=log, stderr=log
            )
        try:
            deadline = time.monotonic() + timeout
            while not self._healthy():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"cimd_latency: the broker did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.1)
            yield self
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False


def document(url: str, key: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    return {
        "client_id": url,
        "client_name": "bench agent",
        "token_endpoint_auth_method": "private_key_jwt",
        "jwks": {"keys": [public_jwk(key)]},
    }


def _deploy(workdir: Path, documents: HttpsServer, ca_file: Path) -> tuple[Broker, dict[str, Client]]:
    """The broker's settings and its three clients: one registered, two CIMD, approved."""
    Keyring.generate().save(workdir / "keys.json")
    broker = Broker(
        workdir,
        {
            "TOKENBROKER_CIMD_ALLOW_LOOPBACK": "true",
            "TOKENBROKER_CIMD_CA_FILE": str(ca_file),
            "TOKENBROKER_CIMD_DEFAULT_AUDIENCES": json.dumps([AUDIENCE]),
            "TOKENBROKER_CIMD_DEFAULT_SCOPES": json.dumps([SCOPE]),
        },
    )
    clients = {BASELINE: Client(BASELINE, "bench-registered")}
    pem = workdir / "registered.pub.pem"
    pem.write_bytes(
        clients[BASELINE]
        .key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    broker.cli(
        "clients", "add", "bench-registered", "--public-key", str(pem), "--audience", AUDIENCE, "--scope", SCOPE,
        "--binding", "dpop", "--approve", "--by", "bench",
    )  # fmt: skip
    for row, cache_control in CACHE_CONTROL.items():
        path = f"/clients/{row}.json"
        client = Client(row, documents.url(path), path=path)
        documents.replies[path] = Reply.json(document(client.client_id, client.key), cache_control=cache_control)
        broker.cli("clients", "approve", client.client_id, "--by", "bench")  # fetches and pins its keys
        clients[row] = client
    return broker, clients


def _request(http: httpx.Client, broker: Broker, client: Client) -> float:
    """One token request; its round trip in milliseconds (signing not included)."""
    token_url = f"{broker.url}/token"
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": make_client_assertion(client.key, client.client_id, broker.url),
        "resource": AUDIENCE,
        "scope": SCOPE,
    }
    headers = {"DPoP": client.dpop.sign("POST", token_url)}
    began = time.perf_counter()
    response = http.post(token_url, data=form, headers=headers)
    elapsed = (time.perf_counter() - began) * 1000
    answer = response.json() if response.status_code == 200 else {}
    if answer.get("token_type") != "DPoP" or answer.get("session_id") is None:
        raise SystemExit(f"cimd_latency: {client.row}: not a DPoP-bound grant: {response.status_code} {response.text}")
    return elapsed


def _interleaved(http: httpx.Client, broker: Broker, clients: dict[str, Client], n: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {row: [] for row in ROWS}
    for i in range(n):
        for j in range(len(ROWS)):
            row = ROWS[(i + j) % len(ROWS)]
            samples[row].append(_request(http, broker, clients[row]))
    return samples


def run(n: int, warmup: int) -> dict[str, Any]:
    """Everything measured: the rows' latencies and the document fetches each caused."""
    with tempfile.TemporaryDirectory(prefix="tb-cimd-latency-") as tmp:
        workdir = Path(tmp)
        ca = make_test_ca(workdir / "ca")
        cert_file, key_file = ca.issue(dns_names=("localhost",), ips=("127.0.0.1",))
        with HttpsServer(cert_file, key_file) as documents:
            broker, clients = _deploy(workdir, documents, ca.ca_file)
            with broker.running(), httpx.Client(timeout=30) as http:
                time.sleep(REGISTRY_RELOAD_SECONDS)  # the approvals are in the file the broker reads
                _say(f"warm-up: {warmup} requests per row")
                _interleaved(http, broker, clients, warmup)
                before = {row: documents.count(c.path) for row, c in clients.items() if c.path is not None}
                _say(f"measuring: {n} requests per row, interleaved")
                samples = _interleaved(http, broker, clients, n)
                fetches = {row: documents.count(c.path) - before[row] for row, c in clients.items() if c.path}
    if fetches["cimd-uncached"] != n or fetches["cimd-cached"] != 0:
        raise SystemExit(
            f"cimd_latency: the document fetches do not match the rows ({fetches}, expected {n} uncached and 0 "
            "cached): the broker's fetcher was not the unthrottled one, or it cached what it must not"
        )
    base = samples[BASELINE]
    rows = []
    for row in ROWS:
        times = samples[row]
        rows.append(
            {
                "row": row,
                "requests": len(times),
                "document_fetches": fetches.get(row, 0),
                "p50_ms": round(percentile(times, 50), 3),
                "p99_ms": round(percentile(times, 99), 3),
                "mean_ms": round(statistics.fmean(times), 3),
                "added_p50_ms": None if row == BASELINE else round(percentile(times, 50) - percentile(base, 50), 3),
                "added_p99_ms": None if row == BASELINE else round(percentile(times, 99) - percentile(base, 99), 3),
            }
        )
    return {"rows": rows}


def markdown(result: dict[str, Any]) -> str:
    meta = result["run"]

    def ms(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    lines = [
        "# CIMD token request latency",
        "",
        f"{meta['started']}, `{meta['command']}`, {meta['cpus']} CPUs, load {meta['load_before']} before, "
        f"Python {meta['python']}, {meta['platform']}, {meta['total_seconds']} s.",
        "",
        "| row | requests | document fetches | p50 ms | p99 ms | mean ms | added p50 ms | added p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['row']} | {row['requests']} | {row['document_fetches']} | {ms(row['p50_ms'])} | "
            f"{ms(row['p99_ms'])} | {ms(row['mean_ms'])} | {ms(row['added_p50_ms'])} | {ms(row['added_p99_ms'])} |"
        )
    lines += [
        "",
        "Added: the row's percentile minus the registered client's, same run.",
        "",
        "Method: one `tokenbroker serve` (memory store) on loopback; `POST /token` (client_credentials, an EdDSA "
        "`private_key_jwt` assertion and a DPoP proof, both signed before the timer starts) over one kept-alive "
        "httpx connection, sequential, the rows taking turns request by request after "
        f"{meta['warmup']} warm-up requests each. registered: a client in the registry file. cimd-cached: an "
        "approved, pinned CIMD client whose document says `max-age=3600` (answered from the broker's cache). "
        "cimd-uncached: the same with `max-age=0`, so each request fetches the document again from a local "
        "HTTPS server (new TCP connection and TLS handshake, test CA); the broker's per-host fetch rate limit is "
        "raised for the run (otherwise it answers its last good copy after 10 fetches), and the run checks one "
        "fetch per uncached request and none for the cached row. Percentiles are nearest-rank.",
    ]
    return "\n".join(lines) + "\n"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="measured requests per row (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up requests per row (default 20)")
    parser.add_argument("--json", type=Path, help="also write everything measured to this file")
    parser.add_argument("--markdown", type=Path, help="also write the Markdown to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= MAX_REQUESTS or not 1 <= args.warmup <= MAX_REQUESTS:
        parser.error(f"-n and --warmup must be from 1 to {MAX_REQUESTS} (the warm-up fetches the cached document)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    began = time.perf_counter()
    result = run(args.n, args.warmup)
    result["run"] = {
        "started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": "benches/cimd_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "n": args.n,
        "warmup": args.warmup,
        "total_seconds": round(time.perf_counter() - began, 1),
    }
    text = markdown(result)
    print(text, end="")
    for path, content in ((args.json, json.dumps(result, indent=2) + "\n"), (args.markdown, text)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            _say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
