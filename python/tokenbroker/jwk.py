"""RFC 7638 JWK thumbprints, for every key kind tokenbroker reads (client keys, CIMD
documents, attesters' bundles), computed in one place so a pin made from one source
always matches the same key read from another."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

# RFC 7638 section 3.2: the required members of each key type.
REQUIRED_MEMBERS = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """The base64url SHA-256 thumbprint of a public JWK: its required members in
    lexicographic order, no whitespace. Raises KeyError for another key type or a missing
    member (callers check their keys first)."""
    members = {name: jwk[name] for name in REQUIRED_MEMBERS[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode("ascii")


__all__ = ["REQUIRED_MEMBERS", "thumbprint"]
