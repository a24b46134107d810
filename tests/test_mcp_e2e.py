"""The MCP integration end to end: a real `tokenbroker serve` process (memory store), a real
MCP server process (examples/protected_server.py behind BrokerAuthMiddleware, loopback),
the real MCP SDK client over streamable HTTP authenticated by BrokerAuth, and the real
CLI for revocation. Runs with whichever `mcp` is installed (2.x MCPServer or 1.x FastMCP)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tokenbroker import Keyring, ProofSigner
from tokenbroker.client import BrokerClient
from tokenbroker.client_assertion import public_jwk
from tokenbroker.dpop_nonce import proof_nonce
from tokenbroker.mcp import BrokerAuth
from tokenbroker.registry import ClientRecord, ClientStatus, ServerRecord
from tokenbroker.registry_file import FileRegistry, hash_secret
from tokenbroker_bench.servers import free_port

from support.broker_process import BrokerProcess, broker_env

try:  # mcp 2.x
    from mcp.shared.exceptions import MCPError as SdkError
except ImportError:  # mcp 1.x
    from mcp.shared.exceptions import McpError as SdkError  # type: ignore[attr-defined,no-redef]

ROOT = Path(__file__).resolve().parent.parent
ISSUER = "https://broker.mcp-e2e.test"
PUBLIC_URL = "http://127.0.0.1:8080"  # the authorization server the nonce server's metadata names
KEY_SERVER, KEY_OTHER, KEY_ADMIN = "key-server-" + "s" * 40, "key-other-" + "o" * 40, "key-admin-" + "a" * 40


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tokenbroker_example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


agent = load_example("agent")


@dataclass
class McpServerProcess:
    """examples/protected_server.py on a free loopback port, stopped with SIGTERM."""

    workdir: Path
    broker: str
    api_key_file: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    options: tuple[str, ...] = ()  # more command-line options of the example server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def log(self) -> Path:
        return self.workdir / f"mcp-server-{self.port}.log"

    def start(self, timeout: float = 30.0) -> McpServerProcess:
        command = [
            sys.executable,
            str(ROOT / "examples" / "protected_server.py"),
            *("--broker", self.broker, "--api-key-file", str(self.api_key_file)),
            *("--audience", self.url, "--issuer", ISSUER, "--port", str(self.port)),
            *self.options,
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=log, env=dict(os.environ))
        metadata = f"http://127.0.0.1:{self.port}/.well-known/oauth-protected-resource/mcp"
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"MCP server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(metadata, timeout=0.5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"MCP server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Deployment:
    broker: BrokerProcess
    server: McpServerProcess
    client_key: ed25519.Ed25519PrivateKey
    # the example server with --authorization-server and --require-dpop-nonce
    nonce_server: McpServerProcess

    @property
    def other_audience(self) -> str:  # another MCP server, registered with the same broker
        return f"http://127.0.0.1:{self.server.port}/other-mcp"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("mcp-e2e")
    Keyring.generate().save(workdir / "keys.json")
    client_key = ed25519.Ed25519PrivateKey.generate()
    port, nonce_port = free_port(), free_port()
    audience, other = f"http://127.0.0.1:{port}/mcp", f"http://127.0.0.1:{port}/other-mcp"
    nonce_audience = f"http://127.0.0.1:{nonce_port}/mcp"
    registry = FileRegistry(workdir / "registry.toml")
    for client_id, scopes in [("agent", ("tools:call", "tools:list")), ("reader", ("tools:list",))]:
        registry.add_client(
            ClientRecord(
                client_id,
                status=ClientStatus.APPROVED,
                public_jwk=public_jwk(client_key),
                allowed_audiences=(audience, other, nonce_audience),
                allowed_scopes=scopes,
            )
        )
    registry.add_server(
        ServerRecord("mcp-server", audiences=(audience, nonce_audience), api_key_hash=hash_secret(KEY_SERVER))
    )
    registry.add_server(ServerRecord("other-server", audiences=(other,), api_key_hash=hash_secret(KEY_OTHER)))
    registry.add_server(ServerRecord("ops", admin=True, api_key_hash=hash_secret(KEY_ADMIN)))
    env = broker_env(workdir, ISSUER)
    api_key_file = workdir / "server-api-key"
    api_key_file.write_text(KEY_SERVER + "\n")
    broker = BrokerProcess(workdir, env)
    server = McpServerProcess(workdir, broker.target, api_key_file, port)
    nonce_options = ("--authorization-server", PUBLIC_URL, "--require-dpop-nonce")
    nonce_server = McpServerProcess(workdir, broker.target, api_key_file, nonce_port, options=nonce_options)
    try:
        broker.start()
        server.start()
        nonce_server.start()
        yield Deployment(broker, server, client_key, nonce_server)
    finally:
        nonce_server.stop()
        server.stop()
        assert broker.stop() == 0, broker.log.read_text()[-2000:]


@pytest.fixture
async def broker_client(deployment: Deployment) -> Any:
    async with BrokerClient(deployment.broker.target, timeout=5) as client:
        yield client


def broker_auth(deployment: Deployment, broker_client: BrokerClient, **options: Any) -> BrokerAuth:
    return BrokerAuth(
        broker_client,
        client_id=options.pop("client_id", "agent"),
        private_key=deployment.client_key,
        issuer=ISSUER,
        audience=options.pop("audience", deployment.server.url),
        scopes=options.pop("scopes", ["tools:call"]),
        **options,
    )


class Exchanges:
    """Every HTTP request the SDK client sent (after auth) and the status it got."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.statuses: list[int] = []

    async def on_request(self, request: Any) -> None:
        self.requests.append(request)

    async def on_response(self, response: Any) -> None:
        self.statuses.append(response.status_code)

    def hooks(self) -> dict[str, Any]:
        return {"event_hooks": {"request": [self.on_request], "response": [self.on_response]}}


