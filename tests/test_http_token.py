"""`POST /token` end to end (issue 10): real `tokenbroker serve` processes on loopback,
httpx as the client, the registry and key files they read.

One memory-store broker serves the module: what a test leaves behind (used assertions and
proofs, continued sessions, clients' own failure counts) changes no other test's answer.
The tests that need settings of their own (rate limits, a broker-wide nonce) or Redis
(replay across restarts and state loss, replicas sharing nonces) start their own
processes from a deployment of their own."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from tokenbroker import LimitPolicy, ProofSigner
from tokenbroker.client import BrokerClient
from tokenbroker.client_assertion import PrivateKey, make_client_assertion
from tokenbroker.registry import ClientStatus
from tokenbroker_bench.servers import redis_command

from support.broker_process import BrokerProcess
from support.jose import thumbprint
from support.oauth import (
    AUDIENCE_A,
    AUDIENCE_B,
    JWT_BEARER,
    SCOPES,
    OAuthDeployment,
    assertion_fields,
    basic_authorization,
    claims_of,
    door_url,
    http_client,
    issuer_of,
    key_token,
    new_key,
    oauth_error,
    post_token,
    secret_fields,
    secret_token,
    token_form,
    token_url,
    wait_for,
)
from support.redis_servers import RedisServer

# A client id and secret with every character RFC 6749 section 2.3.1's form-encoding changes.
SPECIAL_ID = "svc:a+b&c=d%/x"
SPECIAL_SECRET = "p@ss:w/rd+ &=%é~"  # a non-ASCII character too
BEARER_SECRET = "bearer-secret-" + "b" * 30
POST_SECRET = "post-secret-" + "p" * 30
LIMITED_SECRET = "limited-secret-" + "l" * 30
ADMIN_KEY = "admin-key-" + "a" * 40
WRONG = "not-the-secret-" + "x" * 30


class Keys:
    """The module's client keys (RSA generation is the slow part: once)."""

    def __init__(self) -> None:
        self.ed = new_key("ed25519")
        self.p256 = new_key("p256")
        self.rsa = new_key("rsa")


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> OAuthDeployment:
    d = OAuthDeployment(tmp_path_factory.mktemp("http-token"))
    d.add_key_client("ed-agent", keys.ed)
    d.add_key_client("es-agent", keys.p256)
    d.add_key_client("rsa-agent", keys.rsa)
    d.add_key_client("two-audiences", keys.ed, allowed_audiences=(AUDIENCE_A, AUDIENCE_B))
    d.add_key_client("nonce-agent", keys.ed, require_dpop_nonce=True)
    d.add_key_client("limited", keys.ed, max_sessions=2, limit_policy=LimitPolicy.REJECT)
    d.add_key_client("key-bearer", keys.ed, binding="bearer")
    d.add_secret_client(SPECIAL_ID, SPECIAL_SECRET, binding="bearer")
    d.add_secret_client("bearer-agent", BEARER_SECRET, binding="bearer")
    d.add_secret_client(
        "post-agent",
        POST_SECRET,
        binding="bearer",
        owner="team-payments",
        approved_by="alice",
        approved_at=1_700_000_000,
        approved_until=4_000_000_000,
        approval_rule="manual",
    )
    d.add_secret_client("limited-bearer", LIMITED_SECRET, binding="bearer", max_sessions=2)
    d.add_secret_client("pending", BEARER_SECRET, binding="bearer", status=ClientStatus.PENDING)
    d.add_secret_client("disabled", BEARER_SECRET, binding="bearer", status=ClientStatus.DISABLED)
    d.add_secret_client("mtls-agent", BEARER_SECRET, binding="mtls")
    d.add_secret_client("elsewhere", BEARER_SECRET, binding="bearer", allowed_cidrs=("10.0.0.0/8",))
    d.add_server("ops", (), ADMIN_KEY, admin=True)
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


def granted(response: httpx.Response) -> dict[str, object]:
    """The token response's body, after checking it is a 200 (with the error if not)."""
    assert response.status_code == 200, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body, dict)
    return body


def token_claims(response: httpx.Response) -> dict[str, object]:
    return claims_of(str(granted(response)["access_token"]))


def refused(response: httpx.Response, status: int, error: str) -> None:
    assert (response.status_code, oauth_error(response)) == (status, error), response.text
    assert response.headers.get("cache-control") == "no-store", "RFC 6749 5.2 errors must not be cached"


