"""Client authentication at issuance: who is asking for a token, and may they have it.

`ClientAuthenticator.authenticate` applies these rules in order; the first that fails
raises, and the exception's `.rule` names it for the audit log:

1. `auth.rate_limited`: the source address is under its limit of failed
   authentications (checked before anything is verified, which protects the CPU); a
   client id over its limit is refused only when its credential then fails to verify, so
   nobody can lock a client out by failing on its behalf;
2. `credential.*` / `client.unknown`: an RFC 7523 `private_key_jwt` assertion signed by
   the client's registered key with one of four algorithms, each only with its key type:
   EdDSA (Ed25519), ES256 (P-256), RS256 and PS256 (RSA, 2048 to 8192 bits; a key whose
   JWK names an `alg` is used with that one only), whose `aud` is one string, the issuer
   or the token endpoint; or the client's secret;
3. `client.pending` / `client.disabled` / `approval.expired`: the client is approved, and
   its approval's `approved_until` has not passed (a record without `approved_until`, from
   before approvals expired, stays approved); `credential.key_expired`: its credential is
   not past `key_not_after` nor older than `key_max_age_seconds` (counted from
   `key_created_at`; a record without it is not held to the maximum age); each expiry
   refusal is reported once to `on_event`; then an assertion is recorded as used, once (a
   refused client writes no record);
4. `audience.not_allowed`: the audience is one the client may get tokens for;
5. `scope.not_allowed`: every requested scope is allowed;
6. `source.cidr`: the request comes from one of the client's networks, when it has any;
7. `binding.*`: the request binds the token as the client's `binding` says.

Client enumeration: an unknown client id, a wrong credential and a credential of a type
the client does not have get one answer, `AUTH_FAILED` (UNAUTHENTICATED), after the same
work (an unknown client's assertion is verified against a dummy key of the algorithm its
header names, made once per process: Ed25519, P-256 or RSA 2048; its secret against a
dummy hash); only the audit rule tells them apart. A client learns its status and policy
only once its credential verified.

Credential failures raise `CredentialRefusedError` (UNAUTHENTICATED; an expired key,
`CredentialExpiredError`, is one too, raised only after it verified); rate limits and
quotas raise `ClientThrottledError` (RESOURCE_EXHAUSTED); the others raise
`ClientRefusedError` (PERMISSION_DENIED). Each has `.rule` and `.authenticated` (whether
the client had proved itself when it was refused)."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import secrets
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tokenbroker.cimd import CimdDocumentError, CimdFetchError
from tokenbroker.cimd_clients import CimdClients, is_cimd_client_id
from tokenbroker.client_assertion import PrivateKey, public_jwk
from tokenbroker.errors import AuthenticationError, ClientNotAllowedError, RateLimitedError
from tokenbroker.gateway.proxies import parse_ip
from tokenbroker.ratelimit import KeyedBuckets, source_key
from tokenbroker.registry import Binding, ClientRecord, ClientStatus, Registry
from tokenbroker.registry_file import check_public_jwk, hash_secret, secret_matches
from tokenbroker.store.base import Remembered, Store

log = structlog.get_logger("tokenbroker.client_auth")

MAX_ASSERTION_BYTES = 8 * 1024
# The algorithms an assertion may be signed with, and the key type (kty, crv) each needs.
ASSERTION_ALGORITHMS = ("EdDSA", "ES256", "RS256", "PS256")
_KEY_TYPE_FOR_ALGORITHM: dict[str, tuple[str, str | None]] = {
    "EdDSA": ("OKP", "Ed25519"),
    "ES256": ("EC", "P-256"),
    "RS256": ("RSA", None),
    "PS256": ("RSA", None),
}
# Header members that would make a verifier fetch or trust something outside the registry.
_FORBIDDEN_HEADER_MEMBERS = ("jku", "x5u", "jwk", "x5c", "crit")
AUTH_FAILED = (
    "client authentication failed: check the client id and its credential (a client assertion signed with "
    "the client's registered key, or the client's secret)"
)


class CredentialRefusedError(AuthenticationError):
    """The client's credential is missing or wrong. `.rule` names the failed check."""

    authenticated = False

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