def raw_post(url: str, headers: dict[str, str], body: bytes = b"{}") -> httpx.Response:
    """One POST outside the SDK, with exactly these headers."""
    return httpx.post(url, headers={"content-type": "application/json", **headers}, content=body, timeout=10)


def challenge(response: httpx.Response, scheme: str) -> str:
    values = [v for v in response.headers.get_list("www-authenticate") if v.split(" ")[0] == scheme]
    assert len(values) == 1, response.headers.get_list("www-authenticate")
    return values[0]


async def test_an_authorised_tool_call_succeeds_and_the_tool_sees_the_calling_client(
    deployment: Deployment, broker_client: BrokerClient
) -> None:
    auth = broker_auth(deployment, broker_client)
    async with agent.connect(deployment.server.url, auth) as session:
        tools = await session.list_tools()
        me = agent.tool_result(await session.call_tool("whoami", {}))
    assert {tool.name for tool in tools.tools} == {"whoami", "add"}
    assert me["client_id"] == "agent"
    assert me["scopes"] == ["tools:call"]
    assert me["session_id"] == auth.session_id
    assert me["issuer"] == ISSUER
    assert me["resource"] == deployment.server.url


async def test_a_replayed_request_is_refused(deployment: Deployment, broker_client: BrokerClient) -> None:
    exchanges = Exchanges()
    async with agent.connect(deployment.server.url, broker_auth(deployment, broker_client), **exchanges.hooks()) as s:
        await s.call_tool("whoami", {})
    sent = next(r for r, status in zip(exchanges.requests, exchanges.statuses, strict=True) if status == 200)
    assert sent.method == "POST"

    replayed = raw_post(deployment.server.url, dict(sent.headers), sent.content)

    assert replayed.status_code == 401
    assert 'error="invalid_dpop_proof"' in challenge(replayed, "DPoP")


async def test_a_token_issued_for_another_server_is_refused(
    deployment: Deployment, broker_client: BrokerClient
) -> None:
    auth = broker_auth(deployment, broker_client, audience=deployment.other_audience)
    async with httpx.AsyncClient(auth=auth) as client:
        response = await client.post(deployment.server.url, json={}, headers={"accept": "application/json"})
    assert response.status_code == 401
    assert 'error="invalid_token"' in challenge(response, "DPoP")
    assert "another audience" in response.json()["error_description"]


async def test_a_stolen_token_without_a_proof_is_refused(deployment: Deployment, broker_client: BrokerClient) -> None:
    stolen = await broker_auth(deployment, broker_client).atoken()
    response = raw_post(deployment.server.url, {"authorization": f"DPoP {stolen}"})
    assert response.status_code == 401
    assert 'error="invalid_dpop_proof"' in challenge(response, "DPoP")


async def test_a_stolen_token_presented_as_bearer_is_refused(
    deployment: Deployment, broker_client: BrokerClient
) -> None:
    stolen = await broker_auth(deployment, broker_client).atoken()
    response = raw_post(deployment.server.url, {"authorization": f"Bearer {stolen}"})
    assert response.status_code == 401
    assert 'error="invalid_token"' in challenge(response, "DPoP")


async def test_a_stolen_token_with_a_proof_by_another_key_is_refused(
    deployment: Deployment, broker_client: BrokerClient
) -> None:
    stolen = await broker_auth(deployment, broker_client).atoken()
    thief = ProofSigner()
    proof = thief.sign("POST", deployment.server.url, stolen)
    response = raw_post(deployment.server.url, {"authorization": f"DPoP {stolen}", "dpop": proof})
    assert response.status_code == 401
    assert 'error="invalid_token"' in challenge(response, "DPoP")


