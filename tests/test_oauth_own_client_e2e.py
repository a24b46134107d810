"""tokenbroker's own client over the HTTP door (issue 10, "tokenbroker's own client"), all
real processes on loopback: a `tokenbroker serve` (gRPC and HTTP, memory store), the example
MCP server (examples/protected_server.py: `BrokerAuthMiddleware` with
`--authorization-server` and `--require-dpop-nonce`, validating over gRPC), and
`BrokerAuth.from_token_endpoint` in this process driving the MCP SDK's streamable HTTP
client, given only the MCP server's URL. Clients and the server are registered with the CLI.

Every test runs twice: with the token endpoint demanding a DPoP nonce of every client
(`require_dpop_nonce`, broker-wide) and with only the client registered with
`--require-dpop-nonce`. The MCP server demands its own nonces (its own key) either way, so
`BrokerAuth` answers two different nonce challenges: the token endpoint's `use_dpop_nonce`
error (400) and the resource server's `WWW-Authenticate: DPoP error="use_dpop_nonce"` (401).

What is seen on the wire is recorded without changing it: the token requests through a
transport wrapper on the token endpoint's httpx client, the MCP requests through the SDK
HTTP client's event hooks (both run after `BrokerAuth` signed the request)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import jwt
import pytest

from tokenbroker import Keyring
from tokenbroker.client_assertion import load_private_key, make_client_assertion
from tokenbroker.dpop_nonce import proof_nonce
from tokenbroker.mcp import BrokerAuth
from tokenbroker_bench.servers import free_port

from support.broker_process import BrokerProcess, broker_env
from support.protected_server_process import ProtectedServerProcess

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
SCOPE = "tools:call"
ASM_PATH = "/.well-known/oauth-authorization-server"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tokenbroker_example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


agent = load_example("agent")  # its `connect` and `tool_result`: the SDK client, either major version


# -- the deployment ---------------------------------------------------------------------


@dataclass
class Deployment:
    nonce_at: str  # "broker": every client is asked for a nonce; "client": only `agent` is
    broker: BrokerProcess
    server: ProtectedServerProcess
    workdir: Path
    metrics_port: int

    @property
    def public_url(self) -> str:
        return self.broker.http_url

    @property
    def token_url(self) -> str:
        return f"{self.public_url}/token"

    def pem(self, client_id: str) -> bytes:
        return (self.workdir / f"{client_id}.pem").read_bytes()

    def audit(self, **fields: Any) -> list[dict[str, Any]]:
        """The broker's audit lines that have all of `fields`."""
        lines = [json.loads(line) for line in (self.workdir / "audit.jsonl").read_text().splitlines() if line.strip()]
        return [line for line in lines if all(line.get(name) == value for name, value in fields.items())]

    def validations(self, reason: str) -> float:
        """The broker's `tokenbroker_validations_total` for `reason` (0 before the first)."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        prefix = f'tokenbroker_validations_total{{reason="{reason}"}} '
        return next((float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def tokenbroker_cli(env: dict[str, str], *args: str) -> None:
    """The `tokenbroker` CLI in its own process, as an operator runs it."""
    command = [sys.executable, "-c", "from tokenbroker.cli import main; main()", *args]
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


@pytest.fixture(scope="module", params=["broker", "client"], ids=["nonce-broker-wide", "nonce-client-only"])
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    nonce_at: str = request.param
    workdir = tmp_path_factory.mktemp(f"own-client-{nonce_at}")
    Keyring.generate().save(workdir / "keys.json")
    metrics_port = free_port()
    broker = BrokerProcess(workdir, {})
    broker.env = broker_env(workdir, broker.http_url, metrics_port=str(metrics_port))  # public_url: the HTTP door
    if nonce_at == "broker":
        broker.env["TOKENBROKER_REQUIRE_DPOP_NONCE"] = "true"
    api_key_file = workdir / "mcp-server.key"
    server = ProtectedServerProcess(
        workdir,
        broker.target,
        api_key_file,
        options=("--authorization-server", broker.http_url, "--require-dpop-nonce"),
    )
    may_have = ["--audience", server.url, "--scope", SCOPE, "--binding", "dpop", "--approve"]
    # `agent` is the client under test; `plain-agent` is registered without the nonce flag,
    # to show which of the two settings asked for a nonce.
    agent_nonce = ["--require-dpop-nonce"] if nonce_at == "client" else []
    for client_id, extra in [("agent", agent_nonce), ("plain-agent", [])]:
        key = ["--generate-key", str(workdir / f"{client_id}.pem"), "--key-type", "ed25519"]
        tokenbroker_cli(broker.env, "clients", "add", client_id, *key, *may_have, *extra)
    tokenbroker_cli(
        broker.env, "servers", "add", "mcp-server", "--audience", server.url, "--generate-api-key",
        "--api-key-file", str(api_key_file),
    )  # fmt: skip
    try:
        broker.start()
        server.start()
        yield Deployment(nonce_at, broker, server, workdir, metrics_port)
    finally:
        server.stop()
        assert broker.stop() == 0, broker.log.read_text()[-2000:]


# -- what goes over the wire --------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: httpx.Headers
    body: bytes
    status: int
    response_headers: httpx.Headers
    response_body: bytes

    def form(self) -> dict[str, str]:
        return dict(httpx.QueryParams(self.body.decode()))

    def json(self) -> Any:
        return json.loads(self.response_body)


class RecordingTransport(httpx.AsyncBaseTransport):
    """Sends through a real `AsyncHTTPTransport` and keeps each request and its whole answer
    (the answer is handed on unchanged, already read)."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.exchanges: list[Recorded] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        self.exchanges.append(
            Recorded(
                request.method,
                request.url.path,
                request.headers,
                request.content,
                response.status_code,
                response.headers,
                body,
            )
        )
        return httpx.Response(response.status_code, headers=response.headers, content=body, request=request)

    async def aclose(self) -> None:
        await self._inner.aclose()

    def steps(self) -> list[tuple[str, str, int]]:
        return [(e.method, e.path, e.status) for e in self.exchanges]


