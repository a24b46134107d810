"""DPoP (RFC 9449 section 4.3) through the embedded broker."""

import hashlib
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tokenbroker import ProofSigner, Reason, _core

from support import jose
from support.brokers import AUDIENCE, make_broker

URI = AUDIENCE


@pytest.fixture
def bound():
    broker, clock = make_broker()
    signer = ProofSigner()
    issued = broker.issue(client_id="c", audience=AUDIENCE, dpop_jkt=signer.jkt)
    return broker, clock, signer, issued.access_token


def check(broker, token, proof, method="POST", uri=URI):
    return broker.validate(token, audience=AUDIENCE, dpop_proof=proof, http_method=method, http_uri=uri)


def test_fresh_proof_is_accepted_and_the_same_proof_twice_is_a_replay(bound):
    broker, clock, signer, token = bound
    proof = signer.sign("POST", URI, token, iat=int(clock.now))
    assert check(broker, token, proof).valid
    assert check(broker, token, proof).reason is Reason.REPLAYED
    assert check(broker, token, signer.sign("POST", URI, token, iat=int(clock.now))).valid


def test_token_type_is_dpop_when_bound(bound):
    broker, _, signer, _ = bound
    assert broker.issue(client_id="c", audience=AUDIENCE, dpop_jkt=signer.jkt).token_type == "DPoP"
    assert broker.issue(client_id="d", audience=AUDIENCE).token_type == "Bearer"


def test_stolen_token_without_proof_is_rejected(bound):
    broker, _, _, token = bound
    result = broker.validate(token, audience=AUDIENCE, http_method="POST", http_uri=URI)
    assert result.reason is Reason.PROOF_MISSING


def test_proof_from_another_key_is_a_binding_mismatch(bound):
    broker, clock, _, token = bound
    thief = ProofSigner()
    assert check(broker, token, thief.sign("POST", URI, token, iat=int(clock.now))).reason is Reason.BINDING_MISMATCH


@pytest.mark.parametrize(
    ("method", "uri", "proof_method", "proof_uri"),
    [
        ("POST", URI, "GET", URI),
        ("POST", URI, "post", URI),
        ("POST", URI, "POST", "https://evil.test/mcp"),
        ("POST", URI, "POST", URI + "/other"),
        ("POST", URI, "POST", URI.replace("https", "http")),
    ],
)
def test_proof_for_another_request_is_invalid(bound, method, uri, proof_method, proof_uri):
    broker, clock, signer, token = bound
    proof = signer.sign(proof_method, proof_uri, token, iat=int(clock.now))
    assert check(broker, token, proof, method, uri).reason is Reason.PROOF_INVALID


def test_htu_comparison_ignores_query_fragment_case_and_default_port(bound):
    broker, clock, signer, token = bound
    proof = signer.sign("POST", URI, token, iat=int(clock.now))
    assert check(broker, token, proof, uri="HTTPS://MCP.test:443/mcp?cursor=2#x").valid


def test_proof_for_another_token_is_invalid(bound):
    broker, clock, signer, token = bound
    other = broker.issue(client_id="c", audience=AUDIENCE, dpop_jkt=signer.jkt).access_token
    assert check(broker, token, signer.sign("POST", URI, other, iat=int(clock.now))).reason is Reason.PROOF_INVALID
    assert check(broker, token, signer.sign("POST", URI, None, iat=int(clock.now))).reason is Reason.PROOF_INVALID


@pytest.mark.parametrize("age", [-30, 120])
def test_proof_outside_its_time_window_is_invalid(bound, age):
    broker, clock, signer, token = bound
    assert check(broker, token, signer.sign("POST", URI, token, iat=int(clock.now) - age)).reason is (
        Reason.PROOF_INVALID
    )


def test_missing_request_method_or_uri_is_malformed(bound):
    broker, clock, signer, token = bound
    proof = signer.sign("POST", URI, token, iat=int(clock.now))
    assert broker.validate(token, audience=AUDIENCE, dpop_proof=proof).reason is Reason.MALFORMED


