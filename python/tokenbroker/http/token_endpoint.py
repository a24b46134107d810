"""`POST /token`: the client credentials grant (RFC 6749 section 4.4) for the clients that
standard MCP SDKs build.

Client authentication (RFC 6749 section 2.3, RFC 7523 section 2.2): a `private_key_jwt`
assertion (EdDSA, ES256, RS256, PS256), `client_secret_basic` or `client_secret_post`;
exactly one of them. The request names the audience with `resource` (RFC 8707, required
unless the client may have exactly one) and may narrow the scope (`scope`; absent: every
scope the client may have, RFC 6749 section 3.3). A `DPoP` header (RFC 9449 section 5)
binds the token to the proof's key: `token_type` `DPoP` and `cnf.jkt`.

The order of the checks, and why:
1. the form, the grant type and the DPoP proof's shape and signature: stateless, so a
   malformed request costs no state and learns nothing about any client;
2. the broker-wide nonce (`require_dpop_nonce`): before the client's assertion is spent;
3. the client's credential and status (`ClientAuthenticator`, rate-limited per client id
   and per source address; its assertion's `jti` is now used);
4. the client's own nonce requirement: only now, so that whether a client demands a nonce
   is learned only by that client;
5. the request against the client's policy (audience, scopes, networks, binding), then
   the proof's `jti` recorded once (a replayed proof is refused; the record is the
   client's, so nobody else can fill its quota);
6. a session opened or continued, the token signed, the grant audited.

Sessions: the SDK's client-credentials providers never refresh; they ask again after
expiry, every few minutes, all day. Each request therefore continues the session of the
same client, audience and key: the DPoP key's thumbprint when the token is DPoP-bound
(the key is the client instance's own, so one instance is one session), the source
address for Bearer clients (which have no key of their own: the address is the nearest
thing to one instance; several instances behind one address share a session). A session
nobody uses for `session_idle_seconds` ends and stops counting toward the client's limit.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenbroker._core import verify_dpop_proof
from tokenbroker.app import Components
from tokenbroker.attestation import AttestationError, Attesters
from tokenbroker.audit import ISSUE_EVENT as ISSUE
from tokenbroker.client_auth import ClientRefusedError, ClientThrottledError, CredentialRefusedError
from tokenbroker.dpop_nonce import NONCE_HEADER, USE_DPOP_NONCE, DpopNonces
from tokenbroker.errors import (
    InvalidArgumentError,
    SessionLimitExceededError,
    SessionNotFoundError,
    StoreUnavailableError,
    TokenBrokerError,
)
from tokenbroker.http.errors import NO_STORE, OAuthError, error_response, invalid_client, invalid_request
from tokenbroker.http.forms import Form, read_form
from tokenbroker.http.metadata import Endpoints
from tokenbroker.jws_text import unverified_claims
from tokenbroker.registry import Binding, ClientRecord
from tokenbroker.requests import issue_request
from tokenbroker.store.base import Remembered

log = structlog.get_logger("tokenbroker.http")

CLIENT_CREDENTIALS = "client_credentials"
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GRANT_RULE = "grant"
# The DPoP proof window at the token endpoint: the engine's defaults for resource requests.
PROOF_MAX_AGE_SECONDS = 60
PROOF_LEEWAY_SECONDS = 5
MAX_HEADER_CREDENTIAL_CHARS = 4096


class ClientCredential:
    """How the client authenticated: `method` (an RFC 7591 name), its id and its secret or
    assertion."""

    __slots__ = ("assertion", "client_id", "method", "secret")

    def __init__(self, method: str, client_id: str, *, secret: str | None = None, assertion: str | None = None):
        self.method = method
        self.client_id = client_id
        self.secret = secret
        self.assertion = assertion


def _basic_credential(header: str) -> ClientCredential:
    """RFC 6749 section 2.3.1: base64 of the form-encoded id, ":", the form-encoded secret."""
    encoded = header[len("basic ") :].strip()
    if len(encoded) > MAX_HEADER_CREDENTIAL_CHARS:
        raise invalid_client("the Basic credentials are too long")
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII text given to b64decode
        raise invalid_client("the Basic credentials are not base64 of client_id:client_secret") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not client_id or not secret:
        raise invalid_client("the Basic credentials must be client_id:client_secret, both non-empty")
    return ClientCredential("client_secret_basic", unquote_plus(client_id), secret=unquote_plus(secret))


def _assertion_subject(assertion: str) -> str:
    """The `sub` of a client assertion, read without verifying it (the authenticator
    verifies it against that client's key, and requires `iss` = `sub` = the client id)."""
    if assertion.count(".") != 2:
        raise invalid_client("client_assertion is not a JWS compact serialization")
    claims = unverified_claims(assertion)
    if claims is None:
        raise invalid_client("client_assertion's payload is not base64url JSON")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise invalid_client("client_assertion has no sub (the client id)")
    return subject


def client_credential(request: Request, form: Form) -> ClientCredential:
    """The one credential the client sent, or an `OAuthError`."""
    headers = request.headers.getlist("authorization")
    if len(headers) > 1:
        raise invalid_request("send one Authorization header")
    header = headers[0] if headers else None
    form_id, secret, assertion = form.get("client_id"), form.get("client_secret"), form.get("client_assertion")
    assertion_type = form.get("client_assertion_type")
    used = [
        name
        for name, present in (("Basic", header), ("client_secret", secret), ("client_assertion", assertion))
        if present
    ]
    if len(used) > 1:
        raise invalid_request(f"the client authenticated more than once ({' and '.join(used)}): use one method")
    if assertion_type is not None and assertion is None:
        raise invalid_request("client_assertion_type without client_assertion")
    if header is not None:
        if not header.lower().startswith("basic "):
            raise invalid_client("the token endpoint takes Basic client credentials in Authorization, no other scheme")
        credential = _basic_credential(header)
        if form_id is not None and form_id != credential.client_id:
            raise invalid_request("client_id in the body differs from the one in the Basic credentials")
        return credential
    if assertion is not None:
        if assertion_type != JWT_BEARER_ASSERTION:
            raise invalid_request(f"client_assertion_type must be {JWT_BEARER_ASSERTION}")
        subject = _assertion_subject(assertion)
        # A differing client_id is the authenticator's to refuse (iss and sub must be it).
        return ClientCredential("private_key_jwt", form_id or subject, assertion=assertion)
    if secret is not None:
        if form_id is None:
            raise invalid_request("client_secret needs client_id")
        return ClientCredential("client_secret_post", form_id, secret=secret)
    raise invalid_client(
        "the client did not authenticate: send a private_key_jwt client_assertion, Basic credentials or "
        "client_id and client_secret"
    )


def requested_resource(form: Form) -> str | None:
    """The one `resource` (RFC 8707 section 2): an absolute URI without a fragment."""
    resources = [r for r in form.all("resource") if r]
    if len(resources) > 1:
        raise OAuthError("invalid_target", "ask for one resource per token: a token has one audience")
    if not resources:
        return None
    resource = resources[0]
    try:
        parts = urlsplit(resource)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parts = None
    # urlsplit drops leading spaces and control characters and removes tabs and newlines: no
    # URI holds one, and the audience would keep them.
    unsafe = any(c <= " " or c == "\x7f" for c in resource)
    if parts is None or unsafe or not parts.scheme or not parts.netloc or parts.fragment or "#" in resource:
        raise OAuthError("invalid_target", "resource must be an absolute URI without a fragment (RFC 8707)")
    return resource


def _binding_refusal(record: ClientRecord, exc: ClientRefusedError) -> OAuthError | None:
    """A binding refusal in the words of this door (a `DPoP` header, not gRPC's fields)."""
    cid = record.client_id
    change = f"the broker operator can change it with `tokenbroker clients update {cid} --binding ...`"
    if exc.rule == "binding.dpop_required":
        why = (
            f"client {cid!r} has binding dpop: send a DPoP header (an RFC 9449 proof signed with the key the "
            f"token is to be bound to); or {change}"
        )
    elif exc.rule == "binding.bearer_only":
        why = f"client {cid!r} has binding bearer: send no DPoP header; or {change} to dpop"
    else:
        return None
    return OAuthError("invalid_request", why, rule=exc.rule)


def continuation_key(client_id: str, audience: str, kind: str, value: str) -> str:
    """What names a client instance's session (module doc): length-prefixed, hashed."""
    text = "\x00".join(f"{len(part)}:{part}" for part in (client_id, audience, kind, value))
    return hashlib.sha256(text.encode()).hexdigest()


def refusal_for(exc: TokenBrokerError) -> OAuthError:
    """The OAuth answer for a refusal of the broker's own (its `.rule` picks the code)."""
    rule = str(getattr(exc, "rule", ""))
    text = str(exc)
    if isinstance(exc, ClientThrottledError):
        code = "invalid_client" if rule == "auth.rate_limited" else "invalid_request"
        return OAuthError(code, text, status=429, headers={"Retry-After": "60"})
    if isinstance(exc, CredentialRefusedError):
        return invalid_client(text)
    if isinstance(exc, ClientRefusedError):
        if rule == "audience.not_allowed":
            return OAuthError("invalid_target", text)
        if rule == "scope.not_allowed":
            return OAuthError("invalid_scope", text)
        if rule in ("binding.dpop_required", "binding.bearer_only"):
            return invalid_request(text)
        return OAuthError("unauthorized_client", text)
    if isinstance(exc, SessionLimitExceededError):
        return OAuthError("invalid_request", text, status=429, headers={"Retry-After": "60"})
    if isinstance(exc, StoreUnavailableError):
        return OAuthError(
            "temporarily_unavailable",
            "the broker's state store is unreachable",
            status=503,
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, InvalidArgumentError | SessionNotFoundError):
        return invalid_request(text)
    return OAuthError("server_error", "the broker could not issue the token", status=500)


class TokenEndpoint:
    """The `/token` handler for one broker (see the module doc)."""

    def __init__(
        self,
        components: Components,
        endpoints: Endpoints,
        nonces: DpopNonces,
        *,
        require_dpop_nonce: bool = False,
        session_idle_seconds: int | None = None,
        attesters: Attesters | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self._c = components
        self._endpoints = endpoints
        self._nonces = nonces
        self._require_nonce = require_dpop_nonce
        self._idle = session_idle_seconds
        self._attesters = attesters
        self._clock = clock

    async def handle(self, request: Request) -> Response:
        client_ip = request.client.host if request.client is not None else ""
        audit: dict[str, Any] = {"client_id": "", "audience": "", "source_ip": client_ip}
        try:
            return await self._issue(request, client_ip, audit)
        except OAuthError as exc:
            self._audit_refusal(audit, exc.rule, exc.description, authenticated=bool(audit.get("authenticated")))
            return error_response(exc)
        except TokenBrokerError as exc:
            answer = refusal_for(exc)
            rule = str(getattr(exc, "rule", type(exc).__name__))
            authenticated = bool(audit.get("authenticated")) or bool(getattr(exc, "authenticated", False))
            self._audit_refusal(audit, rule, answer.description, authenticated=authenticated)
            if answer.status >= 500:
                log.warning("token request failed", error=type(exc).__name__, client_id=audit["client_id"])
            return error_response(answer)

    def _audit_refusal(self, audit: dict[str, Any], rule: str, reason: str, *, authenticated: bool) -> None:
        self._c.audit.record(
            event=ISSUE,
            client_id=audit["client_id"],
            audience=audit["audience"],
            decision="refuse",
            rule=rule,
            source_ip=audit["source_ip"],
            door="http",
            reason=reason[:300],
            authenticated=authenticated,
        )
        self._c.metrics.issuance("refuse", rule)

    def _nonce_challenge(self, why: str) -> OAuthError:
        return OAuthError(USE_DPOP_NONCE, why, headers={NONCE_HEADER: self._nonces.current()})

    async def _issue(self, request: Request, client_ip: str, audit: dict[str, Any]) -> Response:
        form = await read_form(request)
        grant = form.get("grant_type")
        if grant is None:
            raise invalid_request("grant_type is required: client_credentials")
        if grant not in (CLIENT_CREDENTIALS, JWT_BEARER_GRANT):
            raise OAuthError(
                "unsupported_grant_type",
                f"tokenbroker issues tokens for the {CLIENT_CREDENTIALS} and {JWT_BEARER_GRANT} grants",
            )
        if grant == JWT_BEARER_GRANT:
            if self._attesters is None:
                raise OAuthError(
                    "unsupported_grant_type",
                    "this broker has no attesters configured: the jwt-bearer grant needs the attesters setting",
                )
            credential = ClientCredential("attestation", form.get("client_id") or "", assertion=form.get("assertion"))
        else:
            credential = client_credential(request, form)
            if (
                self._attesters is not None
                and credential.assertion is not None
                and _assertion_subject(credential.assertion).startswith("spiffe://")
            ):
                # A workload's attestation sent as its client_assertion (RFC 7523 section
                # 2.2): the same checks as the jwt-bearer grant.
                credential = ClientCredential(
                    "attestation", form.get("client_id") or "", assertion=credential.assertion
                )
        audit["client_id"] = credential.client_id[:256]
        resource = requested_resource(form)
        audit["audience"] = (resource or "")[:2048]
        scope = form.get("scope")

        proofs = request.headers.getlist("dpop")
        if len(proofs) > 1:
            raise OAuthError("invalid_dpop_proof", "send one DPoP header")
        jkt = proof_jti = None
        proof_iat = 0
        nonce: str | None = None
        if proofs:
            try:
                jkt, proof_jti, proof_iat, nonce = verify_dpop_proof(
                    proofs[0],
                    "POST",
                    self._endpoints.token_url,
                    max_age_seconds=PROOF_MAX_AGE_SECONDS,
                    leeway_seconds=PROOF_LEEWAY_SECONDS,
                )
            except ValueError as exc:
                raise OAuthError("invalid_dpop_proof", f"DPoP proof refused: {exc}") from None
            if self._require_nonce and not self._nonces.accepts(nonce):
                raise self._nonce_challenge("the token endpoint requires a DPoP nonce: sign the proof with this one")

        attested_subject: str | None = None
        if credential.method == "attestation":
            record, attested_subject = await self._attested_client(credential)
            audit["client_id"] = record.client_id
        else:
            record = await self._c.authenticator.aauthenticate_client(
                client_id=credential.client_id,
                client_assertion=credential.assertion,
                client_secret=credential.secret,
                client_ip=client_ip,
            )
        audit["authenticated"] = True
        if jkt is not None and record.require_dpop_nonce and not self._nonces.accepts(nonce):
            raise self._nonce_challenge(
                f"client {record.client_id!r} requires a DPoP nonce: sign the proof with this one"
            )
        audience = self._audience(record, resource)
        audit["audience"] = audience
        if record.binding is Binding.MTLS:
            raise OAuthError(
                "unauthorized_client",
                f"client {record.client_id!r} has binding mtls: it gets tokens over gRPC IssueToken, where its "
                "TLS client certificate is seen",
            )
        # RFC 6749 section 3.3: a scope is a set (repeats collapse, the order is kept).
        scopes = list(dict.fromkeys(scope.split() if scope is not None else record.allowed_scopes))
        try:
            self._c.authenticator.check_request(
                record, audience=audience, scopes=scopes, client_ip=client_ip, dpop_jkt=jkt, cert_thumbprint=None
            )
        except ClientRefusedError as exc:
            raise _binding_refusal(record, exc) or exc from None
        if jkt is not None and proof_jti is not None:
            await self._remember_proof(record, jkt, proof_jti, proof_iat)
        wanted = issue_request(
            client_id=record.client_id,
            audience=audience,
            scopes=scopes,
            dpop_jkt=jkt,
            client_ip=client_ip,
            attested_subject=attested_subject,
            usage_window=record.usage_window_mask(),  # None: the broker may learn one
        )
        kind, value = ("jkt", jkt) if jkt is not None else ("ip", client_ip)
        issued = await self._c.broker.aissue_request(
            wanted,
            session_limit=record.session_limit,
            continuation=continuation_key(record.client_id, audience, kind, value),
            idle_seconds=self._idle,
        )
        attested: dict[str, Any] = {} if attested_subject is None else {"attestation_subject": attested_subject}
        self._c.audit.record(
            event=ISSUE,
            client_id=record.client_id,
            audience=audience,
            decision="grant",
            rule=GRANT_RULE,
            source_ip=client_ip,
            door="http",
            auth_method=credential.method,
            **attested,
            session=issued.session_id,
            jti=issued.jti,
            binding=str(record.binding),
            **record.accountability(),
            scope=" ".join(issued.scopes),
            expires_at=issued.expires_at,
        )
        self._c.metrics.issuance("grant", GRANT_RULE)
        body = {
            "access_token": issued.access_token,
            "token_type": issued.token_type,
            "expires_in": max(0, issued.expires_at - int(self._clock())),
            "scope": " ".join(issued.scopes),
            "session_id": issued.session_id,
        }
        headers = dict(NO_STORE)
        if jkt is not None and (self._require_nonce or record.require_dpop_nonce):
            headers[NONCE_HEADER] = self._nonces.current()  # RFC 9449 section 8.2: the next one
        return JSONResponse(body, headers=headers)

    async def _attested_client(self, credential: ClientCredential) -> tuple[ClientRecord, str]:
        """The jwt-bearer grant (RFC 7523 section 2.1): the assertion is an attester's JWT
        (a JWT-SVID) whose `sub` is the SPIFFE ID registered for the client; it is used
        once. The client is the one registered with that SPIFFE ID (and, when the request
        names a client_id, that one)."""
        assert self._attesters is not None
        if not credential.assertion:
            raise invalid_request("the jwt-bearer grant needs assertion (a JWT-SVID or another attester's JWT)")
        try:
            attestation = await self._attesters.verify(credential.assertion, audience=self._endpoints.issuer)
        except AttestationError as exc:
            raise OAuthError("invalid_grant", str(exc), rule=exc.reason) from None
        subject = attestation.subject
        # One client per SPIFFE ID, whatever the request names: else one attestation could
        # be redeemed once per client sharing the ID (its replay record is the client's).
        records = [r for r in self._c.registry.clients() if r.spiffe_id == subject]
        if credential.client_id and [r.client_id for r in records] != [credential.client_id]:
            records = []
        if len(records) != 1:
            raise OAuthError(
                "invalid_grant",
                "no single client is registered with the attested SPIFFE ID"
                + (" and this client_id" if credential.client_id else "")
                + ": register it with `tokenbroker clients add ID --spiffe-id SPIFFE_ID`",
                rule="attestation.unknown_subject",
            )
        record = records[0]
        self._c.authenticator.check_attested(record)
        key, issued_at, until = attestation.replay
        now = int(self._clock())
        outcome = await self._c.broker.store.aremember(
            key, client_id=record.client_id, issued_at=issued_at, until=until, now=now
        )
        if outcome is not Remembered.NEW:
            raise OAuthError(
                "invalid_grant",
                "the attestation was already used, or predates the broker's replay state: present a fresh one",
                rule="attestation.replayed",
            )
        return record, subject

    @staticmethod
    def _audience(record: ClientRecord, resource: str | None) -> str:
        if resource is not None:
            return resource
        if len(record.allowed_audiences) == 1:
            return record.allowed_audiences[0]
        raise OAuthError(
            "invalid_target",
            f"client {record.client_id!r} may get tokens for {len(record.allowed_audiences)} resources: name one "
            "with the resource parameter (RFC 8707)",
        )

    async def _remember_proof(self, record: ClientRecord, jkt: str, jti: str, iat: int) -> None:
        """Records the proof's `jti` once, for as long as the proof could be accepted."""
        now = int(self._clock())
        until = iat + PROOF_MAX_AGE_SECONDS + 2 * PROOF_LEEWAY_SECONDS + 1
        key = f"dpop-token:{len(jkt)}:{jkt}:{jti}"
        outcome = await self._c.broker.store.aremember(
            key, client_id=record.client_id, issued_at=iat, until=until, now=now
        )
        if outcome is Remembered.NEW:
            return
        if outcome is Remembered.FULL:
            raise OAuthError(
                "invalid_request",
                f"client {record.client_id!r} has used its quota of replay records: retry later",
                status=429,
                headers={"Retry-After": "60"},
            )
        why = "it was already used" if outcome is Remembered.SEEN else "the broker's replay state was reset after it"
        raise OAuthError("invalid_dpop_proof", f"DPoP proof refused: {why}; sign a new proof for every request")


__all__ = [
    "CLIENT_CREDENTIALS",
    "JWT_BEARER_ASSERTION",
    "JWT_BEARER_GRANT",
    "TokenEndpoint",
    "client_credential",
    "continuation_key",
]