# -- private_key_jwt ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_id", "kind", "algorithm"),
    [
        ("ed-agent", "ed", "EdDSA"),
        ("es-agent", "p256", "ES256"),
        ("rsa-agent", "rsa", "RS256"),
        ("rsa-agent", "rsa", "PS256"),
    ],
)
@pytest.mark.parametrize("audience", ["issuer", "issuer/", "token endpoint"])
def test_private_key_jwt_with_each_algorithm_and_assertion_audience(
    http: httpx.Client, broker: BrokerProcess, keys: Keys, client_id: str, kind: str, algorithm: str, audience: str
) -> None:
    key: PrivateKey = getattr(keys, kind)
    aud = {"issuer": issuer_of(broker), "issuer/": issuer_of(broker) + "/", "token endpoint": token_url(broker)}
    credential = assertion_fields(key, client_id, aud[audience], algorithm=algorithm)
    signer = ProofSigner()
    answer = post_token(http, broker, token_form(credential), dpop=signer.sign("POST", token_url(broker)))
    claims = token_claims(answer)
    assert (claims["sub"], claims["client_id"], claims["aud"]) == (client_id, client_id, AUDIENCE_A)


def test_an_assertion_for_another_audience_is_refused(http: httpx.Client, broker: BrokerProcess, keys: Keys) -> None:
    for aud in ("http://127.0.0.1:1", issuer_of(broker) + "/other", AUDIENCE_A):
        credential = assertion_fields(keys.ed, "ed-agent", aud)
        answer = post_token(http, broker, token_form(credential), dpop=ProofSigner().sign("POST", token_url(broker)))
        refused(answer, 401, "invalid_client")


def test_an_assertion_signed_with_another_clients_key_is_refused(
    http: httpx.Client, broker: BrokerProcess, keys: Keys
) -> None:
    credential = assertion_fields(keys.p256, "ed-agent", issuer_of(broker))  # es-agent's key
    answer = post_token(http, broker, token_form(credential), dpop=ProofSigner().sign("POST", token_url(broker)))
    refused(answer, 401, "invalid_client")


def test_a_replayed_client_assertion_is_refused(http: httpx.Client, broker: BrokerProcess, keys: Keys) -> None:
    credential = assertion_fields(keys.ed, "key-bearer", issuer_of(broker))
    granted(post_token(http, broker, token_form(credential)))
    refused(post_token(http, broker, token_form(credential)), 401, "invalid_client")


def test_an_assertion_used_over_grpc_is_refused_at_the_token_endpoint(
    http: httpx.Client, broker: BrokerProcess, keys: Keys
) -> None:
    credential = assertion_fields(keys.ed, "key-bearer", issuer_of(broker))
    with BrokerClient(broker.target, timeout=5) as client:
        issued = client.issue(
            client_id="key-bearer", client_assertion=credential["client_assertion"], audience=AUDIENCE_A
        )
    assert issued.token_type == "Bearer"
    refused(post_token(http, broker, token_form(credential)), 401, "invalid_client")


# -- client secrets ------------------------------------------------------------------------------


def test_client_secret_basic_form_encodes_the_id_and_secret(http: httpx.Client, broker: BrokerProcess) -> None:
    claims = token_claims(secret_token(http, broker, SPECIAL_ID, SPECIAL_SECRET))
    assert claims["client_id"] == SPECIAL_ID
    # Not form-encoded, the ":" in the id splits it early: the server must not guess.
    raw = f"{SPECIAL_ID}:{SPECIAL_SECRET}".encode()
    header = {"Authorization": "Basic " + base64.b64encode(raw).decode()}
    refused(post_token(http, broker, token_form(), headers=header), 401, "invalid_client")


def test_client_secret_post(http: httpx.Client, broker: BrokerProcess) -> None:
    answer = post_token(http, broker, token_form(secret_fields("post-agent", POST_SECRET)))
    assert token_claims(answer)["client_id"] == "post-agent"
    assert granted(answer)["token_type"] == "Bearer"
    # a special-character secret survives the form body too (httpx form-encodes it)
    answer = post_token(http, broker, token_form(secret_fields(SPECIAL_ID, SPECIAL_SECRET)))
    assert token_claims(answer)["client_id"] == SPECIAL_ID


