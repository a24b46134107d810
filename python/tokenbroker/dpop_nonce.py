"""Server-provided DPoP nonces (RFC 9449 sections 8 and 9), stateless.

A nonce is an HMAC of the current time window under a secret key: any replica that holds
the same key computes the same nonce and accepts it, so nothing is stored and a client
that was challenged by one replica is accepted by the next. A nonce is accepted in its own
window and the one before, so it lives between one and two windows: a proof signed with
it cannot be pre-made for later (the point of a nonce), and a client never sees its fresh
nonce refused because the window turned between the challenge and its retry.

The key is the server's: the broker derives its own from its signing keys (the replicas
share them), an MCP server passes its own secret (or gets a random one, right for a
single process)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

from tokenbroker.jws_text import unverified_claims

# The response header that carries a fresh nonce, and the error code that asks for one.
NONCE_HEADER = "DPoP-Nonce"
USE_DPOP_NONCE = "use_dpop_nonce"
_LABEL = b"tokenbroker dpop-nonce v1\x00"
_MAX_NONCE_CHARS = 256


class DpopNonces:
    """Issues and checks nonces for one server. `window_seconds` is how long a nonce stays
    the current one (it is accepted for up to twice that)."""

    def __init__(self, key: bytes | None = None, *, window_seconds: int = 300, clock: Callable[[], float] = time.time):
        if key is not None and len(key) < 16:
            raise ValueError("a DPoP nonce key needs at least 16 bytes")
        if not 10 <= window_seconds <= 86_400:
            raise ValueError("window_seconds must be 10 to 86400")
        self._key = key if key is not None else secrets.token_bytes(32)
        self._window = window_seconds
        self._clock = clock

    @classmethod
    def derived(cls, secret: bytes, purpose: str, *, window_seconds: int = 300) -> DpopNonces:
        """Nonces under a key derived from `secret` (e.g. the broker's signing key) for one
        `purpose`, so the nonce key is never the signing key itself."""
        key = hmac.new(secret, _LABEL + purpose.encode(), hashlib.sha256).digest()
        return cls(key, window_seconds=window_seconds)

    def _for(self, window: int) -> str:
        digest = hmac.new(self._key, _LABEL + window.to_bytes(8, "big", signed=True), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:18]).decode("ascii")

    def current(self) -> str:
        """The nonce to hand out now (the `DPoP-Nonce` header)."""
        return self._for(int(self._clock()) // self._window)

    def accepts(self, nonce: str | None) -> bool:
        """Whether `nonce` is this server's, of the current or the previous window
        (compared in constant time)."""
        if not nonce or len(nonce) > _MAX_NONCE_CHARS:
            return False
        window = int(self._clock()) // self._window
        given = nonce.encode("ascii", "replace")
        # Both compared always: the time taken does not say which window matched.
        now_ok = hmac.compare_digest(given, self._for(window).encode("ascii"))
        before_ok = hmac.compare_digest(given, self._for(window - 1).encode("ascii"))
        return now_ok or before_ok


def proof_nonce(proof: str) -> str | None:
    """The `nonce` claim of a DPoP proof, read WITHOUT verifying it: only for deciding
    whether to challenge before a verification that checks the proof's signature (a
    forged nonce can only lead to a refusal there). None when absent or unreadable."""
    payload = unverified_claims(proof, max_payload_chars=8192)
    nonce = payload.get("nonce") if payload is not None else None
    return nonce if isinstance(nonce, str) else None


__all__ = ["NONCE_HEADER", "USE_DPOP_NONCE", "DpopNonces", "proof_nonce"]