class CredentialExpiredError(CredentialRefusedError):
    """The client's credential verified but is past its `key_not_after` or the maximum key
    age (`credential.key_expired`): the client proved itself, so it may learn why."""

    authenticated = True


class ClientRefusedError(ClientNotAllowedError):
    """The client (authenticated) may not have this token. `.rule` names the failed check."""

    authenticated = True

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


class ClientThrottledError(RateLimitedError):
    """Too many failed authentications (`auth.rate_limited`: from the source, before any
    verification; for the client id, once the credential failed) or the client's quota of
    assertion records is used (`credential.quota`)."""

    def __init__(self, message: str, rule: str, *, authenticated: bool) -> None:
        super().__init__(message)
        self.rule = rule
        self.authenticated = authenticated


@functools.lru_cache(maxsize=4096)
def _verification_key(jwk_json: str, algorithm: str) -> jwt.PyJWK:
    """The key bound to `algorithm`: PyJWT then verifies with that algorithm only (an RSA
    key would otherwise default to RS256 whatever the header says)."""
    return jwt.PyJWK(json.loads(jwk_json), algorithm=algorithm)


def _key_fits(jwk: dict[str, object], algorithm: str) -> bool:
    """Whether a registered key may verify an assertion signed with `algorithm`."""
    kty, crv = _KEY_TYPE_FOR_ALGORITHM[algorithm]
    if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv):
        return False
    named = jwk.get("alg")
    return named is None or named == algorithm or (algorithm == "EdDSA" and named == "Ed25519")


@functools.cache
def _dummy_private_key(kty: str) -> PrivateKey:
    """One throwaway key per key type for the whole process (RS256 and PS256 share the RSA
    one, 2048 bits: the usual size of a real client's key)."""
    if kty == "OKP":
        return ed25519.Ed25519PrivateKey.generate()
    if kty == "EC":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def _dummy_key(algorithm: str) -> jwt.PyJWK:
    """A throwaway public key per algorithm: what an unknown client's assertion is
    verified against, so that it costs what a known client's does."""
    key = _dummy_private_key(_KEY_TYPE_FOR_ALGORITHM[algorithm][0])
    return _verification_key(json.dumps(public_jwk(key), sort_keys=True), algorithm)


# What an unknown client's secret is compared with (same hash and comparison as a real one).
_DUMMY_SECRET_HASH = hash_secret(secrets.token_urlsafe(32))


@functools.lru_cache(maxsize=4096)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _scope_list(scopes: Iterable[str] | str | None) -> list[str]:
    if scopes is None:
        return []
    if isinstance(scopes, str):
        return scopes.split()
    return [s for scope in scopes for s in scope.split()]


def _iso(unix_seconds: int) -> str:
    """A Unix time as ISO 8601 UTC, for messages people read."""
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _generic(rule: str) -> CredentialRefusedError:
    """The one answer for an unknown client, a wrong credential and a wrong credential type."""
    return CredentialRefusedError(AUTH_FAILED, rule)


