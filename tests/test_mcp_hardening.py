"""Issue #8 items 7 and 11 for the MCP integration: BrokerAuthMiddleware refuses request
targets that route somewhere other than the path the DPoP proof covers (400 before any
validation), and `require_dpop` (the default) keeps Bearer tokens out of the middleware and
of BrokerTokenVerifier. In process against an embedded Broker, then with real processes: a
`tokenbroker serve`, examples/protected_server.py with and without `--no-require-dpop`, and
a raw HTTP client (http.client sends the target as given; httpx resolves dot segments)."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp.server.auth.middleware.auth_context import get_access_token
from test_mcp_e2e import ISSUER, McpServerProcess
from test_mcp_unit import Recording, self_signed_certificate

from tokenbroker import Broker, Keyring, ProofSigner, Reason
from tokenbroker._core import normalize_htu
from tokenbroker.client import BrokerClient
from tokenbroker.client_assertion import make_client_assertion, public_jwk
from tokenbroker.mcp import BrokerAuthMiddleware, BrokerTokenVerifier, cert_thumbprint
from tokenbroker.models import Validation
from tokenbroker.registry import Binding, ClientRecord, ClientStatus, ServerRecord
from tokenbroker.registry_file import FileRegistry, hash_secret
from tokenbroker_bench.servers import free_port

from support.broker_process import BrokerProcess

HOST = "testserver"
URL = f"http://{HOST}/mcp"

# The targets of the report (a proof for POST /mcp was accepted there, the app routed /admin),
# and the other spellings of a dot segment.
DOT_SEGMENT_TARGETS = [
    "/admin/../mcp",
    "/admin/%2e%2e/mcp",
    "/admin/.%2e/mcp",
    "/admin/%2E%2E/mcp",
    "/admin/%2e./mcp",
    "/admin/%2E%2e/mcp",
    "/admin/./../mcp",
    "/./mcp",
    "/mcp/.",
    "/mcp/..",
]
SEPARATOR_TARGETS = ["/admin%2fmcp", "/admin%2F..%2Fmcp", "/admin%5c..%5cmcp", "/admin%5C..%5Cmcp", "/admin\\..\\mcp"]
DOUBLE_ENCODED_TARGETS = ["/admin/%252e%252e/mcp", "/admin/%252E%252E/mcp", "/admin%252fmcp", "/admin%255cmcp"]


# -- in process ------------------------------------------------------------------------


@pytest.fixture
def broker() -> Broker:
    return Broker(Keyring.generate(), issuer=ISSUER)


class Accepting:
    """A validator that accepts every token and records the URI it was asked about."""

    def __init__(self) -> None:
        self.uris: list[str] = []

    async def avalidate(self, token: str, **kw: Any) -> Validation:
        self.uris.append(kw["http_uri"])
        return Validation(True, Reason.OK, client_id="agent", subject="agent", audience=URL, scopes=("tools:call",))


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """The protected app: answers 200 with the path it routes."""
    body = json.dumps({"path": scope["path"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def uvicorn_scope(target: str, headers: list[tuple[bytes, bytes]], root_path: str = "") -> dict[str, Any]:
    """The scope uvicorn builds for `target`: raw_path as received, path decoded once, both
    under root_path."""
    raw_path, _, query = target.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": root_path + unquote(raw_path),
        "raw_path": (root_path + raw_path).encode("ascii"),
        "query_string": query.encode("ascii"),
        "root_path": root_path,
        "headers": [(b"host", HOST.encode()), *headers],
        "client": ("192.0.2.7", 40000),
        "server": (HOST, 80),
    }


async def call(app: Any, scope: dict[str, Any]) -> tuple[int, dict[str, Any], list[str]]:
    """One request straight through the ASGI app: its status, JSON body, WWW-Authenticate."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    challenges = [v.decode() for k, v in sent[0]["headers"] if k == b"www-authenticate"]
    return int(sent[0]["status"]), json.loads(sent[1]["body"]), challenges