def test_two_authentication_methods_at_once_are_invalid_request(
    http: httpx.Client, broker: BrokerProcess, keys: Keys
) -> None:
    basic = {"Authorization": basic_authorization("bearer-agent", BEARER_SECRET)}
    assertion = assertion_fields(keys.ed, "key-bearer", issuer_of(broker))
    refused(post_token(http, broker, token_form(assertion), headers=basic), 400, "invalid_request")
    both_in_body = {**secret_fields("bearer-agent", BEARER_SECRET), **assertion}
    refused(post_token(http, broker, token_form(both_in_body)), 400, "invalid_request")
    refused(
        post_token(http, broker, token_form(secret_fields("bearer-agent", BEARER_SECRET)), headers=basic),
        400,
        "invalid_request",
    )


def test_two_authorization_headers_are_invalid_request(http: httpx.Client, broker: BrokerProcess) -> None:
    # A proxy and the broker could each read another one: neither is believed.
    good = basic_authorization("bearer-agent", BEARER_SECRET)
    answer = http.post(
        door_url(broker, "token"),
        data=token_form(),
        headers=[("Authorization", good), ("Authorization", "Bearer something")],
    )
    refused(answer, 400, "invalid_request")


def test_no_client_authentication_is_401_with_a_challenge(http: httpx.Client, broker: BrokerProcess) -> None:
    answer = post_token(http, broker, token_form())
    refused(answer, 401, "invalid_client")
    assert answer.headers.get("www-authenticate", "").lower().startswith("basic"), answer.headers


def test_a_wrong_secret_and_an_unknown_client_get_the_same_answer(http: httpx.Client, broker: BrokerProcess) -> None:
    wrong = secret_token(http, broker, "bearer-agent", WRONG)
    unknown = secret_token(http, broker, "no-such-client", WRONG)
    refused(wrong, 401, "invalid_client")
    assert wrong.headers["www-authenticate"].lower().startswith("basic ")
    assert (unknown.status_code, unknown.json(), unknown.headers.get("www-authenticate")) == (
        wrong.status_code,
        wrong.json(),
        wrong.headers.get("www-authenticate"),
    )
    # client_secret_post: the same answer for both as well
    posted_wrong = post_token(http, broker, token_form(secret_fields("post-agent", WRONG)))
    posted_unknown = post_token(http, broker, token_form(secret_fields("no-such-client", WRONG)))
    refused(posted_wrong, 401, "invalid_client")
    assert posted_unknown.json() == posted_wrong.json()


def test_a_wrong_key_and_an_unknown_client_get_the_same_answer(
    http: httpx.Client, broker: BrokerProcess, keys: Keys
) -> None:
    other_key = new_key("ed25519")
    answers = [
        post_token(
            http,
            broker,
            token_form(assertion_fields(other_key, client_id, issuer_of(broker))),
            dpop=ProofSigner().sign("POST", token_url(broker)),
        )
        for client_id in ("ed-agent", "no-such-client", "bearer-agent")  # the last has a secret, no key
    ]
    for answer in answers:
        refused(answer, 401, "invalid_client")
    assert answers[1].json() == answers[0].json() == answers[2].json()
    # and a secret for a client that has only a key
    refused(secret_token(http, broker, "ed-agent", WRONG), 401, "invalid_client")
    assert secret_token(http, broker, "ed-agent", WRONG).json() == answers[0].json()


def test_a_client_learns_its_status_and_policy_only_with_its_credential(
    http: httpx.Client, broker: BrokerProcess
) -> None:
    for client_id in ("pending", "disabled", "mtls-agent", "elsewhere"):
        refused(secret_token(http, broker, client_id, BEARER_SECRET), 400, "unauthorized_client")
        wrong = secret_token(http, broker, client_id, WRONG)
        refused(wrong, 401, "invalid_client")
        assert wrong.json() == secret_token(http, broker, "no-such-client", WRONG).json(), client_id


def test_a_parameter_sent_twice_is_invalid_request(http: httpx.Client, broker: BrokerProcess) -> None:
    basic = {"Authorization": basic_authorization("bearer-agent", BEARER_SECRET)}
    for name, value in (("scope", "tools:call"), ("grant_type", "client_credentials")):
        body = urlencode([*token_form(scope="tools:call").items(), (name, value)])
        answer = http.post(
            door_url(broker, "token"),
            content=body,
            headers={**basic, "Content-Type": "application/x-www-form-urlencoded"},
        )
        refused(answer, 400, "invalid_request")


def test_the_grant_type_is_checked(http: httpx.Client, broker: BrokerProcess) -> None:
    basic = {"Authorization": basic_authorization("bearer-agent", BEARER_SECRET)}
    refused(post_token(http, broker, {}, headers=basic), 400, "invalid_request")
    form = {"grant_type": "authorization_code", "code": "x"}
    refused(post_token(http, broker, form, headers=basic), 400, "unsupported_grant_type")


