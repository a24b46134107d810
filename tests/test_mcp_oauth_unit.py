"""The MCP server side of OAuth discovery and tokenbroker's own HTTP client (issue 10):
RFC 9728 protected resource metadata, `resource_metadata=` and `scope=` in challenges, DPoP
nonces in `BrokerAuthMiddleware`, the SDK's own auth stack (`auth_settings`,
`ScopeChallengeMiddleware`), and `BrokerAuth` answering nonce challenges and obtaining its
tokens from a token endpoint over HTTP.

Every validator is an embedded `Broker`. The servers are real: uvicorn on 127.0.0.1 free
ports (or httpx's ASGI transport for the middleware's answers). The token endpoint that
`BrokerAuth` talks to is a small Starlette app minting with an embedded Broker and
demanding a nonce: it stands in for `tokenbroker serve`'s, which is outside the client
under test."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ed25519
from mcp.server.auth.middleware.auth_context import get_access_token
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from test_mcp_unit import INITIALIZE, EmbeddedIssuer, Recording, challenges, dpop, echo

from tokenbroker import Broker, Keyring, ProofSigner
from tokenbroker._core import verify_dpop_proof
from tokenbroker.dpop_nonce import NONCE_HEADER, USE_DPOP_NONCE, DpopNonces, proof_nonce
from tokenbroker.mcp import (
    BrokerAuth,
    BrokerAuthMiddleware,
    BrokerTokenVerifier,
    ProtectedResourceMetadata,
    ScopeChallengeMiddleware,
    TokenEndpoint,
    TokenEndpointError,
    auth_settings,
    resource_metadata_url,
)
from tokenbroker.mcp.nonce_memory import NonceMemory, challenge_asks_for_nonce
from tokenbroker.mcp.token_endpoint import ASSERTION_TYPE
from tokenbroker_bench.servers import free_port

try:  # mcp 2.x
    from mcp.server.mcpserver import MCPServer as SdkServer

    MCP_MAJOR = 2
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as SdkServer  # type: ignore[attr-defined,no-redef,unused-ignore]

    MCP_MAJOR = 1

ISSUER = "https://broker.oauth-unit.test"
PUBLIC_URL = "http://127.0.0.1:8080"  # tokenbroker's public_url, as MCP servers publish it
URL = "http://testserver/mcp"
METADATA_URL = "http://testserver/.well-known/oauth-protected-resource/mcp"
CLIENT_KEY = ed25519.Ed25519PrivateKey.generate()
WINDOW = 60


@pytest.fixture
def broker() -> Broker:
    return Broker(Keyring.generate(), issuer=ISSUER)


class Clock:
    """A settable clock for DpopNonces."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def middleware(validator: Any, **options: Any) -> BrokerAuthMiddleware:
    options.setdefault("required_scopes", ["tools:call"])
    options.setdefault("authorization_server", PUBLIC_URL)
    return BrokerAuthMiddleware(echo, broker=validator, audience=options.pop("audience", URL), **options)


async def send(app: Any, method: str = "POST", path: str = "/mcp", headers: Any = ()) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        return await client.request(method, path, headers=list(headers))


def issue(broker: Broker, signer: ProofSigner | None = None, **kw: Any) -> str:
    return broker.issue(
        client_id=kw.pop("client_id", "agent"),
        audience=kw.pop("audience", URL),
        scopes=kw.pop("scopes", ["tools:call"]),
        dpop_jkt=signer.jkt if signer else None,
    ).access_token


