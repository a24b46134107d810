"""State stores: `MemoryStore` (embedded) and, for several replicas, `RedisStore`."""

from tokenbroker.store.base import ReplayRecord, Store
from tokenbroker.store.memory import MemoryStore
from tokenbroker.store.redis import RedisStore

__all__ = ["MemoryStore", "RedisStore", "ReplayRecord", "Store"]