def signed_for(broker: Broker, uri: str = URL) -> list[tuple[bytes, bytes]]:
    """Authorization and DPoP headers: a valid DPoP-bound token and a proof for POST `uri`."""
    signer = ProofSigner()
    token = broker.issue(client_id="agent", audience=URL, scopes=["tools:call"], dpop_jkt=signer.jkt).access_token
    return [(b"authorization", f"DPoP {token}".encode()), (b"dpop", signer.sign("POST", uri, token).encode())]


def bearer(broker: Broker) -> list[tuple[bytes, bytes]]:
    token = broker.issue(client_id="agent", audience=URL, scopes=["tools:call"]).access_token
    return [(b"authorization", f"Bearer {token}".encode())]


def protected(validator: Any, **options: Any) -> BrokerAuthMiddleware:
    return BrokerAuthMiddleware(echo, broker=validator, audience=URL, required_scopes=["tools:call"], **options)


async def test_a_target_signed_for_and_routed_to_mcp_is_accepted(broker: Broker) -> None:
    recording = Recording(broker)
    status, body, _ = await call(protected(recording), uvicorn_scope("/mcp", signed_for(broker)))
    assert (status, body["path"], len(recording.calls)) == (200, "/mcp", 1)


@pytest.mark.parametrize("target", DOT_SEGMENT_TARGETS)
async def test_dot_segment_targets_are_refused_with_400_before_any_validation(broker: Broker, target: str) -> None:
    recording = Recording(broker)
    status, body, _ = await call(protected(recording), uvicorn_scope(target, signed_for(broker)))
    assert (status, body["error"]) == (400, "invalid_request")
    assert "dot segment" in body["error_description"]
    assert recording.calls == []


@pytest.mark.parametrize("target", SEPARATOR_TARGETS)
async def test_encoded_slashes_and_backslashes_are_refused_with_400_before_any_validation(
    broker: Broker, target: str
) -> None:
    recording = Recording(broker)
    status, body, _ = await call(protected(recording), uvicorn_scope(target, signed_for(broker)))
    assert (status, body["error"]) == (400, "invalid_request")
    assert recording.calls == []


@pytest.mark.parametrize("target", DOUBLE_ENCODED_TARGETS)
async def test_twice_encoded_dots_and_slashes_are_refused_with_400(broker: Broker, target: str) -> None:
    recording = Recording(broker)
    status, body, _ = await call(protected(recording), uvicorn_scope(target, signed_for(broker)))
    assert (status, body["error"]) == (400, "invalid_request")
    assert recording.calls == []


@pytest.mark.parametrize("target", ["//mcp", "/admin//mcp", "/mcp%00", "/mcp%0a", "/mcp%ff", "/mcp%zz"])
async def test_empty_segments_control_characters_and_bad_encodings_are_refused_with_400(
    broker: Broker, target: str
) -> None:
    recording = Recording(broker)
    status, _, _ = await call(protected(recording), uvicorn_scope(target, signed_for(broker)))
    assert status == 400
    assert recording.calls == []


async def test_a_raw_path_that_does_not_decode_to_the_routed_path_is_refused(broker: Broker) -> None:
    recording = Recording(broker)
    scope = uvicorn_scope("/mcp", signed_for(broker))
    scope["path"] = "/admin"  # a server or proxy in between that rewrote path but not raw_path
    status, body, _ = await call(protected(recording), scope)
    assert (status, body["error"]) == (400, "invalid_request")
    assert recording.calls == []


async def test_an_encoded_dot_segment_cannot_climb_out_of_an_exempt_path(broker: Broker) -> None:
    status, _, _ = await call(protected(Recording(broker)), uvicorn_scope("/.well-known/%2e%2e/mcp", []))
    assert status == 400


async def test_a_percent_encoded_utf8_path_is_accepted_with_a_proof_for_it(broker: Broker) -> None:
    headers = signed_for(broker, f"http://{HOST}/caf%C3%A9")
    status, body, _ = await call(protected(broker), uvicorn_scope("/caf%C3%A9", headers))
    assert (status, body["path"]) == (200, "/café")


