"""Reading a JWS compact serialization's claims WITHOUT verifying it: only to decide what
to verify it against (which client's key, which audience) or whether to challenge first;
every door that does so verifies the same bytes afterwards."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson


def unverified_claims(compact: str, *, max_payload_chars: int = 16 * 1024) -> dict[str, Any] | None:
    """The payload of `compact` as a JSON object, or None when it is not three
    dot-separated parts, its payload is longer than `max_payload_chars`, or not base64url JSON."""
    parts = compact.split(".")
    if len(parts) != 3 or len(parts[1]) > max_payload_chars:
        return None
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


__all__ = ["unverified_claims"]
