"""The client's side of `private_key_jwt` (RFC 7523): its key, its public JWK and the
assertions it signs to authenticate itself to the broker.

Kept apart from the broker's authenticator (`tokenbroker.client_auth`) so that client
code (`tokenbroker.mcp.BrokerAuth`, agents, `tokenbroker issue --key`) loads only what
signing needs, never the server's verification and policy code. Ed25519 (EdDSA) and
P-256 (ES256) keys only: the two the broker verifies."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tokenbroker.registry_file import check_public_jwk

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def load_private_key(key: PrivateKey | bytes | str) -> PrivateKey:
    """A client's private key from a key object or PKCS#8/SEC1 PEM; Ed25519 or P-256 only."""
    if isinstance(key, str):
        key = key.encode("ascii")
    if isinstance(key, bytes):
        try:
            loaded = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
        key = loaded  # type: ignore[assignment]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ValueError("client keys must be Ed25519 or EC P-256")


def public_jwk(key: Any) -> dict[str, str]:
    """The public JWK of an Ed25519 or P-256 key: a private or public key object, or PEM."""
    if isinstance(key, str):
        key = key.encode("ascii")
    if isinstance(key, bytes):
        if b"PRIVATE KEY" in key:
            key = load_private_key(key)
        else:
            try:
                key = serialization.load_pem_public_key(key)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"not a PEM public or private key: {exc}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        key = key.public_key()
    if isinstance(key, ed25519.Ed25519PublicKey):
        jwk: Mapping[str, Any] = jwt.algorithms.OKPAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
    else:
        raise ValueError("client keys must be Ed25519 or EC P-256")
    return check_public_jwk(jwk)


def make_client_assertion(
    private_key: PrivateKey | bytes | str,
    client_id: str,
    audience: str,
    *,
    kid: str | None = None,
    lifetime: int = 60,
    now: int | None = None,
) -> str:
    """An RFC 7523 client assertion: `iss` = `sub` = `client_id`, `aud` = the broker's
    issuer (one string), a fresh `jti`, valid for `lifetime` seconds. EdDSA for Ed25519, ES256 for P-256."""
    key = load_private_key(private_key)
    algorithm = "EdDSA" if isinstance(key, ed25519.Ed25519PrivateKey) else "ES256"
    issued = int(time.time()) if now is None else now
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": issued,
        "exp": issued + lifetime,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid} if kid else None)


__all__ = ["PrivateKey", "load_private_key", "make_client_assertion", "public_jwk"]