async def test_under_a_root_path_the_proof_covers_the_whole_path_the_app_routes(broker: Broker) -> None:
    recording = Recording(broker)
    headers = signed_for(broker, f"http://{HOST}/prefix/mcp")
    status, _, _ = await call(protected(recording), uvicorn_scope("/mcp", headers, root_path="/prefix"))
    assert status == 200
    assert [c["http_uri"] for c in recording.calls] == [f"http://{HOST}/prefix/mcp"]


TRICKY_SEGMENTS = [
    *(".", "..", "%2e", "%2E", ".%2e", "%2e.", "%2E%2e", "%252e", "%2f", "%2F", "%5c", "%5C", "\\", ""),
    *("mcp", "admin", "a.b", "%41", "%C3%A9", "%ff", "%", "%2", "%00", ";x=1", "~", "%7e", "@", ":"),
]
SEGMENT_ALPHABET = "abc.%25eEfFcC\\;:@~!$&'()*+,="


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    segments=st.lists(
        st.one_of(st.sampled_from(TRICKY_SEGMENTS), st.text(alphabet=SEGMENT_ALPHABET, max_size=6)),
        min_size=1,
        max_size=5,
    ),
    root_path=st.sampled_from(["", "/prefix"]),
    with_raw_path=st.booleans(),
)
def test_fuzzed_targets_are_refused_or_validated_against_the_path_the_app_routes(
    segments: list[str], root_path: str, with_raw_path: bool
) -> None:
    target = "/" + "/".join(segments)
    scope = uvicorn_scope(target, [(b"authorization", b"Bearer abc")], root_path=root_path)
    if not with_raw_path:  # servers that do not give raw_path
        del scope["raw_path"]
    validator = Accepting()
    status, _, _ = asyncio.run(call(protected(validator, require_dpop=False), scope))

    routed = scope["path"]
    spelt = target if with_raw_path else routed  # what the client sent, where the server says
    ambiguous = (
        any(segment in (".", "..") for segment in routed.split("/"))
        or "\\" in spelt
        or re.search("%(2[ef]|5c)", spelt, re.IGNORECASE) is not None
    )
    assert status in (200, 400)
    assert len(validator.uris) == (1 if status == 200 else 0)
    if ambiguous:
        assert status == 400
    if status == 200:
        compared = normalize_htu(validator.uris[0])  # what the broker compares with the proof's htu
        assert compared is not None
        assert unquote(urlsplit(compared).path) == routed


async def test_by_default_a_bearer_token_gets_401_with_only_the_dpop_challenge_and_no_broker_call(
    broker: Broker,
) -> None:
    recording = Recording(broker)
    status, body, challenges = await call(protected(recording), uvicorn_scope("/mcp", bearer(broker)))
    assert status == 401
    assert [c.split(" ")[0] for c in challenges] == ["DPoP"]
    assert 'error="invalid_token"' in challenges[0]
    assert "accepts only DPoP" in body["error_description"]
    assert recording.calls == []


async def test_by_default_a_request_without_credentials_is_offered_only_the_dpop_challenge(broker: Broker) -> None:
    status, _, challenges = await call(protected(broker), uvicorn_scope("/mcp", []))
    assert status == 401
    assert challenges == ['DPoP algs="EdDSA ES256"']


async def test_by_default_a_dpop_request_with_its_proof_is_accepted(broker: Broker) -> None:
    status, _, _ = await call(protected(broker), uvicorn_scope("/mcp", signed_for(broker)))
    assert status == 200


async def test_by_default_a_certificate_bound_token_with_an_unchecked_proof_is_refused(broker: Broker) -> None:
    pem = self_signed_certificate()
    token = broker.issue(client_id="agent", audience=URL, scopes=["tools:call"], cert_thumbprint=cert_thumbprint(pem))
    proof = ProofSigner().sign("POST", URL, token.access_token)  # any key: never checked against the token
    headers = [(b"authorization", f"DPoP {token.access_token}".encode()), (b"dpop", proof.encode())]
    scope = uvicorn_scope("/mcp", headers)
    scope["extensions"] = {"tls": {"client_cert_chain": [pem]}}
    # The engine refuses it too (a token binds to a DPoP key or a certificate, never both),
    # whatever the middleware's own setting.
    status, body, _ = await call(protected(broker, require_dpop=False), dict(scope))
    assert status == 401
    assert "bound to a client certificate" in body["error_description"]
    status, body, _ = await call(protected(broker), scope)
    assert status == 401
    assert "bound to a client certificate" in body["error_description"]


