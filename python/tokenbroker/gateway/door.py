"""One validation behind both gateway doors (`/authz` and Envoy's `Check`).

A door turns what its gateway sent into an `OriginalRequest` (the client's request as the
upstream will route it: method, scheme, host, path, `Authorization`, `DPoP`, the client's
address as `trusted_proxies` allows, the resource when the gateway supplies it);
`GatewayDoor.prepare` checks it against the gateway's server record and builds the broker's
`ValidateRequest`; the door runs the validation (sync or async, as its server does); and
`GatewayDoor.answer` turns the `Validation` into the identity headers for the upstream, or
raises the `Refusal` the client gets (401 with the DPoP and Bearer challenges and
`resource_metadata`, 403 `insufficient_scope` with `scope`). The same rules as
`BrokerAuthMiddleware` (`tokenbroker.resource_guard`), so a server behind a gateway
answers as one with the middleware would.

The audience is `scheme://host` plus the path as the upstream routes it (query dropped),
and must be one of the gateway's own audiences: a gateway validates only for the servers
it fronts. It is also the DPoP `htu`. Required scopes: the gateway's server record
(`servers add --required-scope`) and the scopes its configuration names for the route
(`X-Tokenbroker-Required-Scopes`), added together (a client sending that header itself can
only ask for more)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import structlog

from tokenbroker._core import ValidateRequest
from tokenbroker.errors import InvalidArgumentError, StoreUnavailableError, TokenBrokerError
from tokenbroker.models import Validation
from tokenbroker.registry import ServerRecord
from tokenbroker.requests import validate_request
from tokenbroker.resource_guard import HOST, Challenges, Refusal, checked_target, description, presented, refusal_of
from tokenbroker.resource_metadata import resource_metadata_url

log = structlog.get_logger("tokenbroker.gateway")

CLIENT_ID_HEADER = "X-Tokenbroker-Client-Id"
SESSION_ID_HEADER = "X-Tokenbroker-Session-Id"
SCOPES_HEADER = "X-Tokenbroker-Scopes"
IDENTITY_HEADERS = (CLIENT_ID_HEADER, SESSION_ID_HEADER, SCOPES_HEADER)
# What the upstream must not see: the client's credentials (the identity headers replace them).
CREDENTIAL_HEADERS = ("Authorization", "DPoP")

MAX_REQUIRED_SCOPES = 32
MAX_RESOURCE_CHARS = 1024
_METHOD = re.compile(r"[A-Z]{1,16}")
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")  # RFC 6749 section 3.3 scope-token
_CHALLENGES_CACHED = 1024


@dataclass(frozen=True, slots=True)
class OriginalRequest:
    """The client's request, as its gateway describes it."""

    method: str
    scheme: str
    host: str
    target: str  # the path as the upstream routes it, percent-encoded; a query is dropped
    authorization: tuple[str, ...] = ()
    proofs: tuple[str, ...] = ()
    client_ip: str | None = None
    cert_thumbprint: str | None = None
    resource: str | None = None
    route_scopes: str = ""  # the gateway configuration's X-Tokenbroker-Required-Scopes


@dataclass(frozen=True, slots=True)
class Prepared:
    """A checked original request: what to validate, and what the answer needs."""

    audience: str
    scheme: str  # "dpop" or "bearer": how the client presented its token
    with_proof: bool
    required_scopes: tuple[str, ...]
    request: ValidateRequest | Validation  # a Validation: refused before any broker call


@dataclass(frozen=True, slots=True)
class Allowed:
    """A granted request: the identity headers for the upstream."""

    client_id: str
    session_id: str
    scopes: tuple[str, ...]

    def headers(self) -> list[tuple[str, str]]:
        return [
            (CLIENT_ID_HEADER, self.client_id),
            (SESSION_ID_HEADER, self.session_id),
            (SCOPES_HEADER, " ".join(self.scopes)),
        ]


def _bad(text: str) -> Refusal:
    return Refusal(400, "invalid_request", text)


def _misconfigured(text: str) -> Refusal:
    """The gateway's own configuration is wrong: 400 (nginx answers its client 500 for
    any answer but 2xx, 401 and 403: the client's token is not the problem)."""
    return Refusal(400, "invalid_request", text)


def refusal_for_error(exc: TokenBrokerError) -> Refusal:
    """What a door answers when the broker raised instead of answering: 503 for a store it
    cannot reach (fail closed), 400 for a field the broker refuses, 500 for the rest."""
    if isinstance(exc, StoreUnavailableError):
        log.error("the store is unavailable: request refused (fail closed)", error=str(exc))
        return Refusal(503, "temporarily_unavailable", "token validation is unavailable")
    if isinstance(exc, InvalidArgumentError):
        return Refusal(400, "invalid_request", description(str(exc)))
    log.error("validation failed", error=str(exc), error_type=type(exc).__name__)
    return Refusal(500, "server_error", "token validation is misconfigured")


