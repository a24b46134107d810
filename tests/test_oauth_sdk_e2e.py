"""Unmodified MCP SDK OAuth clients against tokenbroker's HTTP door (issue 10, "Unmodified
SDK clients"), all real processes on loopback: a `tokenbroker serve` (gRPC and HTTP, memory
store), two MCP servers built with the SDK's own auth (`AuthSettings` plus
`BrokerTokenVerifier`, tests/support/sdk_oauth_server.py) for two audiences, and the SDK's
`PrivateKeyJWTOAuthProvider` / `ClientCredentialsOAuthProvider` in this process, given only
the MCP server's URL. Clients and servers are registered with the `tokenbroker` CLI.

Runs with whichever `mcp` is installed (2.x `MCPServer` and httpx2, or 1.x `FastMCP` and
httpx). One difference shows: mcp 1.x servers publish a path-less issuer with a trailing "/"
in their protected resource metadata (see the issuer test)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from mcp.client.auth import OAuthTokenError

from tokenbroker import Keyring, ProofSigner
from tokenbroker_bench.servers import free_port

from support.broker_process import BrokerProcess, broker_env
from support.oauth_sdk_clients import (
    MCP_MAJOR,
    Exchanges,
    MemoryTokenStorage,
    client_secret_provider,
    connect,
    private_key_jwt_provider,
    tool_result,
)

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "tests" / "support" / "sdk_oauth_server.py"
SCOPE = "tools:call"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PRM_PATH = "/.well-known/oauth-protected-resource/mcp"
ASM_PATH = "/.well-known/oauth-authorization-server"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
MCP_HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


@dataclass
class SdkServerProcess:
    """tests/support/sdk_oauth_server.py on a free loopback port, stopped with SIGTERM."""

    workdir: Path
    broker_target: str
    api_key_file: Path
    public_url: str
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its endpoint, which is also its resource URI (the audience of its tokens)."""
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def log(self) -> Path:
        return self.workdir / f"sdk-server-{self.port}.log"

    def start(self, timeout: float = 30.0) -> SdkServerProcess:
        command = [
            sys.executable,
            str(SERVER_SCRIPT),
            *("--broker", self.broker_target, "--api-key-file", str(self.api_key_file)),
            *("--resource", self.url, "--public-url", self.public_url, "--port", str(self.port)),
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=log, env=dict(os.environ))
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"SDK server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{PRM_PATH}", timeout=0.5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SDK server did not start: {self.log.read_text()[-2000:]}")
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
    server_a: SdkServerProcess
    server_b: SdkServerProcess
    workdir: Path

    @property
    def public_url(self) -> str:
        return self.broker.http_url

    @property
    def token_url(self) -> str:
        return f"{self.public_url}/token"

    def pem(self, client_id: str) -> str:
        return (self.workdir / f"{client_id}.pem").read_text()

    def secret(self, client_id: str) -> str:
        return (self.workdir / f"{client_id}.secret").read_text().strip()


def tokenbroker_cli(env: dict[str, str], *args: str) -> None:
    """The `tokenbroker` CLI in its own process, as an operator runs it."""
    command = [sys.executable, "-c", "from tokenbroker.cli import main; main()", *args]
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("oauth-sdk-e2e")
    Keyring.generate().save(workdir / "keys.json")
    broker = BrokerProcess(workdir, {})
    broker.env = broker_env(workdir, broker.http_url)  # public_url: the HTTP door's own address
    port_a, port_b = free_port(), free_port()
    resource_a, resource_b = f"http://127.0.0.1:{port_a}/mcp", f"http://127.0.0.1:{port_b}/mcp"
    may_have = ["--audience", resource_a, "--audience", resource_b, "--scope", SCOPE, "--approve"]
    for client_id, credential in [
        ("es256-agent", ["--generate-key", str(workdir / "es256-agent.pem"), "--key-type", "p256"]),
        ("rs256-agent", ["--generate-key", str(workdir / "rs256-agent.pem"), "--key-type", "rsa"]),
        ("secret-agent", ["--generate-secret", "--secret-file", str(workdir / "secret-agent.secret")]),
    ]:
        tokenbroker_cli(broker.env, "clients", "add", client_id, *credential, "--binding", "bearer", *may_have)
    dpop_key = ["--generate-key", str(workdir / "dpop-agent.pem"), "--key-type", "p256"]
    tokenbroker_cli(broker.env, "clients", "add", "dpop-agent", *dpop_key, "--binding", "dpop", *may_have)
    for server_id, resource in [("server-a", resource_a), ("server-b", resource_b)]:
        key_file = workdir / f"{server_id}.key"
        tokenbroker_cli(
            broker.env, "servers", "add", server_id, "--audience", resource, "--generate-api-key", "--api-key-file",
            str(key_file),
        )  # fmt: skip
    server_a = SdkServerProcess(workdir, broker.target, workdir / "server-a.key", broker.http_url, port_a)
    server_b = SdkServerProcess(workdir, broker.target, workdir / "server-b.key", broker.http_url, port_b)
    try:
        broker.start()
        server_a.start()
        server_b.start()
        yield Deployment(broker, server_a, server_b, workdir)
    finally:
        server_a.stop()
        server_b.stop()
        assert broker.stop() == 0, broker.log.read_text()[-2000:]


