"""Workload attestation: a workload proves who it is with a JWT-SVID (SPIFFE) or a JWT of
another attester, signed by a key of a trust domain the operator configured.

The setting `attesters` maps each trust domain ("example.org") to where its keys are: a
JWKS file, a SPIFFE trust bundle file (a JWKS whose keys have `use` "jwt-svid" or
"x509-svid"; only the jwt-svid ones verify JWTs) or an https URL serving either, fetched
through the injected guarded fetcher (this module opens no connection itself).

`Attesters.verify` applies the JWT-SVID rules of the SPIFFE specification, each failure an
`AttestationError` whose `.reason` names it for the audit log:

- `attestation.malformed` / `attestation.too_large`: a JWS compact serialization of at
  most 8 KiB whose header and payload are JSON objects;
- `attestation.algorithm`: `alg` is ES256, ES384, RS256, PS256 or EdDSA, and the selected
  key is of that algorithm's type (never "none", never HS*: a trust bundle holds public keys);
- `attestation.header`: no `jku`, `x5u`, `jwk`, `x5c` or `crit` (they would make the
  verifier fetch or trust a key outside the bundle), `typ` absent, "JWT" or "JOSE";
- `attestation.subject_invalid` / `attestation.trust_domain_unknown`: `sub` is a SPIFFE
  ID `spiffe://<trust domain>/<path>` of a configured trust domain;
- `attestation.key_unknown`: the header's `kid` names a key of THAT domain's bundle (a
  `kid` is required when the bundle has several keys): a key of domain A never verifies a
  `sub` of domain B, which is why the domain is chosen from `sub` before any key is;
- `attestation.keys_unavailable`: the domain's bundle (an https one) was never fetched, or
  its last good copy is older than the staleness bound;
- `attestation.signature_invalid`; then, on the verified claims:
- `attestation.audience`: `aud` (a string or an array of strings) contains the audience;
- `attestation.expired`, `attestation.not_yet_valid`, `attestation.lifetime`: `exp` is
  required, the token lives at most `max_lifetime` seconds (`exp - iat`; without `iat`,
  `exp - now`), with `leeway` seconds of clock skew;
- `attestation.subject_mismatch`: `sub` equals `expected_subject` when one is given.

Messages say what to fix and never contain the token (only short, quoted pieces of its
header and claims).

Replay: a JWT-SVID may be presented to several audiences during its short life, so the
SPIFFE spec makes `jti` optional. This module does not remember tokens; the caller records
`Attestation.replay` once in its store (`Store.remember(key, issued_at=..., until=...)`)
and refuses the token when the store has seen it. Without `jti` the key is a hash of the
JWS signing input (header and payload), not of the whole token: an ECDSA signature can be
rewritten into another valid one (s into n - s) by anybody, so a hash of the token would
let the same SVID pass twice."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tokenbroker.config import ConfigError
from tokenbroker.errors import AuthenticationError
from tokenbroker.jwk import thumbprint

log = logging.getLogger(__name__)

FetchJwks = Callable[[str], Awaitable[bytes]]
"""The guarded https fetcher: the URL's body, or raises (any exception: a failed fetch)."""

MAX_SVID_BYTES = 8 * 1024
# A SPIFFE bundle also carries the X.509 CA certificates (x5c): larger than a plain JWKS.
MAX_BUNDLE_BYTES = 1024 * 1024
MAX_KEYS_PER_DOMAIN = 64
MAX_SPIFFE_ID_BYTES = 2048
MAX_KID_CHARS = 256
MAX_JTI_CHARS = 256
# https bundles: refreshed after `spiffe_refresh_hint` (or `refresh_seconds`), kept within
# these bounds; after a failed fetch, retried no sooner than RETRY_SECONDS; the last good
# copy is used for at most `max_stale_seconds` past its refresh time. An unknown kid makes
# a refetch (a key may just have been added) at most every KID_REFETCH_SECONDS.
MIN_REFRESH_SECONDS = 30
MAX_REFRESH_SECONDS = 3600
RETRY_SECONDS = 10
KID_REFETCH_SECONDS = 30
# A file's bundle is re-read when the file changes (checked at most this often).
FILE_CHECK_SECONDS = 1.0