def route_scopes(text: str) -> tuple[str, ...]:
    """The scopes of an `X-Tokenbroker-Required-Scopes` value (space separated)."""
    scopes = tuple(dict.fromkeys(text.split()))
    if len(scopes) > MAX_REQUIRED_SCOPES:
        raise _misconfigured(f"X-Tokenbroker-Required-Scopes names more than {MAX_REQUIRED_SCOPES} scopes")
    if not all(_SCOPE.fullmatch(scope) for scope in scopes):
        raise _misconfigured("X-Tokenbroker-Required-Scopes holds something that is not a scope")
    return scopes


class GatewayDoor:
    """The validation both doors share; stateless but for a bounded cache of challenges."""

    def challenges(self, audience: str | None) -> Challenges:
        """The challenges for `audience` (its RFC 9728 metadata URL in `resource_metadata`)."""
        return _challenges(audience)

    def audience_of(self, original: OriginalRequest) -> str:
        """`scheme://host/path` of the original request; raises `Refusal` (400) for a method,
        scheme, host or path that cannot be one the upstream routes as the proof covers."""
        if not _METHOD.fullmatch(original.method):
            raise _bad("the original request's method is not an HTTP method")
        scheme = original.scheme.lower()
        if scheme not in ("http", "https"):
            raise _bad("the original request's scheme is not http or https (X-Forwarded-Proto)")
        if not HOST.fullmatch(original.host):
            raise _bad("the original request's host is not a host[:port] (X-Forwarded-Host)")
        if "#" in original.target:  # never sent by a client: refused, not cut (an upstream may route it)
            raise _bad("the original request's target holds a fragment (#)")
        raw = original.target.partition("?")[0]
        if not raw.startswith("/"):
            raise _bad("the original request's path is not absolute (X-Forwarded-Uri, X-Original-URI)")
        checked_target(raw)
        return f"{scheme}://{original.host.lower()}{raw}"

    def prepare(self, gateway: ServerRecord, original: OriginalRequest, audience: str) -> Prepared:
        """The validation for `original` (whose `audience_of` is `audience`), sent by
        `gateway`; raises `Refusal`."""
        if audience not in gateway.audiences:
            # No token changes this: the route is not one the gateway protects here.
            # The body names neither the route nor the gateway (Caddy, Traefik and Envoy pass it on).
            raise Refusal(403, "access_denied", "this route is not one the gateway protects", challenge=False)
        required = tuple(dict.fromkeys((*gateway.required_scopes, *route_scopes(original.route_scopes))))
        scheme, token, proof = presented(original.authorization, original.proofs, require_dpop=False)
        resource = original.resource
        if resource is not None and (
            len(resource) > MAX_RESOURCE_CHARS
            or len(resource.encode("utf-8", "replace")) > MAX_RESOURCE_CHARS
            or not resource.isprintable()
        ):
            resource = None  # names nothing the detection can use; never a reason to refuse
        request = validate_request(
            token,
            audience=audience,
            dpop_proof=proof,
            http_method=original.method,
            http_uri=audience,
            cert_thumbprint=original.cert_thumbprint,
            client_ip=original.client_ip or None,
            required_scopes=required,
            resource=resource or None,
        )
        return Prepared(audience, scheme, proof is not None, required, request)

    @staticmethod
    def answer(prepared: Prepared, validation: Validation) -> Allowed:
        """The identity of a valid validation; raises the `Refusal` of a refused one."""
        if not validation.valid:
            raise refusal_of(validation, prepared.scheme, prepared.with_proof, prepared.required_scopes)
        return Allowed(validation.client_id, validation.session_id, validation.scopes)


@functools.lru_cache(maxsize=_CHALLENGES_CACHED)
def _challenges(audience: str | None) -> Challenges:
    url = resource_metadata_url(audience) if audience else None
    return Challenges(require_dpop=False, realm="tokenbroker", resource_metadata_url=url)


__all__ = [
    "CLIENT_ID_HEADER",
    "CREDENTIAL_HEADERS",
    "IDENTITY_HEADERS",
    "SCOPES_HEADER",
    "SESSION_ID_HEADER",
    "Allowed",
    "GatewayDoor",
    "OriginalRequest",
    "Prepared",
    "refusal_for_error",
    "route_scopes",
]
