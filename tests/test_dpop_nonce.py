"""Stateless DPoP nonces (tokenbroker.dpop_nonce): accepted in their window and the one
before, by every holder of the key, never by anyone else, never forever."""

from __future__ import annotations

import pytest

from tokenbroker import ProofSigner
from tokenbroker.dpop_nonce import DpopNonces, proof_nonce


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


KEY = b"k" * 32


def test_a_nonce_lives_one_to_two_windows() -> None:
    clock = Clock(1_000_000.0)
    nonces = DpopNonces(KEY, window_seconds=60, clock=clock)
    first = nonces.current()
    assert nonces.accepts(first)
    clock.now += 60  # the next window: still accepted (a client retrying across the turn)
    assert nonces.current() != first
    assert nonces.accepts(first)
    clock.now += 60  # two windows on: refused
    assert not nonces.accepts(first)


def test_replicas_with_one_key_agree_and_other_keys_do_not() -> None:
    clock = Clock(5_000.0)
    a = DpopNonces(KEY, window_seconds=60, clock=clock)
    b = DpopNonces(KEY, window_seconds=60, clock=clock)
    other = DpopNonces(b"x" * 32, window_seconds=60, clock=clock)
    assert b.accepts(a.current())
    assert not other.accepts(a.current())
    derived_a = DpopNonces.derived(b"signing key", "token endpoint")
    derived_b = DpopNonces.derived(b"signing key", "token endpoint")
    assert derived_b.accepts(derived_a.current())
    assert not DpopNonces.derived(b"signing key", "another purpose").accepts(derived_a.current())


@pytest.mark.parametrize("nonce", [None, "", "x" * 300, "not-a-nonce", "é"])
def test_made_up_nonces_are_refused(nonce: str | None) -> None:
    assert not DpopNonces(KEY).accepts(nonce)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        DpopNonces(b"short")
    with pytest.raises(ValueError, match="window_seconds"):
        DpopNonces(KEY, window_seconds=1)


def test_proof_nonce_reads_the_claim_of_a_signed_proof() -> None:
    signer = ProofSigner()
    assert proof_nonce(signer.sign("POST", "https://as.example/token", nonce="n-42")) == "n-42"
    assert proof_nonce(signer.sign("POST", "https://as.example/token")) is None
    assert proof_nonce("not.a.proof") is None
    assert proof_nonce("garbage") is None
