"""Embedded validation (Broker with MemoryStore) against the baselines measured in the same
run: `cryptography`'s Ed25519 verify and PyJWT's decode, what a user would otherwise write.
`report.py` turns the figures into the ratios the issue sets as targets.

Every benchmark checks its answer (`valid`, claims, cache counters) so a broken path cannot
look fast; under --benchmark-disable each body runs once as a plain test."""

from __future__ import annotations

import base64
from typing import Any

import jwt
import pytest
from cryptography.exceptions import InvalidSignature

from tokenbroker import Reason, _core

# -- baselines ------------------------------------------------------------------------------


@pytest.mark.benchmark(group="baseline")
def test_cryptography_verify(benchmark: Any, token: str, public_key: Any) -> None:
    """The signature check alone (OpenSSL via `cryptography`), on the token's own bytes."""
    signing_input, _, signature_b64 = token.encode().rpartition(b".")
    signature = base64.urlsafe_b64decode(signature_b64 + b"==")
    assert benchmark(public_key.verify, signature, signing_input) is None  # raises when invalid
    with pytest.raises(InvalidSignature):
        public_key.verify(signature, signing_input + b"x")


@pytest.mark.benchmark(group="baseline")
@pytest.mark.parametrize("kind", ["bearer", "dpop_bound"])
def test_pyjwt_decode(
    benchmark: Any, request: pytest.FixtureRequest, kind: str, public_key: Any, audience: str, issuer: str
) -> None:
    """PyJWT's full decode (signature, exp/nbf/iat, aud, iss) with a key object loaded once.
    PyJWT has no cache, so one token decoded again and again costs what fresh ones do."""
    token = request.getfixturevalue("token" if kind == "bearer" else "dpop_token")
    claims = benchmark(jwt.decode, token, public_key, algorithms=["EdDSA"], audience=audience, issuer=issuer)
    assert claims["aud"] == audience
    assert claims["iss"] == issuer
    assert ("cnf" in claims) is (kind == "dpop_bound")


# -- the embedded broker ----------------------------------------------------------------------


@pytest.mark.benchmark(group="embedded")
def test_cold_validate(benchmark: Any, fresh: Any, cold_agent: Any, audience: str) -> None:
    """Tokens the broker has never seen, each validated once: parse, Ed25519 verify_strict,
    claims, the MemoryStore check, and the Python API call around them."""
    tokens = fresh(cold_agent.issue, rounds=100, iterations=100)
    assert len(set(tokens.items)) == len(tokens)
    broker = cold_agent.broker
    before = cold_agent.cached_tokens()

    def validate(token: str) -> Any:
        result = broker.validate(token, audience=audience)
        assert result.valid, result.detail
        return result

    assert tokens.bench(benchmark, validate).client_id == cold_agent.client_id
    assert cold_agent.cached_tokens() == before + len(tokens), "a cold validate hit the token cache"


@pytest.mark.benchmark(group="embedded")
def test_warm_validate(benchmark: Any, agent: Any, token: str, audience: str) -> None:
    """The same token again and again: the verified-token cache answers, the signature is
    not checked again; claims and the MemoryStore check still run every call."""
    broker = agent.broker
    assert broker.validate(token, audience=audience).valid  # now cached
    before = agent.cached_tokens()
    result = benchmark(broker.validate, token, audience=audience)
    assert result.valid, result.detail
    assert agent.cached_tokens() == before


@pytest.mark.benchmark(group="embedded")
def test_dpop_validate(
    benchmark: Any, fresh: Any, dpop_agent: Any, dpop_token: str, sign_proof: Any, audience: str
) -> None:
    """A cached DPoP-bound token with a new proof each call: the proof's signature, htm,
    htu, iat, ath and thumbprint checks, and its jti through the replay filter."""
    broker = dpop_agent.broker
    request = {"audience": audience, "http_method": "POST", "http_uri": audience}
    assert broker.validate(dpop_token, dpop_proof=sign_proof(dpop_token), **request).valid  # token cached
    proofs = fresh(lambda: sign_proof(dpop_token), rounds=50, iterations=100)
    before = dpop_agent.cached_tokens()

    def validate(proof: str) -> Any:
        result = broker.validate(dpop_token, dpop_proof=proof, **request)
        assert result.valid, result.detail
        return result

    assert proofs.bench(benchmark, validate).scopes == ("tools:call",)
    assert dpop_agent.cached_tokens() == before
    assert broker.validate(dpop_token, dpop_proof=proofs.items[-1], **request).reason is Reason.REPLAYED


