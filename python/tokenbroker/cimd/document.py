"""Is a fetched Client ID Metadata Document an acceptable description of its client?

The checks, in order: the document's `client_id` is the URL it came from, exactly (simple
string comparison, RFC 3986 6.2.1: otherwise any page could claim to be any client); it
holds no client secret (a document is public, so a secret in it is a leaked one); its
`token_endpoint_auth_method` is `private_key_jwt` (the only method a public document can
support); its keys come from `jwks` or from `jwks_uri`, not both (RFC 7591 2), and the
`jwks_uri` is fetched by the same guarded fetcher under the same rules. Every key must be
a public signing key `registry_file.check_public_jwk` accepts (Ed25519, P-256, RSA of
2048 to 8192 bits); `use: enc` keys are skipped, but a private member in any key refuses
the document. The result carries the keys' RFC 7638 thumbprints, the set that approval
pins, and the document's domain, which `cimd_trusted_domains` is matched against."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from tokenbroker.cimd.errors import CimdDocumentError, CimdFetchError
from tokenbroker.cimd.fetch import CimdFetcher
from tokenbroker.cimd.url import parse_cimd_url
from tokenbroker.errors import InvalidArgumentError
from tokenbroker.jwk import thumbprint
from tokenbroker.registry_file import check_public_jwk

AUTH_METHOD = "private_key_jwt"
MAX_KEYS = 16
MAX_CLIENT_NAME_LENGTH = 200
_SECRET_MEMBERS = ("client_secret", "client_secret_expires_at")
_PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k", "oth")


@dataclass(frozen=True)
class ClientDocument:
    """A checked document: who the client is and the keys it signs with.

    `fingerprint` (hex SHA-256 of the document's exact bytes), `jwks_fingerprint` (of the
    `jwks_uri` key set's bytes), the lifetimes and `stale` are set by
    `load_client_document`; `check_document` alone leaves them empty."""

    client_id: str
    domain: str
    client_name: str | None
    keys: tuple[dict[str, str], ...]
    thumbprints: frozenset[str]
    jwks_uri: str | None = None
    fingerprint: str | None = None
    jwks_fingerprint: str | None = None
    fetched_at: float | None = None
    fresh_until: float | None = None
    usable_until: float | None = None
    stale: bool = False  # the document or its key set is a last good copy after a failed refetch


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """The RFC 7638 thumbprint of a key `check_public_jwk` returned (the one pinned)."""
    return thumbprint(jwk)


@dataclass(frozen=True)
class _Metadata:
    domain: str
    client_name: str | None
    jwks: Any
    jwks_uri: str | None


def _check_metadata(url: str, document: Mapping[str, Any]) -> _Metadata:
    """Everything but the keys, so that a refused document costs no `jwks_uri` fetch."""
    target = parse_cimd_url(url)
    if not isinstance(document, Mapping):
        raise CimdDocumentError("bad_metadata", "the client document must be a JSON object")
    client_id = document.get("client_id")
    if not isinstance(client_id, str) or client_id != url:
        shown = repr(client_id[:100]) if isinstance(client_id, str) else "missing"
        raise CimdDocumentError(
            "client_id_mismatch",
            f"the document's client_id ({shown}) is not the URL it is served at: it must be exactly {url[:200]!r}",
        )
    present_secrets = [name for name in _SECRET_MEMBERS if name in document]
    if present_secrets:
        raise CimdDocumentError(
            "client_secret",
            f"the document holds {present_secrets[0]}: a metadata document is public, so it must not carry a "
            "secret; remove it, rotate the secret, and authenticate with private_key_jwt",
        )
    method = document.get("token_endpoint_auth_method")
    if method != AUTH_METHOD:
        shown = repr(method[:40]) if isinstance(method, str) else "missing"
        raise CimdDocumentError(
            "auth_method",
            f"the document's token_endpoint_auth_method is {shown}: it must be {AUTH_METHOD!r} "
            "(a client id metadata document cannot hold a shared secret)",
        )
    client_name = document.get("client_name")
    if client_name is not None and (
        not isinstance(client_name, str) or len(client_name) > MAX_CLIENT_NAME_LENGTH or not client_name.isprintable()
    ):
        raise CimdDocumentError(
            "bad_metadata",
            f"the document's client_name must be a string of at most {MAX_CLIENT_NAME_LENGTH} printable characters",
        )
    has_jwks, jwks_uri = "jwks" in document, document.get("jwks_uri")
    if has_jwks and "jwks_uri" in document:
        raise CimdDocumentError(
            "both_jwks", "the document has both jwks and jwks_uri: keep one of them (RFC 7591 section 2)"
        )
    if jwks_uri is not None:
        if not isinstance(jwks_uri, str):
            raise CimdDocumentError("bad_metadata", "the document's jwks_uri must be an https:// URL string")
        try:
            parse_cimd_url(jwks_uri, what="jwks_uri")
        except CimdFetchError as error:
            raise CimdDocumentError("bad_metadata", str(error)) from None
    elif not has_jwks:
        raise CimdDocumentError(
            "no_keys", "the document has no keys: publish the client's public keys in jwks or at a jwks_uri"
        )
    return _Metadata(domain=target.host, client_name=client_name, jwks=document.get("jwks"), jwks_uri=jwks_uri)


def _check_keys(jwks: Any, where: str) -> tuple[tuple[dict[str, str], ...], frozenset[str]]:
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        raise CimdDocumentError("bad_jwks", f"the {where} must be a JSON object with a 'keys' list (a JWK Set)")
    members = jwks["keys"]
    if len(members) > MAX_KEYS:
        raise CimdDocumentError("bad_jwks", f"the {where} has {len(members)} keys: at most {MAX_KEYS} are accepted")
    keys: list[dict[str, str]] = []
    for index, jwk in enumerate(members):
        name = f"{where} key {index}"
        if not isinstance(jwk, Mapping):
            raise CimdDocumentError("bad_key", f"{name} must be a JWK object")
        if any(member in jwk for member in _PRIVATE_JWK_MEMBERS):
            raise CimdDocumentError(
                "bad_key",
                f"{name} holds private key material: publish public keys only, and replace the exposed key",
            )
        if jwk.get("use") == "enc":
            continue  # an encryption key: not for client authentication
        try:
            keys.append(check_public_jwk(jwk, where=name))
        except InvalidArgumentError as error:
            raise CimdDocumentError("bad_key", str(error)) from None
    if not keys:
        raise CimdDocumentError("no_keys", f"the {where} has no signing key (use 'sig' or none)")
    return tuple(keys), frozenset(jwk_thumbprint(jwk) for jwk in keys)


def check_document(url: str, document: Mapping[str, Any], *, jwks: Mapping[str, Any] | None = None) -> ClientDocument:
    """The checked description of the client at `url`, or raises `CimdDocumentError`
    (`CimdFetchError` `bad_url`/`not_https` when `url` itself is not a CIMD URL). For a
    document with a `jwks_uri`, pass the key set fetched from it as `jwks`
    (`load_client_document` does both)."""
    metadata = _check_metadata(url, document)
    if metadata.jwks_uri is not None:
        if jwks is None:
            raise CimdDocumentError(
                "jwks_uri_not_fetched",
                "the document names a jwks_uri: fetch it (load_client_document) and pass its key set as jwks",
            )
        keys, thumbprints = _check_keys(jwks, "key set at the jwks_uri")
    else:
        keys, thumbprints = _check_keys(metadata.jwks, "document's jwks")
    return ClientDocument(
        client_id=url,
        domain=metadata.domain,
        client_name=metadata.client_name,
        keys=keys,
        thumbprints=thumbprints,
        jwks_uri=metadata.jwks_uri,
    )


async def load_client_document(
    fetcher: CimdFetcher, url: str, *, approved: bool = False, refresh: bool = False
) -> ClientDocument:
    """Fetches the document at `url` (and its `jwks_uri`, with the same fetcher and
    rules) and checks it. Raises `CimdFetchError` or `CimdDocumentError`. A stale answer
    (last good copy after a failed refetch) gives `stale=True`; the lifetimes are the
    shorter of the document's and the key set's. `refresh` is `CimdFetcher.fetch`'s, for both."""
    fetched = await fetcher.fetch(url, approved=approved, refresh=refresh)
    metadata = _check_metadata(url, fetched.document)
    key_set = None
    if metadata.jwks_uri is not None:
        key_set = await fetcher.fetch(metadata.jwks_uri, approved=approved, refresh=refresh)
    checked = check_document(url, fetched.document, jwks=key_set.document if key_set is not None else None)
    parts = (fetched,) if key_set is None else (fetched, key_set)
    return replace(
        checked,
        fingerprint=fetched.fingerprint,
        jwks_fingerprint=key_set.fingerprint if key_set is not None else None,
        fetched_at=min(part.fetched_at for part in parts),
        fresh_until=min(part.fresh_until for part in parts),
        usable_until=min(part.usable_until for part in parts),
        stale=any(part.stale for part in parts),
    )
