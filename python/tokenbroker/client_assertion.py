"""The client's side of `private_key_jwt` (RFC 7523): its key, its public JWK and the
assertions it signs to authenticate itself to the broker.

Kept apart from the broker's authenticator (`tokenbroker.client_auth`) so that client
code (`tokenbroker.mcp.BrokerAuth`, agents, `tokenbroker issue --key`) loads only what
signing needs, never the server's verification and policy code. Ed25519 (EdDSA), P-256
(ES256) and RSA keys of 2048 to 8192 bits (RS256, the MCP SDK's default, or PS256): the
ones the broker verifies."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tokenbroker.registry_file import MAX_RSA_BITS, MIN_RSA_BITS, check_public_jwk

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_KEY_TYPES = f"client keys must be Ed25519, EC P-256 or RSA of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"


def _check_rsa_size(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> None:
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise ValueError(f"this RSA key has {key.key_size} bits: {_KEY_TYPES} (2048 or 3072 is usual)")


def load_private_key(key: PrivateKey | bytes | str) -> PrivateKey:
    """A client's private key from a key object or PKCS#8/SEC1/PKCS#1 PEM; Ed25519, P-256
    or RSA (2048 to 8192 bits) only."""
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
    if isinstance(key, rsa.RSAPrivateKey):
        _check_rsa_size(key)
        return key
    raise ValueError(_KEY_TYPES)


def public_jwk(key: Any) -> dict[str, str]:
    """The public JWK of an Ed25519, P-256 or RSA key: a private or public key object, or
    PEM, checked as the registry checks it (`check_public_jwk`). Raises `ValueError` (an
    `InvalidArgumentError` when the registry refuses the key's numbers) for other keys."""
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
    if isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        key = key.public_key()
    if isinstance(key, ed25519.Ed25519PublicKey):
        jwk: Mapping[str, Any] = jwt.algorithms.OKPAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, rsa.RSAPublicKey):
        _check_rsa_size(key)
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    else:
        raise ValueError(_KEY_TYPES)
    return check_public_jwk(jwk)


def assertion_algorithm(key: PrivateKey, algorithm: str | None = None) -> str:
    """The JWS algorithm `key` signs client assertions with: `algorithm` when the key can
    (RS256 or PS256 for RSA), else the key's one (EdDSA for Ed25519, ES256 for P-256, RS256
    for RSA, the MCP SDK's default). Raises `ValueError` for a mismatch."""
    choices: tuple[str, ...]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        kind, choices = "an Ed25519", ("EdDSA",)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        kind, choices = "a P-256", ("ES256",)
    else:
        kind, choices = "an RSA", ("RS256", "PS256")
    if algorithm is None:
        return choices[0]
    if algorithm not in choices:
        raise ValueError(
            f"{kind} key cannot sign with algorithm {str(algorithm)[:20]!r}: use {' or '.join(choices)} "
            "(or leave the algorithm unset)"
        )
    return algorithm


def make_client_assertion(
    private_key: PrivateKey | bytes | str,
    client_id: str,
    audience: str,
    *,
    kid: str | None = None,
    lifetime: int = 60,
    now: int | None = None,
    algorithm: str | None = None,
) -> str:
    """An RFC 7523 client assertion: `iss` = `sub` = `client_id`, `aud` = the broker's
    issuer (one string), a fresh `jti`, valid for `lifetime` seconds. Signed with
    `algorithm`, by default EdDSA for Ed25519, ES256 for P-256 and RS256 for RSA (PS256
    is the other choice for RSA); see `assertion_algorithm`."""
    key = load_private_key(private_key)
    algorithm = assertion_algorithm(key, algorithm)
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


__all__ = ["PrivateKey", "assertion_algorithm", "load_private_key", "make_client_assertion", "public_jwk"]
