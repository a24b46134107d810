"""The client's side of server-provided DPoP nonces (RFC 9449 sections 8 and 9): the last
nonce each origin handed out, to put in the next proof for it, and how to recognise a
server asking for one.

A nonce is per server (RFC 9449 section 8.2: "specific to the server"), so it is kept per
origin; the memory is bounded (least recently used origins are forgotten), and a value
that is not an RFC 9449 nonce is ignored rather than put into a signed proof."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Mapping

from tokenbroker.dpop_nonce import NONCE_HEADER, USE_DPOP_NONCE

# RFC 9449 section 8.1: nonce = 1*NQCHAR; bounded like the servers bound it.
_NONCE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,256}")
_ASKS_FOR_NONCE = re.compile(r"""error\s*=\s*"?""" + USE_DPOP_NONCE + r"""\b""", re.IGNORECASE)


def offered_nonce(headers: Mapping[str, str]) -> str | None:
    """The `DPoP-Nonce` a response carries, when it is a well-formed nonce."""
    value = headers.get(NONCE_HEADER)
    value = value.strip() if isinstance(value, str) else None
    return value if value and _NONCE.fullmatch(value) else None


def challenge_asks_for_nonce(www_authenticate: str | None) -> bool:
    """Whether a resource server's `WWW-Authenticate` says `error="use_dpop_nonce"`."""
    return bool(www_authenticate) and _ASKS_FOR_NONCE.search(www_authenticate or "") is not None


class NonceMemory:
    """The last nonce per origin (`scheme://host:port`), for at most `capacity` origins."""

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._nonces: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, origin: str) -> str | None:
        with self._lock:
            nonce = self._nonces.get(origin)
            if nonce is not None:
                self._nonces.move_to_end(origin)
            return nonce

    def remember(self, origin: str, nonce: str) -> None:
        with self._lock:
            self._nonces[origin] = nonce
            self._nonces.move_to_end(origin)
            while len(self._nonces) > self._capacity:
                self._nonces.popitem(last=False)

    def __len__(self) -> int:
        return len(self._nonces)


__all__ = ["NonceMemory", "challenge_asks_for_nonce", "offered_nonce"]