# -- resource and scope ------------------------------------------------------------------------------


def test_resource_is_the_audience_and_must_be_allowed(http: httpx.Client, broker: BrokerProcess) -> None:
    assert token_claims(secret_token(http, broker, "bearer-agent", BEARER_SECRET, resource=AUDIENCE_A))["aud"] == (
        AUDIENCE_A
    )
    refused(secret_token(http, broker, "bearer-agent", BEARER_SECRET, resource=AUDIENCE_B), 400, "invalid_target")


def test_resource_may_be_left_out_only_with_one_audience(http: httpx.Client, broker: BrokerProcess, keys: Keys) -> None:
    assert token_claims(secret_token(http, broker, "bearer-agent", BEARER_SECRET))["aud"] == AUDIENCE_A
    signer = ProofSigner()
    refused(key_token(http, broker, keys.ed, "two-audiences", signer=signer), 400, "invalid_target")
    answer = key_token(http, broker, keys.ed, "two-audiences", signer=signer, resource=AUDIENCE_B)
    assert token_claims(answer)["aud"] == AUDIENCE_B


def test_two_resources_are_invalid_target(http: httpx.Client, broker: BrokerProcess, keys: Keys) -> None:
    form: dict[str, object] = {
        **token_form(assertion_fields(keys.ed, "two-audiences", issuer_of(broker))),
        "resource": [AUDIENCE_A, AUDIENCE_B],
    }
    proof = ProofSigner().sign("POST", token_url(broker))
    answer = http.post(door_url(broker, "token"), data=form, headers={"DPoP": proof})
    refused(answer, 400, "invalid_target")


def test_scope_must_be_allowed_and_defaults_to_the_allowed_ones(http: httpx.Client, broker: BrokerProcess) -> None:
    everything = granted(secret_token(http, broker, "bearer-agent", BEARER_SECRET))
    assert set(str(everything["scope"]).split()) == set(SCOPES)
    one = secret_token(http, broker, "bearer-agent", BEARER_SECRET, scope="tools:call")
    assert (granted(one)["scope"], token_claims(one)["scope"]) == ("tools:call", "tools:call")
    refused(secret_token(http, broker, "bearer-agent", BEARER_SECRET, scope="admin"), 400, "invalid_scope")
    refused(secret_token(http, broker, "bearer-agent", BEARER_SECRET, scope="tools:call admin"), 400, "invalid_scope")


# -- DPoP ------------------------------------------------------------------------------------------


def test_a_dpop_client_with_a_proof_gets_a_dpop_bound_token(
    http: httpx.Client, broker: BrokerProcess, keys: Keys
) -> None:
    signer = ProofSigner()
    assert signer.jkt == thumbprint(json.loads(signer.public_jwk_json))  # the RFC 7638 thumbprint
    answer = key_token(http, broker, keys.ed, "ed-agent", signer=signer)
    assert granted(answer)["token_type"] == "DPoP"
    assert token_claims(answer)["cnf"] == {"jkt": signer.jkt}


def test_a_dpop_client_without_a_proof_gets_nothing(http: httpx.Client, broker: BrokerProcess, keys: Keys) -> None:
    refused(key_token(http, broker, keys.ed, "ed-agent"), 400, "invalid_request")


def test_a_bearer_client_gets_a_bearer_token_and_no_proof_is_accepted(
    http: httpx.Client, broker: BrokerProcess, keys: Keys
) -> None:
    answer = secret_token(http, broker, "bearer-agent", BEARER_SECRET)
    assert granted(answer)["token_type"] == "Bearer"
    assert "cnf" not in token_claims(answer)
    with_proof = key_token(http, broker, keys.ed, "key-bearer", signer=ProofSigner())
    refused(with_proof, 400, "invalid_request")
    headers = {
        "Authorization": basic_authorization("bearer-agent", BEARER_SECRET),
        "DPoP": ProofSigner().sign("POST", token_url(broker)),
    }
    refused(post_token(http, broker, token_form(), headers=headers), 400, "invalid_request")


