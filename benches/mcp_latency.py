"""Latency tokenbroker adds to each MCP request: N `tools/call` round trips through the real
MCP SDK client and server (examples/protected_server.py), in process over the HTTP
library's ASGI transport (no sockets between MCP client and server), for

  unprotected  the same server without BrokerAuthMiddleware, client without BrokerAuth;
  embedded     BrokerAuthMiddleware + BrokerTokenVerifier on an embedded `Broker`;
  remote       the same against a real `tokenbroker serve` process over loopback gRPC
               (memory store), the client's tokens issued by that broker.

Protected calls carry `Authorization: DPoP` and a fresh proof, signed by BrokerAuth, and
are validated once each by the broker (token, proof, replay, session). The configurations
take turns call by call, so load from elsewhere on the machine hits them alike; each
prints p50 and p99 of one call, and the protected ones their difference to unprotected.

    .venv/bin/python benches/mcp_latency.py [-n 2000] [--json out.json]"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from tokenbroker import Broker, Keyring
from tokenbroker.client import BrokerClient
from tokenbroker.client_assertion import public_jwk
from tokenbroker.mcp import BrokerAuth, Validator
from tokenbroker.models import IssuedToken
from tokenbroker.registry import ClientRecord, ClientStatus, ServerRecord
from tokenbroker.registry_file import FileRegistry, hash_secret

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support.broker_process import BrokerProcess  # type: ignore[import-not-found,unused-ignore]  # noqa: E402

AUDIENCE = "http://testserver/mcp"  # what the ASGI transport addresses
ISSUER = "https://broker.bench.test"
SCOPES = ["tools:call"]
API_KEY = "bench-server-key-" + "k" * 32


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tokenbroker_example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


server_example, agent_example = load_example("protected_server"), load_example("agent")
http = agent_example.http  # httpx2 with mcp 2.x, httpx with mcp 1.x


class EmbeddedIssuer:
    """An embedded Broker behind BrokerAuth's issuer interface (the broker trusts us)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def issue(self, *, client_assertion: str | None = None, **kw: Any) -> IssuedToken:
        return self.broker.issue(**kw)

    async def aissue(self, *, client_assertion: str | None = None, **kw: Any) -> IssuedToken:
        return self.broker.issue(**kw)


@asynccontextmanager
async def mcp_session(app: Any, auth: BrokerAuth | None) -> AsyncIterator[Any]:
    """The SDK client (examples/agent.py's `connect`) connected in process to `app`."""
    inner = app.app if hasattr(app, "broker") else app  # BrokerAuthMiddleware wraps the Starlette app
    async with (
        inner.router.lifespan_context(inner),
        agent_example.connect(AUDIENCE, auth, transport=http.ASGITransport(app=app)) as session,
    ):
        yield session


async def timed_call(session: Any, i: int) -> float:
    """Microseconds of one `add` tool call."""
    start = time.perf_counter_ns()
    result = await session.call_tool("add", {"a": i, "b": 1})
    elapsed = (time.perf_counter_ns() - start) / 1000
    if agent_example.tool_result(result) != i + 1:
        raise RuntimeError("wrong tool result")
    return elapsed


async def interleaved(sessions: dict[str, Any], n: int) -> dict[str, list[float]]:
    """`n` calls per session, one session after the other call by call, so that load from
    elsewhere on the machine falls on every configuration alike."""
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    gc.disable()
    try:
        for i in range(n):
            for name, session in sessions.items():
                samples[name].append(await timed_call(session, i))
            if i % 100 == 99:
                gc.collect()
    finally:
        gc.enable()
    return samples


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=1000, method="inclusive")[int(q * 10) - 1]


def start_remote_broker(workdir: Path, client_key: ed25519.Ed25519PrivateKey) -> BrokerProcess:
    Keyring.generate().save(workdir / "keys.json")
    registry = FileRegistry(workdir / "registry.toml")
    registry.add_client(
        ClientRecord(
            "bench-agent",
            status=ClientStatus.APPROVED,
            public_jwk=public_jwk(client_key),
            allowed_audiences=(AUDIENCE,),
            allowed_scopes=tuple(SCOPES),
        )
    )
    registry.add_server(ServerRecord("bench-server", audiences=(AUDIENCE,), api_key_hash=hash_secret(API_KEY)))
    env = {
        "TOKENBROKER_ISSUER": ISSUER,
        "TOKENBROKER_KEY_FILE": str(workdir / "keys.json"),
        "TOKENBROKER_REGISTRY_FILE": str(workdir / "registry.toml"),
        "TOKENBROKER_LOG_LEVEL": "warning",
        "TOKENBROKER_GRACE_SECONDS": "1",
    }
    return BrokerProcess(workdir, env).start()