def _proof(key, jwk, token, alg, **overrides):
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": jwk, **overrides.pop("header", {})}
    claims = {"jti": _core.random_id(), "htm": "POST", "htu": URI, "iat": int(time.time()), "ath": jose.ath(token)}
    claims.update(overrides)
    sign = jose.sign_es256 if alg == "ES256" else jose.sign_ed25519
    return sign(key, jose.dumps(header), jose.dumps(claims))


def test_es256_proofs_are_accepted():
    broker, _ = make_broker(clock=None)
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = jose.ec_public_jwk(key)
    token = broker.issue(client_id="c", audience=AUDIENCE, dpop_jkt=jose.thumbprint(jwk)).access_token
    proof = _proof(key, jwk, token, "ES256")
    assert check(broker, token, proof).valid
    assert check(broker, token, proof).reason is Reason.REPLAYED


@pytest.mark.parametrize(
    "variant",
    ["private-d", "oct", "typ-jwt", "alg-none", "alg-mismatch", "extra-header", "no-jti", "jti-number", "iat-float"],
)
def test_bad_proofs_are_invalid(variant):
    broker, _ = make_broker(clock=None)
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = jose.okp_public_jwk(key)
    token = broker.issue(client_id="c", audience=AUDIENCE, dpop_jkt=jose.thumbprint(jwk)).access_token
    kwargs: dict[str, Any] = {}
    alg = "EdDSA"
    if variant == "private-d":
        jwk = {**jwk, "d": jose.b64(b"\x00" * 32)}
    elif variant == "oct":
        jwk = {"kty": "oct", "k": jose.b64(b"secret")}
    elif variant == "typ-jwt":
        kwargs["header"] = {"typ": "JWT"}
    elif variant == "alg-none":
        alg = "none"
    elif variant == "alg-mismatch":
        alg = "ES256"
    elif variant == "extra-header":
        kwargs["header"] = {"kid": "k"}
    elif variant == "no-jti":
        kwargs["jti"] = None
    elif variant == "jti-number":
        kwargs["jti"] = 7
    elif variant == "iat-float":
        kwargs["iat"] = time.time()
    if alg == "ES256":
        # Signed correctly with Ed25519 but labelled ES256.
        header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}
        claims = {"jti": "x", "htm": "POST", "htu": URI, "iat": int(time.time()), "ath": jose.ath(token)}
        proof = jose.sign_ed25519(key, jose.dumps(header), jose.dumps(claims))
    else:
        proof = _proof(key, jwk, token, "EdDSA", **kwargs)
        if alg == "none":
            h, p, _ = proof.split(".")
            raw_header = jose.unb64(h).replace(b'"EdDSA"', b'"none"')
            proof = f"{jose.b64(raw_header)}.{p}."
    assert check(broker, token, proof).reason is Reason.PROOF_INVALID


def test_oversized_proof_is_refused_before_parsing(bound):
    broker, _, _, token = bound
    assert check(broker, token, "a" * 9000).reason is Reason.PROOF_INVALID


def test_replay_cache_memory_is_fixed_by_configuration():
    broker, clock = make_broker(replay_capacity=10_000)
    signer = ProofSigner()
    token = broker.issue(client_id="c", audience=AUDIENCE, dpop_jkt=signer.jkt).access_token
    before = broker.engine.stats().bloom_bytes
    for _ in range(2000):
        assert check(broker, token, signer.sign("POST", URI, token, iat=int(clock.now))).valid
    assert broker.engine.stats().bloom_bytes == before > 0


def test_a_proofs_replay_record_is_the_sha256_key_of_its_signed_jti_in_hex():
    broker, clock = make_broker()
    signer = ProofSigner()
    token = broker.issue(client_id="c", audience=AUDIENCE, dpop_jkt=signer.jkt).access_token
    proof = signer.sign("POST", AUDIENCE, token, iat=int(clock.now), jti="the-jti")
    request = _core.ValidateRequest(token, audience=AUDIENCE, dpop_proof=proof, http_method="POST", http_uri=AUDIENCE)
    ((key, until),) = broker.engine.validate(request, int(clock.now)).replay
    parts = [b"dpop", signer.jkt.encode(), b"the-jti"]
    expected = hashlib.sha256(b"".join(len(p).to_bytes(8, "little") + p for p in parts)).hexdigest()
    assert (key, until > clock.now) == (expected, True)