class ClientAuthenticator:
    """Authenticates a client asking for a token and checks its policy (see module doc).

    `assertion_audience` is the broker's issuer; a client assertion's `aud` must be that
    string or `token_endpoint`, each with or without one trailing `/` (default endpoint: the
    issuer + "/token"). Assertions live at most `max_assertion_lifetime` seconds and are
    accepted once: their `jti` is remembered in the `store` (shared between replicas with
    Redis). Failed authentications are limited per client id (`client_failure_burst`,
    refilled at `client_failures_per_second`) and per source address (`source_*`; IPv6 by
    /64), each in a table of at most `failure_table_size` keys. Over the source limit,
    requests are refused before anything is verified; over the client id's limit, a
    credential that fails is refused as throttled and a credential that verifies passes.

    Expiry (after the credential verified): an approval past its `approved_until` is
    refused as pending (`approval.expired`), a credential past its `key_not_after` or older
    than `key_max_age_seconds` (from `key_created_at`) as `credential.key_expired`. Each
    such refusal calls `on_event` once with `{"event": "approval_expired", "client_id",
    "approved_until"}` or `{"event": "key_expired", "client_id", "key_not_after"}` (the
    deadline that passed); the hook failing never turns a refusal into a grant."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        *,
        assertion_audience: str,
        token_endpoint: str | None = None,
        clock: Callable[[], float] = time.time,
        max_assertion_lifetime: int = 300,
        leeway_seconds: int = 5,
        client_failure_burst: int = 20,
        client_failures_per_second: float = 0.5,
        source_failure_burst: int = 100,
        source_failures_per_second: float = 5.0,
        failure_table_size: int = 10_000,
        key_max_age_seconds: int | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        cimd: CimdClients | None = None,
    ) -> None:
        if not assertion_audience:
            raise ValueError("assertion_audience (the broker's issuer) is required")
        if key_max_age_seconds is not None and key_max_age_seconds < 1:
            raise ValueError("key_max_age_seconds must be at least 1 (None: no maximum key age)")
        self.key_max_age_seconds = key_max_age_seconds
        self._on_event = on_event
        self.cimd = cimd  # CIMD client ids (https:// URLs), at the asyncio door only
        self.registry = registry
        self.store = store
        self.assertion_audience = assertion_audience
        base = assertion_audience.rstrip("/")
        self.token_endpoint = token_endpoint or f"{base}/token"
        endpoint = self.token_endpoint.rstrip("/")
        self._audiences = frozenset((assertion_audience, base, f"{base}/", endpoint, f"{endpoint}/"))
        self.max_assertion_lifetime = max_assertion_lifetime
        self._clock = clock
        self._leeway = leeway_seconds
        self._client_failures = KeyedBuckets(
            rate=client_failures_per_second, burst=client_failure_burst, max_keys=failure_table_size, clock=clock
        )
        self._source_failures = KeyedBuckets(
            rate=source_failures_per_second, burst=source_failure_burst, max_keys=failure_table_size, clock=clock
        )
        # Made now, not at the first unknown client: that answer would be slower (RSA).
        for algorithm in ASSERTION_ALGORITHMS:
            _dummy_key(algorithm)

    # -- rate limits ------------------------------------------------------------------

    def _check_source_rate(self, source: str) -> None:
        if not self._source_failures.allowed(source):
            raise ClientThrottledError(
                "too many failed client authentications from this address: wait a minute before retrying, and "
                "check the client's credential",
                "auth.rate_limited",
                authenticated=False,
            )

    @staticmethod
    def _client_throttled() -> ClientThrottledError:
        return ClientThrottledError(
            "too many failed authentications for this client id: wait a minute before retrying, and check "
            "the client's credential",
            "auth.rate_limited",
            authenticated=False,
        )

    def _charge(self, client_id: str, source: str) -> None:
        self._client_failures.charge(client_id)
        self._source_failures.charge(source)

    # -- the rules --------------------------------------------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        """Hands a governance event to `on_event`; its failure is logged, never raised."""
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception as exc:  # the refusal stands whatever the hook does
            log.error(
                "on_event hook failed", governance_event=event["event"], client_id=event["client_id"], error=repr(exc)
            )

    def _check_status(self, record: ClientRecord, now: int) -> None:
        """After the credential: only a client that proved itself learns its status, and
        whether its approval or its key has expired; a client that must attest may not use
        its registered credential at all."""
        client_id = record.client_id
        self._check_approval(record, now)
        if record.require_attestation:
            raise ClientRefusedError(
                f"client {client_id!r} requires attestation: ask with the jwt-bearer grant "
                "(urn:ietf:params:oauth:grant-type:jwt-bearer) and a fresh JWT-SVID of its SPIFFE ID as the assertion",
                "attestation.required",
            )
        self._check_key_age(record, now)

    def _check_approval(self, record: ClientRecord, now: int) -> None:
        """Status and approval expiry (rule 3 without the credential's own age)."""
        client_id = record.client_id
        if record.status is ClientStatus.PENDING:
            raise ClientRefusedError(
                f"client {client_id!r} is pending approval: run `tokenbroker clients approve {client_id}`",
                "client.pending",
            )
        if record.status is not ClientStatus.APPROVED:
            raise ClientRefusedError(
                f"client {client_id!r} is disabled: the broker operator can re-enable it with "
                f"`tokenbroker clients approve {client_id}`",
                "client.disabled",
            )
        if record.approval_expired(now):
            assert record.approved_until is not None  # approval_expired says so
            self._emit({"event": "approval_expired", "client_id": client_id, "approved_until": record.approved_until})
            raise ClientRefusedError(
                f"client {client_id!r} is pending approval again: its approval expired at "
                f"{_iso(record.approved_until)}; run `tokenbroker clients approve {client_id}`",
                "approval.expired",
            )

    def check_attested(self, record: ClientRecord) -> None:
        """Rule 3 for a client that proved itself with an attestation (the jwt-bearer
        grant) rather than its registered credential: approved and not expired."""
        self._check_approval(record, int(self._clock()))

    def _check_key_age(self, record: ClientRecord, now: int) -> None:
        client_id = record.client_id
        deadline = record.key_deadline(self.key_max_age_seconds)
        if deadline is not None and now >= deadline:
            self._emit({"event": "key_expired", "client_id": client_id, "key_not_after": deadline})
            raise CredentialExpiredError(
                f"the credential of client {client_id!r} expired at {_iso(deadline)}: the broker operator can "
                f"replace it with `tokenbroker clients rotate-key {client_id}`",
                "credential.key_expired",
            )

    def _check_credential(
        self, client_id: str, client_assertion: str | None, client_secret: str | None, now: int
    ) -> tuple[ClientRecord, tuple[str, int, int] | None]:
        """The client's record once its credential verified, and the assertion's replay
        record to set (key, issued at, until), if any."""
        if client_assertion and client_secret:
            raise CredentialRefusedError(
                "the client sent both an assertion and a secret: send one credential", "credential.ambiguous"
            )
        if not client_assertion and not client_secret:
            raise CredentialRefusedError(
                "the client sent no credential: send a client assertion (private_key_jwt) signed with its "
                "registered key, or its client secret",
                "credential.missing",
            )
        record = self.registry.client(client_id) if client_id else None
        if client_assertion:
            replay = self._check_assertion(record, client_id, client_assertion, now)
            assert record is not None  # _check_assertion raises for an unknown client
            return record, replay
        assert client_secret is not None
        # The same hash and comparison whatever the client: one answer, similar timing.
        stored = record.secret_hash if record is not None and record.secret_hash else _DUMMY_SECRET_HASH
        matches = secret_matches(client_secret, stored)
        if record is None:
            raise _generic("client.unknown")
        if not record.secret_hash:
            raise _generic("credential.no_secret")
        if not matches:
            raise _generic("credential.secret_invalid")
        return record, None

    def _check_assertion(
        self, record: ClientRecord | None, client_id: str, assertion: str, now: int
    ) -> tuple[str, int, int]:
        def refuse(why: str, rule: str = "credential.assertion_invalid") -> CredentialRefusedError:
            return CredentialRefusedError(f"client assertion refused: {why}", rule)

        # Checks that do not depend on the client may say what is wrong: they reveal nothing
        # (the audit rule still says when the client is unknown).
        shape = "client.unknown" if record is None else "credential.assertion_invalid"
        if len(assertion) > MAX_ASSERTION_BYTES:
            raise refuse(f"larger than {MAX_ASSERTION_BYTES} bytes", shape)
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            raise refuse("not a JWS compact serialization", shape) from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in ASSERTION_ALGORITHMS:
            raise refuse(f"alg must be EdDSA, ES256, RS256 or PS256, not {str(algorithm)[:20]!r}", shape)
        forbidden = [m for m in _FORBIDDEN_HEADER_MEMBERS if m in header]
        if forbidden:
            raise refuse(f"header member {forbidden[0]!r} is not accepted", shape)

        # From here on the answer is the same for every failure that depends on the client.
        failed: str | None = None
        jwk = record.public_jwk if record is not None else None
        if record is None:
            failed = "client.unknown"
        elif jwk is None:
            failed = "credential.no_key"
        elif not _key_fits(jwk, algorithm):
            failed = "credential.assertion_invalid"
        key = (
            _dummy_key(algorithm)
            if failed is not None or jwk is None
            else _verification_key(json.dumps(check_public_jwk(jwk), sort_keys=True), algorithm)
        )
        try:
            claims = jwt.decode(
                assertion,
                key,
                algorithms=[algorithm],
                # Only the signature here; times, aud and iss are checked below.
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "require": [],
                },
            )
        except jwt.InvalidSignatureError:
            raise _generic(failed or "credential.assertion_invalid") from None
        except (jwt.PyJWTError, ValueError) as exc:
            if failed is not None:
                raise _generic(failed) from None
            raise refuse(str(exc)[:200] or type(exc).__name__) from None
        if failed is not None:  # unreachable: a dummy key verifies nothing
            raise _generic(failed)

        # The signature verified with the client's key: the client may learn the details.
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise refuse("iss and sub must both be the client id")
        aud = claims.get("aud")
        if not isinstance(aud, str):
            raise refuse(
                f"aud must be one string, the broker's issuer {self.assertion_audience!r} or its token endpoint "
                f"{self.token_endpoint!r} (not an array)",
                "credential.assertion_audience",
            )
        if aud not in self._audiences:
            raise refuse(
                f"aud must be the broker's issuer {self.assertion_audience!r} or its token endpoint "
                f"{self.token_endpoint!r}",
                "credential.assertion_audience",
            )
        exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
        for name, value in (("exp", exp), ("iat", iat), ("nbf", nbf)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise refuse(f"{name} must be an integer (seconds since the epoch)")
        if not isinstance(exp, int):
            raise refuse("exp is required")
        if exp + self._leeway <= now:
            raise refuse("it has expired", "credential.assertion_expired")
        if (iat is not None and iat > now + self._leeway) or (nbf is not None and nbf > now + self._leeway):
            raise refuse("iat or nbf is in the future", "credential.assertion_not_yet_valid")
        if exp - (iat if iat is not None else now) > self.max_assertion_lifetime or (
            exp - now > self.max_assertion_lifetime + self._leeway
        ):
            raise refuse(
                f"it lives longer than {self.max_assertion_lifetime} s: sign assertions with a short exp",
                "credential.assertion_lifetime",
            )
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 1 <= len(jti) <= 256:
            raise refuse("jti (a unique id of 1 to 256 characters) is required")
        # For the store's epoch check: when it was signed (without iat, the earliest it could
        # have been: exp minus the longest lifetime). Left open, and said in the README: the
        # epoch has one-second resolution and trusts the client's iat, so an assertion used
        # in the same second as a state loss, or stamped up to the leeway ahead and used that
        # close before it, could be accepted once more. Closing that would refuse every
        # assertion for the first seconds after each broker start.
        issued_at = iat if iat is not None else exp - self.max_assertion_lifetime
        key_text = f"assertion:{len(client_id)}:{client_id}:{jti}"  # length-prefixed: unambiguous
        return key_text, issued_at, exp + self._leeway

    @staticmethod
    def _remembered(record: ClientRecord, outcome: Remembered) -> None:
        """Raises unless the store recorded the assertion's jti for the first time."""
        if outcome is Remembered.NEW:
            return
        cid = record.client_id
        if outcome is Remembered.STALE:
            raise CredentialRefusedError(
                f"client assertion of {cid!r} refused: the broker's replay state was reset after it was signed, "
                "so its earlier use cannot be ruled out: sign a new assertion",
                "credential.assertion_stale",
            )
        if outcome is Remembered.FULL:
            raise ClientThrottledError(
                f"client {cid!r} has used its quota of assertion records: retry when older assertions expire, or "
                "sign assertions with a shorter exp",
                "credential.quota",
                authenticated=True,
            )
        # SEEN, or anything the store may answer in the future: fail closed.
        raise CredentialRefusedError(
            f"client assertion of {cid!r} refused: it was already used (sign a new one per request)",
            "credential.assertion_replayed",
        )

    def _check_policy(
        self, record: ClientRecord, audience: str, scopes: Iterable[str] | str | None, client_ip: str | None
    ) -> None:
        cid = record.client_id
        if audience not in record.allowed_audiences:
            allowed = ", ".join(record.allowed_audiences) or "none"
            flags = " ".join(f"--audience {a}" for a in (*record.allowed_audiences, audience))
            raise ClientRefusedError(
                f"client {cid!r} may not get tokens for audience {audience!r} (allowed: {allowed}): the broker "
                f"operator can allow it with `tokenbroker clients update {cid} {flags}`",
                "audience.not_allowed",
            )
        requested = _scope_list(scopes)
        missing = [s for s in dict.fromkeys(requested) if s not in record.allowed_scopes]
        if missing:
            raise ClientRefusedError(
                f"client {cid!r} may not get scope(s) {' '.join(missing)} (allowed: "
                f"{' '.join(record.allowed_scopes) or 'none'})",
                "scope.not_allowed",
            )
        if record.allowed_cidrs:
            address = parse_ip(client_ip) if client_ip else None
            if address is None or not any(address in net for net in _networks(record.allowed_cidrs)):
                raise ClientRefusedError(
                    f"client {cid!r} may not get tokens from {client_ip or 'an unknown address'!s} "
                    f"(allowed networks: {', '.join(record.allowed_cidrs)})",
                    "source.cidr",
                )

    @staticmethod
    def check_binding(record: ClientRecord, dpop_jkt: str | None, cert_thumbprint: str | None) -> None:
        """The request binds the token as the client's `binding` says: a `dpop` client
        sends `dpop_jkt` (and no certificate), an `mtls` client `cert_thumbprint` (and no
        DPoP key), a `bearer` client neither (a key it sends would be ignored by servers
        that accept its Bearer tokens, so it is refused rather than silently dropped)."""
        cid = record.client_id
        binding = Binding(record.binding)
        change = f"`tokenbroker clients update {cid} --binding ...`"
        if binding is Binding.DPOP and (not dpop_jkt or cert_thumbprint):
            raise ClientRefusedError(
                f"client {cid!r} has binding dpop: send dpop_jkt (the thumbprint of its DPoP key) and no "
                f"cert_thumbprint, or the broker operator can change the binding with {change}",
                "binding.dpop_required",
            )
        if binding is Binding.MTLS and (not cert_thumbprint or dpop_jkt):
            raise ClientRefusedError(
                f"client {cid!r} has binding mtls: send cert_thumbprint (of its client certificate) and no "
                f"dpop_jkt, or the broker operator can change the binding with {change}",
                "binding.mtls_required",
            )
        if binding is Binding.BEARER and (dpop_jkt or cert_thumbprint):
            raise ClientRefusedError(
                f"client {cid!r} has binding bearer: send neither dpop_jkt nor cert_thumbprint, or the broker "
                f"operator can bind its tokens with {change}",
                "binding.bearer_only",
            )

    # -- entry points -------------------------------------------------------------------

    def _verify(
        self,
        client_id: str,
        client_assertion: str | None,
        client_secret: str | None,
        client_ip: str | None,
        now: int,
        *,
        cimd: tuple[ClientRecord, list[dict[str, str]]] | None = None,
    ) -> tuple[ClientRecord, tuple[str, int, int] | None, str, bool]:
        """The verified client's record, its assertion's replay record, the source's
        rate-limit key and whether the client id is over its failure limit; then its status
        is checked (before anything is recorded for it)."""
        source = source_key(str(parse_ip(client_ip) or client_ip) if client_ip else "")
        self._check_source_rate(source)
        # Looked at before verifying, charged after: a correct credential passes anyway.
        throttled = not self._client_failures.allowed(client_id)
        try:
            if cimd is not None:
                if client_secret or not client_assertion:
                    raise _generic("credential.no_secret")  # a CIMD client authenticates with its keys
                record = cimd[0]
                replay: tuple[str, int, int] | None = self._check_cimd_assertion(
                    record, cimd[1], client_id, client_assertion, now
                )
            else:
                record, replay = self._check_credential(client_id, client_assertion or None, client_secret or None, now)
        except CredentialRefusedError:
            self._charge(client_id, source)
            if throttled:
                raise self._client_throttled() from None
            raise
        self._check_status(record, now)
        return record, replay, source, throttled

    def _after_credential(
        self,
        record: ClientRecord,
        audience: str,
        scopes: Iterable[str] | str | None,
        client_ip: str | None,
        dpop_jkt: str | None,
        cert_thumbprint: str | None,
    ) -> ClientRecord:
        self._check_policy(record, audience, scopes, client_ip)
        self.check_binding(record, dpop_jkt, cert_thumbprint)
        return record

    def authenticate(
        self,
        *,
        client_id: str,
        client_assertion: str | None = None,
        client_secret: str | None = None,
        audience: str,
        scopes: Iterable[str] | str | None = (),
        client_ip: str | None = None,
        dpop_jkt: str | None = None,
        cert_thumbprint: str | None = None,
    ) -> ClientRecord:
        """The client's record when every rule passes. Raises `CredentialRefusedError`
        (an `AuthenticationError`), `ClientRefusedError` (a `ClientNotAllowedError`) or
        `ClientThrottledError` (a `RateLimitedError`), each with `.rule`;
        `StoreUnavailableError` when the replay store is down. `dpop_jkt` and
        `cert_thumbprint` are what the token is to be bound to (see `check_binding`)."""
        now = int(self._clock())
        record, replay, source, throttled = self._verify(client_id, client_assertion, client_secret, client_ip, now)
        if replay is not None:
            key, issued_at, until = replay
            outcome = self.store.remember(key, client_id=client_id, issued_at=issued_at, until=until, now=now)
            self._remembered_or_charge(record, outcome, source, throttled)
        return self._after_credential(record, audience, scopes, client_ip, dpop_jkt, cert_thumbprint)

    async def aauthenticate(
        self,
        *,
        client_id: str,
        client_assertion: str | None = None,
        client_secret: str | None = None,
        audience: str,
        scopes: Iterable[str] | str | None = (),
        client_ip: str | None = None,
        dpop_jkt: str | None = None,
        cert_thumbprint: str | None = None,
    ) -> ClientRecord:
        """The asyncio twin of `authenticate`."""
        now = int(self._clock())
        record, replay, source, throttled = self._verify(client_id, client_assertion, client_secret, client_ip, now)
        if replay is not None:
            key, issued_at, until = replay
            outcome = await self.store.aremember(key, client_id=client_id, issued_at=issued_at, until=until, now=now)
            self._remembered_or_charge(record, outcome, source, throttled)
        return self._after_credential(record, audience, scopes, client_ip, dpop_jkt, cert_thumbprint)

    async def aauthenticate_client(
        self,
        *,
        client_id: str,
        client_assertion: str | None = None,
        client_secret: str | None = None,
        client_ip: str | None = None,
    ) -> ClientRecord:
        """Rules 1 to 3 alone: the client proved itself and is approved (its assertion is
        now used). For a door that must know the client before it can name what is asked
        (the token endpoint: `resource` may be left out, a nonce may be required per
        client); it then calls `check_request`. Raises as `authenticate` does."""
        now = int(self._clock())
        cimd = None
        if self.cimd is not None and is_cimd_client_id(client_id):
            cimd = await self._cimd_candidate(client_id, client_ip)
        try:
            record, replay, source, throttled = self._verify(
                client_id, client_assertion, client_secret, client_ip, now, cimd=cimd
            )
        except ClientRefusedError:
            # The assertion verified with the document's keys, and the client is pending:
            # only now is a first sight recorded (and announced).
            if cimd is not None and self.cimd is not None and self.cimd.is_new(cimd[0]):
                await self.cimd.record_new(cimd[0])
            raise
        if cimd is not None and self.cimd is not None and self.cimd.is_new(record):
            await self.cimd.record_new(record)  # a trusted domain's first sight, proved
        if replay is not None:
            key, issued_at, until = replay
            outcome = await self.store.aremember(key, client_id=client_id, issued_at=issued_at, until=until, now=now)
            self._remembered_or_charge(record, outcome, source, throttled)
        return record

    async def _cimd_candidate(self, client_id: str, client_ip: str | None) -> tuple[ClientRecord, list[dict[str, str]]]:
        """A CIMD client's record and the keys that may verify its assertion: every key of
        its document while it is not approved (so only the client itself learns that it is
        pending), the pinned ones of the current document once it is. The source's failure
        limit is checked first: nobody makes the broker fetch documents for free."""
        assert self.cimd is not None
        source = source_key(str(parse_ip(client_ip) or client_ip) if client_ip else "")
        self._check_source_rate(source)
        try:
            record, document = await self.cimd.record_for(client_id)
        except (CimdFetchError, CimdDocumentError) as exc:
            self._charge(client_id, source)  # a document that cannot be used is a failed authentication
            # A document's own faults are the client's to fix and are said; why a fetch failed
            # (which address, refused, TLS, timeout) would let anyone map networks through the
            # broker, so it goes to the log only.
            if isinstance(exc, CimdFetchError):
                log.info("client metadata document fetch failed", client_id=client_id[:200], reason=exc.reason)
                why = "it could not be fetched (https only, a public address, no redirect, at most 5 KB in 5 s)"
            else:
                why = str(exc)
            raise CredentialRefusedError(
                f"the client metadata document at {client_id[:200]} cannot be used: {why}",
                f"cimd.{getattr(exc, 'reason', 'invalid')}",
            ) from None
        if record.status is ClientStatus.APPROVED:
            return record, self.cimd.pinned_keys(record, document)
        return record, list(document.keys)

    def _check_cimd_assertion(
        self, record: ClientRecord, keys: list[dict[str, str]], client_id: str, assertion: str, now: int
    ) -> tuple[str, int, int]:
        """The assertion verified with one of `keys`: the one its `kid` names, else each in
        turn (DESIGN: `kid` is optional); a key of the right kind whose claims fail stops
        the search (it was the client's key)."""
        if not keys:
            raise _generic("credential.no_key")
        try:
            kid = jwt.get_unverified_header(assertion).get("kid")
        except jwt.PyJWTError:
            kid = None
        named = [key for key in keys if kid is not None and key.get("kid") == kid]
        refused: CredentialRefusedError | None = None
        for key in (named or keys)[:16]:
            try:
                return self._check_assertion(dataclasses.replace(record, public_jwk=key), client_id, assertion, now)
            except CredentialRefusedError as exc:
                if exc.rule != "credential.assertion_invalid" or exc.args[0] != AUTH_FAILED:
                    raise
                refused = exc
        assert refused is not None
        raise refused

    def check_request(
        self,
        record: ClientRecord,
        *,
        audience: str,
        scopes: Iterable[str] | str | None = (),
        client_ip: str | None = None,
        dpop_jkt: str | None = None,
        cert_thumbprint: str | None = None,
    ) -> ClientRecord:
        """Rules 4 to 7 for a client `aauthenticate_client` returned."""
        return self._after_credential(record, audience, scopes, client_ip, dpop_jkt, cert_thumbprint)

    def _remembered_or_charge(self, record: ClientRecord, outcome: Remembered, source: str, throttled: bool) -> None:
        try:
            self._remembered(record, Remembered(outcome))
        except CredentialRefusedError:  # a replayed or stale assertion is a failed authentication
            self._charge(record.client_id, source)
            if throttled:
                raise self._client_throttled() from None
            raise


__all__ = [
    "ASSERTION_ALGORITHMS",
    "AUTH_FAILED",
    "ClientAuthenticator",
    "ClientRefusedError",
    "ClientThrottledError",
    "CredentialExpiredError",
    "CredentialRefusedError",
]