def jwt_part(token: str, index: int) -> dict[str, Any]:
    """A JWS's header (0) or payload (1), read without verifying."""
    part = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def verified_claims(deployment: Deployment, token: str, audience: str) -> dict[str, Any]:
    """The token's claims, verified by PyJWT with the broker's published JWKS."""
    jwks = jwt.PyJWKSet.from_dict(httpx.get(f"{deployment.public_url}/jwks", timeout=5).json())
    key = next(k for k in jwks.keys if k.key_id == jwt_part(token, 0)["kid"])
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["EdDSA"], audience=audience)
    return claims


def without_issuer(build: Any) -> Any:
    """A provider built with nothing but the MCP server's URL (and the client's own
    credentials): the SDK warns that `issuer` will be required in 3.0."""
    with pytest.warns(Warning, match="issuer"):
        return build()


def provider_for(deployment: Deployment, kind: str, server_url: str, storage: MemoryTokenStorage) -> tuple[str, Any]:
    """(client id, the SDK provider of `kind`) given only `server_url`."""
    if kind == "secret_basic":
        secret = deployment.secret("secret-agent")
        return "secret-agent", without_issuer(
            lambda: client_secret_provider(server_url, storage, client_id="secret-agent", client_secret=secret)
        )
    client_id = f"{kind.lower()}-agent"
    pem = deployment.pem(client_id)
    return client_id, without_issuer(
        lambda: private_key_jwt_provider(server_url, storage, client_id=client_id, private_key_pem=pem, algorithm=kind)
    )


@pytest.mark.parametrize("kind", ["ES256", "RS256", "secret_basic"])
async def test_an_sdk_client_given_only_the_server_url_discovers_gets_a_token_and_calls_a_tool(
    deployment: Deployment, kind: str
) -> None:
    server = deployment.server_a
    storage, exchanges = MemoryTokenStorage(), Exchanges()
    client_id, provider = provider_for(deployment, kind, server.url, storage)

    async with connect(server.url, provider, exchanges) as session:
        me = tool_result(await session.call_tool("whoami", {}))
        total = tool_result(await session.call_tool("add", {"a": 2, "b": 3}))

    # The tool saw the principal the broker validated: this very client, for this server.
    assert me["client_id"] == client_id
    assert me["scopes"] == [SCOPE]
    assert me["resource"] == server.url
    assert me["issuer"] == deployment.public_url
    assert total == 5
    # Discovery from the URL alone: 401, the resource's metadata, the issuer's, the token.
    steps = exchanges.steps()
    assert steps[:5] == [
        ("POST", "/mcp", 401),
        ("GET", PRM_PATH, 200),
        ("GET", ASM_PATH, 200),
        ("POST", "/token", 200),
        ("POST", "/mcp", 200),
    ], steps
    (token_request,) = exchanges.to("/token")
    assert token_request.url == deployment.token_url
    form = token_request.form()
    assert form["grant_type"] == "client_credentials"
    assert form["resource"] == server.url
    assert form["scope"] == SCOPE  # from the resource's metadata (scopes_supported)
    assert "dpop" not in token_request.headers
    if kind == "secret_basic":
        assert token_request.headers["authorization"].startswith("Basic ")
        assert "client_secret" not in form
    else:
        assert form["client_assertion_type"] == JWT_BEARER
        assert jwt_part(form["client_assertion"], 0)["alg"] == kind
        assert jwt_part(form["client_assertion"], 1)["aud"].rstrip("/") == deployment.public_url
    # The SDK holds a short-lived Bearer token for this server alone, in this client's name.
    assert storage.tokens is not None
    assert storage.tokens.token_type == "Bearer"
    claims = verified_claims(deployment, storage.tokens.access_token, server.url)
    assert claims["client_id"] == claims["sub"] == client_id
    assert "cnf" not in claims
    assert 0 < claims["exp"] - claims["iat"] <= 3600
    every_mcp_request = [e for e in exchanges.to("/mcp") if e.status != 401]
    assert every_mcp_request
    assert all(e.headers["authorization"] == f"Bearer {storage.tokens.access_token}" for e in every_mcp_request)


