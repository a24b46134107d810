"""tokenbroker.mcp in process: BrokerTokenVerifier, BrokerAuthMiddleware (its answers and
WWW-Authenticate challenges, over httpx's ASGI transport) and BrokerAuth, all against an
embedded Broker."""

from __future__ import annotations

import asyncio
import base64
import datetime
import importlib
import importlib.util
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from mcp.server.auth.middleware.auth_context import get_access_token

from tokenbroker import Broker, Keyring, ProofSigner, Reason
from tokenbroker.errors import PermissionDeniedError, SessionNotFoundError, StoreUnavailableError
from tokenbroker.mcp import BrokerAuth, BrokerAuthMiddleware, BrokerTokenVerifier, cert_thumbprint
from tokenbroker.models import IssuedToken, Validation

ISSUER = "https://broker.unit.test"
URL = "http://testserver/mcp"  # what httpx's ASGI transport addresses
OTHER = "https://other.example/mcp"
CLIENT_KEY = ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def broker() -> Broker:
    return Broker(Keyring.generate(), issuer=ISSUER)


def issue(broker: Broker, signer: ProofSigner | None = None, **kw: Any) -> IssuedToken:
    return broker.issue(
        client_id=kw.pop("client_id", "agent"),
        audience=kw.pop("audience", URL),
        scopes=kw.pop("scopes", ["tools:call"]),
        dpop_jkt=signer.jkt if signer else None,
        **kw,
    )


class Recording:
    """A validator that records each call's keyword arguments, then asks `inner`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[dict[str, Any]] = []

    async def avalidate(self, token: str, **kw: Any) -> Validation:
        self.calls.append(kw)
        return await self.inner.avalidate(token, **kw)  # type: ignore[no-any-return]


class Failing:
    """A validator whose broker cannot answer, or refuses this server."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def avalidate(self, token: str, **kw: Any) -> Validation:
        raise self.error


class EmbeddedIssuer:
    """An embedded Broker behind BrokerAuth's issuer interface; records the calls."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.calls: list[str] = []

    def issue(self, *, client_assertion: str | None = None, **kw: Any) -> IssuedToken:
        self.calls.append("issue")
        return self.broker.issue(**kw)

    async def aissue(self, *, client_assertion: str | None = None, **kw: Any) -> IssuedToken:
        self.calls.append("aissue")
        await asyncio.sleep(0)
        return self.broker.issue(**kw)


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """The protected app: answers with what it was handed."""
    token = get_access_token()
    headers = dict(scope["headers"])
    body = json.dumps(
        {
            "client_id": token.client_id if token else None,
            "session_id": token.claims.get("sid") if token and token.claims else None,
            "user": getattr(scope.get("user"), "username", None),
            "auth_scopes": list(getattr(scope.get("auth"), "scopes", [])),
            "authorization_scheme": headers.get(b"authorization", b"").split(b" ")[0].decode(),
        }
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def protected(validator: Any, **options: Any) -> BrokerAuthMiddleware:
    options.setdefault("required_scopes", ["tools:call"])
    options.setdefault("require_dpop", False)  # Bearer accepted too; test_mcp_hardening covers require_dpop
    return BrokerAuthMiddleware(echo, broker=validator, audience=options.pop("audience", URL), **options)


async def post(app: Any, headers: Iterable[tuple[str, str]] = (), path: str = "/mcp") -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        return await client.post(path, headers=list(headers), content=b"{}")


def dpop(token: str, proof: str) -> list[tuple[str, str]]:
    return [("authorization", f"DPoP {token}"), ("dpop", proof)]


def challenges(response: httpx.Response) -> dict[str, str]:
    return {value.split(" ")[0]: value for value in response.headers.get_list("www-authenticate")}


def http_scope(headers: list[tuple[bytes, bytes]], **extra: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/mcp",
        "raw_path": b"/mcp",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("192.0.2.7", 40000),
        "server": ("testserver", 80),
        **extra,
    }


async def call(app: Any, scope: dict[str, Any]) -> int:
    """Runs one request straight through the ASGI app; returns its status."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return int(sent[0]["status"])


