"""How the Redis store fails: closed. Any Redis error, timeout or connection failure
becomes a `StoreUnavailableError` naming the operation (never a token), never an OK answer."""

from __future__ import annotations

from redis.exceptions import OutOfMemoryError, RedisClusterException, RedisError

from tokenbroker.errors import StoreUnavailableError, TokenBrokerError


class UnsafeRedisError(RedisError):
    """The Redis server may lose security state (eviction on): the store refuses it.
    Raised while connecting, so no command runs on such a connection."""


class ReplyError(Exception):
    """A call in a batch failed, or answered what the store cannot read; the driver turns
    it into `StoreUnavailableError`."""


# What a Redis call can raise when Redis is down, slow or answers nonsense.
STORE_ERRORS: tuple[type[Exception], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    UnicodeError,
    ValueError,
    IndexError,
)
# What reading one validation's replies can raise: Redis down, or a reply we cannot read.
REPLY_ERRORS: tuple[type[Exception], ...] = (*STORE_ERRORS, KeyError, ReplyError)


def _cause(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """`exc` or the first exception of that kind in its chain (pipelines wrap errors)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, kind):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def unavailable(operation: str, exc: BaseException | None = None) -> StoreUnavailableError:
    """The error a caller gets when `operation` failed because of `exc`: it names the
    unsafe setting or the full memory when that is the cause, so an operator can fix it."""
    unsafe = _cause(exc, UnsafeRedisError)
    if unsafe is not None:  # its message names the setting and the fix, never a token
        return StoreUnavailableError(f"Redis store refused during {operation}: {unsafe}")
    if _cause(exc, OutOfMemoryError) is not None:
        return StoreUnavailableError(
            f"Redis store unavailable during {operation}: Redis is out of memory (maxmemory reached under "
            "noeviction), so nothing is recorded and nothing is accepted: raise maxmemory or add memory"
        )
    why = f" ({type(exc).__name__})" if exc is not None else ""
    return StoreUnavailableError(f"Redis store unavailable during {operation}{why}: check that Redis is reachable")


class FailClosed:
    """`with FailClosed(operation):` turns what Redis raises in the block into the
    `StoreUnavailableError` of `operation`; the broker's own errors pass as they are."""

    def __init__(self, operation: str) -> None:
        self.operation = operation

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        if exc is None or isinstance(exc, TokenBrokerError):
            return
        if isinstance(exc, ReplyError):
            raise unavailable(self.operation, exc.__cause__ or exc) from exc
        if isinstance(exc, STORE_ERRORS):
            raise unavailable(self.operation, exc) from exc
