"""Exceptions raised by tokenbroker. A refused token is not an exception: `Broker.validate`
returns a `Validation` with a `Reason`. These are for callers and configuration."""

from __future__ import annotations


class TokenBrokerError(Exception):
    """Base of every tokenbroker exception."""


class InvalidArgumentError(TokenBrokerError, ValueError):
    """A request or setting is unusable as given (gRPC INVALID_ARGUMENT)."""


class InvalidKeyError(TokenBrokerError, ValueError):
    """A key could not be loaded: wrong type, wrong encoding or a weak key."""


class UnknownKeyIdError(TokenBrokerError, KeyError):
    """No key with that `kid` is in the keyring."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SessionLimitExceededError(TokenBrokerError):
    """The client already has its maximum of concurrent sessions (gRPC RESOURCE_EXHAUSTED)."""


class RateLimitedError(TokenBrokerError):
    """A caller or client is over a rate limit or quota (gRPC RESOURCE_EXHAUSTED)."""


class SessionNotFoundError(TokenBrokerError):
    """The session to continue is unknown, expired, revoked or not the client's."""


class StoreUnavailableError(TokenBrokerError):
    """The state store cannot be reached: fail closed (gRPC UNAVAILABLE)."""


class ClientNotAllowedError(TokenBrokerError):
    """The client may not get this token (unknown, not approved, or outside its policy)."""


class AuthenticationError(TokenBrokerError):
    """The caller's or client's credential is missing or wrong (gRPC UNAUTHENTICATED)."""


class PermissionDeniedError(TokenBrokerError):
    """The caller may not do this (gRPC PERMISSION_DENIED)."""


__all__ = [
    "AuthenticationError",
    "ClientNotAllowedError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "PermissionDeniedError",
    "RateLimitedError",
    "SessionLimitExceededError",
    "SessionNotFoundError",
    "StoreUnavailableError",
    "TokenBrokerError",
    "UnknownKeyIdError",
]
