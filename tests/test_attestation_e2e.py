"""Workload attestation at the token endpoint, against a real `tokenbroker serve`: the
jwt-bearer grant with a JWT-SVID of a configured trust domain (issue 11, "Attestation")."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tokenbroker.client_assertion import public_jwk

from support.broker_process import BrokerProcess
from support.oauth import (
    AUDIENCE_A,
    OAuthDeployment,
    assertion_fields,
    claims_of,
    door_url,
    http_client,
    issuer_of,
    new_key,
    token_url,
)

DOMAIN = "attest.test"
WORKLOAD = f"spiffe://{DOMAIN}/ns/agents/sa/reporter"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
REPORTER_2_KEY = new_key("ed25519")


class Domain:
    """A trust domain of the test: its signing key and its SPIFFE bundle file."""

    def __init__(self, directory: Path, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        jwk = {**public_jwk(self.key), "kid": f"{name}-1", "use": "jwt-svid"}
        self.bundle = directory / f"{name}.bundle.json"
        self.bundle.write_text(json.dumps({"keys": [jwk], "spiffe_refresh_hint": 300}))
        self.kid = f"{name}-1"

    def svid(self, subject: str, audience: str, *, lifetime: int = 60) -> str:
        now = int(time.time())
        claims = {"sub": subject, "aud": audience, "iat": now, "exp": now + lifetime, "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.kid})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OAuthDeployment, BrokerProcess, Domain, Domain]]:
    workdir = tmp_path_factory.mktemp("attest")
    domain, stranger = Domain(workdir, "attest"), Domain(workdir, "other")
    deployment = OAuthDeployment(workdir)
    deployment.add_key_client(
        "reporter", new_key("ed25519"), spiffe_id=WORKLOAD, require_attestation=True, binding="bearer"
    )
    deployment.add_key_client(
        "reporter-2", REPORTER_2_KEY, spiffe_id=WORKLOAD + "-2", require_attestation=True, binding="bearer"
    )
    broker = deployment.broker(attesters=json.dumps({DOMAIN: str(domain.bundle)}))
    try:
        yield deployment, broker, domain, stranger
    finally:
        broker.stop()


def grant(http: httpx.Client, broker: BrokerProcess, assertion: str, **extra: str) -> httpx.Response:
    form = {"grant_type": JWT_BEARER, "assertion": assertion, "resource": AUDIENCE_A, **extra}
    return http.post(door_url(broker, "token"), data=form)


def test_an_attested_workload_gets_a_token_naming_its_client(setup) -> None:
    deployment, broker, domain, _ = setup
    with http_client() as http:
        metadata = http.get(f"{broker.http_url}/.well-known/oauth-authorization-server").json()
        assert JWT_BEARER in metadata["grant_types_supported"]
        answer = grant(http, broker, domain.svid(WORKLOAD, issuer_of(broker)))
    assert answer.status_code == 200, answer.text
    claims = claims_of(answer.json()["access_token"])
    assert (claims["client_id"], claims["aud"]) == ("reporter", AUDIENCE_A)
    assert claims["attested_sub"] == WORKLOAD  # the token names the attested subject
    lines = [line for line in deployment.audit_lines() if line.get("jti") == claims["jti"]]
    assert [(line["auth_method"], line["attestation_subject"]) for line in lines] == [("attestation", WORKLOAD)]


def test_a_client_that_must_attest_cannot_use_its_key(setup) -> None:
    _, broker, _, _ = setup
    key = REPORTER_2_KEY  # registered, and its signature good: still refused
    with http_client() as http:
        form = {"grant_type": "client_credentials", **assertion_fields(key, "reporter-2", issuer_of(broker))}
        answer = http.post(door_url(broker, "token"), data=form)
    assert answer.status_code == 400, answer.text
    assert "requires attestation" in answer.json()["error_description"]


def test_attestations_that_prove_nothing_are_invalid_grant(setup) -> None:
    _, broker, domain, stranger = setup
    issuer = issuer_of(broker)
    cases = {
        "another domain's key": stranger.svid(WORKLOAD, issuer),
        "another audience": domain.svid(WORKLOAD, token_url(broker) + "/elsewhere"),
        "too long-lived": domain.svid(WORKLOAD, issuer, lifetime=3600),
        "a subject nobody registered": domain.svid(f"spiffe://{DOMAIN}/ns/agents/sa/nobody", issuer),
    }
    with http_client() as http:
        for why, assertion in cases.items():
            answer = grant(http, broker, assertion)
            assert (answer.status_code, answer.json()["error"]) == (400, "invalid_grant"), (why, answer.text)
            assert assertion not in answer.text


def test_an_attestation_is_used_once(setup) -> None:
    _, broker, domain, _ = setup
    assertion = domain.svid(WORKLOAD, issuer_of(broker))
    with http_client() as http:
        assert grant(http, broker, assertion).status_code == 200
        again = grant(http, broker, assertion)
    assert (again.status_code, again.json()["error"]) == (400, "invalid_grant"), again.text
    assert "already used" in again.json()["error_description"]


def test_an_attestation_may_also_be_the_client_assertion(setup) -> None:
    _, broker, domain, _ = setup
    form = {
        "grant_type": "client_credentials",
        "client_id": "reporter",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": domain.svid(WORKLOAD, issuer_of(broker)),
        "resource": AUDIENCE_A,
    }
    with http_client() as http:
        answer = http.post(door_url(broker, "token"), data=form)
    assert answer.status_code == 200, answer.text
    claims = claims_of(answer.json()["access_token"])
    assert (claims["client_id"], claims["attested_sub"]) == ("reporter", WORKLOAD)