SVID_ALGORITHMS = ("ES256", "ES384", "RS256", "PS256", "EdDSA")
_RSA_BITS = (2048, 8192)
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_FORBIDDEN_HEADER_MEMBERS = ("jku", "x5u", "jwk", "x5c", "crit")
_ALLOWED_TYP = ("JWT", "JOSE")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


class AttestationError(AuthenticationError):
    """An attestation was refused. `.reason` names the failed rule (see the module doc);
    `.rule` is the same string, for the audit log's field of that name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def rule(self) -> str:
        return self.reason


@dataclass(frozen=True, slots=True)
class Attestation:
    """A verified attestation. `replay` is what the caller records once in its store:
    (key, issued_at, until), where issued_at is `iat` or, without it, the earliest the token
    could have been signed (exp - max_lifetime), and until is exp + leeway."""

    subject: str
    trust_domain: str
    issued_at: int | None
    expires_at: int
    jti: str | None
    key_thumbprint: str
    key_id: str | None
    algorithm: str
    replay: tuple[str, int, int]


# -- SPIFFE IDs -------------------------------------------------------------------------


def check_trust_domain(name: str) -> str:
    """`name` when it is a SPIFFE trust domain name (lowercase letters, digits, '.', '-',
    '_'; 1 to 255 characters), else raises `ValueError` saying how to write it."""
    if not isinstance(name, str) or not _TRUST_DOMAIN.fullmatch(name):
        text = str(name)[:80]
        hint = ""
        if text.startswith("spiffe://"):
            hint = f": write the trust domain alone ({text.removeprefix('spiffe://').split('/', 1)[0]!r})"
        elif text.lower() != text:
            hint = ": trust domain names are lowercase"
        raise ValueError(
            f"{text!r} is not a SPIFFE trust domain name (1 to 255 lowercase letters, digits, '.', '-' or '_', "
            f"like 'example.org'){hint}"
        )
    return name


def parse_spiffe_id(value: str) -> tuple[str, str]:
    """(trust domain, path) of a workload's SPIFFE ID `spiffe://<trust domain>/<path>`, or
    raises `ValueError` saying what is wrong. The path is required (an ID without one names
    the trust domain, not a workload) and is made of non-empty segments of letters, digits,
    '.', '-' and '_', none of them "." or ".."; no query, fragment, port or user."""
    if not isinstance(value, str):
        raise ValueError("a SPIFFE ID must be a string like 'spiffe://example.org/ns/prod/sa/api'")
    shown = repr(value[:80])
    if len(value.encode("utf-8")) > MAX_SPIFFE_ID_BYTES:
        raise ValueError(f"SPIFFE ID {shown}... is longer than {MAX_SPIFFE_ID_BYTES} bytes")
    if not value.startswith("spiffe://"):
        raise ValueError(f"{shown} is not a SPIFFE ID: it must start with 'spiffe://' (lowercase)")
    rest = value[len("spiffe://") :]
    domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise ValueError(
            f"SPIFFE ID {shown} has no valid trust domain: lowercase letters, digits, '.', '-' and '_' only "
            "(no port, user or percent-encoding)"
        )
    if not slash or not path:
        raise ValueError(f"SPIFFE ID {shown} has no path: a workload's ID is spiffe://{domain}/<path>")
    for segment in path.split("/"):
        if not segment:
            raise ValueError(f"SPIFFE ID {shown} has an empty path segment (a '//' or a trailing '/')")
        if segment in (".", ".."):
            raise ValueError(f"SPIFFE ID {shown} has a '.' or '..' path segment")
        if not _PATH_SEGMENT.fullmatch(segment):
            raise ValueError(
                f"SPIFFE ID {shown} has a path segment with a character other than letters, digits, '.', '-' and '_'"
            )
    return domain, "/" + path


# -- keys and bundles -------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class _Key:
    """One public key of a trust domain, loaded once for each algorithm it may verify."""

    kid: str | None
    kind: str  # "Ed25519", "EC P-256", "EC P-384", "RSA 2048", for messages
    thumbprint: str
    verifiers: Mapping[str, jwt.PyJWK]  # algorithm -> key bound to it


def _algorithms_of(jwk: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The key's kind and the SVID algorithms it may verify, or raises `ValueError`."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    algorithms: tuple[str, ...]
    if kty == "OKP" and crv == "Ed25519":
        kind, algorithms = "Ed25519", ("EdDSA",)
    elif kty == "EC" and crv == "P-256":
        kind, algorithms = "EC P-256", ("ES256",)
    elif kty == "EC" and crv == "P-384":
        kind, algorithms = "EC P-384", ("ES384",)
    elif kty == "RSA":
        kind, algorithms = "RSA", ("RS256", "PS256")
    else:
        raise ValueError(
            f"key type {str(kty)[:20]}/{str(crv)[:20]} is not supported (Ed25519, EC P-256, EC P-384 or RSA)"
        )
    named = jwk.get("alg")
    if named is not None:
        if named == "Ed25519" and algorithms == ("EdDSA",):
            named = "EdDSA"
        if named not in algorithms:
            raise ValueError(f"a {kind} key cannot verify alg {str(named)[:20]!r} (use {' or '.join(algorithms)})")
        algorithms = (named,)
    return kind, algorithms


def _load_key(jwk: Mapping[str, Any]) -> _Key:
    """A public key of a bundle, checked (type, size, point on the curve), or raises
    `ValueError` saying why it cannot be used."""
    if any(member in jwk for member in _PRIVATE_MEMBERS):
        raise ValueError("it holds private key material: a trust bundle must hold public keys only")
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or not 1 <= len(kid) <= MAX_KID_CHARS):
        raise ValueError(f"its kid must be a string of 1 to {MAX_KID_CHARS} characters")
    kind, algorithms = _algorithms_of(jwk)
    members = {m: jwk[m] for m in ("kty", "crv", "x", "y", "n", "e") if m in jwk}
    try:
        verifiers = {a: jwt.PyJWK(members, algorithm=a) for a in algorithms}
    except (jwt.PyJWTError, ValueError, TypeError, KeyError, binascii.Error) as exc:
        raise ValueError(f"its {kind} members do not form a valid public key ({str(exc)[:100]})") from None
    public = next(iter(verifiers.values())).key
    canonical: Mapping[str, Any]
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        if not _RSA_BITS[0] <= public.key_size <= _RSA_BITS[1]:
            raise ValueError(f"it is an RSA key of {public.key_size} bits: {_RSA_BITS[0]} to {_RSA_BITS[1]} accepted")
        if numbers.e < 3 or numbers.e % 2 == 0 or numbers.e.bit_length() > 256:
            raise ValueError("its RSA public exponent is unusual (65537, 'AQAB', is the usual one)")
        kind = f"RSA {public.key_size}"
        canonical = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        canonical = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ed25519.Ed25519PublicKey):
        canonical = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    else:  # an X448/Ed448 OKP key would load; it is refused by _algorithms_of first
        raise ValueError(f"{kind} did not load as a public key")
    return _Key(kid=kid, kind=kind, thumbprint=thumbprint(canonical), verifiers=verifiers)


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The keys of one trust domain that verify JWTs, by `kid`; the SPIFFE bundle's
    `spiffe_refresh_hint` (seconds) and `spiffe_sequence`, when it has them."""

    keys: tuple[_Key, ...]
    by_kid: Mapping[str, _Key]
    refresh_hint: int | None
    sequence: int | None


