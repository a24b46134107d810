"""The SDK-style token loop of the token endpoint bench, in a process of its own: what one
MCP SDK client does for every token, again and again, for a warm-up and then a timed window.

    python -m tokenbroker_bench.sdk_loop < job.json > result.json

One token is one pass of the MCP SDK's own, unmodified `PrivateKeyJWTOAuthProvider` (with
`SignedJWTParameters`, RS256 by default, a fresh assertion each time) through its auth
flow, the way a client-credentials client meets each expiry (the SDK's providers never
refresh): the request to the MCP server answered 401, its protected resource metadata
(RFC 9728), the broker's authorization server metadata (RFC 8414), `POST /token`, and the
request again with the token (answered 200). A fresh provider per token makes the flow
run whole each time; the SDK's HTTP client (httpx2 under mcp 2.x, httpx under 1.x) is one
for the whole loop and keeps its connections, as a client's session does.

The job is JSON on stdin (it holds the client's private key); the result JSON on stdout:
tokens in the window, latency per token, the HTTP requests each token took, this
process's CPU per token and the named processes' (the broker's, the resource's)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped,unused-ignore]
from mcp.client.auth.extensions.client_credentials import PrivateKeyJWTOAuthProvider, SignedJWTParameters
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from tokenbroker_bench.loadgen import percentile

try:  # mcp 2.x: the SDK's HTTP client is httpx2
    import httpx2 as sdk_http  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # mcp 1.x: httpx
    import httpx as sdk_http  # type: ignore[no-redef,unused-ignore]


@dataclass
class Job:
    resource: str  # the MCP server's URL (the resource stub)
    issuer: str  # the broker's issuer, as an SDK user configures it
    client_id: str
    private_key_pem: str
    algorithm: str  # SignedJWTParameters.signing_algorithm ("RS256", the SDK's default)
    warmup: float
    duration: float
    pids: dict[str, int] = field(default_factory=dict)


@dataclass
class Result:
    tokens: int
    wall_s: float
    loop_cpu_s: float
    cpu_s: dict[str, float]
    latency_ms: dict[str, float]
    requests_per_token: float
    steps: list[str]  # "GET /mcp 401", ... of the last token
    failures: dict[str, int]


class _Storage:
    """The SDK's `TokenStorage`, in memory and empty: each provider starts with no token."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


def _provider(job: Job, storage: _Storage) -> PrivateKeyJWTOAuthProvider:
    signer = SignedJWTParameters(
        issuer=job.client_id, subject=job.client_id, signing_key=job.private_key_pem, signing_algorithm=job.algorithm
    )
    return PrivateKeyJWTOAuthProvider(
        server_url=job.resource,
        storage=storage,
        client_id=job.client_id,
        assertion_provider=signer.create_assertion_provider(),
        issuer=job.issuer,
    )


def _cpu(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """User+system CPU seconds of each named process."""
    seconds = {}
    for name, process in processes.items():
        times = process.cpu_times()
        seconds[name] = float(times.user + times.system)
    return seconds


async def _loop(job: Job) -> Result:
    processes = {name: psutil.Process(pid) for name, pid in job.pids.items()}
    steps: list[str] = []

    async def on_response(response: Any) -> None:
        steps.append(f"{response.request.method} {response.request.url.path} {response.status_code}")

    latencies: list[float] = []
    failures: dict[str, int] = {}
    requests = tokens = 0
    last_steps: list[str] = []
    async with sdk_http.AsyncClient(timeout=30.0, event_hooks={"response": [on_response]}) as client:
        began = time.perf_counter()
        begin_edge: tuple[float, float, dict[str, float]] | None = None
        while True:
            now = time.perf_counter()
            if begin_edge is None and now - began >= job.warmup:
                begin_edge = (now, time.process_time(), _cpu(processes))
            if begin_edge is not None and now - begin_edge[0] >= job.duration:
                break
            storage = _Storage()
            steps.clear()
            sent = time.perf_counter()
            response = await client.get(job.resource, auth=_provider(job, storage))
            elapsed = time.perf_counter() - sent
            token = storage.tokens
            if response.status_code != 200 or token is None or not token.access_token.startswith("eyJ"):
                key = f"{response.status_code} after {' / '.join(steps)}"[:200]
                failures[key] = failures.get(key, 0) + 1
                continue
            if begin_edge is not None:
                tokens += 1
                requests += len(steps)
                latencies.append(elapsed)
                last_steps = list(steps)
        end = time.perf_counter(), time.process_time(), _cpu(processes)
    assert begin_edge is not None
    latencies.sort()
    return Result(
        tokens=tokens,
        wall_s=end[0] - begin_edge[0],
        loop_cpu_s=end[1] - begin_edge[1],
        cpu_s={name: end[2][name] - begin_edge[2][name] for name in end[2]},
        latency_ms={p: 1e3 * percentile(latencies, float(p[1:])) for p in ("p50", "p90", "p99")},
        requests_per_token=requests / tokens if tokens else 0.0,
        steps=last_steps,
        failures=failures,
    )


def run(job: Job) -> Result:
    return asyncio.run(_loop(job))


def job_from_json(text: str) -> Job:
    return Job(**json.loads(text))


def result_from_json(text: str) -> Result:
    return Result(**json.loads(text))


def main() -> None:
    print(json.dumps(asdict(run(job_from_json(sys.stdin.read())))))


if __name__ == "__main__":
    main()


__all__ = ["Job", "Result", "job_from_json", "result_from_json", "run"]
