"""`POST /introspect` (RFC 7662) and `POST /revoke` (RFC 7009).

Introspection is for registered MCP servers (`Authorization: Bearer <API key>`). A token
is reported active only for an audience the caller owns: to any other caller it is
`{"active": false}`, so one server cannot learn about another's tokens. The answer
carries `cnf`, so the caller checks the DPoP proof (or certificate) that came with the
token itself: introspection checks everything but the binding, and records nothing (so a
single-use token, which only ValidateToken can use up, is never active here).

Revocation takes the client's own authentication, as the token endpoint does (the token
must have been issued to that client), or a registered server's API key (for tokens of
its own audiences). Per RFC 7009 section 2.2 an unknown, invalid or foreign token gets 200
all the same: the answer says nothing about it."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenbroker.app import Components
from tokenbroker.errors import StoreUnavailableError, TokenBrokerError
from tokenbroker.http.errors import NO_STORE, OAuthError, error_response, invalid_request
from tokenbroker.http.forms import read_form
from tokenbroker.http.token_endpoint import client_credential, refusal_for
from tokenbroker.jws_text import unverified_claims
from tokenbroker.registry import ServerRecord

MAX_TOKEN_CHARS = 16 * 1024
INACTIVE = {"active": False}


def _unverified_audience(token: str) -> str | None:
    """The `aud` a token claims, unverified: only to pick which audience to verify it for."""
    claims = unverified_claims(token)
    audience = claims.get("aud") if claims is not None else None
    return audience if isinstance(audience, str) and audience else None


def _server(components: Components, request: Request) -> ServerRecord | None:
    """The registered server whose API key is the request's Bearer credential, if any."""
    headers = request.headers.getlist("authorization")
    if len(headers) > 1:
        raise invalid_request("send one Authorization header")
    header = headers[0] if headers else ""
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return components.registry.server_by_api_key(key.strip())


def _server_challenge(description: str) -> OAuthError:
    return OAuthError(
        "invalid_client",
        description,
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="tokenbroker", error="invalid_token"'},
    )


def _token_field(form: Any) -> str:
    token = form.get("token")
    if token is None:
        raise invalid_request("token is required")
    if len(token) > MAX_TOKEN_CHARS:
        raise invalid_request(f"token is longer than {MAX_TOKEN_CHARS} characters")
    return str(token)


class Introspection:
    def __init__(self, components: Components):
        self._c = components

    async def introspect(self, request: Request) -> Response:
        try:
            caller = _server(self._c, request)
            if caller is None:
                raise _server_challenge(
                    "introspection is for registered MCP servers: send Authorization: Bearer <API key>"
                )
            form = await read_form(request)
            token = _token_field(form)
            audience = _unverified_audience(token)
            if audience is None or audience not in caller.audiences:
                return JSONResponse(INACTIVE, headers=NO_STORE)
            validation, claims = await self._c.broker.aintrospect(token, audience=audience)
        except OAuthError as exc:
            return error_response(exc)
        except StoreUnavailableError as exc:
            return error_response(refusal_for(exc))
        # A single-use token is used up by its one validation (ValidateToken); introspection
        # records nothing, so a resource server relying on it could accept one any number of
        # times: it is never active here.
        if claims is None or not validation.valid or claims.once:
            return JSONResponse(INACTIVE, headers=NO_STORE)
        body: dict[str, Any] = {
            "active": True,
            "client_id": claims.client_id,
            "sub": claims.subject,
            "aud": claims.audience,
            "iss": claims.issuer,
            "jti": claims.jti,
            "sid": claims.session_id,
            "scope": " ".join(claims.scopes),
            "iat": claims.issued_at,
            "exp": claims.expires_at,
            "token_type": "Bearer",
        }
        confirmation = claims.confirmation
        if confirmation is not None:
            kind, thumbprint = confirmation
            body["cnf"] = {kind: thumbprint}
            if kind == "jkt":
                body["token_type"] = "DPoP"  # noqa: S105 (a token type, not a secret)
        return JSONResponse(body, headers=NO_STORE)

    async def revoke(self, request: Request) -> Response:
        try:
            form = await read_form(request)
            token = _token_field(form)
            caller = _server(self._c, request)
            client_id: str | None = None
            if caller is None and request.headers.get("authorization", "").lower().startswith("bearer "):
                raise _server_challenge("the Bearer credential is not a registered server's API key")
            if caller is None:
                credential = client_credential(request, form)
                client_ip = request.client.host if request.client is not None else ""
                record = await self._c.authenticator.aauthenticate_client(
                    client_id=credential.client_id,
                    client_assertion=credential.assertion,
                    client_secret=credential.secret,
                    client_ip=client_ip,
                )
                client_id = record.client_id
            audience = _unverified_audience(token)
            if audience is not None and (caller is None or audience in caller.audiences):
                _, claims = await self._c.broker.aintrospect(token, audience=audience)
                if claims is not None and (client_id is None or claims.client_id == client_id):
                    await self._c.broker.arevoke_token(claims.jti)
                    self._c.audit.record(
                        event="revoke_token",
                        client_id=claims.client_id,
                        audience=audience,
                        decision="grant",
                        rule="caller.server" if caller is not None else "client.own_token",
                        source_ip=request.client.host if request.client is not None else "",
                        door="http",
                        jti=claims.jti,
                        caller=caller.server_id if caller is not None else claims.client_id,
                    )
        except OAuthError as exc:
            return error_response(exc)
        except TokenBrokerError as exc:
            return error_response(refusal_for(exc))
        return Response(status_code=200, headers=NO_STORE)


__all__ = ["Introspection"]