def self_signed_certificate() -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# -- BrokerTokenVerifier ---------------------------------------------------------------


async def test_verifier_accepts_an_unbound_token_issued_for_its_audience(broker: Broker) -> None:
    token = issue(broker).access_token
    verified = await BrokerTokenVerifier(broker, require_dpop=False, audience=URL).verify_token(token)
    assert verified is not None
    assert verified.client_id == "agent"


async def test_verifier_fills_client_scopes_expiry_resource_subject_and_claims(broker: Broker) -> None:
    issued = issue(broker, scopes=["tools:call", "tools:list"])
    verified = await BrokerTokenVerifier(broker, require_dpop=False, audience=URL).verify_token(issued.access_token)
    assert verified is not None
    assert (verified.client_id, verified.scopes, verified.expires_at) == (
        "agent",
        ["tools:call", "tools:list"],
        issued.expires_at,
    )
    assert (verified.resource, verified.subject) == (URL, "agent")
    assert verified.claims is not None
    assert (verified.claims["iss"], verified.claims["sid"], verified.claims["jti"]) == (
        ISSUER,
        issued.session_id,
        issued.jti,
    )


async def test_verifier_refuses_a_dpop_bound_token_because_it_never_sees_the_proof(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    token = issue(broker, ProofSigner()).access_token
    with caplog.at_level(logging.INFO, logger="tokenbroker.mcp"):
        assert await BrokerTokenVerifier(broker, require_dpop=False, audience=URL).verify_token(token) is None
    assert "PROOF_MISSING" in caplog.text


async def test_verifier_refuses_a_token_issued_for_another_audience(broker: Broker) -> None:
    token = issue(broker, audience=OTHER).access_token
    assert await BrokerTokenVerifier(broker, require_dpop=False, audience=URL).verify_token(token) is None


async def test_verifier_refuses_a_token_without_a_required_scope(broker: Broker) -> None:
    token = issue(broker, scopes=["tools:list"]).access_token
    verifier = BrokerTokenVerifier(broker, require_dpop=False, audience=URL, required_scopes=["tools:call"])
    assert await verifier.verify_token(token) is None


async def test_verifier_refuses_a_token_of_a_revoked_session(broker: Broker) -> None:
    issued = issue(broker)
    broker.revoke_session(issued.session_id)
    assert await BrokerTokenVerifier(broker, require_dpop=False, audience=URL).verify_token(issued.access_token) is None


async def test_verifier_raises_when_the_broker_cannot_answer() -> None:
    verifier = BrokerTokenVerifier(Failing(StoreUnavailableError("store down")), audience=URL, require_dpop=False)
    with pytest.raises(StoreUnavailableError):
        await verifier.verify_token("eyJ.e30.sig")


async def test_access_token_repr_never_shows_the_token(broker: Broker) -> None:
    token = issue(broker).access_token
    verified = await BrokerTokenVerifier(broker, require_dpop=False, audience=URL).verify_token(token)
    assert token not in repr(verified)
    assert token not in str(verified)


# -- BrokerAuthMiddleware: accepted ----------------------------------------------------


async def test_dpop_request_with_a_valid_proof_reaches_the_app_as_the_validated_client(broker: Broker) -> None:
    signer = ProofSigner()
    issued = issue(broker, signer)
    response = await post(protected(broker), dpop(issued.access_token, signer.sign("POST", URL, issued.access_token)))
    assert response.status_code == 200
    assert response.json()["client_id"] == "agent"
    assert response.json()["session_id"] == issued.session_id


async def test_the_app_gets_the_sdk_user_scopes_and_a_bearer_authorization(broker: Broker) -> None:
    signer = ProofSigner()
    token = issue(broker, signer).access_token
    answer = (await post(protected(broker), dpop(token, signer.sign("POST", URL, token)))).json()
    assert (answer["user"], answer["auth_scopes"], answer["authorization_scheme"]) == (
        "agent",
        ["tools:call"],
        "Bearer",
    )


async def test_an_unbound_bearer_token_is_accepted(broker: Broker) -> None:
    token = issue(broker).access_token
    response = await post(protected(broker), [("authorization", f"Bearer {token}")])
    assert response.status_code == 200


async def test_public_base_url_is_the_uri_the_proof_must_cover(broker: Broker) -> None:
    signer, public = ProofSigner(), "https://mcp.example.com"
    app = protected(broker, public_base_url=public)
    token = issue(broker, signer).access_token
    assert (await post(app, dpop(token, signer.sign("POST", public + "/mcp", token)))).status_code == 200
    assert (await post(app, dpop(token, signer.sign("POST", URL, token)))).status_code == 401


async def test_the_client_address_is_given_to_the_broker(broker: Broker) -> None:
    recording = Recording(broker)
    await call(protected(recording), http_scope([]))  # refused: no credentials, no broker call
    token = issue(broker).access_token
    status = await call(protected(recording), http_scope([(b"authorization", f"Bearer {token}".encode())]))
    assert status == 200
    assert [c["client_ip"] for c in recording.calls] == ["192.0.2.7"]


async def test_a_certificate_bound_token_is_accepted_with_its_certificate_from_the_tls_extension(
    broker: Broker,
) -> None:
    pem = self_signed_certificate()
    token = issue(broker, cert_thumbprint=cert_thumbprint(pem)).access_token
    tls = {"tls": {"client_cert_chain": [pem], "server_cert": None, "tls_version": 0x0304, "cipher_suite": None}}
    scope = http_scope([(b"authorization", f"Bearer {token}".encode())], extensions=tls)
    assert await call(protected(broker), scope) == 200


async def test_a_certificate_bound_token_is_refused_with_another_certificate(broker: Broker) -> None:
    token = issue(broker, cert_thumbprint=cert_thumbprint(self_signed_certificate())).access_token
    tls = {"tls": {"client_cert_chain": [self_signed_certificate()]}}
    scope = http_scope([(b"authorization", f"Bearer {token}".encode())], extensions=tls)
    assert await call(protected(broker), scope) == 401


async def test_well_known_paths_are_served_without_a_token(broker: Broker) -> None:
    response = await post(protected(broker), path="/.well-known/oauth-protected-resource/mcp")
    assert response.status_code == 200


async def test_a_dot_segment_cannot_climb_out_of_an_exempt_path(broker: Broker) -> None:
    scope = http_scope([], path="/.well-known/../mcp", raw_path=b"/.well-known/../mcp")
    assert await call(protected(broker), scope) == 400  # refused before any validation


# -- BrokerAuthMiddleware: refused -----------------------------------------------------


async def test_a_request_without_credentials_is_challenged_for_dpop_and_bearer_without_an_error(
    broker: Broker,
) -> None:
    response = await post(protected(broker, resource_metadata_url="http://testserver/.well-known/x"))
    assert response.status_code == 401
    assert challenges(response) == {
        "DPoP": 'DPoP resource_metadata="http://testserver/.well-known/x", algs="EdDSA ES256"',
        "Bearer": 'Bearer resource_metadata="http://testserver/.well-known/x"',
    }


async def test_a_replayed_proof_is_refused_as_an_invalid_dpop_proof(broker: Broker) -> None:
    signer = ProofSigner()
    token = issue(broker, signer).access_token
    headers = dpop(token, signer.sign("POST", URL, token))
    assert (await post(protected(broker), headers)).status_code == 200
    replayed = await post(protected(broker), headers)
    assert replayed.status_code == 401
    assert challenges(replayed)["DPoP"] == (
        'DPoP error="invalid_dpop_proof", error_description="DPoP proof or single-use token was already used: '
        'sign a fresh proof for each request", algs="EdDSA ES256"'
    )
    assert challenges(replayed)["Bearer"] == "Bearer"


async def test_the_dpop_scheme_without_a_proof_header_is_refused_as_an_invalid_dpop_proof(broker: Broker) -> None:
    token = issue(broker, ProofSigner()).access_token
    response = await post(protected(broker), [("authorization", f"DPoP {token}")])
    assert response.status_code == 401
    assert 'error="invalid_dpop_proof"' in challenges(response)["DPoP"]


async def test_a_bound_token_presented_as_bearer_is_refused_on_the_dpop_challenge(broker: Broker) -> None:
    signer = ProofSigner()
    token = issue(broker, signer).access_token
    headers = [("authorization", f"Bearer {token}"), ("dpop", signer.sign("POST", URL, token))]
    response = await post(protected(broker), headers)
    assert response.status_code == 401
    assert 'error="invalid_token"' in challenges(response)["DPoP"]
    assert challenges(response)["Bearer"] == "Bearer"


async def test_a_proof_by_another_key_is_refused_as_an_invalid_token(broker: Broker) -> None:
    token = issue(broker, ProofSigner()).access_token
    response = await post(protected(broker), dpop(token, ProofSigner().sign("POST", URL, token)))
    assert response.status_code == 401
    assert 'error="invalid_token"' in challenges(response)["DPoP"]  # RFC 9449 7.1: "Invalid DPoP key binding"


async def test_a_proof_for_another_uri_is_refused_as_an_invalid_dpop_proof(broker: Broker) -> None:
    signer = ProofSigner()
    token = issue(broker, signer).access_token
    response = await post(protected(broker), dpop(token, signer.sign("POST", "http://testserver/other", token)))
    assert response.status_code == 401
    assert 'error="invalid_dpop_proof"' in challenges(response)["DPoP"]


async def test_a_token_for_another_audience_is_refused_as_an_invalid_token(broker: Broker) -> None:
    signer = ProofSigner()
    token = issue(broker, signer, audience=OTHER).access_token
    response = await post(protected(broker), dpop(token, signer.sign("POST", URL, token)))
    assert response.status_code == 401
    assert challenges(response)["DPoP"] == (
        'DPoP error="invalid_token", error_description="token was issued for another audience", algs="EdDSA ES256"'
    )


async def test_a_bearer_token_for_another_audience_is_refused_on_the_bearer_challenge(broker: Broker) -> None:
    token = issue(broker, audience=OTHER).access_token
    response = await post(protected(broker), [("authorization", f"Bearer {token}")])
    assert response.status_code == 401
    assert challenges(response)["Bearer"] == (
        'Bearer error="invalid_token", error_description="token was issued for another audience"'
    )


async def test_a_token_without_a_required_scope_is_forbidden_with_insufficient_scope(broker: Broker) -> None:
    signer = ProofSigner()
    token = issue(broker, signer, scopes=["tools:list"]).access_token
    response = await post(protected(broker), dpop(token, signer.sign("POST", URL, token)))
    assert response.status_code == 403
    assert challenges(response)["DPoP"] == (
        'DPoP error="insufficient_scope", error_description="token lacks scope: tools:call", '
        'scope="tools:call", algs="EdDSA ES256"'
    )


async def test_two_authorization_headers_are_a_bad_request(broker: Broker) -> None:
    token = issue(broker).access_token
    response = await post(protected(broker), [("authorization", f"Bearer {token}")] * 2)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


async def test_two_dpop_headers_are_a_bad_request(broker: Broker) -> None:
    signer = ProofSigner()
    token = issue(broker, signer).access_token
    proof = ("dpop", signer.sign("POST", URL, token))
    response = await post(protected(broker), [("authorization", f"DPoP {token}"), proof, proof])
    assert response.status_code == 400


async def test_an_unavailable_broker_fails_closed_with_503(broker: Broker) -> None:
    token = issue(broker).access_token
    response = await post(protected(Failing(StoreUnavailableError("down"))), [("authorization", f"Bearer {token}")])
    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"


async def test_a_broker_refusing_this_server_answers_500(broker: Broker) -> None:
    token = issue(broker).access_token
    app = protected(Failing(PermissionDeniedError("not your audience")))
    response = await post(app, [("authorization", f"Bearer {token}")])
    assert response.status_code == 500


async def test_refusals_never_log_the_token_or_the_proof(broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    signer = ProofSigner()
    token = issue(broker, signer, audience=OTHER).access_token
    proof = signer.sign("POST", URL, token)
    with caplog.at_level(logging.DEBUG):
        await post(protected(broker), dpop(token, proof))
        await post(protected(broker), [("authorization", f"DPoP {token}")])
        await post(protected(Failing(StoreUnavailableError("down"))), dpop(token, proof))
    assert "WRONG_AUDIENCE" in caplog.text
    assert token not in caplog.text
    assert proof not in caplog.text
    assert token.split(".")[2] not in caplog.text


# -- with the SDK's own auth stack -----------------------------------------------------


def load_example(name: str) -> Any:
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tokenbroker_example_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


async def test_behind_the_middleware_the_sdk_stack_accepts_dpop_with_one_broker_call_per_request(
    broker: Broker,
) -> None:
    recording = Recording(broker)
    app = load_example("protected_server").create_app(
        recording, audience=URL, issuer=ISSUER, host="testserver", stateless=True, json_response=True
    )
    signer = ProofSigner()
    token = issue(broker, signer).access_token
    async with (
        app.app.router.lifespan_context(app.app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client,
    ):
        headers = {
            "accept": "application/json, text/event-stream",
            **dict(dpop(token, signer.sign("POST", URL, token))),
        }
        response = await client.post("/mcp", json=INITIALIZE, headers=headers)
    assert response.status_code == 200
    assert response.json()["result"]["serverInfo"]["name"] == "tokenbroker-protected"
    assert len(recording.calls) == 1


# -- BrokerAuth ------------------------------------------------------------------------


def broker_auth(issuer: Any, **options: Any) -> BrokerAuth:
    return BrokerAuth(
        issuer,
        client_id="agent",
        private_key=CLIENT_KEY,
        issuer=ISSUER,
        audience=URL,
        scopes=["tools:call"],
        **options,
    )


class Capture:
    """An httpx transport answering 200 and keeping every request it was sent."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(200)


async def test_broker_auth_sends_the_token_with_a_fresh_valid_proof_on_every_request(broker: Broker) -> None:
    capture = Capture()
    async with httpx.AsyncClient(auth=broker_auth(EmbeddedIssuer(broker)), transport=httpx.MockTransport(capture)) as c:
        await c.post(URL)
        await c.post(URL)
    first, second = capture.requests
    assert first.headers["authorization"] == second.headers["authorization"]
    assert first.headers["dpop"] != second.headers["dpop"]
    for request in capture.requests:
        token = request.headers["authorization"].removeprefix("DPoP ")
        validation = broker.validate(
            token, audience=URL, dpop_proof=request.headers["dpop"], http_method="POST", http_uri=URL
        )
        assert validation.valid, validation.detail


async def test_broker_auth_proofs_cover_the_method_and_the_uri_without_its_query(broker: Broker) -> None:
    capture = Capture()
    async with httpx.AsyncClient(auth=broker_auth(EmbeddedIssuer(broker)), transport=httpx.MockTransport(capture)) as c:
        await c.get(URL + "?cursor=2")
    (request,) = capture.requests
    payload = json.loads(base64.urlsafe_b64decode(request.headers["dpop"].split(".")[1] + "=="))
    assert (payload["htm"], payload["htu"]) == ("GET", URL)


async def test_broker_auth_keeps_its_token_until_it_is_about_to_expire(broker: Broker) -> None:
    issuer, capture = EmbeddedIssuer(broker), Capture()
    async with httpx.AsyncClient(auth=broker_auth(issuer), transport=httpx.MockTransport(capture)) as client:
        for _ in range(3):
            await client.post(URL)
    assert issuer.calls == ["aissue"]


async def test_broker_auth_refreshes_before_expiry_in_the_same_session(broker: Broker) -> None:
    issuer, capture = EmbeddedIssuer(broker), Capture()
    auth = broker_auth(issuer, ttl_seconds=2, refresh_margin=1.5)
    async with httpx.AsyncClient(auth=auth, transport=httpx.MockTransport(capture)) as client:
        await client.post(URL)
        session = auth.session_id
        await asyncio.sleep(1.1)
        await client.post(URL)
    first, second = (r.headers["authorization"] for r in capture.requests)
    assert issuer.calls == ["aissue", "aissue"]
    assert first != second
    assert auth.session_id == session


async def test_broker_auth_does_not_open_a_new_session_when_its_session_was_revoked(broker: Broker) -> None:
    auth = broker_auth(EmbeddedIssuer(broker))
    await auth.atoken()
    broker.revoke_session(str(auth.session_id))
    auth.drop_token()
    with pytest.raises(SessionNotFoundError):
        await auth.atoken()  # the next token would continue the revoked session


async def test_broker_auth_never_calls_the_blocking_issue_in_an_async_flow(broker: Broker) -> None:
    issuer = EmbeddedIssuer(broker)
    async with httpx.AsyncClient(auth=broker_auth(issuer), transport=httpx.MockTransport(Capture())) as client:
        await asyncio.gather(*(client.post(URL) for _ in range(5)))
    assert issuer.calls == ["aissue"]  # one issuance shared by concurrent requests


def test_broker_auth_signs_requests_of_a_sync_client(broker: Broker) -> None:
    issuer, capture = EmbeddedIssuer(broker), Capture()
    with httpx.Client(auth=broker_auth(issuer), transport=httpx.MockTransport(capture)) as client:
        client.post(URL)
    assert issuer.calls == ["issue"]
    assert capture.requests[0].headers["authorization"].startswith("DPoP ")


async def test_broker_auth_plugs_into_httpx2_the_http_client_of_mcp_2(broker: Broker) -> None:
    # mcp 2.x's HTTP client: `make test-mcp1` (mcp 1.x, no httpx2) deselects this test, so
    # it never skips; anywhere else a missing httpx2 is a failure, not a skip.
    httpx2: Any = importlib.import_module("httpx2")  # untyped here, as importorskip gave it
    requests: list[Any] = []

    def answer(request: Any) -> Any:
        requests.append(request)
        return httpx2.Response(200)

    async with httpx2.AsyncClient(
        auth=broker_auth(EmbeddedIssuer(broker)), transport=httpx2.MockTransport(answer)
    ) as c:
        await c.post(URL)
    assert requests[0].headers["authorization"].startswith("DPoP ")
    assert "dpop" in requests[0].headers


async def test_broker_auth_repr_never_shows_the_token(broker: Broker) -> None:
    auth = broker_auth(EmbeddedIssuer(broker))
    token = await auth.atoken()
    assert token not in repr(auth)


SPECIAL_ANSWERS = {
    Reason.INSUFFICIENT_SCOPE: (403, "insufficient_scope"),
    Reason.PROOF_INVALID: (401, "invalid_dpop_proof"),
    Reason.REPLAYED: (401, "invalid_dpop_proof"),  # a proof was presented: the proof was replayed
    Reason.REPLAY_CACHE_FULL: (503, "temporarily_unavailable"),
}


@pytest.mark.parametrize("reason", [r for r in Reason if r is not Reason.OK], ids=lambda r: r.name)
def test_each_refusal_reason_gets_its_rfc_status_and_error(reason: Reason) -> None:
    app = BrokerAuthMiddleware(echo, broker=Failing(RuntimeError()), audience=URL, required_scopes=["s"])
    refusal = app._refusal(Validation.rejected(reason, "detail"), "dpop", with_proof=True)
    assert (refusal.status, refusal.error) == SPECIAL_ANSWERS.get(reason, (401, "invalid_token"))


async def test_a_host_header_carrying_a_path_is_a_bad_request(broker: Broker) -> None:
    signer = ProofSigner()
    issued = issue(broker, signer)
    forged_uri = "http://testserver/other"
    proof = signer.sign("POST", forged_uri, issued.access_token)
    headers = [(b"authorization", f"DPoP {issued.access_token}".encode()), (b"dpop", proof.encode())]
    scope = http_scope(headers)
    scope["headers"] = [(b"host", b"testserver/other#"), *headers]
    assert await call(protected(broker), scope) == 400


async def test_the_dpop_scheme_with_an_unbound_token_is_refused(broker: Broker) -> None:
    signer = ProofSigner()
    issued = issue(broker)  # not bound to any key
    response = await post(protected(broker), dpop(issued.access_token, signer.sign("POST", URL, issued.access_token)))
    assert response.status_code == 401