async def components(n: int, embedded: Broker, remote: BrokerClient, auth: BrokerAuth) -> dict[str, list[float]]:
    """The parts of the added latency: the client signing a proof, the broker validating."""
    token = await auth.atoken()
    samples: dict[str, list[float]] = {"sign proof (client)": [], "validate, embedded": [], "validate, remote": []}
    validators: dict[str, Validator] = {"validate, embedded": embedded, "validate, remote": remote}
    embedded_token = embedded.issue(
        client_id="bench-agent", audience=AUDIENCE, scopes=SCOPES, dpop_jkt=auth.signer.jkt
    ).access_token
    for _ in range(n):
        start = time.perf_counter_ns()
        auth.signer.sign("POST", AUDIENCE, token)
        samples["sign proof (client)"].append((time.perf_counter_ns() - start) / 1000)
        for name, validator in validators.items():
            used = embedded_token if validator is embedded else token
            proof = auth.signer.sign("POST", AUDIENCE, used)
            start = time.perf_counter_ns()
            answer = await validator.avalidate(
                used, audience=AUDIENCE, dpop_proof=proof, http_method="POST", http_uri=AUDIENCE, required_scopes=SCOPES
            )
            samples[name].append((time.perf_counter_ns() - start) / 1000)
            if not answer.valid:
                raise RuntimeError(f"{name}: {answer.reason.name}")
    return samples


async def run(n: int, warmup: int) -> dict[str, dict[str, float]]:
    client_key = ed25519.Ed25519PrivateKey.generate()
    embedded = Broker(Keyring.generate(), issuer=ISSUER)
    with tempfile.TemporaryDirectory() as tmp:
        process = start_remote_broker(Path(tmp), client_key)
        try:
            async with (
                BrokerClient(process.target, api_key=API_KEY, timeout=5) as validator,
                BrokerClient(process.target, timeout=5) as issuer,
            ):

                def auth(broker: Any) -> BrokerAuth:
                    return BrokerAuth(
                        broker,
                        client_id="bench-agent",
                        private_key=client_key,
                        issuer=ISSUER,
                        audience=AUDIENCE,
                        scopes=SCOPES,
                        ttl_seconds=3600,
                    )

                remote_auth = auth(issuer)
                configs: dict[str, tuple[Any, BrokerAuth | None]] = {
                    "unprotected": (server_example.create_app(None, host="testserver"), None),
                    "embedded": (
                        server_example.create_app(embedded, audience=AUDIENCE, issuer=ISSUER, host="testserver"),
                        auth(EmbeddedIssuer(embedded)),
                    ),
                    "remote": (
                        server_example.create_app(validator, audience=AUDIENCE, issuer=ISSUER, host="testserver"),
                        remote_auth,
                    ),
                }
                logging.disable(logging.INFO)  # the SDK logs every request at INFO: not what is measured
                async with AsyncExitStack() as stack:
                    sessions = {
                        name: await stack.enter_async_context(mcp_session(app, client_auth))
                        for name, (app, client_auth) in configs.items()
                    }
                    await interleaved(sessions, warmup)
                    samples = await interleaved(sessions, n)
                samples |= await components(n, embedded, validator, remote_auth)
        finally:
            process.stop()
    return {
        name: {
            "calls": len(values),
            "p50_us": round(percentile(values, 50), 1),
            "p99_us": round(percentile(values, 99), 1),
            "mean_us": round(statistics.fmean(values), 1),
        }
        for name, values in samples.items()
    }


def report(results: dict[str, dict[str, float]]) -> str:
    base = results["unprotected"]
    lines = [
        f"MCP tools/call round trips in process (ASGI transport), mcp {agent_example.MCP_MAJOR}.x client and server",
        f"{'':20} {'calls':>6} {'p50 us':>9} {'p99 us':>9} {'+p50 us':>9} {'+p99 us':>9}",
    ]
    for name, r in results.items():
        if name == "sign proof (client)":
            lines.append("components (no MCP):")
        added = (
            f"{r['p50_us'] - base['p50_us']:>9.1f} {r['p99_us'] - base['p99_us']:>9.1f}"
            if name in ("embedded", "remote")
            else f"{'':>9} {'':>9}"
        )
        lines.append(f"{name:20} {r['calls']:>6} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {added}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="timed calls per configuration")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls per configuration first")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = asyncio.run(run(args.n, args.warmup))
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