@contextmanager
def serving(app: Any, port: int | None = None) -> Iterator[str]:
    """`app` under uvicorn on a free 127.0.0.1 port (in a thread); yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="auto"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


class Tally:
    """ASGI wrapper keeping (path, status, the proof's nonce) of every answered request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.answers: list[tuple[str, int, str | None]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        proof = dict(scope["headers"]).get(b"dpop")
        nonce = proof_nonce(proof.decode()) if proof else None

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.answers.append((scope["path"], message["status"], nonce))
            await send(message)

        await self.app(scope, receive, sending)

    def statuses(self, path: str = "/mcp") -> list[int]:
        return [status for answered, status, _ in self.answers if answered == path]


# -- RFC 9728 protected resource metadata ------------------------------------------------

DOCUMENT = {
    "resource": URL,
    "authorization_servers": [PUBLIC_URL],
    "scopes_supported": ["tools:call"],
    "bearer_methods_supported": ["header"],
    "dpop_signing_alg_values_supported": ["EdDSA", "ES256"],
    "dpop_bound_access_tokens_required": True,
}


@pytest.mark.parametrize("path", ["/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"])
async def test_the_metadata_is_served_at_the_path_inserted_and_the_bare_path_without_a_token(
    broker: Broker, path: str
) -> None:
    recording = Recording(broker)
    response = await send(middleware(recording), "GET", path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == DOCUMENT
    assert list(response.json()) == list(DOCUMENT)  # the order too
    assert recording.calls == []  # public: no validation at all


async def test_the_metadata_says_whether_dpop_is_required_and_which_scopes_to_ask_for(broker: Broker) -> None:
    app = middleware(broker, require_dpop=False, scopes_supported=["tools:call", "files:read"])
    document = (await send(app, "GET", "/.well-known/oauth-protected-resource/mcp")).json()
    assert document["dpop_bound_access_tokens_required"] is False
    assert document["scopes_supported"] == ["tools:call", "files:read"]


async def test_the_metadata_of_a_resource_at_the_root_is_at_the_bare_path_only(broker: Broker) -> None:
    app = middleware(broker, audience="http://testserver/")
    assert (await send(app, "GET", "/.well-known/oauth-protected-resource")).json()["resource"] == "http://testserver/"
    # not the metadata: another path under .well-known/ passes to the app (exempt, no token)
    assert (await send(app, "GET", "/.well-known/oauth-protected-resource/mcp")).json()["client_id"] is None


async def test_the_metadata_is_read_with_get_head_or_a_cors_preflight(broker: Broker) -> None:
    app = middleware(broker)
    path = "/.well-known/oauth-protected-resource/mcp"
    head = await send(app, "HEAD", path)
    assert (head.status_code, head.content) == (200, b"")
    preflight = await send(app, "OPTIONS", path)
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    posted = await send(app, "POST", path)
    assert posted.status_code == 405
    assert posted.headers["allow"] == "GET, HEAD, OPTIONS"


async def test_without_an_authorization_server_the_app_serves_its_own_metadata_path(broker: Broker) -> None:
    app = BrokerAuthMiddleware(echo, broker=broker, audience=URL)
    response = await send(app, "GET", "/.well-known/oauth-protected-resource/mcp")
    assert response.json() == {
        "client_id": None,
        "session_id": None,
        "user": None,
        "auth_scopes": [],
        "authorization_scheme": "",
    }  # echo's answer: the SDK app's metadata (or whatever the app serves) is untouched


def test_the_metadata_url_inserts_the_well_known_path_before_the_resource_path() -> None:
    assert (
        resource_metadata_url("https://mcp.example/mcp")
        == "https://mcp.example/.well-known/oauth-protected-resource/mcp"
    )
    assert resource_metadata_url("http://h:8000/a/b") == "http://h:8000/.well-known/oauth-protected-resource/a/b"
    assert resource_metadata_url("http://h:8000/") == "http://h:8000/.well-known/oauth-protected-resource"
    assert resource_metadata_url("http://h:8000") == "http://h:8000/.well-known/oauth-protected-resource"


@pytest.mark.parametrize(
    ("resource", "server", "message"),
    [
        ("mcp", PUBLIC_URL, "absolute http"),
        ("http://h/mcp?x=1", PUBLIC_URL, "no query"),
        ("http://h/mcp", "ftp://broker", "absolute http"),
        ("http://h/mcp", "http://broker/#f", "no query or fragment"),
        ("http://h/mcp", "http://user:pw@broker", "user name"),
    ],
)
def test_a_resource_or_authorization_server_that_is_no_plain_url_is_refused_with_how_to_fix(
    resource: str, server: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ProtectedResourceMetadata(resource, server)


# -- challenges ------------------------------------------------------------------------


async def test_a_request_without_credentials_is_challenged_with_the_metadata_url(broker: Broker) -> None:
    response = await send(middleware(broker))
    assert response.status_code == 401
    assert response.headers.get_list("www-authenticate") == [
        f'DPoP resource_metadata="{METADATA_URL}", algs="EdDSA ES256"'
    ]


async def test_every_refusal_challenge_carries_the_metadata_url(broker: Broker) -> None:
    signer = ProofSigner()
    token = issue(broker, signer, audience="https://other.example/mcp")
    response = await send(middleware(broker, require_dpop=False), headers=dpop(token, signer.sign("POST", URL, token)))
    assert response.status_code == 401
    assert challenges(response) == {
        "DPoP": (
            'DPoP error="invalid_token", error_description="token was issued for another audience", '
            f'resource_metadata="{METADATA_URL}", algs="EdDSA ES256"'
        ),
        "Bearer": f'Bearer resource_metadata="{METADATA_URL}"',
    }


async def test_an_explicit_metadata_url_wins_over_the_derived_one(broker: Broker) -> None:
    response = await send(middleware(broker, resource_metadata_url="https://meta.example/x"))
    assert 'resource_metadata="https://meta.example/x"' in response.headers["www-authenticate"]


async def test_insufficient_scope_names_every_scope_required_and_the_metadata_url(broker: Broker) -> None:
    signer = ProofSigner()
    token = issue(broker, signer, scopes=["tools:call"])
    app = middleware(broker, required_scopes=["tools:call", "files:read"])
    response = await send(app, headers=dpop(token, signer.sign("POST", URL, token)))
    assert response.status_code == 403
    assert response.headers["www-authenticate"] == (
        'DPoP error="insufficient_scope", error_description="token lacks scope: files:read", '
        f'scope="tools:call files:read", resource_metadata="{METADATA_URL}", algs="EdDSA ES256"'
    )


# -- DPoP nonces in BrokerAuthMiddleware -------------------------------------------------


def nonced(validator: Any, clock: Clock, **options: Any) -> tuple[BrokerAuthMiddleware, DpopNonces]:
    nonces = DpopNonces(b"k" * 32, window_seconds=WINDOW, clock=clock)
    return middleware(validator, dpop_nonces=nonces, **options), nonces


async def test_a_proof_without_a_nonce_is_challenged_before_the_broker_sees_it(broker: Broker) -> None:
    recording = Recording(broker)
    app, nonces = nonced(recording, Clock())
    signer = ProofSigner()
    token = issue(broker, signer)
    proof = signer.sign("POST", URL, token)
    response = await send(app, headers=dpop(token, proof))
    assert response.status_code == 401
    assert response.headers[NONCE_HEADER] == nonces.current()
    assert response.headers["www-authenticate"].startswith(f'DPoP error="{USE_DPOP_NONCE}", error_description="')
    assert f'resource_metadata="{METADATA_URL}"' in response.headers["www-authenticate"]
    assert response.json()["error"] == USE_DPOP_NONCE
    assert recording.calls == []
    # the broker never saw the proof: its jti is not spent
    assert broker.validate(token, audience=URL, dpop_proof=proof, http_method="POST", http_uri=URL).valid


async def test_a_proof_with_the_current_nonce_passes_and_the_answer_carries_the_nonce(broker: Broker) -> None:
    clock = Clock()
    app, nonces = nonced(broker, clock)
    signer = ProofSigner()
    token = issue(broker, signer)
    response = await send(app, headers=dpop(token, signer.sign("POST", URL, token, nonce=nonces.current())))
    assert response.status_code == 200
    assert response.json()["client_id"] == "agent"
    assert response.headers[NONCE_HEADER] == nonces.current()


async def test_a_proof_with_a_made_up_nonce_is_challenged(broker: Broker) -> None:
    recording = Recording(broker)
    app, _ = nonced(recording, Clock())
    signer = ProofSigner()
    token = issue(broker, signer)
    response = await send(app, headers=dpop(token, signer.sign("POST", URL, token, nonce="made-up-nonce")))
    assert response.status_code == 401
    assert f'error="{USE_DPOP_NONCE}"' in response.headers["www-authenticate"]
    assert recording.calls == []


async def test_a_nonce_of_the_previous_window_passes_and_one_of_two_windows_back_is_challenged(
    broker: Broker,
) -> None:
    clock = Clock()
    app, nonces = nonced(broker, clock)
    signer = ProofSigner()
    token = issue(broker, signer)
    old = nonces.current()
    clock.now += WINDOW
    response = await send(app, headers=dpop(token, signer.sign("POST", URL, token, nonce=old)))
    assert response.status_code == 200
    assert response.headers[NONCE_HEADER] != old  # the fresh one
    clock.now += WINDOW
    response = await send(app, headers=dpop(token, signer.sign("POST", URL, token, nonce=old)))
    assert response.status_code == 401
    assert f'error="{USE_DPOP_NONCE}"' in response.headers["www-authenticate"]


async def test_a_nonce_does_not_make_a_forged_proof_pass(broker: Broker) -> None:
    """The nonce is read before the proof is verified: the broker still refuses a proof by
    another key that carries the right nonce."""
    app, nonces = nonced(broker, Clock())
    token = issue(broker, ProofSigner())
    response = await send(app, headers=dpop(token, ProofSigner().sign("POST", URL, token, nonce=nonces.current())))
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_bearer_requests_are_not_asked_for_a_nonce_and_every_answer_offers_one(broker: Broker) -> None:
    app, nonces = nonced(broker, Clock(), require_dpop=False)
    response = await send(app, headers=[("authorization", f"Bearer {issue(broker)}")])
    assert response.status_code == 200
    assert response.headers[NONCE_HEADER] == nonces.current()
    unauthenticated = await send(app)
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers[NONCE_HEADER] == nonces.current()


# -- BrokerAuth answering a resource server's nonce challenge ---------------------------


@contextmanager
def nonce_server(broker: Broker, clock: Any = time.time) -> Iterator[tuple[str, Tally, DpopNonces]]:
    """A real uvicorn server running BrokerAuthMiddleware (nonces required) on echo."""
    port = free_port()
    nonces = DpopNonces(window_seconds=WINDOW, clock=clock)
    audience = f"http://127.0.0.1:{port}/mcp"
    tally = Tally(
        BrokerAuthMiddleware(
            echo,
            broker=broker,
            audience=audience,
            required_scopes=["tools:call"],
            authorization_server=PUBLIC_URL,
            dpop_nonces=nonces,
        )
    )
    with serving(tally, port):
        yield audience, tally, nonces


def grpc_style_auth(broker: Broker, audience: str) -> BrokerAuth:
    return BrokerAuth(
        EmbeddedIssuer(broker),
        client_id="agent",
        private_key=CLIENT_KEY,
        issuer=ISSUER,
        audience=audience,
        scopes=["tools:call"],
    )


async def test_broker_auth_answers_a_nonce_challenge_once_then_keeps_using_the_nonce(broker: Broker) -> None:
    with nonce_server(broker) as (url, tally, nonces):
        async with httpx.AsyncClient(auth=grpc_style_auth(broker, url)) as client:
            first = await client.post(url)
            second = await client.post(url)
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json()["client_id"] == "agent"
    # challenged once (no nonce yet), re-signed with the nonce, then the remembered nonce
    assert [(status, nonce) for _, status, nonce in tally.answers] == [
        (401, None),
        (200, nonces.current()),
        (200, nonces.current()),
    ]


def test_a_sync_client_answers_the_nonce_challenge_too(broker: Broker) -> None:
    with nonce_server(broker) as (url, tally, _), httpx.Client(auth=grpc_style_auth(broker, url)) as client:
        assert client.post(url).status_code == 200
    assert tally.statuses() == [401, 200]


async def test_broker_auth_follows_a_nonce_that_turned_stale(broker: Broker) -> None:
    clock = Clock()
    clock.now = time.time()
    with nonce_server(broker, clock) as (url, tally, _):
        async with httpx.AsyncClient(auth=grpc_style_auth(broker, url)) as client:
            assert (await client.post(url)).status_code == 200
            clock.now += 2 * WINDOW  # the remembered nonce is now refused
            assert (await client.post(url)).status_code == 200
    assert tally.statuses() == [401, 200, 401, 200]


async def test_broker_auth_retries_a_nonce_challenge_only_once(broker: Broker) -> None:
    answered: list[int] = []

    async def always_challenging(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return  # uvicorn's lifespan probe
        answered.append(len(answered))
        headers = [
            (b"www-authenticate", b'DPoP error="use_dpop_nonce"'),
            (b"dpop-nonce", f"nonce-{len(answered)}".encode()),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    with serving(always_challenging) as base:
        async with httpx.AsyncClient(auth=grpc_style_auth(broker, base + "/mcp")) as client:
            response = await client.post(base + "/mcp")
    assert response.status_code == 401
    assert len(answered) == 2


def test_nonces_are_remembered_per_origin_in_bounded_memory() -> None:
    memory = NonceMemory(capacity=2)
    memory.remember("http://a:1", "n1")
    memory.remember("http://b:1", "n2")
    assert memory.get("http://a:1") == "n1"  # a is now the most recently used
    memory.remember("http://c:1", "n3")
    assert (memory.get("http://a:1"), memory.get("http://b:1"), memory.get("http://c:1")) == ("n1", None, "n3")
    assert len(memory) == 2


def test_only_a_use_dpop_nonce_error_is_a_nonce_challenge() -> None:
    assert challenge_asks_for_nonce('Bearer realm="x", DPoP error="use_dpop_nonce", algs="EdDSA"')
    assert not challenge_asks_for_nonce('DPoP error="invalid_dpop_proof"')
    assert not challenge_asks_for_nonce(None)


# -- BrokerAuth over a token endpoint ---------------------------------------------------


class StandInTokenEndpoint:
    """POST /token minting with an embedded Broker (client credentials, RFC 7523 assertion,
    a DPoP proof that must carry this endpoint's nonce) and the RFC 8414 metadata: stands in
    for `tokenbroker serve`'s endpoint. Keeps every token request it received."""

    def __init__(self, broker: Broker, base: str, *, clock: Any = time.time) -> None:
        self.broker = broker
        self.issuer = base
        self.token_url = base + "/token"
        self.nonces = DpopNonces(window_seconds=WINDOW, clock=clock)
        self.requests: list[dict[str, Any]] = []
        self.spent: set[str] = set()
        self.metadata_reads = 0
        self.metadata_issuer = base
        self.app = Starlette(
            routes=[
                Route("/.well-known/oauth-authorization-server", self.metadata),
                Route("/token", self.token, methods=["POST"]),
                Route("/huge/token", self.huge, methods=["POST"]),
            ]
        )

    async def metadata(self, request: Request) -> Response:
        self.metadata_reads += 1
        return JSONResponse({"issuer": self.metadata_issuer, "token_endpoint": self.token_url})

    async def huge(self, request: Request) -> Response:
        return Response(b"{" + b" " * 100_000 + b"}", media_type="application/json")

    @staticmethod
    def refuse(error: str, description: str, status: int = 400, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse(
            {"error": error, "error_description": description},
            status_code=status,
            headers={"Cache-Control": "no-store", **(headers or {})},
        )

    async def token(self, request: Request) -> Response:
        form = {key: str(value) for key, value in (await request.form()).items()}
        proof = request.headers.get("dpop")
        self.requests.append({"form": form, "proof": proof})
        if form.get("grant_type") != "client_credentials":
            return self.refuse("unsupported_grant_type", "client_credentials only")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            return self.refuse("invalid_client", "a jwt-bearer client assertion is required", 401)
        try:
            claims = jwt.decode(
                form.get("client_assertion", ""),
                CLIENT_KEY.public_key(),
                algorithms=["EdDSA"],
                audience=[self.issuer, self.token_url],
                options={"require": ["exp", "iat", "jti", "iss", "sub"]},
            )
        except jwt.InvalidTokenError as exc:
            return self.refuse("invalid_client", f"client assertion refused: {exc}", 401)
        if claims["iss"] != form.get("client_id") or claims["sub"] != form.get("client_id"):
            return self.refuse("invalid_client", "assertion is not the client's", 401)
        if claims["jti"] in self.spent:
            return self.refuse("invalid_client", "client assertion was already used", 401)
        self.spent.add(claims["jti"])
        if proof is None:
            return self.refuse("invalid_dpop_proof", "a DPoP proof is required")
        try:
            jkt, _, _, nonce = verify_dpop_proof(proof, "POST", self.token_url)
        except ValueError as exc:
            return self.refuse("invalid_dpop_proof", str(exc))
        if not self.nonces.accepts(nonce):
            return self.refuse(USE_DPOP_NONCE, "a nonce is required", headers={NONCE_HEADER: self.nonces.current()})
        scopes = form.get("scope", "").split()
        if not set(scopes) <= {"tools:call", "files:read"}:
            return self.refuse("invalid_scope", "scope not allowed for this client")
        bearer = form["client_id"] == "bearer-agent"
        issued = self.broker.issue(
            client_id=form["client_id"],
            audience=form.get("resource", ""),
            scopes=scopes,
            dpop_jkt=None if bearer else jkt,
        )
        body = {
            "access_token": issued.access_token,
            "token_type": "Bearer" if bearer else "DPoP",
            "expires_in": issued.expires_at - int(time.time()),
            "scope": " ".join(issued.scopes),
            "session_id": issued.session_id,
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store", NONCE_HEADER: self.nonces.current()})


@contextmanager
def token_endpoint(broker: Broker) -> Iterator[StandInTokenEndpoint]:
    port = free_port()
    endpoint = StandInTokenEndpoint(broker, f"http://127.0.0.1:{port}")
    with serving(endpoint.app, port):
        yield endpoint


def assertion_claims(request: dict[str, Any]) -> dict[str, Any]:
    return jwt.decode(request["form"]["client_assertion"], options={"verify_signature": False})


def http_auth(endpoint: str, resource: str, **options: Any) -> BrokerAuth:
    return BrokerAuth.from_token_endpoint(
        endpoint,
        client_id=options.pop("client_id", "agent"),
        private_key=CLIENT_KEY,
        resource=resource,
        scopes=options.pop("scopes", ["tools:call"]),
        **options,
    )


async def test_broker_auth_gets_a_dpop_bound_token_from_the_token_endpoint_answering_its_nonce(
    broker: Broker,
) -> None:
    with token_endpoint(broker) as endpoint, nonce_server(broker) as (url, tally, _):
        auth = http_auth(endpoint.token_url, url)
        async with httpx.AsyncClient(auth=auth) as client:
            response = await client.post(url)
    assert response.status_code == 200
    assert response.json()["client_id"] == "agent"
    challenged, granted = endpoint.requests
    assert challenged["form"] == granted["form"] | {"client_assertion": challenged["form"]["client_assertion"]}
    assert granted["form"] | {"client_assertion": ""} == {
        "grant_type": "client_credentials",
        "client_id": "agent",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": "",
        "resource": url,
        "scope": "tools:call",
    }
    # a fresh assertion and a proof with the nonce for the retry, both addressed to the endpoint
    assert assertion_claims(challenged)["jti"] != assertion_claims(granted)["jti"]
    assert assertion_claims(granted)["aud"] == endpoint.token_url
    assert proof_nonce(challenged["proof"]) is None
    assert proof_nonce(granted["proof"]) == endpoint.nonces.current()
    jkt, _, _, _ = verify_dpop_proof(granted["proof"], "POST", endpoint.token_url, max_age_seconds=300)
    assert jkt == auth.signer.jkt
    assert auth.session_id is not None
    assert tally.statuses() == [401, 200]  # and the MCP server's own nonce challenge


async def test_the_token_endpoints_nonce_is_kept_for_the_next_token(broker: Broker) -> None:
    with token_endpoint(broker) as endpoint:
        auth = http_auth(endpoint.token_url, URL)
        first = await auth.atoken()
        auth.drop_token()
        second = await auth.atoken()
    assert first != second
    assert len(endpoint.requests) == 3  # challenged, granted, granted at once with the kept nonce


async def test_broker_auth_discovers_the_token_endpoint_from_the_issuer(broker: Broker) -> None:
    with token_endpoint(broker) as endpoint:
        auth = http_auth(endpoint.issuer, URL)
        await auth.atoken()
        auth.drop_token()
        await auth.atoken()
    assert endpoint.metadata_reads == 1
    assert {assertion_claims(r)["aud"] for r in endpoint.requests} == {endpoint.issuer}


async def test_metadata_naming_another_issuer_is_refused(broker: Broker) -> None:
    with token_endpoint(broker) as endpoint:
        endpoint.metadata_issuer = "http://127.0.0.1:1/elsewhere"
        with pytest.raises(TokenEndpointError, match=r"RFC 8414 section 3\.3") as refused:
            await http_auth(endpoint.issuer, URL).atoken()
    assert refused.value.error == "invalid_response"
    assert endpoint.requests == []  # no credential was sent to the impostor


async def test_a_refusal_of_the_token_endpoint_is_raised_with_its_oauth_error(broker: Broker) -> None:
    with token_endpoint(broker) as endpoint, pytest.raises(TokenEndpointError) as refused:
        await http_auth(endpoint.token_url, URL, scopes=["admin"]).atoken()
    assert (refused.value.error, refused.value.status) == ("invalid_scope", 400)
    assert str(refused.value) == "token endpoint answered 400: invalid_scope: scope not allowed for this client"


async def test_an_answer_larger_than_the_bound_is_refused(broker: Broker) -> None:
    with token_endpoint(broker) as endpoint, pytest.raises(TokenEndpointError, match="larger than"):
        await http_auth(endpoint.issuer + "/huge/token", URL).atoken()


async def test_an_unreachable_token_endpoint_raises_without_an_answer() -> None:
    auth = http_auth(f"http://127.0.0.1:{free_port()}/token", URL)
    with pytest.raises(TokenEndpointError) as refused:
        await auth.atoken()
    assert (refused.value.error, refused.value.status) == ("temporarily_unavailable", 0)


def test_a_sync_client_gets_its_token_from_the_token_endpoint(broker: Broker) -> None:
    with (
        token_endpoint(broker) as endpoint,
        nonce_server(broker) as (url, _, _),
        httpx.Client(auth=http_auth(endpoint.token_url, url)) as client,
    ):
        response = client.post(url)
    assert response.status_code == 200
    assert response.json()["authorization_scheme"] == "Bearer"  # as the SDK stack behind sees it


async def test_a_bearer_answer_to_a_dpop_token_request_is_refused_as_a_downgrade(broker: Broker) -> None:
    # Every token request carries a proof: a server answering with an unbound token (a
    # misconfigured or hostile one) gets nothing sent with it.
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    tally = Tally(BrokerAuthMiddleware(echo, broker=broker, audience=url, require_dpop=False))
    with token_endpoint(broker) as endpoint, serving(tally, port):
        async with httpx.AsyncClient(auth=http_auth(endpoint.token_url, url, client_id="bearer-agent")) as client:
            with pytest.raises(TokenEndpointError, match="Bearer although the request carried a DPoP proof"):
                await client.post(url)
    assert tally.answers == []


async def test_the_token_endpoint_client_uses_a_given_http_client_and_never_its_auth(broker: Broker) -> None:
    class Refusing(httpx.Auth):
        def auth_flow(self, request: httpx.Request) -> Any:
            raise AssertionError("the token request went through the client's auth")

    with token_endpoint(broker) as endpoint:
        async with httpx.AsyncClient(auth=Refusing()) as given:
            auth = http_auth(endpoint.token_url, URL, http_client=given)
            await auth.atoken()
    assert len(endpoint.requests) == 2


def test_a_token_endpoint_takes_neither_an_issuer_nor_a_lifetime() -> None:
    endpoint = TokenEndpoint("http://127.0.0.1:8080/token")
    with pytest.raises(ValueError, match="leave issuer unset"):
        BrokerAuth(endpoint, client_id="a", private_key=CLIENT_KEY, issuer=ISSUER, audience=URL)
    with pytest.raises(ValueError, match="ttl_seconds"):
        BrokerAuth(endpoint, client_id="a", private_key=CLIENT_KEY, audience=URL, ttl_seconds=60)
    with pytest.raises(ValueError, match="issuer"):
        BrokerAuth(
            EmbeddedIssuer(Broker(Keyring.generate(), issuer=ISSUER)),
            client_id="a",
            private_key=CLIENT_KEY,
            audience=URL,
        )


# -- the SDK's own auth stack ----------------------------------------------------------


def whoami() -> str:
    """The caller's client id."""
    token = get_access_token()
    return token.client_id if token else ""


@asynccontextmanager
async def sdk_server(broker: Broker, *, wrapped: bool) -> AsyncIterator[tuple[str, str]]:
    """A real SDK server (2.x MCPServer or 1.x FastMCP) on uvicorn with the SDK's own auth:
    `auth_settings` and `BrokerTokenVerifier` (Bearer, scopes left to the SDK)."""
    port = free_port()
    resource = f"http://127.0.0.1:{port}/mcp"
    settings = auth_settings(public_url=PUBLIC_URL, resource=resource, required_scopes=["tools:call"])
    verifier = BrokerTokenVerifier(broker, audience=resource, require_dpop=False)
    http: dict[str, Any] = {"stateless_http": True, "json_response": True}  # FastMCP takes them at construction
    server = SdkServer("sdk-auth", auth=settings, token_verifier=verifier, **(http if MCP_MAJOR == 1 else {}))
    app: Any = server.streamable_http_app(**({} if MCP_MAJOR == 1 else http))
    server.tool()(whoami)
    if wrapped:
        app = ScopeChallengeMiddleware(app, required_scopes=["tools:call"])
    with serving(app, port) as base:
        yield base, resource


async def test_the_sdk_server_publishes_metadata_naming_the_public_url(broker: Broker) -> None:
    async with sdk_server(broker, wrapped=True) as (base, resource), httpx.AsyncClient() as client:
        document = (await client.get(base + "/.well-known/oauth-protected-resource/mcp")).json()
    # mcp 1.x renders a path-less URL with a trailing "/" (its clients compare them as equal)
    assert document["authorization_servers"] == [PUBLIC_URL if MCP_MAJOR == 2 else PUBLIC_URL + "/"]
    assert document["resource"] == resource
    assert document["scopes_supported"] == ["tools:call"]


async def test_behind_scope_challenges_the_sdks_insufficient_scope_names_the_scopes(broker: Broker) -> None:
    async with sdk_server(broker, wrapped=True) as (base, resource), httpx.AsyncClient() as client:
        token = issue(broker, audience=resource, scopes=["files:read"])
        response = await client.post(base + "/mcp", json=INITIALIZE, headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert response.headers["www-authenticate"] == (
        'Bearer error="insufficient_scope", error_description="Required scope: tools:call", '
        f'resource_metadata="{resource_metadata_url(resource)}", scope="tools:call"'
    )


async def test_without_scope_challenges_the_sdks_insufficient_scope_names_no_scope(broker: Broker) -> None:
    """Why ScopeChallengeMiddleware exists; if the SDK starts naming the scope, it is no
    longer needed (and adds nothing: it never writes a second scope=)."""
    async with sdk_server(broker, wrapped=False) as (base, resource), httpx.AsyncClient() as client:
        token = issue(broker, audience=resource, scopes=["files:read"])
        response = await client.post(base + "/mcp", json=INITIALIZE, headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert "scope=" not in response.headers["www-authenticate"]


async def test_behind_scope_challenges_an_sdk_401_names_the_scopes_and_a_good_token_passes(broker: Broker) -> None:
    async with sdk_server(broker, wrapped=True) as (base, resource), httpx.AsyncClient() as client:
        anonymous = await client.post(base + "/mcp", json=INITIALIZE)
        token = issue(broker, audience=resource)
        headers = {"authorization": f"Bearer {token}", "accept": "application/json, text/event-stream"}
        granted = await client.post(base + "/mcp", json=INITIALIZE, headers=headers)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].endswith(
        f'resource_metadata="{resource_metadata_url(resource)}", scope="tools:call"'
    )
    assert granted.status_code == 200
    assert granted.json()["result"]["serverInfo"]["name"] == "sdk-auth"


async def test_scope_challenges_never_add_a_second_scope_and_leave_other_answers_alone() -> None:
    async def answering(scope: Any, receive: Any, send: Any) -> None:
        status = {"/a": 403, "/b": 200, "/c": 401}[scope["path"]]
        challenge = b'Bearer error="insufficient_scope", scope="x y"' if status == 403 else b"Bearer"
        await send({"type": "http.response.start", "status": status, "headers": [(b"www-authenticate", challenge)]})
        await send({"type": "http.response.body", "body": b""})

    app = ScopeChallengeMiddleware(answering, required_scopes=["tools:call"], resource_metadata_url=METADATA_URL)
    assert (await send(app, path="/a")).headers["www-authenticate"] == (
        f'Bearer error="insufficient_scope", scope="x y", resource_metadata="{METADATA_URL}"'
    )
    assert (await send(app, path="/b")).headers["www-authenticate"] == "Bearer"
    assert (await send(app, path="/c")).headers["www-authenticate"] == (
        f'Bearer scope="tools:call", resource_metadata="{METADATA_URL}"'
    )


def test_scope_challenges_refuse_scopes_that_cannot_be_quoted() -> None:
    with pytest.raises(ValueError, match="scope tokens"):
        ScopeChallengeMiddleware(echo, required_scopes=['a"b'])
    with pytest.raises(ValueError, match="scope tokens"):
        ScopeChallengeMiddleware(echo, required_scopes=[])


def test_auth_settings_name_the_public_url_as_the_issuer_and_the_resource() -> None:
    settings = auth_settings(public_url=PUBLIC_URL, resource="http://127.0.0.1:8000/mcp", required_scopes=["a", "b"])
    assert str(settings.issuer_url).rstrip("/") == PUBLIC_URL
    assert str(settings.resource_server_url) == "http://127.0.0.1:8000/mcp"
    assert settings.required_scopes == ["a", "b"]
    with pytest.raises(ValueError, match="public_url"):
        auth_settings(public_url="broker:8080", resource="http://127.0.0.1:8000/mcp")