def test_proofs_for_another_uri_or_method_or_too_old_are_invalid(
    http: httpx.Client, broker: BrokerProcess, keys: Keys
) -> None:
    signer = ProofSigner()
    now = int(time.time())
    bad = {
        "htu": signer.sign("POST", issuer_of(broker) + "/introspect"),
        "htm": signer.sign("GET", token_url(broker)),
        "stale iat": signer.sign("POST", token_url(broker), iat=now - 600),
        "future iat": signer.sign("POST", token_url(broker), iat=now + 600),
        "not a JWS": "not.a.proof",
    }
    for what, proof in bad.items():
        form = token_form(assertion_fields(keys.ed, "ed-agent", issuer_of(broker)))
        answer = post_token(http, broker, form, dpop=proof)
        assert (answer.status_code, oauth_error(answer)) == (400, "invalid_dpop_proof"), (what, answer.text)
    granted(key_token(http, broker, keys.ed, "ed-agent", signer=signer))  # the same key, a good proof


def test_a_proof_is_accepted_once(http: httpx.Client, broker: BrokerProcess, keys: Keys) -> None:
    proof = ProofSigner().sign("POST", token_url(broker))
    first = post_token(http, broker, token_form(assertion_fields(keys.ed, "ed-agent", issuer_of(broker))), dpop=proof)
    granted(first)
    again = post_token(http, broker, token_form(assertion_fields(keys.ed, "ed-agent", issuer_of(broker))), dpop=proof)
    refused(again, 400, "invalid_dpop_proof")


def test_two_dpop_headers_are_refused(http: httpx.Client, broker: BrokerProcess, keys: Keys) -> None:
    signer = ProofSigner()
    form = token_form(assertion_fields(keys.ed, "ed-agent", issuer_of(broker)))
    headers = [("DPoP", signer.sign("POST", token_url(broker))), ("DPoP", signer.sign("POST", token_url(broker)))]
    answer = http.post(door_url(broker, "token"), data=form, headers=headers)
    refused(answer, 400, "invalid_dpop_proof")


# -- nonces, per client --------------------------------------------------------------------------


def test_a_client_that_requires_a_nonce_is_challenged_and_then_served(
    http: httpx.Client, broker: BrokerProcess, keys: Keys
) -> None:
    signer = ProofSigner()
    challenge = key_token(http, broker, keys.ed, "nonce-agent", signer=signer)
    refused(challenge, 400, "use_dpop_nonce")
    nonce = challenge.headers.get("dpop-nonce")
    assert nonce, challenge.headers
    made_up = key_token(http, broker, keys.ed, "nonce-agent", signer=signer, nonce="made-up-" + nonce[8:])
    refused(made_up, 400, "use_dpop_nonce")
    answer = key_token(http, broker, keys.ed, "nonce-agent", signer=signer, nonce=nonce)
    assert token_claims(answer)["cnf"] == {"jkt": signer.jkt}
    assert answer.headers.get("dpop-nonce"), "RFC 9449 8.2: the 200 carries the next nonce"


def test_a_client_without_the_requirement_needs_no_nonce(http: httpx.Client, broker: BrokerProcess, keys: Keys) -> None:
    answer = key_token(http, broker, keys.ed, "ed-agent", signer=ProofSigner())
    granted(answer)
    assert "dpop-nonce" not in answer.headers


# -- responses ------------------------------------------------------------------------------------


def test_a_token_response_has_the_rfc_6749_fields_and_no_store(
    http: httpx.Client, broker: BrokerProcess, keys: Keys
) -> None:
    answer = key_token(http, broker, keys.ed, "ed-agent", signer=ProofSigner(), scope="tools:list")
    body = granted(answer)
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["content-type"].startswith("application/json")
    assert isinstance(body["access_token"], str)
    assert body["token_type"] == "DPoP"
    assert isinstance(body["expires_in"], int)
    assert 290 <= body["expires_in"] <= 300  # the default lifetime
    assert body["scope"] == "tools:list"
    claims = token_claims(answer)
    assert claims["iss"] == issuer_of(broker)
    assert isinstance(claims["exp"], int)
    assert isinstance(claims["iat"], int)
    assert claims["exp"] - claims["iat"] == 300


def test_error_responses_have_no_store_and_a_json_body(http: httpx.Client, broker: BrokerProcess) -> None:
    for answer in (
        post_token(http, broker, token_form()),
        secret_token(http, broker, "bearer-agent", BEARER_SECRET, scope="admin"),
        http.post(door_url(broker, "token"), content=b"grant_type=client_credentials"),  # no content type
    ):
        assert answer.status_code in (400, 401), answer.text
        assert answer.headers["cache-control"] == "no-store"
        assert isinstance(answer.json().get("error_description"), str)


# -- sessions --------------------------------------------------------------------------------------


