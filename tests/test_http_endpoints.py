"""The HTTP door's other endpoints end to end (issue 10): RFC 8414 metadata (also for an
issuer with a path), `/jwks` (verified with PyJWT), `/introspect` (RFC 7662), `/revoke`
(RFC 7009, checked through introspection and gRPC ValidateToken), `/authorize` (an honest
error) and `/healthz` (failing closed when Redis goes away). Real `tokenbroker serve`
processes on loopback, httpx as the client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from tokenbroker import ProofSigner, Reason
from tokenbroker.client import BrokerClient
from tokenbroker.client_assertion import PrivateKey, make_client_assertion

from support.broker_process import BrokerProcess
from support.oauth import (
    AUDIENCE_A,
    AUDIENCE_B,
    METADATA_PATH,
    OAuthDeployment,
    assertion_fields,
    basic_authorization,
    claims_of,
    door_url,
    endpoint_url,
    http_client,
    issuer_of,
    key_token,
    new_key,
    oauth_error,
    secret_token,
    token_form,
    token_url,
    wait_for,
)
from support.redis_servers import RedisServer

KEY_A = "server-a-key-" + "a" * 40
KEY_B = "server-b-key-" + "b" * 40
OTHER_SECRET = "other-secret-" + "o" * 30


@pytest.fixture(scope="module")
def client_key() -> PrivateKey:
    return new_key("ed25519")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, client_key: PrivateKey) -> OAuthDeployment:
    d = OAuthDeployment(tmp_path_factory.mktemp("http-endpoints"))
    d.add_key_client("agent", client_key)
    d.add_key_client("agent-b", client_key, allowed_audiences=(AUDIENCE_B,))
    d.add_secret_client("other", OTHER_SECRET, binding="bearer")
    d.add_server("server-a", (AUDIENCE_A,), KEY_A)
    d.add_server("server-b", (AUDIENCE_B,), KEY_B)
    return d


@pytest.fixture(scope="module")
def broker(deployment: OAuthDeployment) -> Iterator[BrokerProcess]:
    process = deployment.broker()
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log.read_text()[-2000:]


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with http_client() as client:
        yield client


class Issued:
    """A DPoP-bound token of "agent" (or "agent-b") and the key it is bound to."""

    def __init__(self, http: httpx.Client, broker: BrokerProcess, key: PrivateKey, client_id: str = "agent"):
        self.signer = ProofSigner()
        answer = key_token(http, broker, key, client_id, signer=self.signer)
        assert answer.status_code == 200, answer.text
        self.token: str = answer.json()["access_token"]
        self.claims = claims_of(self.token)


def introspect(http: httpx.Client, broker: BrokerProcess, token: str, api_key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
    return http.post(door_url(broker, "introspect"), data={"token": token}, headers=headers)


def active(http: httpx.Client, broker: BrokerProcess, token: str, api_key: str = KEY_A) -> bool:
    answer = introspect(http, broker, token, api_key)
    assert answer.status_code == 200, answer.text
    return bool(answer.json()["active"])


def revoke(
    http: httpx.Client, broker: BrokerProcess, token: str, *, form: dict[str, str], headers: dict[str, str]
) -> httpx.Response:
    return http.post(door_url(broker, "revoke"), data={"token": token, **form}, headers=headers)


def grpc_reason(broker: BrokerProcess, issued: Issued) -> Reason:
    audience = str(issued.claims["aud"])
    proof = issued.signer.sign("POST", audience, issued.token)
    with BrokerClient(broker.target, api_key=KEY_A, timeout=5) as client:
        validation = client.validate(
            issued.token, audience=audience, dpop_proof=proof, http_method="POST", http_uri=audience
        )
    return validation.reason


# -- metadata ---------------------------------------------------------------------------------------


def test_the_metadata_names_the_issuer_and_every_endpoint_under_it(
    http: httpx.Client, broker: BrokerProcess, client_key: PrivateKey
) -> None:
    answer = http.get(f"{broker.http_url}{METADATA_PATH}")
    assert answer.status_code == 200, answer.text
    metadata = answer.json()
    issuer = issuer_of(broker)
    assert metadata["issuer"] == issuer
    for field in ("authorization_endpoint", "token_endpoint", "jwks_uri", "introspection_endpoint"):
        assert metadata[field].startswith(issuer + "/"), (field, metadata[field])
    assert metadata["revocation_endpoint"].startswith(issuer + "/")
    assert metadata["token_endpoint"] == token_url(broker)
    assert "client_credentials" in metadata["grant_types_supported"]
    assert set(metadata["token_endpoint_auth_methods_supported"]) >= {
        "private_key_jwt",
        "client_secret_basic",
        "client_secret_post",
    }
    assert set(metadata["token_endpoint_auth_signing_alg_values_supported"]) == {"EdDSA", "ES256", "RS256", "PS256"}
    assert metadata["dpop_signing_alg_values_supported"]
    assert "response_types_supported" in metadata  # REQUIRED by RFC 8414 section 2
    assert {"tools:call", "tools:list"} <= set(metadata["scopes_supported"])
    assert "client_id_metadata_document_supported" in metadata
    # the token's iss is the same string
    assert Issued(http, broker, client_key).claims["iss"] == metadata["issuer"]


def test_an_issuer_with_a_path_serves_its_metadata_and_endpoints_under_it(
    http: httpx.Client, deployment: OAuthDeployment, client_key: PrivateKey
) -> None:
    broker = deployment.broker(path="/auth")
    try:
        issuer = issuer_of(broker)
        assert issuer == f"{broker.http_url}/auth"
        # RFC 8414 section 3.1: the well-known segment goes between the host and the path
        answer = http.get(f"{broker.http_url}{METADATA_PATH}/auth")
        assert answer.status_code == 200, answer.text
        metadata = answer.json()
        assert metadata["issuer"] == issuer
        assert metadata["token_endpoint"] == f"{issuer}/token"
        for field in ("jwks_uri", "introspection_endpoint", "revocation_endpoint", "authorization_endpoint"):
            assert metadata[field].startswith(issuer + "/"), (field, metadata[field])
        for audience in (issuer, issuer + "/", f"{issuer}/token"):
            credential = assertion_fields(client_key, "agent", audience)
            proof = ProofSigner().sign("POST", metadata["token_endpoint"])
            answer = http.post(metadata["token_endpoint"], data=token_form(credential), headers={"DPoP": proof})
            assert answer.status_code == 200, (audience, answer.text)
            assert claims_of(answer.json()["access_token"])["iss"] == issuer
        assert http.get(metadata["jwks_uri"]).status_code == 200
        # nothing is served outside the issuer's path
        assert http.post(f"{broker.http_url}/token", data=token_form()).status_code == 404
    finally:
        assert broker.stop() == 0, broker.log.read_text()[-2000:]


# -- /jwks --------------------------------------------------------------------------------------------


def test_jwks_verifies_the_tokens_with_pyjwt(http: httpx.Client, broker: BrokerProcess, client_key: PrivateKey) -> None:
    answer = http.get(endpoint_url(broker, "jwks"))
    assert answer.status_code == 200
    key_set = jwt.PyJWKSet.from_dict(answer.json())
    issued = Issued(http, broker, client_key)
    kid = jwt.get_unverified_header(issued.token)["kid"]
    [key] = [k for k in key_set.keys if k.key_id == kid]
    claims = jwt.decode(issued.token, key, algorithms=["EdDSA"], audience=AUDIENCE_A, issuer=issuer_of(broker))
    assert claims["client_id"] == "agent"
    header, payload, signature = issued.token.split(".")
    tampered = f"{header}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tampered, key, algorithms=["EdDSA"], audience=AUDIENCE_A, issuer=issuer_of(broker))


# -- /authorize and /healthz --------------------------------------------------------------------------


def test_authorize_answers_with_an_error_and_never_redirects(http: httpx.Client, broker: BrokerProcess) -> None:
    query = {
        "response_type": "code",
        "client_id": "agent",
        "redirect_uri": "https://attacker.example/callback",
        "state": "s",
        "code_challenge": "x" * 43,
        "code_challenge_method": "S256",
    }
    answer = http.get(endpoint_url(broker, "authorize"), params=query)
    assert answer.status_code == 400, answer.text
    assert oauth_error(answer)
    assert "location" not in answer.headers
    assert http.get(endpoint_url(broker, "authorize")).status_code == 400


def test_healthz_is_serving(http: httpx.Client, broker: BrokerProcess) -> None:
    answer = http.get(f"{broker.http_url}/healthz")
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "serving"


# -- /introspect --------------------------------------------------------------------------------------


def test_introspection_of_the_callers_own_audience(
    http: httpx.Client, broker: BrokerProcess, client_key: PrivateKey
) -> None:
    issued = Issued(http, broker, client_key)
    answer = introspect(http, broker, issued.token, KEY_A)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body["active"] is True
    assert body["cnf"] == {"jkt": issued.signer.jkt}
    expected = {
        "client_id": "agent",
        "scope": issued.claims["scope"],
        "exp": issued.claims["exp"],
        "sid": issued.claims["sid"],
        "aud": AUDIENCE_A,
        "iss": issuer_of(broker),
    }
    assert {name: body.get(name) for name in expected} == expected
    assert body.get("token_type") == "DPoP"


def test_introspection_of_another_servers_audience_is_inactive(
    http: httpx.Client, broker: BrokerProcess, client_key: PrivateKey
) -> None:
    issued = Issued(http, broker, client_key)
    answer = introspect(http, broker, issued.token, KEY_B)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"active": False}
    # server B sees its own tokens: the answer above is about the audience, not the caller
    own = Issued(http, broker, client_key, client_id="agent-b")
    assert active(http, broker, own.token, KEY_B)
    assert not active(http, broker, own.token, KEY_A)
    assert not active(http, broker, "not-a-token", KEY_A)
    assert not active(http, broker, issued.token[:-3] + "AAA", KEY_A)  # signature broken


def test_a_single_use_token_is_never_active_at_introspection(
    http: httpx.Client, broker: BrokerProcess, client_key: PrivateKey
) -> None:
    # Only ValidateToken can use a `once` token up; introspection records nothing, so a
    # resource server relying on it would accept the token again and again.
    signer = ProofSigner()
    with BrokerClient(broker.target, timeout=5) as anonymous:
        once = anonymous.issue(
            client_id="agent",
            client_assertion=make_client_assertion(client_key, "agent", issuer_of(broker)),
            audience=AUDIENCE_A,
            scopes=["tools:call"],
            dpop_jkt=signer.jkt,
            once=True,
        )
    assert introspect(http, broker, once.access_token, KEY_A).json() == {"active": False}
    # ... and is still usable once, where it is used up.
    proof = signer.sign("POST", AUDIENCE_A, once.access_token)
    with BrokerClient(broker.target, api_key=KEY_A, timeout=5) as server:
        first = server.validate(
            once.access_token, audience=AUDIENCE_A, dpop_proof=proof, http_method="POST", http_uri=AUDIENCE_A
        )
    assert first.valid, first.detail


def test_introspection_needs_a_registered_servers_key(
    http: httpx.Client, broker: BrokerProcess, client_key: PrivateKey
) -> None:
    issued = Issued(http, broker, client_key)
    for api_key in (None, "not-a-registered-key"):
        answer = introspect(http, broker, issued.token, api_key)
        assert answer.status_code == 401, (api_key, answer.text)
        assert answer.headers.get("www-authenticate"), answer.headers
        assert issued.token not in answer.text
    # a client's own credentials are not a server's
    basic = {"Authorization": basic_authorization("other", OTHER_SECRET)}
    answer = http.post(door_url(broker, "introspect"), data={"token": issued.token}, headers=basic)
    assert answer.status_code == 401, answer.text


# -- /revoke ------------------------------------------------------------------------------------------


def test_a_client_revokes_its_own_token(http: httpx.Client, broker: BrokerProcess, client_key: PrivateKey) -> None:
    issued, untouched = Issued(http, broker, client_key), Issued(http, broker, client_key)
    assert active(http, broker, issued.token)
    credential = assertion_fields(client_key, "agent", issuer_of(broker))
    answer = revoke(http, broker, issued.token, form=credential, headers={})
    assert answer.status_code == 200, answer.text
    assert not active(http, broker, issued.token)
    assert grpc_reason(broker, issued) is Reason.TOKEN_REVOKED
    # one token: the client's other token of the same session still works
    assert active(http, broker, untouched.token)
    assert grpc_reason(broker, untouched) is Reason.OK


def test_a_client_cannot_revoke_another_clients_token(
    http: httpx.Client, broker: BrokerProcess, client_key: PrivateKey
) -> None:
    issued = Issued(http, broker, client_key)
    basic = {"Authorization": basic_authorization("other", OTHER_SECRET)}
    answer = revoke(http, broker, issued.token, form={}, headers=basic)
    assert answer.status_code == 200, answer.text  # RFC 7009 2.2: the answer says nothing
    assert active(http, broker, issued.token)
    # nor can a server revoke a token of an audience it does not own
    answer = revoke(http, broker, issued.token, form={}, headers={"Authorization": f"Bearer {KEY_B}"})
    assert answer.status_code == 200, answer.text
    assert active(http, broker, issued.token)
    # and without any credential the caller is told to authenticate
    answer = revoke(http, broker, issued.token, form={}, headers={})
    assert (answer.status_code, oauth_error(answer)) == (401, "invalid_client"), answer.text


def test_a_server_revokes_a_token_of_its_audience(
    http: httpx.Client, broker: BrokerProcess, client_key: PrivateKey
) -> None:
    issued = Issued(http, broker, client_key)
    answer = revoke(http, broker, issued.token, form={}, headers={"Authorization": f"Bearer {KEY_A}"})
    assert answer.status_code == 200, answer.text
    assert answer.headers.get("cache-control") == "no-store"
    assert not active(http, broker, issued.token)
    assert grpc_reason(broker, issued) is Reason.TOKEN_REVOKED


# -- failing closed when Redis goes away --------------------------------------------------------------


def test_healthz_and_token_fail_closed_while_redis_is_down_and_recover(
    http: httpx.Client, tmp_path: Path, redis_server: RedisServer
) -> None:
    d = OAuthDeployment(tmp_path)
    d.add_secret_client("other", OTHER_SECRET, binding="bearer")
    broker = d.broker(redis_url=redis_server.url)
    try:
        health = f"{broker.http_url}/healthz"
        assert http.get(health).status_code == 200
        assert secret_token(http, broker, "other", OTHER_SECRET).status_code == 200
        redis_server.kill()
        down = http.get(health)
        assert down.status_code == 503, down.text
        assert down.json()["status"] != "serving"
        answer = secret_token(http, broker, "other", OTHER_SECRET)
        assert (answer.status_code, oauth_error(answer)) == (503, "temporarily_unavailable"), answer.text
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers.get("retry-after")
        assert "access_token" not in answer.text
        redis_server.start()
        assert wait_for(lambda: http.get(health).status_code == 200), "healthz did not recover with Redis"
        answer = secret_token(http, broker, "other", OTHER_SECRET)
        assert answer.status_code == 200, answer.text
        # a hung Redis (SIGSTOP) is answered within the store's timeouts, closed as well
        redis_server.pause()
        try:
            started = time.monotonic()
            assert http.get(health).status_code == 503
            answer = secret_token(http, broker, "other", OTHER_SECRET)
            assert (answer.status_code, oauth_error(answer)) == (503, "temporarily_unavailable"), answer.text
            assert time.monotonic() - started < 8, "a hung Redis must not hang the HTTP door"
        finally:
            redis_server.resume()
        assert wait_for(lambda: http.get(health).status_code == 200), "healthz did not recover after the pause"
        assert secret_token(http, broker, "other", OTHER_SECRET).status_code == 200
    finally:
        assert broker.stop() == 0, broker.log.read_text()[-2000:]