async def test_without_require_dpop_an_unbound_bearer_token_is_accepted(broker: Broker) -> None:
    status, _, _ = await call(protected(broker, require_dpop=False), uvicorn_scope("/mcp", bearer(broker)))
    assert status == 200


async def test_a_verifier_requiring_dpop_refuses_a_token_it_sees_alone_without_a_broker_call(broker: Broker) -> None:
    recording = Recording(broker)
    token = broker.issue(client_id="agent", audience=URL, scopes=["tools:call"]).access_token
    assert await BrokerTokenVerifier(recording, audience=URL).verify_token(token) is None
    assert recording.calls == []


def verifying(verifier: BrokerTokenVerifier) -> Any:
    """An app that asks `verifier` about the request's token, as the SDK's bearer stack does."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        principal = get_access_token()
        assert principal is not None
        verified = await verifier.verify_token(principal.token)
        body = json.dumps({"client_id": verified.client_id if verified else None}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


async def test_a_verifier_requiring_dpop_returns_the_principal_the_middleware_proved_with_dpop(
    broker: Broker,
) -> None:
    recording = Recording(broker)
    app = BrokerAuthMiddleware(verifying(BrokerTokenVerifier(recording, audience=URL)), broker=recording, audience=URL)
    status, body, _ = await call(app, uvicorn_scope("/mcp", signed_for(broker)))
    assert (status, body["client_id"], len(recording.calls)) == (200, "agent", 1)


async def test_a_verifier_requiring_dpop_refuses_a_bearer_token_the_middleware_let_through(broker: Broker) -> None:
    verifier = BrokerTokenVerifier(broker, audience=URL)
    app = BrokerAuthMiddleware(verifying(verifier), broker=broker, audience=URL, require_dpop=False)
    status, body, _ = await call(app, uvicorn_scope("/mcp", bearer(broker)))
    assert (status, body["client_id"]) == (200, None)


# -- real processes --------------------------------------------------------------------

KEY_STRICT, KEY_LENIENT = "key-strict-" + "s" * 40, "key-lenient-" + "l" * 40
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


@dataclass
class Deployment:
    broker: BrokerProcess
    strict: McpServerProcess  # the example server as it starts by default: DPoP required
    lenient: McpServerProcess  # with --no-require-dpop
    client_key: ed25519.Ed25519PrivateKey


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("mcp-hardening")
    Keyring.generate().save(workdir / "keys.json")
    client_key = ed25519.Ed25519PrivateKey.generate()
    strict_port, lenient_port = free_port(), free_port()
    audiences = (f"http://127.0.0.1:{strict_port}/mcp", f"http://127.0.0.1:{lenient_port}/mcp")
    registry = FileRegistry(workdir / "registry.toml")
    for client_id, binding in [("agent", Binding.DPOP), ("bearer-agent", Binding.BEARER)]:
        registry.add_client(
            ClientRecord(
                client_id,
                status=ClientStatus.APPROVED,
                public_jwk=public_jwk(client_key),
                allowed_audiences=audiences,
                allowed_scopes=("tools:call",),
                binding=binding,
            )
        )
    registry.add_server(ServerRecord("strict", audiences=audiences[:1], api_key_hash=hash_secret(KEY_STRICT)))
    registry.add_server(ServerRecord("lenient", audiences=audiences[1:], api_key_hash=hash_secret(KEY_LENIENT)))
    env = {
        "TOKENBROKER_ISSUER": ISSUER,
        "TOKENBROKER_KEY_FILE": str(workdir / "keys.json"),
        "TOKENBROKER_REGISTRY_FILE": str(workdir / "registry.toml"),
    }
    (workdir / "strict-key").write_text(KEY_STRICT + "\n")
    (workdir / "lenient-key").write_text(KEY_LENIENT + "\n")
    broker = BrokerProcess(workdir, env)
    strict = McpServerProcess(workdir, broker.target, workdir / "strict-key", strict_port)
    options = ("--no-require-dpop",)
    lenient = McpServerProcess(workdir, broker.target, workdir / "lenient-key", lenient_port, options=options)
    try:
        broker.start()
        strict.start()
        lenient.start()
        yield Deployment(broker, strict, lenient, client_key)
    finally:
        strict.stop()
        lenient.stop()
        assert broker.stop() == 0, broker.log.read_text()[-2000:]


def issued_token(deployment: Deployment, client_id: str, audience: str, signer: ProofSigner | None = None) -> str:
    with BrokerClient(deployment.broker.target, timeout=5) as client:
        return client.issue(
            client_id=client_id,
            client_assertion=make_client_assertion(deployment.client_key, client_id, ISSUER),
            audience=audience,
            scopes=["tools:call"],
            dpop_jkt=signer.jkt if signer else None,
        ).access_token


@dataclass
class Answer:
    status: int
    body: bytes
    challenges: list[str]


def raw_post(server: McpServerProcess, target: str, headers: dict[str, str]) -> Answer:
    """POST `target` exactly as written (http.client neither resolves nor re-encodes it)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        body = json.dumps(INITIALIZE).encode()
        all_headers = {"content-type": "application/json", "accept": "application/json, text/event-stream", **headers}
        connection.request("POST", target, body=body, headers=all_headers)
        response = connection.getresponse()
        return Answer(response.status, response.read(), response.headers.get_all("www-authenticate") or [])
    finally:
        connection.close()


