"""tokenbroker: short-lived, session- and audience-bound, sender-constrained tokens for
MCP servers, with replay detection, session limits and immediate revocation."""

from tokenbroker import errors
from tokenbroker._core import ProofSigner
from tokenbroker.broker import Broker
from tokenbroker.keyring import Keyring
from tokenbroker.models import IssuedToken, LimitPolicy, Session, SessionLimit, Validation
from tokenbroker.reason import Reason
from tokenbroker.store import MemoryStore, RedisStore

__all__ = [
    "Broker",
    "IssuedToken",
    "Keyring",
    "LimitPolicy",
    "MemoryStore",
    "ProofSigner",
    "Reason",
    "RedisStore",
    "Session",
    "SessionLimit",
    "Validation",
    "errors",
]
__version__ = "0.1.0"
