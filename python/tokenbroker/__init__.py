"""tokenbroker: short-lived, session- and audience-bound, sender-constrained tokens for
MCP servers, with replay detection, session limits and immediate revocation.

`RedisStore` is loaded on first use (PEP 562), so that embedded users never import the
Redis client: `from tokenbroker import RedisStore` and `tokenbroker.RedisStore` still work."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenbroker import errors
from tokenbroker._core import IssueRequest, ProofSigner, ValidateRequest
from tokenbroker.broker import Broker
from tokenbroker.keyring import Keyring
from tokenbroker.models import IssuedToken, LimitPolicy, Session, SessionLimit, Validation
from tokenbroker.reason import Reason
from tokenbroker.store import MemoryStore

if TYPE_CHECKING:
    from tokenbroker.store.redis import RedisStore

__all__ = [
    "Broker",
    "IssueRequest",
    "IssuedToken",
    "Keyring",
    "LimitPolicy",
    "MemoryStore",
    "ProofSigner",
    "Reason",
    "RedisStore",
    "Session",
    "SessionLimit",
    "ValidateRequest",
    "Validation",
    "errors",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "RedisStore":
        from tokenbroker.store.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