@pytest.mark.benchmark(group="embedded")
@pytest.mark.parametrize("size", [64, 256])
def test_batch_validate(benchmark: Any, fresh: Any, cold_agent: Any, audience: str, size: int) -> None:
    """`validate_batch` of `size` cold tokens: one engine call (batch Ed25519 verification,
    GIL released) and one store call. report.py divides by `tokens_per_call`."""
    batches = fresh(
        lambda: [{"token": cold_agent.issue(), "audience": audience} for _ in range(size)],
        rounds=100 if size == 64 else 30,
    )
    broker = cold_agent.broker
    before = cold_agent.cached_tokens()
    answers: list[list[Any]] = []

    def validate(batch: list[dict[str, str]]) -> list[Any]:
        results: list[Any] = broker.validate_batch(batch)
        answers.append(results)  # checked below, outside the timed call
        return results

    benchmark.extra_info["tokens_per_call"] = size
    batches.bench(benchmark, validate)
    assert len(answers) == len(batches)
    assert all(len(results) == size and all(r.valid for r in results) for results in answers)
    assert cold_agent.cached_tokens() == before + size * len(batches), "a cold batch hit the token cache"


# -- where the time goes: the Rust engine without the Python Broker and store ------------------


@pytest.fixture
def engine(keyring: Any, issuer: str) -> Any:
    """A bare `_core.Engine` with the broker's key: no Broker, no store, empty cache."""
    keys = _core.KeySet()
    keys.add_pem(keyring.to_pem().decode("ascii"))
    return _core.Engine(keys, issuer)


@pytest.mark.benchmark(group="engine")
def test_engine_cold_validate(benchmark: Any, fresh: Any, engine: Any, cold_agent: Any, audience: str) -> None:
    """The engine call alone on fresh tokens: PyO3 conversion plus the Rust path."""
    tokens = fresh(cold_agent.issue, rounds=100, iterations=100)

    def validate(token: str) -> Any:
        verdict = engine.validate(_core.ValidateRequest(token, audience=audience))
        assert verdict.ok, verdict.detail
        return verdict

    assert tokens.bench(benchmark, validate).claims.audience == audience
    assert engine.stats().cached_tokens == len(tokens)


@pytest.mark.benchmark(group="engine")
def test_engine_warm_validate(benchmark: Any, engine: Any, token: str, audience: str) -> None:
    """The engine call alone on a cached token: the floor under `test_warm_validate`."""
    request = _core.ValidateRequest(token, audience=audience)
    assert engine.validate(request).ok
    verdict = benchmark(lambda: engine.validate(_core.ValidateRequest(token, audience=audience)))
    assert verdict.ok, verdict.detail
    assert engine.stats().cached_tokens == 1


@pytest.mark.benchmark(group="engine")
def test_engine_batch_validate(benchmark: Any, fresh: Any, engine: Any, cold_agent: Any, audience: str) -> None:
    """The engine's batch call alone on 64 fresh tokens: the floor under `test_batch_validate[64]`."""
    batches = fresh(
        lambda: [_core.ValidateRequest(cold_agent.issue(), audience=audience) for _ in range(64)], rounds=100
    )
    answers: list[list[Any]] = []

    def validate(batch: list[Any]) -> list[Any]:
        verdicts: list[Any] = engine.validate_batch(batch)
        answers.append(verdicts)  # checked below, outside the timed call
        return verdicts

    benchmark.extra_info["tokens_per_call"] = 64
    batches.bench(benchmark, validate)
    assert all(len(verdicts) == 64 and all(v.ok for v in verdicts) for verdicts in answers)
    assert engine.stats().cached_tokens == 64 * len(batches)
