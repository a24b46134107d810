"""Checking a Client ID Metadata Document and its keys (tokenbroker.cimd.document), and
`cimd_trusted_domains` matching (tokenbroker.cimd.trust).

The documents that are fetched come from the real local HTTPS server of
tests/support/https_servers.py, on 127.0.0.1 with `allow_loopback`, or through an
injected resolver and connector: no test sends a packet off the machine."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc.jwk import ECKey, OKPKey, RSAKey

from tokenbroker import _core
from tokenbroker.cimd import (
    CimdDocumentError,
    CimdFetcher,
    CimdFetchError,
    check_document,
    check_trusted_domains,
    jwk_thumbprint,
    load_client_document,
    trusted_domain_rule,
)
from tokenbroker.errors import InvalidArgumentError

from support.https_servers import HttpsServer, Reply, TestCa, make_test_ca

URL = "https://cimd.test/client.json"
PUBLIC = "93.184.216.34"  # only ever handed to the injected connector


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64_uint(number: int) -> str:
    return b64(number.to_bytes((number.bit_length() + 7) // 8, "big"))


def ed25519_jwk(**extra: str) -> dict[str, str]:
    raw = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    return {"kty": "OKP", "crv": "Ed25519", "x": b64(raw), **extra}


def p256_jwk(**extra: str) -> dict[str, str]:
    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64(numbers.x.to_bytes(32, "big")),
        "y": b64(numbers.y.to_bytes(32, "big")),
        **extra,
    }


def rsa_jwk(bits: int = 2048, **extra: str) -> dict[str, str]:
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key().public_numbers()
    return {"kty": "RSA", "n": b64_uint(numbers.n), "e": b64_uint(numbers.e), **extra}


def document(url: str = URL, keys: Sequence[dict[str, str]] | None = None, **members: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "client_id": url,
        "client_name": "Test Agent",
        "token_endpoint_auth_method": "private_key_jwt",
        "jwks": {"keys": list(keys) if keys is not None else [ed25519_jwk()]},
    }
    body.update(members)
    return {name: value for name, value in body.items() if value is not None}


def joserfc_thumbprint(key: dict[str, str]) -> str:
    """The RFC 7638 thumbprint by another implementation (joserfc), as the oracle."""
    data: dict[str, str | list[str]] = dict(key)
    kinds: dict[str, type[OKPKey] | type[ECKey] | type[RSAKey]] = {"OKP": OKPKey, "EC": ECKey, "RSA": RSAKey}
    return kinds[key["kty"]].import_key(data).thumbprint()


def refused(url: str, doc: Any, **options: Any) -> CimdDocumentError:
    with pytest.raises(CimdDocumentError) as caught:
        check_document(url, doc, **options)
    return caught.value


# --- an acceptable document -----------------------------------------------------------------


def test_an_acceptable_document_gives_its_keys_thumbprints_and_domain() -> None:
    key = ed25519_jwk(kid="k1", alg="EdDSA", use="sig")
    checked = check_document(URL, document(keys=[key]))
    assert (checked.client_id, checked.domain, checked.client_name) == (URL, "cimd.test", "Test Agent")
    assert checked.keys == ({"kty": "OKP", "crv": "Ed25519", "x": key["x"], "kid": "k1", "alg": "EdDSA", "use": "sig"},)
    assert checked.thumbprints == frozenset({joserfc_thumbprint(key)})
    assert checked.jwks_uri is None
    assert checked.fingerprint is None


def test_thumbprints_of_every_key_type_match_an_independent_implementation() -> None:
    okp, ec_key, rsa_key = ed25519_jwk(), p256_jwk(), rsa_jwk()
    checked = check_document(URL, document(keys=[okp, ec_key, rsa_key]))
    expected = {
        joserfc_thumbprint(okp),
        joserfc_thumbprint(ec_key),
        joserfc_thumbprint(rsa_key),
    }
    assert checked.thumbprints == frozenset(expected)
    assert len(checked.keys) == 3


def test_the_rsa_thumbprint_is_rfc_7638s_example() -> None:
    # RFC 7638 section 3.1: the example key and its thumbprint.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMs"
        "tn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5h"
        "ajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    key = {"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert check_document(URL, document(keys=[key])).thumbprints == frozenset(
        {"NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"}
    )


def test_okp_and_ec_thumbprints_are_the_engines() -> None:
    for key in (ed25519_jwk(kid="x"), p256_jwk(use="sig")):
        assert jwk_thumbprint(key) == _core.jwk_thumbprint(json.dumps(key))


def test_encryption_keys_are_skipped() -> None:
    signing = p256_jwk(use="sig")
    encrypting = {"kty": "OKP", "crv": "X25519", "x": b64(bytes(32)), "use": "enc"}
    checked = check_document(URL, document(keys=[encrypting, signing]))
    assert checked.thumbprints == frozenset({joserfc_thumbprint(signing)})


# --- refused documents -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "client_id", [URL + "/", "https://cimd.test/client.json?", "https://other.test/client.json", None, 42, URL.upper()]
)
def test_the_client_id_must_be_the_url_exactly(client_id) -> None:
    doc = document()
    doc["client_id"] = client_id
    if client_id is None:
        del doc["client_id"]
    assert refused(URL, doc).reason == "client_id_mismatch"


@pytest.mark.parametrize("method", [None, "client_secret_basic", "client_secret_post", "none", "private_key_jwt ", 7])
def test_the_auth_method_must_be_private_key_jwt(method) -> None:
    doc = document(token_endpoint_auth_method=method)
    assert refused(URL, doc).reason == "auth_method"


@pytest.mark.parametrize("member", ["client_secret", "client_secret_expires_at"])
def test_a_document_with_a_client_secret_is_refused(member) -> None:
    members: dict[str, Any] = {member: "s3cr3t-value"}
    error = refused(URL, document(**members))
    assert error.reason == "client_secret"
    assert "s3cr3t-value" not in str(error)


@pytest.mark.parametrize(
    ("jwks", "reason"),
    [
        (None, "no_keys"),
        ({"keys": []}, "no_keys"),
        ({"keys": [{"kty": "OKP", "crv": "X25519", "x": b64(bytes(32)), "use": "enc"}]}, "no_keys"),
        ([], "bad_jwks"),
        ({"keys": "none"}, "bad_jwks"),
        ({"keys": [ed25519_jwk() for _ in range(17)]}, "bad_jwks"),
        ({"keys": ["not a key"]}, "bad_key"),
    ],
)
def test_a_document_without_usable_keys_is_refused(jwks, reason) -> None:
    doc = document()
    if jwks is None:
        del doc["jwks"]
    else:
        doc["jwks"] = jwks
    assert refused(URL, doc).reason == reason


@pytest.mark.parametrize("use", [None, "enc"])
def test_a_private_key_in_the_jwks_is_refused(use) -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    d = b64(private.private_bytes_raw())
    key = {"kty": "OKP", "crv": "Ed25519", "x": b64(private.public_key().public_bytes_raw()), "d": d}
    if use:
        key["use"] = use
    error = refused(URL, document(keys=[key]))
    assert error.reason == "bad_key"
    assert d not in str(error)


@pytest.mark.parametrize(
    "key",
    [
        {"kty": "oct", "k": b64(b"shared secret bytes")},
        {"kty": "EC", "crv": "P-384", "x": b64(bytes(48)), "y": b64(bytes(48))},
        {"kty": "OKP", "crv": "Ed25519"},
        {"kty": "OKP", "crv": "Ed25519", "x": b64(bytes(32)), "alg": "RS256"},
        {"kty": "OKP", "crv": "Ed25519", "x": b64(bytes(32)), "use": "wrap"},
    ],
    ids=["symmetric", "p384", "no-x", "wrong-alg", "odd-use"],
)
def test_unsupported_or_malformed_keys_are_refused(key) -> None:
    assert refused(URL, document(keys=[key])).reason == "bad_key"


def test_a_small_rsa_key_is_refused() -> None:
    assert refused(URL, document(keys=[rsa_jwk(1024)])).reason == "bad_key"


def test_jwks_and_jwks_uri_together_are_refused() -> None:
    assert refused(URL, document(jwks_uri="https://cimd.test/jwks.json")).reason == "both_jwks"


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ({"jwks": None, "jwks_uri": "http://cimd.test/jwks.json"}, "bad_metadata"),
        ({"jwks": None, "jwks_uri": "https://cimd.test"}, "bad_metadata"),
        ({"jwks": None, "jwks_uri": ["https://cimd.test/jwks.json"]}, "bad_metadata"),
        ({"jwks": None, "jwks_uri": "https://cimd.test/jwks.json"}, "jwks_uri_not_fetched"),
        ({"client_name": "x" * 201}, "bad_metadata"),
        ({"client_name": "agent\n2026-01-01 approved by admin"}, "bad_metadata"),
        ({"client_name": 5}, "bad_metadata"),
    ],
)
def test_bad_metadata_is_refused(members, reason) -> None:
    assert refused(URL, document(**members)).reason == reason


def test_a_document_that_is_not_an_object_is_refused() -> None:
    assert refused(URL, ["client_id", URL]).reason == "bad_metadata"


def test_the_url_itself_is_checked() -> None:
    with pytest.raises(CimdFetchError) as caught:
        check_document("http://cimd.test/client.json", document("http://cimd.test/client.json"))
    assert caught.value.reason == "not_https"


# --- documents fetched: inline keys, keys at a jwks_uri, same rules --------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return make_test_ca(tmp_path_factory.mktemp("cimd-document-ca"))


@pytest.fixture
def origin(ca: TestCa) -> Iterator[HttpsServer]:
    cert, key = ca.issue(dns_names=("localhost", "cimd.test"), ips=("127.0.0.1",))
    with HttpsServer(cert, key) as server:
        yield server


class Resolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return self.answers[host]


class Connector:
    """Sends PUBLIC to the local origin; any other address fails the test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.calls: list[str] = []

    async def __call__(self, address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.calls.append(address)
        if address != PUBLIC:
            raise AssertionError(f"the fetcher tried to connect to {address}:{port}")
        return await asyncio.open_connection("127.0.0.1", self.port)


async def loopback_only(address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert address == "127.0.0.1", f"the fetcher tried to connect to {address}:{port}"
    return await asyncio.open_connection("127.0.0.1", port)


def loopback_fetcher(ca: TestCa) -> CimdFetcher:
    return CimdFetcher(ca_file=ca.ca_file, allow_loopback=True, connector=loopback_only)


async def test_a_fetched_document_with_inline_keys(ca, origin) -> None:
    url = origin.url("/client.json")
    doc = document(url)
    origin.replies["/client.json"] = Reply.json(doc, cache_control="max-age=300")
    checked = await load_client_document(loopback_fetcher(ca), url)
    assert checked.domain == "127.0.0.1"
    assert checked.fingerprint == hashlib.sha256(json.dumps(doc).encode()).hexdigest()
    assert checked.jwks_fingerprint is None
    assert checked.fresh_until is not None
    assert checked.fetched_at is not None
    assert checked.fresh_until - checked.fetched_at == 300
    assert checked.stale is False


async def test_keys_at_a_jwks_uri_are_fetched(ca, origin) -> None:
    url, key = origin.url("/client.json"), p256_jwk()
    origin.replies["/client.json"] = Reply.json(document(url, jwks=None, jwks_uri=origin.url("/jwks.json")))
    jwks_body = {"keys": [key]}
    origin.replies["/jwks.json"] = Reply.json(jwks_body, content_type="application/jwk-set+json")
    checked = await load_client_document(loopback_fetcher(ca), url)
    assert checked.thumbprints == frozenset({joserfc_thumbprint(key)})
    assert checked.jwks_uri == origin.url("/jwks.json")
    assert checked.jwks_fingerprint == hashlib.sha256(json.dumps(jwks_body).encode()).hexdigest()
    assert (origin.count("/client.json"), origin.count("/jwks.json")) == (1, 1)


async def test_a_refused_document_costs_no_jwks_uri_fetch(ca, origin) -> None:
    url = origin.url("/client.json")
    origin.replies["/client.json"] = Reply.json(
        document("https://elsewhere.test/client.json", jwks=None, jwks_uri=origin.url("/jwks.json"))
    )
    origin.replies["/jwks.json"] = Reply.json({"keys": [ed25519_jwk()]})
    with pytest.raises(CimdDocumentError) as caught:
        await load_client_document(loopback_fetcher(ca), url)
    assert caught.value.reason == "client_id_mismatch"
    assert origin.count("/jwks.json") == 0


@pytest.mark.parametrize(
    ("jwks_uri", "reason"),
    [
        ("https://keys.internal.test/jwks.json", "blocked_address"),  # resolves to 10.0.0.1
        ("https://169.254.169.254/latest/meta-data/jwks", "blocked_address"),
        ("https://127.0.0.1/jwks.json", "blocked_address"),  # no loopback allowance
        ("https://cimd.test/redirect.json", "redirect"),
        ("https://cimd.test/big.json", "too_large"),
    ],
)
async def test_the_jwks_uri_is_fetched_under_the_same_rules(ca, origin, jwks_uri, reason) -> None:
    origin.replies["/client.json"] = Reply.json(document(URL, jwks=None, jwks_uri=jwks_uri))
    origin.replies["/redirect.json"] = Reply(status=302, headers=(("Location", "https://cimd.test/jwks.json"),))
    origin.replies["/big.json"] = Reply(body=b'{"keys": [], "pad": "' + b"x" * 6000 + b'"}')
    resolver = Resolver({"cimd.test": [PUBLIC], "keys.internal.test": ["10.0.0.1"]})
    connector = Connector(origin.port)
    fetcher = CimdFetcher(ca_file=ca.ca_file, resolver=resolver, connector=connector)
    with pytest.raises(CimdFetchError) as caught:
        await load_client_document(fetcher, URL)
    assert caught.value.reason == reason
    assert set(connector.calls) == {PUBLIC}


async def test_a_jwks_uri_that_is_not_a_key_set_is_refused(ca, origin) -> None:
    url = origin.url("/client.json")
    origin.replies["/client.json"] = Reply.json(document(url, jwks=None, jwks_uri=origin.url("/jwks.json")))
    origin.replies["/jwks.json"] = Reply.json({"keys": {"kty": "OKP"}})
    with pytest.raises(CimdDocumentError) as caught:
        await load_client_document(loopback_fetcher(ca), url)
    assert caught.value.reason == "bad_jwks"


async def test_a_stale_key_set_marks_the_document_stale(ca, origin) -> None:
    url = origin.url("/client.json")
    origin.replies["/client.json"] = Reply.json(document(url, jwks=None, jwks_uri=origin.url("/jwks.json")))
    origin.replies["/jwks.json"] = Reply.json({"keys": [ed25519_jwk()]})
    fetcher = loopback_fetcher(ca)
    first = await load_client_document(fetcher, url, approved=True)
    origin.replies["/jwks.json"] = Reply(status=500, body=b"{}")
    again = await load_client_document(fetcher, url, approved=True)
    assert again.stale is True
    assert again.thumbprints == first.thumbprints


# --- cimd_trusted_domains --------------------------------------------------------------------


def test_trusted_domains_match_exact_names_and_suffixes() -> None:
    patterns = check_trusted_domains(["Agents.Example.com", "*.corp.example"])
    assert patterns == ("agents.example.com", "*.corp.example")
    assert trusted_domain_rule("agents.example.com", patterns) == "agents.example.com"
    assert trusted_domain_rule("a.b.corp.example", patterns) == "*.corp.example"
    assert trusted_domain_rule("corp.example", patterns) is None
    assert trusted_domain_rule("evilcorp.example", patterns) is None
    assert trusted_domain_rule("x.agents.example.com", patterns) is None
    assert trusted_domain_rule("agents.example.com.evil.test", patterns) is None


@pytest.mark.parametrize("pattern", ["*", "*.com", "exa mple.com", "*example.com", "https://example.com", "", 5])
def test_unusable_trusted_domain_patterns_are_refused(pattern) -> None:
    with pytest.raises(InvalidArgumentError):
        check_trusted_domains([pattern])