@dataclass(frozen=True)
class Sent:
    """One MCP request as it went out: `BrokerAuth` signs a retry on the same request object,
    so its headers are copied when its answer arrives, before any re-signing."""

    method: str
    headers: dict[str, str]
    content: bytes


class McpExchanges:
    """The MCP requests the SDK's HTTP client sent (as signed) with their status and answer
    headers, through its event hooks (httpx2 under mcp 2.x, httpx under 1.x)."""

    def __init__(self) -> None:
        self.done: list[tuple[Sent, int, Any]] = []

    async def _on_response(self, response: Any) -> None:
        request = response.request
        sent = Sent(request.method, dict(request.headers), bytes(request.content))
        self.done.append((sent, response.status_code, response.headers))

    def options(self) -> dict[str, Any]:
        return {"event_hooks": {"response": [self._on_response]}}

    def statuses(self) -> list[int]:
        return [status for _, status, _ in self.done]


def jws_part(jws: str, index: int) -> dict[str, Any]:
    """A JWS's header (0) or payload (1), read without verifying."""
    part = jws.split(".")[index]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638, computed here (not by the package): the required members in lexical order,
    no whitespace, SHA-256, base64url."""
    required = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}[jwk["kty"]]
    canonical = json.dumps({name: jwk[name] for name in required}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def verified_claims(deployment: Deployment, token: str, audience: str) -> dict[str, Any]:
    """The token's claims, verified by PyJWT with the broker's published JWKS."""
    jwks = jwt.PyJWKSet.from_dict(httpx.get(f"{deployment.public_url}/jwks", timeout=5).json())
    key = next(k for k in jwks.keys if k.key_id == jws_part(token, 0)["kid"])
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["EdDSA"], audience=audience)
    return claims


def challenge(headers: Any, scheme: str = "DPoP") -> str:
    values = [v for v in headers.get_list("www-authenticate") if v.split(" ")[0] == scheme]
    assert len(values) == 1, headers.get_list("www-authenticate")
    return str(values[0])


def discover_issuer(server_url: str) -> str:
    """The MCP authorization spec's steps from the server's URL alone: an anonymous request
    (401, `resource_metadata=`), the RFC 9728 metadata, `authorization_servers[0]`, its RFC
    8414 metadata. Returns the issuer, checked equal to `authorization_servers[0]`."""
    anonymous = httpx.post(server_url, json={}, timeout=10)
    assert anonymous.status_code == 401
    resource = httpx.URL(server_url)  # RFC 9728 section 3.1: the well-known prefix before the path
    prm_url = f"{resource.scheme}://{resource.netloc.decode()}/.well-known/oauth-protected-resource{resource.path}"
    assert f'resource_metadata="{prm_url}"' in challenge(anonymous.headers)
    prm = httpx.get(prm_url, timeout=10).json()
    assert prm["resource"] == server_url
    assert prm["dpop_bound_access_tokens_required"] is True
    authorization_server: str = prm["authorization_servers"][0]
    origin = httpx.URL(authorization_server)
    path = origin.path.rstrip("/")
    asm_url = f"{origin.scheme}://{origin.netloc.decode()}{ASM_PATH}{path}"  # RFC 8414 section 3.1
    asm = httpx.get(asm_url, timeout=10).json()
    assert asm["issuer"] == authorization_server  # RFC 8414 section 3.3
    assert asm["token_endpoint"] == f"{authorization_server}/token"
    assert "EdDSA" in asm["dpop_signing_alg_values_supported"]
    return authorization_server


def own_client(deployment: Deployment, issuer: str, token_http: httpx.AsyncClient, client_id: str) -> BrokerAuth:
    return BrokerAuth.from_token_endpoint(
        issuer,
        client_id=client_id,
        private_key=deployment.pem(client_id),
        resource=deployment.server.url,
        scopes=[SCOPE],
        http_client=token_http,
    )


# -- the tests ----------------------------------------------------------------------------


async def test_the_own_client_discovers_gets_a_dpop_token_answering_both_nonces_and_calls_tools(
    deployment: Deployment,
) -> None:
    server_url = deployment.server.url
    issuer = discover_issuer(server_url)
    assert issuer == deployment.public_url
    recorder, mcp = RecordingTransport(), McpExchanges()
    async with httpx.AsyncClient(transport=recorder, timeout=10) as token_http:
        auth = own_client(deployment, issuer, token_http, "agent")
        async with agent.connect(server_url, auth, **mcp.options()) as session:
            tools = await session.list_tools()
            me = agent.tool_result(await session.call_tool("whoami", {}))
            total = agent.tool_result(await session.call_tool("add", {"a": 2, "b": 3}))

    # The tool saw this client, for this server, in the session its token names.
    assert {tool.name for tool in tools.tools} == {"whoami", "add"}
    assert (me["client_id"], me["resource"], me["issuer"], total) == ("agent", server_url, issuer, 5)
    assert me["scopes"] == [SCOPE]

    # The token endpoint: found through the issuer's metadata, asked once without a nonce
    # (400 use_dpop_nonce with one), then again with that nonce and a fresh assertion.
    assert recorder.steps() == [("GET", ASM_PATH, 200), ("POST", "/token", 400), ("POST", "/token", 200)]
    _, refused, granted = recorder.exchanges
    assert refused.json()["error"] == "use_dpop_nonce"
    # Which setting asked: the broker-wide one before authenticating anyone, or this client's.
    asked_by = "the token endpoint requires" if deployment.nonce_at == "broker" else "client 'agent' requires"
    assert asked_by in refused.json()["error_description"]
    token_nonce = refused.response_headers["dpop-nonce"]
    assert proof_nonce(refused.headers["dpop"]) is None
    assert proof_nonce(granted.headers["dpop"]) == token_nonce
    assertions = [jws_part(e.form()["client_assertion"], 1) for e in (refused, granted)]
    assert assertions[0]["jti"] != assertions[1]["jti"]  # an assertion is single-use
    assert {a["aud"] for a in assertions} == {issuer}  # discovered: addressed to the issuer
    form = granted.form()
    assert (form["grant_type"], form["client_assertion_type"]) == ("client_credentials", JWT_BEARER)
    assert (form["resource"], form["scope"]) == (server_url, SCOPE)
    proof_header = jws_part(granted.headers["dpop"], 0)
    proof_claims = jws_part(granted.headers["dpop"], 1)
    assert (proof_claims["htm"], proof_claims["htu"], "ath" in proof_claims) == ("POST", deployment.token_url, False)

    # The token: DPoP, bound to the key of the proof (RFC 7638 computed here), for this server.
    answer = granted.json()
    assert answer["token_type"] == "DPoP"
    assert granted.response_headers["cache-control"] == "no-store"
    token = answer["access_token"]
    claims = verified_claims(deployment, token, server_url)
    assert claims["cnf"]["jkt"] == thumbprint(proof_header["jwk"]) == auth.signer.jkt
    assert (claims["iss"], claims["client_id"], claims["sid"]) == (issuer, "agent", auth.session_id)
    assert me["session_id"] == answer["session_id"] == auth.session_id

    # The MCP server: one nonce challenge of its own (401), answered; then every request
    # carries the token as DPoP and a proof with the server's nonce, never the broker's.
    statuses = mcp.statuses()
    assert statuses[0] == 401, statuses
    assert statuses.count(401) == 1, statuses
    first_request, _, first_headers = mcp.done[0]
    assert 'error="use_dpop_nonce"' in challenge(first_headers)
    assert proof_nonce(first_request.headers["dpop"]) is None
    server_nonces = {first_headers["dpop-nonce"]}
    for request, _, _ in mcp.done[1:]:
        assert request.headers["authorization"] == f"DPoP {token}"
        assert proof_nonce(request.headers["dpop"]) in server_nonces | {h["dpop-nonce"] for _, _, h in mcp.done}
    assert token_nonce not in server_nonces  # two servers, two nonce keys

    # The audit: the grant over HTTP, naming this client, its session and token.
    grants = deployment.audit(event="issue", decision="grant", door="http", client="agent", session=auth.session_id)
    assert len(grants) == 1, grants
    assert (grants[0]["jti"], grants[0]["audience"], grants[0]["binding"]) == (claims["jti"], server_url, "dpop")
    assert deployment.audit(event="issue", decision="refuse", rule="use_dpop_nonce", door="http", client="agent")


async def test_a_replayed_request_with_a_still_valid_nonce_is_refused_by_the_brokers_replay_detection(
    deployment: Deployment,
) -> None:
    server_url = deployment.server.url
    mcp = McpExchanges()
    async with httpx.AsyncClient(timeout=10) as token_http, httpx.AsyncClient(timeout=10) as raw:
        auth = own_client(deployment, deployment.public_url, token_http, "agent")
        async with agent.connect(server_url, auth, **mcp.options()) as session:
            await session.call_tool("whoami", {})
            # One tools/call exactly as BrokerAuth signed it: token, proof (with the
            # server's nonce), body, session headers.
            sent = next(
                request
                for request, status, _ in reversed(mcp.done)
                if status == 200 and request.method == "POST" and b'"tools/call"' in request.content
            )
            headers = sent.headers
            nonce = proof_nonce(headers["dpop"])
            assert nonce is not None
            replayed_before = deployment.validations("REPLAYED")

            replay = await raw.post(server_url, headers=headers, content=sent.content)

            replayed_after = deployment.validations("REPLAYED")
            # The control: the same request, token and nonce, with a fresh proof (a new jti).
            token = headers["authorization"].removeprefix("DPoP ")
            fresh = auth.signer.sign("POST", server_url, token, nonce=nonce)
            control = await raw.post(server_url, headers={**headers, "dpop": fresh}, content=sent.content)

    assert replay.status_code == 401, replay.text
    refusal = challenge(replay.headers)
    # invalid_dpop_proof, not use_dpop_nonce: the middleware checks the nonce before it asks
    # the broker, so a refused nonce would have been answered use_dpop_nonce (and spent no
    # jti). The nonce passed; the broker refused the proof because its jti was seen.
    assert 'error="invalid_dpop_proof"' in refusal
    assert "use_dpop_nonce" not in refusal
    assert replay.headers["dpop-nonce"]  # the server's current nonce, handed out again
    assert replayed_after - replayed_before == 1  # counted by the broker as REPLAYED
    assert "401 invalid_dpop_proof REPLAYED" in deployment.server.log.read_text()
    assert control.status_code == 200, control.text  # only the jti made the difference


async def test_a_replayed_token_request_proof_is_refused_even_with_a_fresh_assertion(deployment: Deployment) -> None:
    recorder = RecordingTransport()
    async with httpx.AsyncClient(transport=recorder, timeout=10) as token_http:
        auth = own_client(deployment, deployment.public_url, token_http, "agent")
        await auth.atoken()
        granted = next(e for e in recorder.exchanges if e.path == "/token" and e.status == 200)
        proof = granted.headers["dpop"]
        assert proof_nonce(proof) is not None  # a nonce the broker handed out, still current
        key = load_private_key(deployment.pem("agent"))

        def request(dpop: str) -> dict[str, Any]:
            form = granted.form() | {"client_assertion": make_client_assertion(key, "agent", deployment.public_url)}
            return {"data": form, "headers": {"DPoP": dpop, "Accept": "application/json"}}

        replay = await token_http.post(deployment.token_url, **request(proof))
        fresh = auth.signer.sign("POST", deployment.token_url, None, nonce=proof_nonce(proof))
        control = await token_http.post(deployment.token_url, **request(fresh))

    assert replay.status_code == 400, replay.text
    assert replay.json()["error"] == "invalid_dpop_proof"
    assert "already used" in replay.json()["error_description"]
    assert control.status_code == 200, control.text
    assert control.json()["token_type"] == "DPoP"


async def test_the_nonce_requirement_is_per_client_or_broker_wide_as_configured(deployment: Deployment) -> None:
    recorder = RecordingTransport()
    async with httpx.AsyncClient(transport=recorder, timeout=10) as token_http:
        await own_client(deployment, deployment.public_url, token_http, "plain-agent").atoken()
    token_statuses = [e.status for e in recorder.exchanges if e.path == "/token"]
    # plain-agent was registered without --require-dpop-nonce: only the broker-wide setting asks it.
    assert token_statuses == ([400, 200] if deployment.nonce_at == "broker" else [200])


def test_the_example_agent_over_the_token_endpoint_lists_and_calls_tools(deployment: Deployment) -> None:
    # Both forms of --token-endpoint: the issuer (discovered) and the endpoint's URL.
    endpoint = deployment.public_url if deployment.nonce_at == "broker" else deployment.token_url
    command = [
        sys.executable,
        str(ROOT / "examples" / "agent.py"),
        *("--url", deployment.server.url, "--client-id", "agent"),
        *("--key", str(deployment.workdir / "agent.pem"), "--token-endpoint", endpoint),
    ]
    done = subprocess.run(command, cwd=deployment.workdir, capture_output=True, timeout=45, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    output = json.loads(done.stdout)
    assert output["tools"] == ["add", "whoami"]
    assert output["add(2, 3)"] == 5
    me = output["whoami"]
    assert (me["client_id"], me["issuer"], me["resource"]) == ("agent", deployment.public_url, deployment.server.url)
    assert "eyJ" not in done.stdout.decode() + done.stderr.decode()  # no token or proof printed


def test_no_token_proof_or_assertion_reaches_the_logs_or_the_audit(deployment: Deployment) -> None:
    logs = deployment.server.log.read_text() + deployment.broker.log.read_text()
    logs += (deployment.workdir / "audit.jsonl").read_text()
    assert "refused" in deployment.server.log.read_text()  # the refusals above were logged ...
    assert "eyJ" not in logs  # ... but no JWS (every token, proof and assertion begins with eyJ)
