"""The one table between `tokenbroker.errors` and gRPC status codes, read both ways: the
servicer turns a domain error into a status, `BrokerClient` turns a status back into a
domain error, and both stay in step because both read this module.

Status codes are their names ("INVALID_ARGUMENT"), so this module needs no grpc: the
servicer looks the code up with `grpc.StatusCode[name]`.

The way back is not an inverse: several errors share a status (a refused client and a
refused caller are both PERMISSION_DENIED), so a status maps back to the first error of
the table that has it, and to the broker-wide errors for the statuses only the transport
gives (a call that timed out fails closed as an unreachable store)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from tokenbroker.errors import (
    AuthenticationError,
    ClientNotAllowedError,
    InvalidArgumentError,
    PermissionDeniedError,
    RateLimitedError,
    SessionLimitExceededError,
    SessionNotFoundError,
    StoreUnavailableError,
    TokenBrokerError,
)

# Most specific first: the first match decides. For each status, its first error is the
# one a client raises for it.
STATUS_BY_ERROR: tuple[tuple[type[TokenBrokerError], str], ...] = (
    (InvalidArgumentError, "INVALID_ARGUMENT"),
    (AuthenticationError, "UNAUTHENTICATED"),
    (PermissionDeniedError, "PERMISSION_DENIED"),
    (ClientNotAllowedError, "PERMISSION_DENIED"),
    (SessionLimitExceededError, "RESOURCE_EXHAUSTED"),
    (RateLimitedError, "RESOURCE_EXHAUSTED"),
    (SessionNotFoundError, "NOT_FOUND"),
    (StoreUnavailableError, "UNAVAILABLE"),
)

# Statuses no domain error is sent as, which a client still meets.
_TRANSPORT_ERRORS: dict[str, type[TokenBrokerError]] = {"DEADLINE_EXCEEDED": StoreUnavailableError}


def _first_error_by_status() -> dict[str, type[TokenBrokerError]]:
    errors: dict[str, type[TokenBrokerError]] = {}
    for error_type, name in STATUS_BY_ERROR:
        errors.setdefault(name, error_type)
    return errors | _TRANSPORT_ERRORS


ERROR_BY_STATUS: Mapping[str, type[TokenBrokerError]] = MappingProxyType(_first_error_by_status())


def status_name_for(exc: BaseException) -> str:
    """The status a domain error is sent as ("INTERNAL" for one the table does not name)."""
    for error_type, name in STATUS_BY_ERROR:
        if isinstance(exc, error_type):
            return name
    return "INTERNAL"


def error_for_status(name: str) -> type[TokenBrokerError]:
    """The error a caller raises for a status (`TokenBrokerError` for any other status)."""
    return ERROR_BY_STATUS.get(name, TokenBrokerError)


def status_name_of(rpc_error: object) -> str:
    """The status name of a `grpc.RpcError` (read, not imported: grpc stays unloaded)."""
    code_of = getattr(rpc_error, "code", None)
    code = code_of() if callable(code_of) else None
    return str(getattr(code, "name", code))


__all__ = ["ERROR_BY_STATUS", "STATUS_BY_ERROR", "error_for_status", "status_name_for", "status_name_of"]
