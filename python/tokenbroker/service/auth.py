"""Who is calling the broker. An MCP server (a caller of ValidateToken* and, when it is an
admin, of the revocation RPCs) proves itself with an API key in metadata
(`authorization: ApiKey <key>`) or with its mTLS client certificate, whose thumbprint
(base64url SHA-256 of the DER) the registry knows. IssueToken needs no caller credential:
the client authenticates itself (see `tokenbroker.client_auth`); GetJwks is public."""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import ssl
from typing import Any

from tokenbroker.errors import AuthenticationError, PermissionDeniedError
from tokenbroker.registry import Registry, ServerRecord

AUTHORIZATION = "authorization"
API_KEY_SCHEME = "ApiKey"
MAX_API_KEY_BYTES = 512  # minted keys are 43 characters; anything this long is not one


@functools.lru_cache(maxsize=1024)
def cert_thumbprint(pem: bytes) -> str:
    """RFC 8705 `x5t#S256` of a PEM certificate: base64url (no padding) SHA-256 of its DER."""
    der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def peer_cert_thumbprint(context: Any) -> str | None:
    """The thumbprint of the verified mTLS client certificate of this call, if any."""
    certs = context.auth_context().get("x509_pem_cert")
    if not certs:
        return None
    try:
        return cert_thumbprint(bytes(certs[0]))
    except (ValueError, UnicodeDecodeError):
        return None


def peer_ip(context: Any) -> str:
    """The peer's IP address ("ipv4:10.0.0.7:5123" -> "10.0.0.7"), or "" when it has none
    (a Unix socket, an in-process channel)."""
    peer = str(context.peer() or "")
    kind, _, address = peer.partition(":")
    if kind == "ipv4":
        return address.rpartition(":")[0]
    if kind == "ipv6":
        host = address.rpartition(":")[0].strip("[]")
        try:
            return str(ipaddress.ip_address(host.split("%", 1)[0]))
        except ValueError:
            return host
    return ""


def _api_key(context: Any) -> str | None:
    """The API key in `authorization: ApiKey <key>`, None when there is no such header.
    Raises `AuthenticationError` for another scheme."""
    for key, value in context.invocation_metadata() or ():
        if key != AUTHORIZATION:
            continue
        scheme, _, credential = str(value).strip().partition(" ")
        if scheme.lower() != API_KEY_SCHEME.lower() or not credential.strip():
            raise AuthenticationError(f"authorization metadata must be `{API_KEY_SCHEME} <key>`")
        if len(credential) > MAX_API_KEY_BYTES:
            raise AuthenticationError(
                f"the API key is longer than {MAX_API_KEY_BYTES} characters: check the key given to this MCP server"
            )
        return credential.strip()
    return None


class CallerAuthenticator:
    """Resolves the caller of an RPC to its `ServerRecord` and checks what it may do."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def identify(self, context: Any) -> ServerRecord:
        """The registered MCP server making this call. An API key, when one is presented,
        decides alone; otherwise the mTLS client certificate. Raises `AuthenticationError`."""
        api_key = _api_key(context)
        if api_key is not None:
            server = self._registry.server_by_api_key(api_key)
            if server is None:
                raise AuthenticationError("API key is not registered: check the key given to this MCP server")
            return server
        thumbprint = peer_cert_thumbprint(context)
        if thumbprint is not None:
            server = self._registry.server_by_cert(thumbprint)
            if server is None:
                raise AuthenticationError(
                    f"client certificate {thumbprint} is not registered: "
                    f"run `tokenbroker servers add <id> --cert-thumbprint {thumbprint}`"
                )
            return server
        raise AuthenticationError(
            f"no caller credential: send metadata `{AUTHORIZATION}: {API_KEY_SCHEME} <key>` "
            "or connect with a registered mTLS client certificate"
        )

    @staticmethod
    def check_audience(caller: ServerRecord, audience: str) -> None:
        """A server validates tokens only for its own audiences. Raises `PermissionDeniedError`."""
        if audience not in caller.audiences:
            raise PermissionDeniedError(
                f"server {caller.server_id!r} may not validate tokens for audience {audience!r}"
            )

    @staticmethod
    def check_admin(caller: ServerRecord, action: str) -> None:
        """Raises `PermissionDeniedError` unless the caller is an admin."""
        if not caller.admin:
            raise PermissionDeniedError(f"server {caller.server_id!r} is not an admin and may not {action}")


__all__ = [
    "API_KEY_SCHEME",
    "AUTHORIZATION",
    "MAX_API_KEY_BYTES",
    "CallerAuthenticator",
    "cert_thumbprint",
    "peer_cert_thumbprint",
    "peer_ip",
]