def dpop_headers(deployment: Deployment, server: McpServerProcess) -> dict[str, str]:
    """A valid token for `server` and a fresh proof for POST on its /mcp."""
    signer = ProofSigner()
    token = issued_token(deployment, "agent", server.url, signer)
    return {"authorization": f"DPoP {token}", "dpop": signer.sign("POST", server.url, token)}


def test_the_example_server_serves_a_raw_request_signed_for_mcp(deployment: Deployment) -> None:
    answer = raw_post(deployment.strict, "/mcp", dpop_headers(deployment, deployment.strict))
    assert answer.status == 200, answer.body


@pytest.mark.parametrize("target", ["/admin/../mcp", "/admin/%2e%2e/mcp", "/admin/.%2e/mcp", "/admin%2f..%2fmcp"])
def test_the_example_server_answers_400_to_path_confusion_with_a_valid_token_and_proof(
    deployment: Deployment, target: str
) -> None:
    answer = raw_post(deployment.strict, target, dpop_headers(deployment, deployment.strict))
    assert answer.status == 400
    assert json.loads(answer.body)["error"] == "invalid_request"  # the middleware's answer, not uvicorn's


def test_the_example_server_by_default_refuses_a_bearer_token_with_the_dpop_challenge(deployment: Deployment) -> None:
    token = issued_token(deployment, "bearer-agent", deployment.strict.url)
    answer = raw_post(deployment.strict, "/mcp", {"authorization": f"Bearer {token}"})
    assert answer.status == 401
    assert [c.split(" ")[0] for c in answer.challenges] == ["DPoP"]
    assert 'error="invalid_token"' in answer.challenges[0]


def test_the_example_server_with_no_require_dpop_accepts_a_bearer_token(deployment: Deployment) -> None:
    token = issued_token(deployment, "bearer-agent", deployment.lenient.url)
    answer = raw_post(deployment.lenient, "/mcp", {"authorization": f"Bearer {token}"})
    assert answer.status == 200, answer.body


def test_refusals_of_path_confusion_are_logged_without_the_token_or_the_proof(deployment: Deployment) -> None:
    headers = dpop_headers(deployment, deployment.strict)
    assert raw_post(deployment.strict, "/admin/%2e%2e/mcp", headers).status == 400
    log = deployment.strict.log.read_text()
    assert "refused POST /admin/../mcp" in log  # the refusal was logged ...
    assert "eyJ" not in log  # ... but no JWS (every token and proof begins with eyJ)
