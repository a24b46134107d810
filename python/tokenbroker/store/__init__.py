"""State stores: `MemoryStore` (embedded) and, for several replicas, `RedisStore`.

`RedisStore` is loaded on first use (PEP 562): an embedded broker never imports the Redis
client, and `from tokenbroker.store import RedisStore` works as before."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenbroker.store.base import ReplayRecord, SessionOpen, Store, TokenCheck
from tokenbroker.store.memory import MemoryStore

if TYPE_CHECKING:
    from tokenbroker.store.redis import RedisStore

__all__ = ["MemoryStore", "RedisStore", "ReplayRecord", "SessionOpen", "Store", "TokenCheck"]


def __getattr__(name: str) -> Any:
    if name == "RedisStore":
        from tokenbroker.store.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
