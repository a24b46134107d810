"""Why a Client ID Metadata Document could not be fetched or was not accepted.

Each error carries a `reason` code (stable, for metrics, audit lines and tests) and a
message that says what was refused and how to fix it. Messages may reach the client that
sent the `client_id` (an `error_description`), so they name the rule, the host and the
HTTP status, never a resolved address (which would map the broker's network for whoever
probes it), never the URL's user information, and never key material."""

from __future__ import annotations

from typing import Literal

from tokenbroker.errors import InvalidArgumentError, TokenBrokerError

FetchFailure = Literal[
    "bad_url",  # not a usable CIMD URL: user information, fragment, no path, dot segments, odd host or port
    "not_https",  # another scheme than https
    "blocked_address",  # the host is or resolves to an address the broker must not connect to
    "resolve_failed",  # the host name did not resolve
    "connect_failed",  # no TCP connection to any checked address
    "tls",  # the TLS handshake or the certificate check failed
    "timeout",  # the whole fetch took longer than its timeout
    "redirect",  # a 3xx answer: redirects are never followed
    "bad_status",  # an answer other than 200
    "too_large",  # the body is larger than the cap
    "not_json",  # not application/json, not UTF-8 JSON, not an object, or duplicate members
    "bad_response",  # not valid HTTP/1.1, or a Content-Encoding
    "rate_limited",  # too many fetches for this host or address, or too many at once
]

DocumentFailure = Literal[
    "client_id_mismatch",  # the document's client_id is not the URL it was fetched from
    "auth_method",  # token_endpoint_auth_method is not private_key_jwt
    "client_secret",  # the document holds a client secret
    "no_keys",  # neither jwks nor jwks_uri, or no signing key in them
    "both_jwks",  # jwks and jwks_uri together (RFC 7591 2)
    "bad_jwks",  # jwks is not {"keys": [...]}, or too many keys
    "bad_key",  # a key is private, unsupported, or malformed
    "bad_metadata",  # another member has the wrong type (client_name, jwks_uri)
    "jwks_uri_not_fetched",  # check_document was given a jwks_uri document without its key set
]


class CimdFetchError(TokenBrokerError):
    """A document (or a key set at a `jwks_uri`) was not fetched: see `reason`."""

    def __init__(self, reason: FetchFailure, message: str, *, host: str | None = None) -> None:
        super().__init__(message)
        self.reason: FetchFailure = reason
        self.host = host

    def __str__(self) -> str:
        return str(self.args[0])


class CimdDocumentError(InvalidArgumentError):
    """A fetched document is not an acceptable client description: see `reason`."""

    def __init__(self, reason: DocumentFailure, message: str) -> None:
        super().__init__(message)
        self.reason: DocumentFailure = reason

    def __str__(self) -> str:
        return str(self.args[0])
