"""State stores: `MemoryStore` (embedded) and, for several replicas, `RedisStore`."""

from tokenbroker.store.base import ReplayRecord, Store
from tokenbroker.store.memory import MemoryStore

__all__ = ["MemoryStore", "ReplayRecord", "Store"]
