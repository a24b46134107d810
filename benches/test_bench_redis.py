"""With shared state in a real redis-server: the pure-Python pipeline a user would write
(PyJWT decode, then `SET jti NX EXAT` with redis-py and hiredis) against the Broker with
`RedisStore` validating a warm token and a DPoP request. Both sides pay one round trip."""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

import jwt
import pytest

from tokenbroker import Reason

DPOP_MAX_AGE = 60


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 SHA-256 thumbprint of an OKP public JWK."""
    return _b64(hashlib.sha256(f'{{"crv":"{jwk["crv"]}","kty":"OKP","x":"{jwk["x"]}"}}'.encode()).digest())


def pyjwt_dpop(token: str, proof: str, public_key: Any, audience: str, issuer: str) -> dict[str, Any]:
    """PyJWT's take on a DPoP request (RFC 9449 section 4.3, the checks a careful user
    writes): the token, then the proof against the key in its header; returns the proof's
    claims or raises."""
    claims = jwt.decode(token, public_key, algorithms=["EdDSA"], audience=audience, issuer=issuer)
    header = jwt.get_unverified_header(proof)
    if header.get("typ") != "dpop+jwt" or jwk_thumbprint(header["jwk"]) != claims["cnf"]["jkt"]:
        raise ValueError("proof is not a DPoP proof of the token's key")
    proof_claims: dict[str, Any] = jwt.decode(proof, jwt.PyJWK(header["jwk"]).key, algorithms=["EdDSA"])
    if (proof_claims["htm"], proof_claims["htu"]) != ("POST", audience):
        raise ValueError("proof is for another request")
    if proof_claims["ath"] != _b64(hashlib.sha256(token.encode()).digest()):
        raise ValueError("proof is for another token")
    if abs(time.time() - proof_claims["iat"]) > DPOP_MAX_AGE:
        raise ValueError("proof is too old")
    return proof_claims


@pytest.mark.benchmark(group="redis")
def test_pure_python_pipeline(
    benchmark: Any, fresh: Any, agent: Any, public_key: Any, redis_client: Any, audience: str, issuer: str
) -> None:
    """PyJWT decode, then the token's jti recorded with `SET NX EXAT exp` (replay check);
    fresh tokens, since a second SET NX of one jti would (rightly) fail."""
    tokens = fresh(agent.issue, rounds=30, iterations=100)

    def pipeline(token: str) -> dict[str, Any]:
        claims: dict[str, Any] = jwt.decode(token, public_key, algorithms=["EdDSA"], audience=audience, issuer=issuer)
        assert redis_client.set(f"bench:jti:{claims['jti']}", 1, nx=True, exat=claims["exp"])
        return claims

    claims = tokens.bench(benchmark, pipeline)
    assert redis_client.exists(f"bench:jti:{claims['jti']}") == 1


@pytest.mark.benchmark(group="redis")
def test_pure_python_dpop_pipeline(
    benchmark: Any,
    fresh: Any,
    dpop_token: str,
    sign_proof: Any,
    public_key: Any,
    redis_client: Any,
    audience: str,
    issuer: str,
) -> None:
    """The DPoP request in pure Python: token and proof decoded by PyJWT, the proof's jti
    recorded with `SET NX EX`."""
    proofs = fresh(lambda: sign_proof(dpop_token), rounds=30, iterations=50)

    def pipeline(proof: str) -> dict[str, Any]:
        proof_claims = pyjwt_dpop(dpop_token, proof, public_key, audience, issuer)
        assert redis_client.set(f"bench:proof:{proof_claims['jti']}", 1, nx=True, ex=DPOP_MAX_AGE)
        return proof_claims

    assert proofs.bench(benchmark, pipeline)["htu"] == audience
    with pytest.raises(ValueError, match="another token"):
        pyjwt_dpop(dpop_token, sign_proof("another-token"), public_key, audience, issuer)


@pytest.mark.benchmark(group="redis")
def test_redis_warm_validate(benchmark: Any, redis_agent: Any, audience: str) -> None:
    """Broker + RedisStore, cached token: the engine from cache, then one Redis round trip
    (session, revocations, activity)."""
    broker = redis_agent.broker
    token = redis_agent.issue()
    assert broker.validate(token, audience=audience).valid  # now cached
    result = benchmark(broker.validate, token, audience=audience)
    assert result.valid, result.detail


@pytest.mark.benchmark(group="redis")
def test_redis_dpop_validate(benchmark: Any, fresh: Any, redis_dpop_agent: Any, sign_proof: Any, audience: str) -> None:
    """Broker + RedisStore, cached DPoP-bound token, a new proof per call: the proof checks
    in Rust, then one Redis round trip that also records the proof's jti."""
    broker = redis_dpop_agent.broker
    token = redis_dpop_agent.issue()
    request = {"audience": audience, "http_method": "POST", "http_uri": audience}
    assert broker.validate(token, dpop_proof=sign_proof(token), **request).valid  # token cached
    proofs = fresh(lambda: sign_proof(token), rounds=30, iterations=50)

    def validate(proof: str) -> Any:
        result = broker.validate(token, dpop_proof=proof, **request)
        assert result.valid, result.detail
        return result

    assert proofs.bench(benchmark, validate).client_id == redis_dpop_agent.client_id
    assert broker.validate(token, dpop_proof=proofs.items[-1], **request).reason is Reason.REPLAYED