async def test_the_issuer_is_one_string_in_the_metadata_the_token_and_the_resource_metadata(
    deployment: Deployment,
) -> None:
    server = deployment.server_a
    metadata = httpx.get(f"{deployment.public_url}{ASM_PATH}", timeout=5).json()
    resource_metadata = httpx.get(f"http://127.0.0.1:{server.port}{PRM_PATH}", timeout=5).json()
    # A client configured with that issuer string (the SDK's strict mode) accepts the metadata.
    storage, exchanges = MemoryTokenStorage(), Exchanges()
    provider = private_key_jwt_provider(
        server.url,
        storage,
        client_id="es256-agent",
        private_key_pem=deployment.pem("es256-agent"),
        algorithm="ES256",
        issuer=metadata["issuer"],
    )
    async with connect(server.url, provider, exchanges) as session:
        me = tool_result(await session.call_tool("whoami", {}))
    assert me["client_id"] == "es256-agent"
    assert storage.tokens is not None
    claims = verified_claims(deployment, storage.tokens.access_token, server.url)

    assert metadata["issuer"] == deployment.public_url
    assert claims["iss"] == metadata["issuer"]
    assert resource_metadata["resource"] == server.url
    if MCP_MAJOR == 1:
        # mcp 1.x's AuthSettings parses the issuer as a pydantic URL, which writes a
        # path-less one with a trailing "/"; its clients (and 2.x's) compare a root issuer
        # with and without it as equal. A `public_url` ending in "/" is one string on 1.x too.
        assert resource_metadata["authorization_servers"][0] == metadata["issuer"] + "/"
    else:
        assert resource_metadata["authorization_servers"][0] == metadata["issuer"]


async def test_a_dpop_client_asking_for_a_bearer_token_gets_400_and_the_sdk_calls_no_tool(
    deployment: Deployment,
) -> None:
    server = deployment.server_a
    storage, exchanges = MemoryTokenStorage(), Exchanges()
    provider = without_issuer(
        lambda: private_key_jwt_provider(
            server.url, storage, client_id="dpop-agent", private_key_pem=deployment.pem("dpop-agent"), algorithm="ES256"
        )
    )
    called: list[Any] = []

    # The SDK's token request fails and the SDK raises its OAuthTokenError (from inside the
    # transport's task group, so wrapped in an exception group) instead of calling the tool.
    with pytest.raises((OAuthTokenError, BaseExceptionGroup)) as raised:
        async with connect(server.url, provider, exchanges) as session:
            called.append(await session.call_tool("whoami", {}))
    errors = [e for e in _leaves(raised.value) if isinstance(e, OAuthTokenError)]
    assert errors, raised.value
    assert "(400)" in str(errors[0])
    assert "invalid_request" in str(errors[0])
    assert called == []
    assert exchanges.steps() == [
        ("POST", "/mcp", 401),
        ("GET", PRM_PATH, 200),
        ("GET", ASM_PATH, 200),
        ("POST", "/token", 400),
    ]
    (token_request,) = exchanges.to("/token")
    assert token_request.status == 400
    assert storage.tokens is None
    assert all("authorization" not in e.headers for e in exchanges.to("/mcp"))

    # The same request outside the SDK: 400 invalid_request, not cached; with a proof, a DPoP token.
    form = token_request.form()
    form["client_assertion"] = _assertion(deployment, "dpop-agent")
    bearer = httpx.post(deployment.token_url, data=form, timeout=10)
    assert bearer.status_code == 400
    assert bearer.json()["error"] == "invalid_request"
    assert "dpop" in bearer.json()["error_description"].lower()
    assert bearer.headers["cache-control"] == "no-store"
    form["client_assertion"] = _assertion(deployment, "dpop-agent")
    proof = ProofSigner().sign("POST", deployment.token_url)
    bound = httpx.post(deployment.token_url, data=form, headers={"DPoP": proof}, timeout=10)
    assert bound.status_code == 200, bound.text
    assert bound.json()["token_type"] == "DPoP"
    assert "jkt" in jwt_part(bound.json()["access_token"], 1)["cnf"]


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions an exception group holds, flattened (the error itself otherwise)."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _assertion(deployment: Deployment, client_id: str) -> str:
    """A fresh RFC 7523 assertion of the kind the SDK signs (`aud`: the issuer)."""
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": deployment.public_url, "iat": now, "exp": now + 60}
    claims["jti"] = base64.urlsafe_b64encode(os.urandom(16)).decode()
    return jwt.encode(claims, deployment.pem(client_id), algorithm="ES256")


