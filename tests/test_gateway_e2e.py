"""Issue 13's gateway acceptance, with real processes: Debian's nginx running the shipped
contrib/gateways/nginx.conf (`auth_request` to tokenbroker's `/authz`), and Debian's Caddy
running the shipped contrib/gateways/Caddyfile (`forward_auth`), each in front of an MCP
SDK server that has no auth code (examples/gateway_upstream.py), with a real `tokenbroker
serve`, and the MCP SDK client authenticated by `BrokerAuth`. Every test runs through both.

- The SDK client calls tools through the gateway; the upstream sees the identity headers and
  never the client's `Authorization` or `DPoP`; a client's forged identity header is
  overwritten.
- No token: 401 with the DPoP and Bearer challenges and `resource_metadata`, whose
  document the gateway serves from tokenbroker.
- A replayed proof: 401. Another server's token: 401. A missing scope: 403
  insufficient_scope."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from tokenbroker import ProofSigner
from tokenbroker.client_assertion import PrivateKey
from tokenbroker.mcp import BrokerAuth
from tokenbroker_bench.servers import free_port

from support.broker_process import BrokerProcess
from support.caddy_gateway import CaddyGateway
from support.nginx_gateway import NginxGateway
from support.oauth import OAuthDeployment, key_token, new_key
from support.upstream_process import UpstreamProcess

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_KEY = "gateway-api-key-for-tests"
OTHER_KEY = "other-server-api-key-for-tests"
OTHER_AUDIENCE = "http://other.test/mcp"
SCOPES = ("tools:call", "tools:list")
ACCEPT = "application/json, text/event-stream"


def _example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"tokenbroker_example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


agent = _example("agent")


@dataclass
class Stack:
    broker: BrokerProcess
    gateway: NginxGateway | CaddyGateway
    upstream: UpstreamProcess
    key: PrivateKey

    @property
    def url(self) -> str:
        return self.gateway.url

    def logs(self) -> str:
        if isinstance(self.gateway, NginxGateway):
            return self.gateway.error_log() + (self.gateway.workdir / "access.log").read_text()
        return self.gateway.log()


@pytest.fixture(scope="module", params=["nginx", "caddy"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp(request.param)
    port = free_port()
    audience = f"http://127.0.0.1:{port}/mcp"  # what clients address: the gateway, with its port
    key = new_key("ed25519")
    d = OAuthDeployment(workdir / "broker")
    for client_id, scopes in (("agent", SCOPES), ("reader", ("tools:list",))):
        d.add_key_client(
            client_id, key, allowed_audiences=(audience, OTHER_AUDIENCE), allowed_scopes=scopes, max_sessions=100
        )
    d.add_server("mcp-gateway", (audience,), GATEWAY_KEY, required_scopes=("tools:call",))
    d.add_server("other", (OTHER_AUDIENCE,), OTHER_KEY)
    broker = d.broker(trusted_proxies='["127.0.0.1"]')
    upstream = UpstreamProcess(workdir).start()
    kind = NginxGateway if request.param == "nginx" else CaddyGateway
    gateway = kind(workdir / request.param, upstream.port, broker.http_port, GATEWAY_KEY, port=port)
    try:
        gateway.start()
        yield Stack(broker, gateway, upstream, key)
    finally:
        gateway.stop()
        upstream.stop()
        assert broker.stop() == 0, broker.log.read_text()[-2000:]


def pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class RawClient:
    """JSON-RPC over streamable HTTP by hand, so that each header can be chosen."""

    def __init__(
        self, stack: Stack, client_id: str = "agent", scope: str = "tools:call tools:list", audience: str = ""
    ):
        self.url = stack.url
        self.signer = ProofSigner()
        with httpx.Client(timeout=10) as http:
            answer = key_token(
                http, stack.broker, stack.key, client_id, signer=self.signer, resource=audience or self.url, scope=scope
            )
        assert answer.status_code == 200, answer.text
        self.token = answer.json()["access_token"]

    def headers(self) -> dict[str, str]:
        return {
            "Authorization": f"DPoP {self.token}",
            "DPoP": self.signer.sign("POST", self.url, self.token),
            "Accept": ACCEPT,
            "Content-Type": "application/json",
        }

    def initialize(self) -> dict[str, Any]:
        return {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "raw", "version": "1"},
            },
        }


async def test_the_sdk_client_calls_tools_through_the_gateway(stack: Stack) -> None:
    auth = BrokerAuth.from_token_endpoint(
        f"{stack.broker.http_url}/token",
        client_id="agent",
        private_key=pem(stack.key),
        resource=stack.url,
        scopes=SCOPES,
    )
    async with agent.connect(stack.url, auth) as session:
        me = agent.tool_result(await session.call_tool("whoami", {}))
        total = agent.tool_result(await session.call_tool("add", {"a": 2, "b": 3}))
    assert me["client_id"] == "agent"
    assert me["session_id"]
    assert sorted(me["scopes"]) == sorted(SCOPES)
    assert me["credentials_seen"] == []  # the gateway stripped Authorization and DPoP
    assert total == 5


def test_a_forged_identity_header_is_overwritten(stack: Stack) -> None:
    client = RawClient(stack)
    with httpx.Client(timeout=10) as http:
        opened = http.post(stack.url, json=client.initialize(), headers=client.headers())
        assert opened.status_code == 200, opened.text
        session = {"mcp-session-id": opened.headers["mcp-session-id"]}
        done = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert http.post(stack.url, json=done, headers={**client.headers(), **session}).status_code == 202
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
        forged = {**client.headers(), **session, "X-Tokenbroker-Client-Id": "admin", "X-Tokenbroker-Scopes": "root"}
        answer = http.post(stack.url, json=call, headers=forged)
    assert answer.status_code == 200, answer.text
    me = json.loads(answer.json()["result"]["content"][0]["text"])
    assert me["client_id"] == "agent"
    assert "root" not in me["scopes"]


def test_a_client_cannot_describe_its_own_request(stack: Stack) -> None:
    """The headers that describe the request to /authz are the gateway's: a client's own
    X-Forwarded-Method / -Uri / -Host (or X-Original-*) never choose the htm, htu or audience."""
    client = RawClient(stack)
    with httpx.Client(timeout=10) as http:
        # A proof signed for GET, sent with a POST that claims to be a GET.
        headers = {
            **client.headers(),
            "DPoP": client.signer.sign("GET", stack.url, client.token),
            "X-Forwarded-Method": "GET",
            "X-Original-Method": "GET",
        }
        answer = http.post(stack.url, json=client.initialize(), headers=headers)
        assert answer.status_code == 401, answer.text
        assert 'error="invalid_dpop_proof"' in answer.headers["www-authenticate"]
        # A proof for another path and host, with headers claiming the request went there.
        elsewhere = "http://elsewhere.test/other"
        forged = {
            **client.headers(),
            "DPoP": client.signer.sign("POST", elsewhere, client.token),
            "X-Forwarded-Uri": "/other",
            "X-Original-URI": "/other",
            "X-Forwarded-Host": "elsewhere.test",
        }
        refused = http.post(stack.url, json=client.initialize(), headers=forged)
    assert refused.status_code in (400, 401, 500), refused.text  # never let through


def test_no_token_gets_401_with_the_challenge_and_its_metadata(stack: Stack) -> None:
    with httpx.Client(timeout=10) as http:
        answer = http.post(stack.url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers={"Accept": ACCEPT})
        assert answer.status_code == 401
        challenge = answer.headers["www-authenticate"]
        assert challenge.startswith("DPoP ")
        assert ", Bearer " in challenge
        metadata_url = f"http://127.0.0.1:{stack.gateway.port}/.well-known/oauth-protected-resource/mcp"
        assert f'resource_metadata="{metadata_url}"' in challenge
        document = http.get(metadata_url)
    assert document.status_code == 200, document.text
    assert document.json()["resource"] == stack.url
    assert document.json()["authorization_servers"] == [stack.broker.env["TOKENBROKER_ISSUER"]]


def test_a_replayed_proof_gets_401(stack: Stack) -> None:
    client = RawClient(stack)
    headers = client.headers()
    with httpx.Client(timeout=10) as http:
        assert http.post(stack.url, json=client.initialize(), headers=headers).status_code == 200
        again = http.post(stack.url, json=client.initialize(), headers=headers)
    assert again.status_code == 401
    assert 'error="invalid_dpop_proof"' in again.headers["www-authenticate"]


def test_another_servers_token_gets_401(stack: Stack) -> None:
    client = RawClient(stack, audience=OTHER_AUDIENCE)
    with httpx.Client(timeout=10) as http:
        answer = http.post(stack.url, json=client.initialize(), headers=client.headers())
    assert answer.status_code == 401
    assert 'error="invalid_token"' in answer.headers["www-authenticate"]


def test_a_missing_scope_gets_403(stack: Stack) -> None:
    client = RawClient(stack, client_id="reader", scope="tools:list")  # the route requires tools:call
    with httpx.Client(timeout=10) as http:
        answer = http.post(stack.url, json=client.initialize(), headers=client.headers())
    assert answer.status_code == 403
    challenge = answer.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="tools:call"' in challenge


def test_the_gateway_logged_no_credential(stack: Stack) -> None:
    logs = stack.logs()
    assert GATEWAY_KEY not in logs
    assert "eyJ" not in logs  # no token
