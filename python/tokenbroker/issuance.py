"""Client authentication at issuance: who is asking for a token, and may they have it.

`ClientAuthenticator.authenticate` applies these rules in order; the first that fails
raises, and the exception's `.rule` names it for the audit log:

1. `client.unknown`: the client id is registered;
2. `client.pending` / `client.disabled`: the client is approved;
3. `credential.*`: an RFC 7523 `private_key_jwt` assertion signed by the client's
   registered key (EdDSA/Ed25519 or ES256/P-256), used once, or the client secret;
4. `audience.not_allowed`: the audience is one the client may get tokens for;
5. `scope.not_allowed`: every requested scope is allowed;
6. `source.cidr`: the request comes from one of the client's networks, when it has any.

Credential failures raise `AuthenticationError` (gRPC UNAUTHENTICATED); the others raise
`ClientNotAllowedError` (PERMISSION_DENIED)."""

from __future__ import annotations

import functools
import ipaddress
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tokenbroker.errors import AuthenticationError, ClientNotAllowedError
from tokenbroker.registry import ClientRecord, ClientStatus, Registry
from tokenbroker.registry_file import check_public_jwk, secret_matches
from tokenbroker.store.base import Store

MAX_ASSERTION_BYTES = 8 * 1024
_ALGORITHM_FOR_KEY = {("OKP", "Ed25519"): "EdDSA", ("EC", "P-256"): "ES256"}
# Header members that would make a verifier fetch or trust something outside the registry.
_FORBIDDEN_HEADER_MEMBERS = ("jku", "x5u", "jwk", "x5c", "crit")

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


class CredentialRefusedError(AuthenticationError):
    """The client's credential is missing or wrong. `.rule` names the failed check."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


class ClientRefusedError(ClientNotAllowedError):
    """The client may not have this token. `.rule` names the failed check."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