def _optional_int(document: Mapping[str, Any], member: str) -> int | None:
    value = document.get(member)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{member} must be a non-negative integer")
    return value


def parse_bundle(data: bytes) -> TrustBundle:
    """The JWT-verifying keys of a JWKS or SPIFFE trust bundle, or raises `ValueError`
    saying what is wrong. In a SPIFFE bundle (one with `spiffe_*` members or keys whose
    `use` is "jwt-svid" or "x509-svid") only `use` "jwt-svid" keys count, and each needs a
    `kid`; in a plain JWKS, keys whose `use` is absent or "sig". Keys of other types are
    left out (the message lists why when none is left)."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise ValueError(f"it is larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"it is not JSON ({str(exc)[:80]}): a JWKS or SPIFFE bundle is a JSON object") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('it is not a JWKS: a JSON object with a "keys" array is expected')
    entries = document["keys"]
    spiffe = any(m in document for m in ("spiffe_refresh_hint", "spiffe_sequence")) or any(
        isinstance(e, dict) and e.get("use") in ("jwt-svid", "x509-svid") for e in entries
    )
    wanted_use: tuple[str | None, ...] = ("jwt-svid",) if spiffe else (None, "sig")
    keys: list[_Key] = []
    skipped: list[str] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            skipped.append(f"key {index} is not a JSON object")
            continue
        if any(member in entry for member in _PRIVATE_MEMBERS):
            raise ValueError(f"key {index} holds private key material: publish public keys only")
        if entry.get("use") not in wanted_use:
            skipped.append(f"key {index} has use {str(entry.get('use'))[:20]!r}")
            continue
        if spiffe and not entry.get("kid"):
            skipped.append(f"key {index} is a jwt-svid key without kid")
            continue
        try:
            keys.append(_load_key(entry))
        except ValueError as exc:
            skipped.append(f"key {index}: {exc}")
    if not keys:
        what = "jwt-svid keys (SPIFFE bundle)" if spiffe else "signing keys"
        why = f" ({'; '.join(skipped[:5])})" if skipped else ""
        raise ValueError(f"it has no usable {what}{why}")
    if len(keys) > MAX_KEYS_PER_DOMAIN:
        raise ValueError(f"it has {len(keys)} usable keys: at most {MAX_KEYS_PER_DOMAIN} are accepted")
    by_kid: dict[str, _Key] = {}
    for key in keys:
        if key.kid is not None:
            if key.kid in by_kid:
                raise ValueError(f"two keys share kid {key.kid[:40]!r}: each key needs its own kid")
            by_kid[key.kid] = key
    if len(keys) > 1 and len(by_kid) < len(keys):
        raise ValueError("it has several keys and not all have a kid: give each key a kid")
    return TrustBundle(
        keys=tuple(keys),
        by_kid=by_kid,
        refresh_hint=_optional_int(document, "spiffe_refresh_hint"),
        sequence=_optional_int(document, "spiffe_sequence"),
    )


def _unavailable(trust_domain: str) -> AttestationError:
    """Says nothing of why the fetch failed (the log does): the fetcher's errors may name
    internal hosts, and this message goes to whoever presented the token."""
    return AttestationError(
        "attestation.keys_unavailable",
        f"attestation refused: the keys of trust domain {trust_domain!r} could not be fetched: retry later; "
        "the broker operator can check the `attesters` source of that domain (the broker's log says why)",
    )


class _FileSource:
    """A bundle file, read at start (a bad file is a configuration error) and re-read when
    it changes (SPIRE helpers rewrite it on rotation); a bad rewrite keeps the last good."""

    def __init__(self, trust_domain: str, path: Path, clock: Callable[[], float]) -> None:
        self.trust_domain = trust_domain
        self.path = path
        self._clock = clock
        try:
            self._stamp = self._stat()
            self._bundle = parse_bundle(self._read())
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ValueError(f"bundle file {path}: {exc}") from None
        self._checked_at = clock()
        self._problem: str | None = None  # the last one logged: a broken file is logged once

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> bytes:
        with open(self.path, "rb") as handle:
            return handle.read(MAX_BUNDLE_BYTES + 1)

    async def bundle(self, kid: str | None) -> TrustBundle:
        now = self._clock()
        if now - self._checked_at >= FILE_CHECK_SECONDS:
            self._checked_at = now
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._bundle = parse_bundle(self._read())
                    self._stamp = stamp
                self._problem = None
            except (OSError, ValueError) as exc:
                if str(exc) != self._problem:
                    self._problem = str(exc)
                    log.warning(
                        "attester bundle file unusable, keeping its last good keys",
                        extra={"trust_domain": self.trust_domain, "path": str(self.path), "error": str(exc)[:200]},
                    )
        return self._bundle


class _UrlSource:
    """An https bundle, fetched when first needed and again after its refresh time; a
    failed fetch keeps the last good copy for at most `max_stale` seconds more. One fetch
    at a time: while it runs, callers with a usable copy use it rather than wait."""

    def __init__(
        self,
        trust_domain: str,
        url: str,
        fetch: FetchJwks,
        clock: Callable[[], float],
        refresh_seconds: int,
        max_stale: int,
    ) -> None:
        self.trust_domain = trust_domain
        self.url = url
        self._fetch = fetch
        self._clock = clock
        self._refresh_seconds = refresh_seconds
        self._max_stale = max_stale
        self._bundle: TrustBundle | None = None
        self._fetched_at = -math.inf
        self._refresh_at = -math.inf
        self._retry_at = -math.inf
        self._lock = asyncio.Lock()

    def _usable(self, now: float) -> TrustBundle | None:
        if self._bundle is not None and now < self._refresh_at + self._max_stale:
            return self._bundle
        return None

    def _wants_fetch(self, now: float, kid: str | None) -> bool:
        if now < self._retry_at:
            return False
        if now >= self._refresh_at:
            return True
        missing = kid is not None and self._bundle is not None and kid not in self._bundle.by_kid
        return missing and now >= self._fetched_at + KID_REFETCH_SECONDS

    async def bundle(self, kid: str | None) -> TrustBundle:
        now = self._clock()
        usable = self._usable(now)
        if not self._wants_fetch(now, kid) or (usable is not None and self._lock.locked()):
            if usable is None:
                raise _unavailable(self.trust_domain)
            return usable
        async with self._lock:
            now = self._clock()
            if self._wants_fetch(now, kid):  # else another caller fetched while we waited
                await self._refresh(now)
            usable = self._usable(now)
        if usable is None:
            raise _unavailable(self.trust_domain)
        return usable

    async def _refresh(self, now: float) -> None:
        try:
            bundle = parse_bundle(await self._fetch(self.url))
        except Exception as exc:  # any failure of the fetcher or the document: keep the last good
            self._retry_at = now + RETRY_SECONDS
            log.warning(  # the reason goes to the log only: it may name internal hosts
                "attester bundle fetch failed, keeping its last good keys",
                extra={"trust_domain": self.trust_domain, "error": str(exc)[:200] or type(exc).__name__},
            )
            return
        hint = bundle.refresh_hint if bundle.refresh_hint is not None else self._refresh_seconds
        self._bundle = bundle
        self._fetched_at = now
        self._refresh_at = now + min(MAX_REFRESH_SECONDS, max(MIN_REFRESH_SECONDS, hint))
        self._retry_at = -math.inf


_Source = _FileSource | _UrlSource


# -- the verifier -----------------------------------------------------------------------


def _refuse(reason: str, why: str) -> AttestationError:
    return AttestationError(reason, f"attestation refused: {why}")


def _segment_json(segment: str, what: str) -> dict[str, Any]:
    if not _B64URL.fullmatch(segment):
        raise _refuse("attestation.malformed", f"its {what} is not base64url")
    try:
        value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error):
        raise _refuse("attestation.malformed", f"its {what} is not base64url-encoded JSON") from None
    if not isinstance(value, dict):
        raise _refuse("attestation.malformed", f"its {what} is not a JSON object")
    return value


def _numeric_date(claims: Mapping[str, Any], name: str) -> int | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _refuse("attestation.malformed", f"{name} must be a number (seconds since the epoch)")
    return int(value)


def _check_header(header: Mapping[str, Any]) -> tuple[str, str | None]:
    """The header's alg and kid, or raises."""
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in SVID_ALGORITHMS:
        raise _refuse(
            "attestation.algorithm",
            f"alg must be one of {', '.join(SVID_ALGORITHMS)}, not {str(algorithm)[:20]!r}",
        )
    forbidden = [m for m in _FORBIDDEN_HEADER_MEMBERS if m in header]
    if forbidden:
        raise _refuse(
            "attestation.header",
            f"header member {forbidden[0]!r} is not accepted: keys come from the configured trust bundle only",
        )
    typ = header.get("typ")
    if typ is not None and typ not in _ALLOWED_TYP:
        raise _refuse("attestation.header", f"typ must be 'JWT' or 'JOSE' (or absent), not {str(typ)[:20]!r}")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or not 1 <= len(kid) <= MAX_KID_CHARS):
        raise _refuse("attestation.malformed", f"kid must be a string of 1 to {MAX_KID_CHARS} characters")
    return algorithm, kid