def test_one_key_keeps_one_session_and_another_key_opens_another(
    http: httpx.Client, broker: BrokerProcess, keys: Keys
) -> None:
    signer = ProofSigner()
    sessions = set()
    for _ in range(30):
        body = granted(key_token(http, broker, keys.ed, "limited", signer=signer))
        sessions.add(body["session_id"])
    assert len(sessions) == 1, "30 requests with one DPoP key must continue one session (max_sessions=2)"
    other = granted(key_token(http, broker, keys.ed, "limited", signer=ProofSigner()))
    assert other["session_id"] not in sessions
    # both places of max_sessions=2 are taken by live sessions: a third key is refused
    third = key_token(http, broker, keys.ed, "limited", signer=ProofSigner())
    assert third.status_code == 429, third.text
    assert "session" in third.json()["error_description"], third.text
    assert third.headers.get("retry-after")
    # ... and the first key still continues its own
    assert granted(key_token(http, broker, keys.ed, "limited", signer=signer))["session_id"] in sessions


def test_a_bearer_client_from_one_address_keeps_one_session(http: httpx.Client, broker: BrokerProcess) -> None:
    sessions = {granted(secret_token(http, broker, "limited-bearer", LIMITED_SECRET))["session_id"] for _ in range(30)}
    assert len(sessions) == 1, "30 Bearer requests from one address must continue one session (max_sessions=2)"


def test_the_token_endpoints_sessions_end_when_idle(http: httpx.Client, broker: BrokerProcess, keys: Keys) -> None:
    """The idle window itself is tested on every store in test_session_continuation.py; here
    only that the HTTP door opens its sessions with it (`session_idle_seconds`, 1800 by
    default), not with the session lifetime (8 h)."""
    signer = ProofSigner()
    granted(key_token(http, broker, keys.ed, "two-audiences", signer=signer, resource=AUDIENCE_A))
    with BrokerClient(broker.target, api_key=ADMIN_KEY, timeout=5) as admin:
        [session] = [s for s in admin.sessions("two-audiences") if s.audience == AUDIENCE_A]
    assert 1790 <= session.expires_at - session.last_seen_at <= 1800, session


# -- the audit log ---------------------------------------------------------------------------------


def test_grants_and_refusals_are_audited_with_the_door_and_the_rule(
    http: httpx.Client, broker: BrokerProcess, deployment: OAuthDeployment, keys: Keys
) -> None:
    jti = token_claims(secret_token(http, broker, "post-agent", POST_SECRET))["jti"]
    key_jti = token_claims(key_token(http, broker, keys.ed, "ed-agent", signer=ProofSigner()))["jti"]
    refused(secret_token(http, broker, "post-agent", POST_SECRET, scope="admin"), 400, "invalid_scope")

    def lines() -> list[dict[str, object]]:
        return [line for line in deployment.audit_lines() if line.get("client") == "post-agent"]

    assert wait_for(lambda: any(line.get("rule") == "scope.not_allowed" for line in lines()))
    [grant] = [line for line in lines() if line.get("jti") == jti]
    assert (grant["event"], grant["decision"], grant["door"], grant["auth_method"]) == (
        "issue",
        "grant",
        "http",
        "client_secret_basic",
    )
    [key_grant] = [line for line in deployment.audit_lines() if line.get("jti") == key_jti]
    assert (key_grant["client"], key_grant["door"], key_grant["auth_method"], key_grant["binding"]) == (
        "ed-agent",
        "http",
        "private_key_jwt",
        "dpop",
    )
    # Who let the client in, on every grant (issue 11, accountability).
    assert {k: grant.get(k) for k in ("owner", "approved_by", "approved_at", "approval_rule")} == {
        "owner": "team-payments",
        "approved_by": "alice",
        "approved_at": 1_700_000_000,
        "approval_rule": "manual",
    }
    refusal = next(line for line in lines() if line.get("rule") == "scope.not_allowed")
    assert (refusal["decision"], refusal["door"]) == ("refuse", "http")
    text = deployment.audit_file.read_text()
    assert POST_SECRET not in text
    assert SPECIAL_SECRET not in text


# -- a deployment of a test's own (its brokers get settings of their own) ---------------------------


@pytest.fixture
def fresh_deployment(tmp_path: Path, keys: Keys) -> OAuthDeployment:
    """Fresh files for brokers that one test starts, with settings or a store of its own."""
    d = OAuthDeployment(tmp_path)
    d.add_secret_client("victim", BEARER_SECRET, binding="bearer")
    d.add_secret_client("bystander", POST_SECRET, binding="bearer")
    d.add_key_client("key-bearer", keys.ed, binding="bearer")
    d.add_key_client("agent", keys.ed)
    return d