async def test_a_token_for_server_a_gets_401_at_server_b(deployment: Deployment) -> None:
    server_a, server_b = deployment.server_a, deployment.server_b
    storage, exchanges = MemoryTokenStorage(), Exchanges()
    _, provider = provider_for(deployment, "ES256", server_a.url, storage)
    async with connect(server_a.url, provider, exchanges) as session:
        await session.call_tool("whoami", {})
    assert storage.tokens is not None
    token_a = storage.tokens.access_token
    bearer = {**MCP_HEADERS, "authorization": f"Bearer {token_a}"}

    at_a = httpx.post(server_a.url, json=INITIALIZE, headers=bearer, timeout=10)
    at_b = httpx.post(server_b.url, json=INITIALIZE, headers=bearer, timeout=10)

    assert at_a.status_code == 200, at_a.text  # the token is good, for server A
    assert at_b.status_code == 401, at_b.text
    assert 'error="invalid_token"' in at_b.headers["www-authenticate"]
    assert at_b.headers["www-authenticate"].startswith("Bearer ")

    # An SDK client holding A's token and pointed at B is refused, discovers B and asks for B.
    storage_b, exchanges_b = MemoryTokenStorage(storage.tokens), Exchanges()
    _, provider_b = provider_for(deployment, "ES256", server_b.url, storage_b)
    async with connect(server_b.url, provider_b, exchanges_b) as session:
        me = tool_result(await session.call_tool("whoami", {}))
    assert exchanges_b.steps()[0] == ("POST", "/mcp", 401)
    assert exchanges_b.done[0].headers["authorization"] == f"Bearer {token_a}"
    assert exchanges_b.to("/token")[0].form()["resource"] == server_b.url
    assert me["resource"] == server_b.url
    assert storage_b.tokens is not None
    assert verified_claims(deployment, storage_b.tokens.access_token, server_b.url)["aud"] == server_b.url


def test_no_token_assertion_or_secret_appears_in_the_logs(deployment: Deployment) -> None:
    secret = deployment.secret("secret-agent")
    issued = httpx.post(
        deployment.token_url,
        data={"grant_type": "client_credentials", "resource": deployment.server_a.url},
        auth=("secret-agent", secret),
        timeout=10,
    )
    assert issued.status_code == 200, issued.text
    bearer = {**MCP_HEADERS, "authorization": f"Bearer {issued.json()['access_token']}"}
    assert httpx.post(deployment.server_b.url, json=INITIALIZE, headers=bearer, timeout=10).status_code == 401

    logs = "".join(p.read_text() for p in (deployment.broker.log, deployment.server_a.log, deployment.server_b.log))
    assert "refused" in deployment.server_b.log.read_text()  # server B logged the refusal ...
    assert "eyJ" not in logs  # ... but no JWS (tokens and assertions begin with eyJ)
    assert secret not in logs
