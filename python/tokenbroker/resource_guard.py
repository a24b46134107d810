"""What a protected resource checks of an HTTP request before and after the broker's
validation, whatever carries the request: `BrokerAuthMiddleware` (an ASGI app in front of
an MCP SDK server) and the gateway doors (`/authz` forward auth, Envoy's `Check`). One
module so that the three answer alike: the same request-target rules, the same reading of
`Authorization` and `DPoP`, the same mapping of a refused validation to 401 or 403, the
same `WWW-Authenticate` challenges (RFC 6750 section 3, RFC 9449 section 7, RFC 9728
`resource_metadata`)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import ssl
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

from tokenbroker.models import Validation
from tokenbroker.reason import Reason

DPOP_ALGS = "EdDSA ES256"
# A bare host[:port] (a DNS name or a bracketed IP literal): what a Host header may be.
HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
# RFC 6750 section 2.1 b64token, and RFC 7515 compact serialisation (a DPoP proof).
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
COMPACT_JWS = re.compile(r"[A-Za-z0-9\-_]+\.[A-Za-z0-9\-_]+\.[A-Za-z0-9\-_]+")
# RFC 3986 section 3.3 path-absolute: "/" then pchar (unreserved, pct-encoded, sub-delims, ":", "@").
_RFC3986_PATH = re.compile(r"(?:/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*)+")
# A percent-encoded dot, slash or backslash: WHATWG URL parsing (the htu's) resolves `%2e`
# dot segments and routers do not, and `%2f`/`%5c` become separators for some and not others.
_ENCODED_SEPARATOR = re.compile(r"%(?:2[EeFf]|5[Cc])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Characters allowed in an error_description (RFC 6750 section 3): printable ASCII but " and \.
_NOT_DESCRIPTION = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")

PROOF_REASONS = frozenset({Reason.PROOF_INVALID})
DPOP_REASONS = frozenset({Reason.PROOF_MISSING, Reason.PROOF_INVALID, Reason.BINDING_MISMATCH})


class Refusal(Exception):
    """A request answered by the guard, never passed on."""

    def __init__(
        self,
        status: int,
        error: str,
        description: str,
        *,
        scheme: str = "",
        scope: str = "",
        reason: str = "",
        challenge: bool = True,
    ) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.scheme = scheme  # "dpop", "bearer" or "" (which challenge carries the error)
        self.scope = scope
        self.reason = reason  # the broker's Reason name, when it decided
        self.challenge = challenge  # False: a 401 or 403 that no token would change (no challenge)

    def body(self) -> bytes:
        """The JSON body of the answer (RFC 6750 section 3's error and description)."""
        if not self.error:
            return json.dumps({"error": "unauthorized", "error_description": "authentication required"}).encode()
        return json.dumps({"error": self.error, "error_description": self.description}).encode()


def description(text: str) -> str:
    """`text` as an error_description may carry it (printable ASCII but `"` and `\\`, at
    most 200 characters): safe inside a quoted header parameter."""
    return _NOT_DESCRIPTION.sub("", text)[:200]


def _bad_target(what: str) -> Refusal:
    return Refusal(400, "invalid_request", f"request path {what}")


def checked_target(raw: str) -> str:
    """The decoded path of `raw` (a request path as the client spelled it, percent-encoded,
    no query), once it is proven to be one every router and WHATWG URL parsing (the DPoP
    `htu`'s) agree on; raises `Refusal` (400) otherwise: not an RFC 3986 path (backslash,
    space, raw non-ASCII, stray `%`), an empty segment, invalid UTF-8 once decoded, a `.`
    or `..` segment, a percent-encoded dot, slash or backslash (once or twice), or a
    control character once decoded. A target is refused, never normalised."""
    if not _RFC3986_PATH.fullmatch(raw):
        raise _bad_target("is not an RFC 3986 path (a backslash, a space, a raw non-ASCII byte?): percent-encode it")
    if "//" in raw:
        raise _bad_target("has an empty segment (//): send the path without it")
    encoded = "%" in raw  # the common case has no escape at all: skip decoding it
    try:
        decoded = unquote_to_bytes(raw).decode("utf-8") if encoded else raw
    except UnicodeDecodeError:
        raise _bad_target("is not UTF-8 once percent-decoded") from None
    if "/." in decoded and any(segment in (".", "..") for segment in decoded.split("/")):
        raise _bad_target("has a dot segment (. or .., plain or percent-encoded): send the path with them resolved")
    if encoded:
        if _ENCODED_SEPARATOR.search(raw):
            raise _bad_target("percent-encodes a dot, slash or backslash (%2e, %2f, %5c): send the plain path")
        if _ENCODED_SEPARATOR.search(decoded):
            raise _bad_target("encodes a dot, slash or backslash twice (%252e, %252f, %255c): send the plain path")
        if _CONTROL.search(decoded):
            raise _bad_target("decodes to a control character")
    return decoded


def credentials(header: str) -> tuple[str, str]:
    """(scheme, token) of one `Authorization` value: scheme `dpop` or `bearer`. An
    unsupported scheme is answered as if no credentials came (the challenge, no error);
    a malformed token is 400."""
    scheme, _, token = header.strip().partition(" ")
    scheme, token = scheme.lower(), token.strip()
    if scheme not in ("dpop", "bearer"):
        raise Refusal(401, "", "")
    if not token or not _TOKEN68.fullmatch(token):
        raise Refusal(400, "invalid_request", "Authorization header is malformed", scheme=scheme)
    return scheme, token


def presented(
    authorization: Sequence[str], proofs: Sequence[str], *, require_dpop: bool
) -> tuple[str, str, str | None]:
    """(scheme, token, proof) of a request's `Authorization` and `DPoP` header values,
    checked before any broker call: exactly one Authorization (none: 401 with the bare
    challenge); with `require_dpop`, DPoP only; a DPoP presentation has exactly one proof,
    a compact JWS. Raises `Refusal`."""
    if not authorization:
        raise Refusal(401, "", "")
    if len(authorization) > 1:
        raise Refusal(400, "invalid_request", "more than one Authorization header")
    scheme, token = credentials(authorization[0])
    if scheme == "bearer" and require_dpop:
        text = "this server accepts only DPoP: send Authorization: DPoP <token> with a DPoP proof header"
        raise Refusal(401, "invalid_token", text, scheme="dpop")
    if scheme != "dpop":
        return scheme, token, None
    if len(proofs) > 1:
        raise Refusal(400, "invalid_request", "more than one DPoP header", scheme="dpop")
    if not proofs:
        raise Refusal(401, "invalid_dpop_proof", "DPoP proof header is missing", scheme="dpop")
    proof = proofs[0].strip()
    if not COMPACT_JWS.fullmatch(proof):
        raise Refusal(401, "invalid_dpop_proof", "DPoP proof is not a compact JWS", scheme="dpop")
    return scheme, token, proof


def refusal_of(validation: Validation, scheme: str, with_proof: bool, required_scopes: Sequence[str]) -> Refusal:
    """The answer to a validation the broker refused: 403 `insufficient_scope` naming every
    required scope, 503 for a full replay cache, 401 `invalid_dpop_proof` for a bad or
    replayed proof, 401 `invalid_token` for the rest (on the DPoP challenge when the
    reason is the binding's)."""
    reason = validation.reason
    detail = description(validation.detail or reason.name.lower())
    if reason is Reason.INSUFFICIENT_SCOPE:
        scope = " ".join(required_scopes)
        return Refusal(403, "insufficient_scope", detail, scheme=scheme, scope=scope, reason=reason.name)
    if reason is Reason.REPLAY_CACHE_FULL:
        return Refusal(503, "temporarily_unavailable", "replay cache is full", reason=reason.name)
    if reason in PROOF_REASONS or (reason is Reason.REPLAYED and with_proof):
        return Refusal(401, "invalid_dpop_proof", detail, scheme="dpop", reason=reason.name)
    scheme = "dpop" if reason in DPOP_REASONS else scheme
    return Refusal(401, "invalid_token", detail, scheme=scheme, reason=reason.name)


class Challenges:
    """The `WWW-Authenticate` values of a protected resource: a DPoP challenge (`algs`)
    and, unless `require_dpop`, a Bearer one, each with `realm` and `resource_metadata`
    when given; the error goes on the scheme it concerns."""

    def __init__(self, *, require_dpop: bool, realm: str | None = None, resource_metadata_url: str | None = None):
        self.require_dpop = require_dpop
        self._realm = f'realm="{description(realm)}"' if realm else ""
        self._metadata = f'resource_metadata="{description(resource_metadata_url)}"' if resource_metadata_url else ""

    def values(self, error: str = "", text: str = "", *, scheme: str = "", scope: str = "") -> list[str]:
        schemes = (("dpop", "DPoP"),) if self.require_dpop else (("dpop", "DPoP"), ("bearer", "Bearer"))
        values = []
        for name, label in schemes:
            params = [self._realm] if self._realm else []
            if error and name == scheme:
                params.append(f'error="{error}"')
                if text:
                    params.append(f'error_description="{description(text)}"')
                if scope:
                    params.append(f'scope="{description(scope)}"')
            if self._metadata:
                params.append(self._metadata)
            if name == "dpop":
                params.append(f'algs="{DPOP_ALGS}"')
            values.append(f"{label} {', '.join(params)}" if params else label)
        return values

    def for_refusal(self, refusal: Refusal) -> list[str]:
        """The challenges of a 401 or 403 (none for any other status)."""
        if refusal.status not in (401, 403) or not refusal.challenge:
            return []
        scheme = refusal.scheme or ("dpop" if self.require_dpop else "bearer")
        return self.values(refusal.error, refusal.description, scheme=scheme, scope=refusal.scope)


def dpop_bound(token: str) -> bool:
    """Whether a token the broker has just validated carries `cnf.jkt` (its signature is
    verified, so its claims can be read as they are)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return False
    cnf = claims.get("cnf") if isinstance(claims, dict) else None
    return isinstance(cnf, dict) and isinstance(cnf.get("jkt"), str)


def cert_thumbprint(pem_or_der: str | bytes) -> str:
    """RFC 8705 `x5t#S256`: base64url(SHA-256(DER certificate)), no padding."""
    der = ssl.PEM_cert_to_DER_cert(pem_or_der) if isinstance(pem_or_der, str) else pem_or_der
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


__all__ = [
    "COMPACT_JWS",
    "DPOP_ALGS",
    "HOST",
    "Challenges",
    "Refusal",
    "cert_thumbprint",
    "checked_target",
    "credentials",
    "description",
    "dpop_bound",
    "presented",
    "refusal_of",
]