# -- failed authentications are rate-limited -------------------------------------------------------


def test_failed_authentications_are_limited_per_client_id(
    http: httpx.Client, fresh_deployment: OAuthDeployment
) -> None:
    broker = fresh_deployment.broker(
        client_auth_failure_burst="3",
        client_auth_failures_per_minute="0",
        source_auth_failure_burst="1000",
        source_auth_failures_per_minute="0",
    )
    try:
        for _ in range(3):
            refused(secret_token(http, broker, "victim", WRONG), 401, "invalid_client")
        throttled = secret_token(http, broker, "victim", WRONG)
        assert throttled.status_code == 429, throttled.text
        assert throttled.headers.get("retry-after")
        assert throttled.headers["cache-control"] == "no-store"
        # the right credential still passes: failing on a client's behalf cannot lock it out
        granted(secret_token(http, broker, "victim", BEARER_SECRET))
        # the limit is the client id's: another client's failures are still plain 401s
        refused(secret_token(http, broker, "bystander", WRONG), 401, "invalid_client")
    finally:
        assert broker.stop() == 0


def test_failed_authentications_are_limited_per_source(
    http: httpx.Client, fresh_deployment: OAuthDeployment, keys: Keys
) -> None:
    broker = fresh_deployment.broker(
        client_auth_failure_burst="1000",
        client_auth_failures_per_minute="0",
        source_auth_failure_burst="4",
        source_auth_failures_per_minute="0",
    )
    try:
        for i in range(4):
            refused(secret_token(http, broker, f"unknown-{i}", WRONG), 401, "invalid_client")
        # over the source's limit, everything from it is refused before verification
        for answer in (
            secret_token(http, broker, "bystander", POST_SECRET),
            key_token(http, broker, keys.ed, "key-bearer"),
        ):
            assert answer.status_code == 429, answer.text
            assert answer.headers.get("retry-after")
    finally:
        assert broker.stop() == 0


# -- replay across restarts and state loss (Redis) -------------------------------------------------


def assertion_refusal_rule(deployment: OAuthDeployment, since: int) -> str:
    """The rule of the newest audit refusal of client "key-bearer" after line `since`."""
    found = [line for line in deployment.audit_lines()[since:] if line.get("client") == "key-bearer"]
    refusals = [line for line in found if line.get("decision") == "refuse"]
    return str(refusals[-1]["rule"]) if refusals else ""


def test_an_assertion_is_never_accepted_twice_across_restarts_and_state_loss(
    http: httpx.Client, fresh_deployment: OAuthDeployment, keys: Keys, redis_server: RedisServer
) -> None:
    d = fresh_deployment
    broker = d.broker(redis_url=redis_server.url)
    try:
        issuer = issuer_of(broker)
        used = make_client_assertion(keys.ed, "key-bearer", issuer)
        kept = make_client_assertion(keys.ed, "key-bearer", issuer)  # signed now, used after the restart
        signed_at = int(time.time())

        def send(assertion: str) -> httpx.Response:
            form = token_form({"client_assertion_type": JWT_BEARER, "client_assertion": assertion})
            return post_token(http, broker, form)

        def send_proof(proof: str) -> httpx.Response:
            return post_token(http, broker, token_form(assertion_fields(keys.ed, "agent", issuer)), dpop=proof)

        signer = ProofSigner()
        used_proof = signer.sign("POST", token_url(broker))
        granted(send(used))
        granted(send_proof(used_proof))
        # the broker process restarts on the same ports (the same issuer); Redis keeps its state
        assert broker.stop() == 0
        broker.start()
        since = len(d.audit_lines())
        refused(send(used), 401, "invalid_client")
        assert assertion_refusal_rule(d, since) == "credential.assertion_replayed"
        granted(send(kept))  # a broker restart is no state loss: an unused assertion still works
        refused(send_proof(used_proof), 400, "invalid_dpop_proof")  # nor a used proof

        # state loss: FLUSHALL. Everything signed before it is refused, used or not. The
        # epoch has one-second resolution (the README's stated bound): what was signed in
        # the second of the loss could pass once more, so the loss comes a second later.
        while int(time.time()) <= signed_at:
            time.sleep(0.05)
        before_flush = make_client_assertion(keys.ed, "key-bearer", issuer, now=int(time.time()) - 2)
        proof_before_flush = signer.sign("POST", token_url(broker), iat=int(time.time()) - 2)
        redis_server_command(redis_server, "FLUSHALL")
        since = len(d.audit_lines())
        refused(send(before_flush), 401, "invalid_client")
        assert assertion_refusal_rule(d, since) == "credential.assertion_stale"
        refused(send(used), 401, "invalid_client")
        refused(send(kept), 401, "invalid_client")

        # state loss: Redis restarted empty on the same port.
        time.sleep(1.1)  # past the epoch's second: the next assertion is newer than the loss
        refused(send_proof(proof_before_flush), 400, "invalid_dpop_proof")  # never used, but older than the loss
        refused(send_proof(used_proof), 400, "invalid_dpop_proof")
        signed_before_restart = make_client_assertion(keys.ed, "key-bearer", issuer)
        granted(send(make_client_assertion(keys.ed, "key-bearer", issuer)))
        time.sleep(1.1)
        redis_server.restart()
        assert wait_for(lambda: http.get(f"{broker.http_url}/healthz").status_code == 200)
        since = len(d.audit_lines())
        refused(send(signed_before_restart), 401, "invalid_client")
        assert assertion_refusal_rule(d, since) == "credential.assertion_stale"
        time.sleep(1.1)
        granted(send(make_client_assertion(keys.ed, "key-bearer", issuer)))  # and it recovers
    finally:
        assert broker.stop() == 0, broker.log.read_text()[-2000:]