@functools.lru_cache(maxsize=4096)
def _verification_key(jwk_json: str) -> jwt.PyJWK:
    return jwt.PyJWK(json.loads(jwk_json))


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in "1.2.3.4", "::1", gRPC's "ipv4:1.2.3.4:5678" / "ipv6:[::1]:5678" or
    "host:port" forms; IPv4-mapped IPv6 becomes IPv4. None when it is none of them."""
    text = value.strip()
    for prefix in ("ipv4:", "ipv6:"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    text = text.split("%", 1)[0]  # zone index
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _scope_list(scopes: Iterable[str] | str | None) -> list[str]:
    if scopes is None:
        return []
    if isinstance(scopes, str):
        return scopes.split()
    return [s for scope in scopes for s in scope.split()]


class ClientAuthenticator:
    """Authenticates a client asking for a token and checks its policy (see module doc).

    `assertion_audience` is the broker's issuer: the `aud` a client assertion must carry.
    Assertions live at most `max_assertion_lifetime` seconds and are accepted once: their
    `jti` is remembered in the `store` (shared between replicas with Redis)."""

    def __init__(
        self,
        registry: Registry,
        store: Store,
        *,
        assertion_audience: str,
        clock: Callable[[], float] = time.time,
        max_assertion_lifetime: int = 300,
        leeway_seconds: int = 5,
    ) -> None:
        if not assertion_audience:
            raise ValueError("assertion_audience (the broker's issuer) is required")
        self.registry = registry
        self.store = store
        self.assertion_audience = assertion_audience
        self.max_assertion_lifetime = max_assertion_lifetime
        self._clock = clock
        self._leeway = leeway_seconds

    # -- the rules --------------------------------------------------------------------

    def _identify(self, client_id: str) -> ClientRecord:
        record = self.registry.client(client_id) if client_id else None
        if record is None:
            raise ClientRefusedError(
                f"client {client_id!r} is not registered: the broker operator can register it with "
                f"`tokenbroker clients add {client_id or '<id>'} ...`",
                "client.unknown",
            )
        return record

    @staticmethod
    def _check_status(record: ClientRecord) -> None:
        """After the credential: only a client that proved itself learns its status."""
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

    def _check_credential(
        self, record: ClientRecord, client_assertion: str | None, client_secret: str | None, now: int
    ) -> tuple[str, int] | None:
        """Checks the credential; returns the assertion's replay record to set, if any."""
        cid = record.client_id
        if client_assertion and client_secret:
            raise CredentialRefusedError(
                f"client {cid!r} sent both an assertion and a secret: send one credential", "credential.ambiguous"
            )
        if client_assertion:
            return self._check_assertion(record, client_assertion, now)
        if client_secret:
            if not record.secret_hash:
                raise CredentialRefusedError(
                    f"client {cid!r} has no registered secret: sign a client assertion with its registered key",
                    "credential.no_secret",
                )
            if not secret_matches(client_secret, record.secret_hash):
                raise CredentialRefusedError(f"client secret of {cid!r} is wrong", "credential.secret_invalid")
            return None
        raise CredentialRefusedError(
            f"client {cid!r} sent no credential: send a client assertion (private_key_jwt) signed with its "
            "registered key, or its client secret",
            "credential.missing",
        )

    def _check_assertion(self, record: ClientRecord, assertion: str, now: int) -> tuple[str, int]:
        cid = record.client_id

        def refuse(why: str, rule: str = "credential.assertion_invalid") -> CredentialRefusedError:
            return CredentialRefusedError(f"client assertion of {cid!r} refused: {why}", rule)

        if not record.public_jwk:
            raise CredentialRefusedError(
                f"client {cid!r} has no registered public key: use its client secret, or register a key with "
                f"`tokenbroker clients update {cid} --public-key FILE`",
                "credential.no_key",
            )
        if len(assertion) > MAX_ASSERTION_BYTES:
            raise refuse(f"larger than {MAX_ASSERTION_BYTES} bytes")
        jwk = record.public_jwk
        algorithm = _ALGORITHM_FOR_KEY.get((jwk.get("kty"), jwk.get("crv")))  # type: ignore[arg-type]
        if algorithm is None:
            raise refuse("the registered key is neither Ed25519 nor P-256", "credential.no_key")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            raise refuse("not a JWS compact serialization") from None
        if header.get("alg") != algorithm:
            raise refuse(f"alg must be {algorithm} for the registered key, not {str(header.get('alg'))[:20]!r}")
        forbidden = [m for m in _FORBIDDEN_HEADER_MEMBERS if m in header]
        if forbidden:
            raise refuse(f"header member {forbidden[0]!r} is not accepted")
        try:
            key = _verification_key(json.dumps(check_public_jwk(jwk), sort_keys=True))
            claims = jwt.decode(
                assertion,
                key,
                algorithms=[algorithm],
                # Times are checked below against the broker's clock; aud/iss here.
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False, "require": []},
                audience=self.assertion_audience,
                issuer=cid,
            )
        except jwt.InvalidAudienceError:
            raise refuse(
                f"aud must be the broker's issuer {self.assertion_audience!r}", "credential.assertion_audience"
            ) from None
        except jwt.InvalidIssuerError:
            raise refuse("iss must be the client id") from None
        except jwt.InvalidSignatureError:
            raise refuse("the signature does not verify with the registered key") from None
        except (jwt.PyJWTError, ValueError) as exc:
            raise refuse(str(exc)[:200] or type(exc).__name__) from None
        if claims.get("sub") != cid or claims.get("iss") != cid:
            raise refuse("iss and sub must both be the client id")
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
        return f"assertion:{len(cid)}:{cid}:{jti}", exp + self._leeway  # length-prefixed: unambiguous

    @staticmethod
    def _replayed(record: ClientRecord) -> CredentialRefusedError:
        return CredentialRefusedError(
            f"client assertion of {record.client_id!r} refused: it was already used (sign a new one per request)",
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
            address = _parse_ip(client_ip) if client_ip else None
            if address is None or not any(address in net for net in _networks(record.allowed_cidrs)):
                raise ClientRefusedError(
                    f"client {cid!r} may not get tokens from {client_ip or 'an unknown address'!s} "
                    f"(allowed networks: {', '.join(record.allowed_cidrs)})",
                    "source.cidr",
                )

    # -- entry points -------------------------------------------------------------------

    def authenticate(
        self,
        *,
        client_id: str,
        client_assertion: str | None = None,
        client_secret: str | None = None,
        audience: str,
        scopes: Iterable[str] | str | None = (),
        client_ip: str | None = None,
    ) -> ClientRecord:
        """The client's record when every rule passes. Raises `CredentialRefusedError`
        (an `AuthenticationError`) or `ClientRefusedError` (a `ClientNotAllowedError`),
        each with `.rule`; `StoreUnavailableError` when the replay store is down."""
        now = int(self._clock())
        record = self._identify(client_id)
        replay = self._check_credential(record, client_assertion or None, client_secret or None, now)
        if replay is not None and not self.store.remember(replay[0], until=replay[1], now=now):
            raise self._replayed(record)
        self._check_status(record)
        self._check_policy(record, audience, scopes, client_ip)
        return record

    async def aauthenticate(
        self,
        *,
        client_id: str,
        client_assertion: str | None = None,
        client_secret: str | None = None,
        audience: str,
        scopes: Iterable[str] | str | None = (),
        client_ip: str | None = None,
    ) -> ClientRecord:
        """The asyncio twin of `authenticate`."""
        now = int(self._clock())
        record = self._identify(client_id)
        replay = self._check_credential(record, client_assertion or None, client_secret or None, now)
        if replay is not None and not await self.store.aremember(replay[0], until=replay[1], now=now):
            raise self._replayed(record)
        self._check_status(record)
        self._check_policy(record, audience, scopes, client_ip)
        return record


# -- for clients, tests and the CLI ----------------------------------------------------


def load_private_key(key: PrivateKey | bytes | str) -> PrivateKey:
    """A client's private key from a key object or PKCS#8/SEC1 PEM; Ed25519 or P-256 only."""
    if isinstance(key, str):
        key = key.encode("ascii")
    if isinstance(key, bytes):
        try:
            loaded = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
        key = loaded  # type: ignore[assignment]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ValueError("client keys must be Ed25519 or EC P-256")


def public_jwk(key: Any) -> dict[str, str]:
    """The public JWK of an Ed25519 or P-256 key: a private or public key object, or PEM."""
    if isinstance(key, str):
        key = key.encode("ascii")
    if isinstance(key, bytes):
        if b"PRIVATE KEY" in key:
            key = load_private_key(key)
        else:
            try:
                key = serialization.load_pem_public_key(key)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"not a PEM public or private key: {exc}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        key = key.public_key()
    if isinstance(key, ed25519.Ed25519PublicKey):
        jwk: Mapping[str, Any] = jwt.algorithms.OKPAlgorithm.to_jwk(key, as_dict=True)
    elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
    else:
        raise ValueError("client keys must be Ed25519 or EC P-256")
    return check_public_jwk(jwk)


def make_client_assertion(
    private_key: PrivateKey | bytes | str,
    client_id: str,
    audience: str,
    *,
    kid: str | None = None,
    lifetime: int = 60,
    now: int | None = None,
) -> str:
    """An RFC 7523 client assertion: `iss` = `sub` = `client_id`, `aud` = the broker's
    issuer, a fresh `jti`, valid for `lifetime` seconds. EdDSA for Ed25519, ES256 for P-256."""
    key = load_private_key(private_key)
    algorithm = "EdDSA" if isinstance(key, ed25519.Ed25519PrivateKey) else "ES256"
    issued = int(time.time()) if now is None else now
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": issued,
        "exp": issued + lifetime,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid} if kid else None)


__all__ = [
    "ClientAuthenticator",
    "ClientRefusedError",
    "CredentialRefusedError",
    "load_private_key",
    "make_client_assertion",
    "public_jwk",
]