def revoke_session(deployment: Deployment, session_id: str) -> None:
    """`tokenbroker revoke session`, the CLI in its own process."""
    command = [sys.executable, "-c", "from tokenbroker.cli import main; main()", "revoke"]
    command += ["--target", deployment.broker.target, "--api-key-file", "-", "session", "--", session_id]
    # The key on stdin, not the command line (issue #8 item 9: no secret in /proc/PID/cmdline).
    revoke = subprocess.run(command, input=KEY_ADMIN.encode(), capture_output=True, timeout=30, check=False)
    assert revoke.returncode == 0, revoke.stderr.decode()[-1000:]


async def test_after_the_session_is_revoked_the_next_call_is_refused(
    deployment: Deployment, broker_client: BrokerClient
) -> None:
    auth = broker_auth(deployment, broker_client)
    exchanges, sums = Exchanges(), []

    async def add_revoke_add() -> None:
        async with agent.connect(deployment.server.url, auth, **exchanges.hooks()) as session:
            sums.append(agent.tool_result(await session.call_tool("add", {"a": 1, "b": 2})))
            revoke_session(deployment, str(auth.session_id))
            sums.append(agent.tool_result(await session.call_tool("add", {"a": 1, "b": 2})))

    # mcp 2.x answers the refused call with an MCP error; 1.x's transport raises the HTTP 401.
    with pytest.raises((SdkError, BaseExceptionGroup)):
        await add_revoke_add()
    assert sums == [3]
    assert 401 in exchanges.statuses
    async with httpx.AsyncClient(auth=auth) as client:
        after = await client.post(deployment.server.url, json={}, headers={"accept": "application/json"})
    assert after.status_code == 401
    assert "revoked" in after.json()["error_description"]


async def test_a_client_without_the_required_scope_is_forbidden(
    deployment: Deployment, broker_client: BrokerClient
) -> None:
    auth = broker_auth(deployment, broker_client, client_id="reader", scopes=["tools:list"])
    async with httpx.AsyncClient(auth=auth) as client:
        response = await client.post(deployment.server.url, json={}, headers={"accept": "application/json"})
    assert response.status_code == 403
    assert 'error="insufficient_scope"' in challenge(response, "DPoP")
    assert 'scope="tools:call"' in challenge(response, "DPoP")


async def test_with_nonces_required_the_sdk_client_answers_the_challenge_once_and_calls_tools(
    deployment: Deployment, broker_client: BrokerClient
) -> None:
    url = deployment.nonce_server.url
    exchanges = Exchanges()
    async with agent.connect(url, broker_auth(deployment, broker_client, audience=url), **exchanges.hooks()) as s:
        me = agent.tool_result(await s.call_tool("whoami", {}))
        total = agent.tool_result(await s.call_tool("add", {"a": 2, "b": 3}))
    assert (me["client_id"], me["resource"], total) == ("agent", url, 5)
    # one nonce challenge, answered; every later request carries the remembered nonce
    assert exchanges.statuses.count(401) == 1
    assert exchanges.statuses[0] == 401
    nonces = {proof_nonce(request.headers["dpop"]) for request in exchanges.requests[1:]}
    assert None not in nonces


async def test_with_nonces_required_a_replayed_request_is_refused(
    deployment: Deployment, broker_client: BrokerClient
) -> None:
    url = deployment.nonce_server.url
    exchanges = Exchanges()
    async with agent.connect(url, broker_auth(deployment, broker_client, audience=url), **exchanges.hooks()) as s:
        await s.call_tool("whoami", {})
    sent = next(r for r, status in zip(exchanges.requests, exchanges.statuses, strict=True) if status == 200)
    replayed = raw_post(url, dict(sent.headers), sent.content)
    assert replayed.status_code == 401
    assert 'error="invalid_dpop_proof"' in challenge(replayed, "DPoP")


def test_the_nonce_server_publishes_metadata_naming_the_authorization_server(deployment: Deployment) -> None:
    server = deployment.nonce_server
    metadata_url = f"http://127.0.0.1:{server.port}/.well-known/oauth-protected-resource/mcp"
    document = httpx.get(metadata_url, timeout=10).json()
    assert document["authorization_servers"] == [PUBLIC_URL]
    assert document["resource"] == server.url
    assert document["dpop_bound_access_tokens_required"] is True
    anonymous = raw_post(server.url, {})
    assert anonymous.status_code == 401
    assert f'resource_metadata="{metadata_url}"' in challenge(anonymous, "DPoP")
    assert anonymous.headers["dpop-nonce"]


def test_no_token_or_proof_appears_in_the_logs(deployment: Deployment) -> None:
    logs = deployment.server.log.read_text() + deployment.broker.log.read_text()
    assert "refused" in deployment.server.log.read_text()  # the refusals above were logged ...
    assert "eyJ" not in logs  # ... but no JWS (every token and proof begins with eyJ)