def redis_server_command(server: RedisServer, *args: str) -> bytes:
    return redis_command(server.port, *args, timeout=2.0)


# -- nonces, broker-wide, on two replicas ----------------------------------------------------------


def test_replicas_require_nonces_and_accept_each_others(
    http: httpx.Client, fresh_deployment: OAuthDeployment, keys: Keys, redis_server: RedisServer
) -> None:
    d = fresh_deployment
    settings = {"redis_url": redis_server.url, "require_dpop_nonce": "true"}
    first = d.broker(**settings)
    started = [first]
    try:
        second = d.broker(public_url=issuer_of(first), **settings)  # a replica behind the same name
        started.append(second)
        signer = ProofSigner()
        form = token_form(assertion_fields(keys.ed, "agent", issuer_of(first)))
        challenge = post_token(http, first, form, dpop=signer.sign("POST", token_url(first)))
        refused(challenge, 400, "use_dpop_nonce")
        nonce = challenge.headers["dpop-nonce"]
        # the broker-wide nonce is asked for before the assertion is spent: the same one retries
        answer = post_token(http, first, form, dpop=signer.sign("POST", token_url(first), nonce=nonce))
        assert token_claims(answer)["cnf"] == {"jkt": signer.jkt}
        assert answer.headers.get("dpop-nonce")
        # the other replica accepts the first one's nonce (and the first one's next nonce)
        for given in (nonce, answer.headers["dpop-nonce"]):
            form = token_form(assertion_fields(keys.ed, "agent", issuer_of(first)))
            granted(post_token(http, second, form, dpop=signer.sign("POST", token_url(first), nonce=given)))
        # one proof, one assertion: accepted by one replica, a replay at the other
        nonce = answer.headers["dpop-nonce"]
        proof = signer.sign("POST", token_url(first), nonce=nonce)
        granted(post_token(http, first, token_form(assertion_fields(keys.ed, "agent", issuer_of(first))), dpop=proof))
        again = post_token(http, second, token_form(assertion_fields(keys.ed, "agent", issuer_of(first))), dpop=proof)
        refused(again, 400, "invalid_dpop_proof")
        spent = token_form(assertion_fields(keys.ed, "agent", issuer_of(first)))
        granted(post_token(http, second, spent, dpop=signer.sign("POST", token_url(first), nonce=nonce)))
        replayed = post_token(http, first, spent, dpop=signer.sign("POST", token_url(first), nonce=nonce))
        refused(replayed, 401, "invalid_client")
        # a made-up nonce, or none, is a challenge on every replica
        for process in (first, second):
            for guess in ("made-up-nonce", None):
                form = token_form(assertion_fields(keys.ed, "agent", issuer_of(first)))
                proof = signer.sign("POST", token_url(first), nonce=guess)
                refused(post_token(http, process, form, dpop=proof), 400, "use_dpop_nonce")
        # a Bearer client sends no proof: it is asked for no nonce
        granted(secret_token(http, second, "victim", BEARER_SECRET))
    finally:
        for replica in started:
            assert replica.stop() == 0, replica.log.read_text()[-2000:]
