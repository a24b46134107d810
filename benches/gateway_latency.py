"""Latency the nginx gateway door adds to each MCP request, against direct access: N
`tools/call` round trips (JSON answers) to an MCP SDK server with no auth code
(examples/gateway_upstream.py), over loopback TCP, for

  direct       the client talks to the MCP server itself (no gateway, no auth);
  nginx        through Debian's nginx as a plain reverse proxy (no auth): nginx's own cost;
  nginx+authz  through nginx running the shipped contrib/gateways/nginx.conf: each request
               is first asked of a real `tokenbroker serve` (memory store) on `/authz`,
               carrying `Authorization: DPoP` and a fresh proof (signed before the clock
               starts: the client's work, not the gateway's).

The configurations take turns call by call, so load from elsewhere hits them alike; each
row gives p50 and p99 of one call and the difference to direct. Needs nginx (`make
gateways`).

    .venv/bin/python benches/gateway_latency.py [-n 2000] [--json out.json]"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tokenbroker import ProofSigner
from tokenbroker_bench.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support.nginx_gateway import NginxGateway  # type: ignore[import-not-found,unused-ignore]  # noqa: E402
from support.oauth import OAuthDeployment, http_client, key_token, new_key  # type: ignore[import-not-found,unused-ignore]  # noqa: E402
from support.upstream_process import UpstreamProcess  # type: ignore[import-not-found,unused-ignore]  # noqa: E402

API_KEY = "bench-gateway-key-" + "k" * 32
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
PLAIN_PROXY = """
upstream mcp_server { server 127.0.0.1:8000; keepalive 16; }
server {
    listen 127.0.0.1:8443;
    location = /mcp {
        proxy_set_header Host $http_host;
        proxy_set_header Connection "";
        proxy_http_version 1.1;
        proxy_buffering off;
        proxy_pass http://mcp_server;
    }
}
"""


class Path_:
    """One way to the MCP server: its URL, the headers each call needs, an MCP session."""

    def __init__(self, name: str, url: str, headers: Callable[[], dict[str, str]]):
        self.name = name
        self.url = url
        self.headers = headers
        self.http = httpx.Client(timeout=10)
        self.session: dict[str, str] = {}
        self.times: list[float] = []

    def open(self) -> None:
        hello = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "b", "version": "1"},
            },
        }
        answer = self.http.post(self.url, json=hello, headers={**ACCEPT, **self.headers()})
        answer.raise_for_status()
        self.session = {"mcp-session-id": answer.headers["mcp-session-id"]}
        done = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        self.http.post(self.url, json=done, headers={**ACCEPT, **self.session, **self.headers()}).raise_for_status()

    def call(self, n: int) -> None:
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": n,
                "method": "tools/call",
                "params": {"name": "add", "arguments": {"a": n, "b": 1}},
            }
        )
        headers = {**ACCEPT, **self.session, **self.headers()}  # the proof is signed here, before the clock
        began = time.perf_counter()
        answer = self.http.post(self.url, content=body, headers=headers)
        elapsed = time.perf_counter() - began
        if answer.status_code != 200 or '"isError":true' in answer.text:
            raise RuntimeError(f"{self.name}: call {n} answered {answer.status_code}: {answer.text[:200]}")
        self.times.append(elapsed)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="calls per configuration (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="calls per configuration not counted")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.n < 100:
        parser.error("-n must be at least 100 (a p99 needs them)")

    with tempfile.TemporaryDirectory(prefix="tb-gateway-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        audience = f"http://127.0.0.1:{port}/mcp"
        key = new_key("ed25519")
        d = OAuthDeployment(work / "broker")
        d.add_key_client("agent", key, allowed_audiences=(audience,), allowed_scopes=("tools:call",))
        d.add_server("nginx-gateway", (audience,), API_KEY, required_scopes=("tools:call",))
        print("starting tokenbroker serve, the MCP server and two nginx", file=sys.stderr)
        broker = d.broker(trusted_proxies='["127.0.0.1"]')
        upstream = UpstreamProcess(work).start()
        gateway = NginxGateway(work / "nginx-authz", upstream.port, broker.http_port, API_KEY, port=port)
        plain = NginxGateway(work / "nginx-plain", upstream.port, broker.http_port, API_KEY, site_text=PLAIN_PROXY)
        try:
            gateway.start()
            plain.start()
            signer = ProofSigner()
            with http_client() as http:
                answer = key_token(http, broker, key, "agent", signer=signer, resource=audience, scope="tools:call")
            answer.raise_for_status()
            token = answer.json()["access_token"]

            def dpop() -> dict[str, str]:
                return {"Authorization": f"DPoP {token}", "DPoP": signer.sign("POST", audience, token)}

            paths = [
                Path_("direct", upstream.url, dict),
                Path_("nginx", plain.url, dict),
                Path_("nginx+authz", gateway.url, dpop),
            ]
            for path in paths:
                path.open()
            total = args.warmup + args.n
            for n in range(total):
                for path in paths:
                    path.call(n)
                if n == args.warmup - 1:
                    for path in paths:
                        path.times.clear()
                if (n + 1) % 500 == 0:
                    print(f"  {n + 1}/{total} calls each", file=sys.stderr)
        finally:
            plain.stop()
            gateway.stop()
            upstream.stop()
            broker.stop()

    direct = paths[0].times
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.append(
            {
                "path": path.name,
                "calls": len(path.times),
                "p50_ms": percentile(path.times, 0.50) * 1000,
                "p99_ms": percentile(path.times, 0.99) * 1000,
                "mean_ms": statistics.fmean(path.times) * 1000,
                "added_p50_ms": (percentile(path.times, 0.50) - percentile(direct, 0.50)) * 1000,
                "added_p99_ms": (percentile(path.times, 0.99) - percentile(direct, 0.99)) * 1000,
            }
        )
    print(f"| path | p50 (ms) | p99 (ms) | added p50 (ms) | added p99 (ms) |  ({args.n} calls each)")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['path']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['added_p50_ms']:+.2f} | {row['added_p99_ms']:+.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"calls": args.n, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
