"""`BrokerTokenVerifier`: the MCP SDK's `TokenVerifier`, answered by a tokenbroker.

The SDK hands a verifier nothing but the token string, so on its own it can accept only
Bearer (unbound) tokens, and only with `require_dpop=False`: a DPoP-bound token without its
proof is refused (the broker answers `PROOF_MISSING`). Put `BrokerAuthMiddleware` in front
of the SDK app to accept DPoP: the middleware validates the whole request (token, proof,
method, URI) and records the result for this request, which the verifier then returns
instead of validating again."""

from __future__ import annotations

import contextvars
import hmac
import logging
from collections.abc import Sequence
from typing import Any, Protocol, Unpack

from mcp.server.auth.provider import AccessToken
from pydantic import Field

from tokenbroker.models import Validation
from tokenbroker.requests import ValidateFields

log = logging.getLogger("tokenbroker.mcp")


class Validator(Protocol):
    """What validates tokens: an embedded `tokenbroker.Broker` or a remote
    `tokenbroker.client.BrokerClient` (both have this `avalidate`)."""

    async def avalidate(self, token: str, **fields: Unpack[ValidateFields]) -> Validation: ...


class BrokerAccessToken(AccessToken):
    """The SDK's `AccessToken` filled from a broker `Validation`: `client_id`, `scopes`,
    `expires_at`, `resource` (the audience), `subject`, and `claims` with `iss`, `sub`,
    `client_id`, `aud`, `sid`, `jti`, `exp`, `scope`. `session_id` and `issuer` repeat
    `sid` and `iss` for convenience. `dpop_proven` is True when the token is DPoP-bound and
    came with a proof the broker verified (the caller holds its key). The token itself never
    appears in the repr."""

    token: str = Field(repr=False)
    # Declared again so the model has them whichever SDK release defines AccessToken.
    resource: str | None = None
    subject: str | None = None
    claims: dict[str, Any] | None = None
    session_id: str = ""
    issuer: str = ""
    dpop_proven: bool = False

    @classmethod
    def from_validation(cls, token: str, validation: Validation, *, dpop_proven: bool = False) -> BrokerAccessToken:
        scopes = list(validation.scopes)
        return cls(
            token=token,
            client_id=validation.client_id,
            scopes=scopes,
            expires_at=validation.expires_at or None,
            resource=validation.audience,
            subject=validation.subject or None,
            claims={
                "iss": validation.issuer,
                "sub": validation.subject,
                "client_id": validation.client_id,
                "aud": validation.audience,
                "sid": validation.session_id,
                "jti": validation.jti,
                "exp": validation.expires_at,
                "scope": " ".join(scopes),
            },
            session_id=validation.session_id,
            issuer=validation.issuer,
            dpop_proven=dpop_proven,
        )


# The principal BrokerAuthMiddleware validated for the request being served (same task
# and its children only): the verifier answers from it instead of validating again.
validated_principal: contextvars.ContextVar[BrokerAccessToken | None] = contextvars.ContextVar(
    "tokenbroker_mcp_validated", default=None
)


def _same_token(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("ascii", "replace"), b.encode("ascii", "replace"))


class BrokerTokenVerifier:
    """`mcp.server.auth.provider.TokenVerifier` backed by a broker.

    `broker`: an embedded `Broker` or a `BrokerClient` (anything with `avalidate`).
    `audience`: this server's own resource URI; a token issued for any other is refused.
    `required_scopes`: every one must be granted, or the token is refused.
    `require_dpop` (default True, as `BrokerAuthMiddleware`): only a token the middleware
    validated with its DPoP proof for this very request is accepted; anything else is
    refused without a broker call, since a verifier never sees a proof. Set it False to
    accept Bearer tokens (clients registered with `binding` `bearer`) with the SDK alone.

    `verify_token` returns a `BrokerAccessToken`, or None for a refused token (the SDK
    then answers 401). It raises `tokenbroker.errors.StoreUnavailableError` when the broker
    or its store cannot answer: fail closed, never a token."""

    def __init__(
        self, broker: Validator, *, audience: str, required_scopes: Sequence[str] = (), require_dpop: bool = True
    ) -> None:
        if not audience:
            raise ValueError("audience (this MCP server's resource URI) is required")
        if isinstance(required_scopes, str):
            required_scopes = required_scopes.split()
        self.broker = broker
        self.audience = audience
        self.required_scopes = tuple(required_scopes)
        self.require_dpop = require_dpop

    async def verify_token(self, token: str) -> BrokerAccessToken | None:
        checked = validated_principal.get()
        if checked is not None and checked.resource == self.audience and _same_token(checked.token, token):
            if not set(self.required_scopes).issubset(checked.scopes):
                return None
            if self.require_dpop and not checked.dpop_proven:
                log.info("token refused: this verifier requires DPoP and the request came with a Bearer token")
                return None
            return checked
        if self.require_dpop:
            log.info(
                "token refused: this verifier requires DPoP and cannot see a proof; put BrokerAuthMiddleware "
                "in front of the SDK app, or set require_dpop=False to accept Bearer tokens"
            )
            return None
        validation = await self.broker.avalidate(token, audience=self.audience, required_scopes=self.required_scopes)
        if not validation.valid:
            log.info("token refused: %s (%s)", validation.reason.name, validation.detail)
            return None
        return BrokerAccessToken.from_validation(token, validation)

    def __repr__(self) -> str:
        return (
            f"BrokerTokenVerifier(audience={self.audience!r}, required_scopes={list(self.required_scopes)!r}, "
            f"require_dpop={self.require_dpop!r})"
        )
