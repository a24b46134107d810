"""The processes test_t40_netns.py runs inside its network namespaces (tests/support/netns.py).

    python -m support.netns_agent probe --grpc 127.0.0.1:50051 --http http://127.0.0.1:8000/...
        waits until the broker answers SERVING and the MCP server its metadata (exit 0),
        or fails after --timeout seconds (exit 1).

    python -m support.netns_agent client --url http://10.71.0.1:8000/mcp --token-file T \\
        --results R --stop-file S [--token-url URL --client-id ID --secret-file F --resource URI]
        an MCP client (the SDK's streamable HTTP client, `Authorization: Bearer`): with
        --token-url it first gets its token from the broker's token endpoint
        (client_credentials, client_secret_basic) and writes it to T; without, it reads T
        (the thief, with a stolen copy). Then it calls tools at --rate per second until S
        exists or --max-seconds pass, writing one JSON line per attempt to R: `kind`
        ("start" before its first request, "call" after each attempt), `t0`/`t1` (Unix
        time), `tool`, `ok`, for a success the tool's answer, for a failure the HTTP error
        statuses and `error_description`s the attempt got and the exception's type.

A failed attempt drops the MCP session and the next one connects again (a 401 can leave
the SDK's transport in any state). Every step is bounded in time. Nothing here prints or
writes a token except to --token-file."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import anyio
import httpx

from support.oauth_sdk_clients import Exchanges, connect, tool_result

try:  # the SDK's HTTP client: httpx2 under mcp 2.x, httpx under 1.x
    import httpx2 as sdk_http
except ImportError:
    import httpx as sdk_http  # type: ignore[no-redef]

CALL_SECONDS = 5.0  # one attempt (connect included) at most
TOKEN_SECONDS = 10.0


class Bearer(sdk_http.Auth):
    """`Authorization: Bearer <token>` on every request of the SDK's HTTP client."""

    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


class Refusals(Exchanges):
    """The SDK client's exchanges, keeping each refusal's status and error description."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[dict[str, Any]] = []

    async def _on_response(self, response: Any) -> None:
        await super()._on_response(response)
        if response.status_code >= 400:
            await response.aread()  # a refusal is a short JSON body, never a stream
            try:
                body = json.loads(response.content)
            except ValueError:
                body = {}
            self.refusals.append(
                {
                    "status": response.status_code,
                    "error": body.get("error") if isinstance(body, dict) else None,
                    "detail": body.get("error_description") if isinstance(body, dict) else None,
                }
            )


def write_line(results: Path, record: dict[str, Any]) -> None:
    with results.open("a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


def obtain_token(args: argparse.Namespace) -> str:
    """The client's own token from the broker's token endpoint, written to --token-file
    (atomically: the thief's reader never sees half of it)."""
    secret = Path(args.secret_file).read_text().strip()
    answer = httpx.post(
        args.token_url,
        auth=(args.client_id, secret),
        data={"grant_type": "client_credentials", "resource": args.resource, "scope": args.scope},
        timeout=TOKEN_SECONDS,
    )
    if answer.status_code != 200:
        raise SystemExit(f"token endpoint answered {answer.status_code}: {answer.text[:500]}")
    token = str(answer.json()["access_token"])
    partial = Path(args.token_file).with_suffix(".partial")
    partial.write_text(token)
    os.replace(partial, args.token_file)
    return token


async def calls(args: argparse.Namespace, token: str) -> None:
    results, stop = Path(args.results), Path(args.stop_file)
    deadline = time.monotonic() + args.max_seconds
    period = 1.0 / args.rate
    tools = ["whoami", "add"]
    count = 0
    write_line(results, {"kind": "start", "t": time.time()})

    def done() -> bool:
        return stop.exists() or time.monotonic() > deadline

    while not done():
        watcher = Refusals()
        t0 = time.time()
        tool = "connect"
        try:
            # One scope bounds each step (the connect, every call, the goodbye): its deadline
            # moves, as a scope nested in the session's own task group could not.
            with anyio.fail_after(CALL_SECONDS) as bound:
                async with connect(args.url, Bearer(token), watcher) as session:
                    while not done():
                        tool = tools[count % 2]
                        count += 1
                        arguments = {"a": count, "b": 1} if tool == "add" else {}
                        bound.deadline = anyio.current_time() + CALL_SECONDS
                        value = tool_result(await session.call_tool(tool, arguments))
                        bound.deadline = math.inf
                        t1 = time.time()
                        write_line(
                            results, {"kind": "call", "t0": t0, "t1": t1, "tool": tool, "ok": True, "value": value}
                        )
                        await anyio.sleep(max(0.0, period - (t1 - t0)))
                        t0 = time.time()
                        watcher.refusals.clear()
                    bound.deadline = anyio.current_time() + CALL_SECONDS
                return
        except Exception as exc:  # the attempt failed: record why, connect again
            write_line(
                results,
                {
                    "kind": "call",
                    "t0": t0,
                    "t1": time.time(),
                    "tool": tool,
                    "ok": False,
                    "refusals": watcher.refusals,
                    "exception": type(exc).__name__,
                },
            )
            await anyio.sleep(period)


def probe(args: argparse.Namespace) -> int:
    """Waits for the broker (gRPC health) and the MCP server (its resource metadata)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + args.timeout
    broker_up = server_up = False
    while time.monotonic() < deadline:
        if not broker_up:
            try:
                with grpc.insecure_channel(args.grpc) as channel:
                    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    broker_up = answer.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                pass
        if broker_up and not server_up and args.http:
            with contextlib.suppress(httpx.TransportError):
                server_up = httpx.get(args.http, timeout=0.5).status_code == 200
        if broker_up and (server_up or not args.http):
            print("ready", flush=True)
            return 0
        time.sleep(0.1)
    print(f"not ready after {args.timeout:g} s: broker {broker_up}, MCP server {server_up}", flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    ready = modes.add_parser("probe")
    ready.add_argument("--grpc", required=True)
    ready.add_argument("--http", default="")
    ready.add_argument("--timeout", type=float, default=20.0)
    client = modes.add_parser("client")
    client.add_argument("--url", required=True)
    client.add_argument("--token-file", required=True)
    client.add_argument("--results", required=True)
    client.add_argument("--stop-file", required=True)
    client.add_argument("--rate", type=float, default=5.0)
    client.add_argument("--max-seconds", type=float, default=50.0)
    client.add_argument("--token-url")
    client.add_argument("--client-id")
    client.add_argument("--secret-file")
    client.add_argument("--resource")
    client.add_argument("--scope", default="tools:call")
    args = parser.parse_args(argv)
    if args.mode == "probe":
        return probe(args)
    token = obtain_token(args) if args.token_url else Path(args.token_file).read_text().strip()
    anyio.run(calls, args, token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