def _select_key(bundle: TrustBundle, trust_domain: str, kid: str | None, algorithm: str) -> _Key:
    if kid is not None:
        key = bundle.by_kid.get(kid)
        if key is None:
            raise _refuse(
                "attestation.key_unknown",
                f"no key with kid {kid[:40]!r} in the bundle of trust domain {trust_domain!r}: sign with a "
                "current key of that domain",
            )
    elif len(bundle.keys) == 1:
        key = bundle.keys[0]
    else:
        raise _refuse(
            "attestation.key_unknown",
            f"the header has no kid and trust domain {trust_domain!r} has several keys: name the key in kid",
        )
    if algorithm not in key.verifiers:
        raise _refuse(
            "attestation.algorithm",
            f"alg {algorithm} does not fit the {key.kind} key it names (that key verifies "
            f"{' or '.join(key.verifiers)})",
        )
    return key


class Attesters:
    """The configured trust domains and their keys (see the module doc). Build with
    `from_setting`; `verify` is safe to call concurrently from one event loop."""

    def __init__(self, sources: Mapping[str, _Source], *, clock: Callable[[], float] = time.time) -> None:
        self._sources = dict(sources)
        self._clock = clock

    @classmethod
    def from_setting(
        cls,
        mapping: Mapping[str, str],
        *,
        fetch_jwks: FetchJwks | None = None,
        clock: Callable[[], float] = time.time,
        refresh_seconds: int = 300,
        max_stale_seconds: int = 24 * 3600,
    ) -> Attesters:
        """The attesters of the `attesters` setting: trust domain -> bundle file path or
        https URL (fetched with `fetch_jwks`, refreshed after `spiffe_refresh_hint` or
        `refresh_seconds`, between 30 s and 1 h; a failing fetch keeps the last good keys
        for `max_stale_seconds` more). Files are read now. Raises `ConfigError` with one
        line per unusable entry."""
        if not isinstance(mapping, Mapping):
            raise ConfigError("attesters must be a table: trust domain = JWKS or SPIFFE bundle file, or https URL")
        problems: list[str] = []
        sources: dict[str, _Source] = {}
        for trust_domain, where in mapping.items():
            name = f"attesters.{str(trust_domain)[:80]}"
            try:
                check_trust_domain(trust_domain)
                if not isinstance(where, str) or not where.strip():
                    raise ValueError("its value must be a bundle file path or an https URL")
                if where.startswith("https://"):
                    if fetch_jwks is None:
                        raise ValueError("an https bundle needs the broker's guarded fetcher (none was given)")
                    sources[trust_domain] = _UrlSource(
                        trust_domain, where, fetch_jwks, clock, refresh_seconds, max_stale_seconds
                    )
                elif "://" in where:
                    raise ValueError(f"{where[:80]!r} is not https: serve the bundle over https, or give a file path")
                else:
                    path = Path(where)
                    if not path.is_file():
                        raise ValueError(f"no such file {where[:200]!r}: give the path of a JWKS or SPIFFE bundle")
                    sources[trust_domain] = _FileSource(trust_domain, path, clock)
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
        if problems:
            raise ConfigError("\n".join(problems))
        return cls(sources, clock=clock)

    @property
    def trust_domains(self) -> tuple[str, ...]:
        return tuple(self._sources)

    async def verify(
        self,
        token: str,
        *,
        audience: str,
        expected_subject: str | None = None,
        max_lifetime: int = 300,
        leeway: int = 5,
    ) -> Attestation:
        """The verified attestation, or raises `AttestationError` (see the module doc).
        The caller records `Attestation.replay` once (see the module doc on replay)."""
        if not audience:
            raise ValueError("audience (the broker's issuer) is required")
        if not isinstance(token, str) or not token:
            raise _refuse("attestation.malformed", "no token was sent")
        if len(token) > MAX_SVID_BYTES:
            raise _refuse("attestation.too_large", f"it is larger than {MAX_SVID_BYTES} bytes")
        parts = token.split(".")
        if not token.isascii() or len(parts) != 3:
            raise _refuse("attestation.malformed", "it is not a JWS compact serialization (three base64url parts)")
        algorithm, kid = _check_header(_segment_json(parts[0], "header"))
        unverified = _segment_json(parts[1], "payload")

        subject = unverified.get("sub")
        if not isinstance(subject, str):
            raise _refuse("attestation.subject_invalid", "sub (the workload's SPIFFE ID, a string) is required")
        try:
            trust_domain, _ = parse_spiffe_id(subject)
        except ValueError as exc:
            raise _refuse("attestation.subject_invalid", f"sub must be the workload's SPIFFE ID: {exc}") from None
        source = self._sources.get(trust_domain)
        if source is None:
            raise _refuse(
                "attestation.trust_domain_unknown",
                f"trust domain {trust_domain!r} of its sub is not one this broker trusts (setting `attesters`)",
            )
        # Only keys of the sub's own trust domain: domain A's key never vouches for domain B.
        key = _select_key(await source.bundle(kid), trust_domain, kid, algorithm)
        try:
            claims = jwt.decode(
                token,
                key.verifiers[algorithm],
                algorithms=[algorithm],
                # The signature alone; the claims are checked below.
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_sub": False,
                    "verify_jti": False,
                    "require": [],
                },
            )
        except jwt.InvalidSignatureError:
            raise _refuse(
                "attestation.signature_invalid",
                f"its signature does not verify with key {(key.kid or key.thumbprint)[:40]!r} of trust domain "
                f"{trust_domain!r}",
            ) from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise _refuse("attestation.malformed", str(exc)[:160] or type(exc).__name__) from None
        return self._check_claims(
            claims, subject, trust_domain, key, algorithm, parts, audience, expected_subject, max_lifetime, leeway
        )

    def _check_claims(
        self,
        claims: Mapping[str, Any],
        subject: str,
        trust_domain: str,
        key: _Key,
        algorithm: str,
        parts: list[str],
        audience: str,
        expected_subject: str | None,
        max_lifetime: int,
        leeway: int,
    ) -> Attestation:
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or not audiences or not all(isinstance(a, str) for a in audiences):
            raise _refuse("attestation.audience", f"aud must be a string or an array of strings naming {audience!r}")
        # Exactly the broker: an SVID that also names other audiences could be redeemed here
        # first by any of them (for a token bound to its own key).
        if audiences != [audience]:
            raise _refuse(
                "attestation.audience",
                f"aud must be exactly {audience!r} (one audience): ask for an SVID for the broker alone",
            )
        now = int(self._clock())
        exp, iat, nbf = (_numeric_date(claims, n) for n in ("exp", "iat", "nbf"))
        if exp is None:
            raise _refuse("attestation.malformed", "exp is required")
        if exp + leeway <= now:
            raise _refuse("attestation.expired", "it has expired: fetch a fresh SVID")
        if (iat is not None and iat > now + leeway) or (nbf is not None and nbf > now + leeway):
            raise _refuse("attestation.not_yet_valid", "iat or nbf is in the future: check the workload's clock")
        if iat is not None:
            too_long = exp - iat > max_lifetime or exp - now > max_lifetime + leeway
        else:  # nothing says when it was signed: it must not outlive the bound from now on
            too_long = exp - now > max_lifetime
        if too_long:
            raise _refuse(
                "attestation.lifetime",
                f"it lives longer than {max_lifetime} s: ask the attester for a shorter-lived SVID",
            )
        jti = claims.get("jti")
        if jti is not None and (not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI_CHARS):
            raise _refuse("attestation.malformed", f"jti must be a string of 1 to {MAX_JTI_CHARS} characters")
        if expected_subject is not None and subject != expected_subject:
            raise _refuse(
                "attestation.subject_mismatch",
                f"its SPIFFE ID {subject[:200]!r} is not the one registered for this client",
            )
        if jti is not None:
            replay_key = f"attestation:{len(subject)}:{subject}:{jti}"  # length-prefixed: unambiguous
        else:
            signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
            replay_key = f"attestation-sha256:{_b64url(hashlib.sha256(signing_input).digest())}"
        issued_for_epoch = iat if iat is not None else exp - max_lifetime
        return Attestation(
            subject=subject,
            trust_domain=trust_domain,
            issued_at=iat,
            expires_at=exp,
            jti=jti,
            key_thumbprint=key.thumbprint,
            key_id=key.kid,
            algorithm=algorithm,
            replay=(replay_key, issued_for_epoch, exp + leeway),
        )


__all__ = [
    "SVID_ALGORITHMS",
    "Attestation",
    "AttestationError",
    "Attesters",
    "FetchJwks",
    "TrustBundle",
    "check_trust_domain",
    "parse_bundle",
    "parse_spiffe_id",
]
