"""Attesters: JWT-SVIDs of configured trust domains, with real keys and real bundle files;
https bundles through an injected fetcher (no network), with an injected clock."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tokenbroker._core import jwk_thumbprint
from tokenbroker.attestation import AttestationError, Attesters, parse_spiffe_id
from tokenbroker.config import ConfigError

from support.brokers import FakeClock

AUDIENCE = "https://broker.test"
WORKLOAD = "spiffe://example.org/ns/prod/sa/agent"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_members(key: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    return jwk


class Domains:
    """example.org: a SPIFFE bundle (P-256 "k1", RSA "k2", one x509-svid entry);
    other.org: a plain JWKS with one Ed25519 key without kid."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.clock = FakeClock()
        self.p256 = ec.generate_private_key(ec.SECP256R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.x509_ca = ec.generate_private_key(ec.SECP256R1())
        x509_entry = {**public_members(self.x509_ca), "use": "x509-svid", "kid": "x1"}
        self.example_bundle: dict[str, Any] = {
            "keys": [
                {**public_members(self.p256), "use": "jwt-svid", "kid": "k1"},
                {**public_members(self.rsa), "use": "jwt-svid", "kid": "k2"},
                x509_entry,
            ],
            "spiffe_refresh_hint": 300,
            "spiffe_sequence": 7,
        }
        self.example_file = self.write("example.json", self.example_bundle)
        self.other_file = self.write("other.json", {"keys": [public_members(self.ed)]})
        self.attesters = Attesters.from_setting(
            {"example.org": str(self.example_file), "other.org": str(self.other_file)}, clock=self.clock
        )

    def write(self, name: str, document: Any) -> Path:
        path = self.tmp_path / name
        path.write_text(json.dumps(document) if not isinstance(document, str) else document)
        return path

    def svid(
        self,
        key: Any = None,
        *,
        alg: str = "ES256",
        kid: str | None = "k1",
        sub: str = WORKLOAD,
        aud: Any = AUDIENCE,
        lifetime: int = 60,
        with_iat: bool = True,
        jti: str | None = "",
        headers: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
    ) -> str:
        now = int(self.clock())
        body: dict[str, Any] = {"sub": sub, "aud": aud, "exp": now + lifetime}
        if with_iat:
            body["iat"] = now
        if jti is not None:
            body["jti"] = jti or uuid.uuid4().hex
        body.update(claims or {})
        header = dict(headers or {})
        if kid is not None:
            header["kid"] = kid
        return jwt.encode(body, self.p256 if key is None else key, algorithm=alg, headers=header or None)


@pytest.fixture
def domains(tmp_path: Path) -> Domains:
    return Domains(tmp_path)


async def refused(attesters: Attesters, token: str, reason: str, **kwargs: Any) -> AttestationError:
    """Asserts that `token` is refused for `reason`, with a message that does not hold it."""
    kwargs.setdefault("audience", AUDIENCE)
    with pytest.raises(AttestationError) as info:
        await attesters.verify(token, **kwargs)
    assert info.value.reason == reason, str(info.value)
    assert info.value.rule == reason
    assert token not in str(info.value)
    signature = token.rsplit(".", 1)[-1]
    if len(signature) >= 16:
        assert signature not in str(info.value)
    return info.value


# -- what verifies ----------------------------------------------------------------------


async def test_a_valid_svid_verifies(domains: Domains) -> None:
    token = domains.svid(jti="svid-1")
    attestation = await domains.attesters.verify(token, audience=AUDIENCE)
    now = int(domains.clock())
    assert attestation.subject == WORKLOAD
    assert attestation.trust_domain == "example.org"
    assert (attestation.issued_at, attestation.expires_at) == (now, now + 60)
    assert attestation.jti == "svid-1"
    assert attestation.key_id == "k1"
    assert attestation.algorithm == "ES256"
    # RFC 7638, computed by the Rust core independently.
    assert attestation.key_thumbprint == jwk_thumbprint(json.dumps(public_members(domains.p256)))
    assert attestation.replay == (f"attestation:{len(WORKLOAD)}:{WORKLOAD}:svid-1", now, now + 60 + 5)


async def test_each_algorithm_with_its_own_key(domains: Domains) -> None:
    for key, alg, kid in ((domains.rsa, "RS256", "k2"), (domains.rsa, "PS256", "k2")):
        attestation = await domains.attesters.verify(domains.svid(key, alg=alg, kid=kid), audience=AUDIENCE)
        assert (attestation.algorithm, attestation.key_id) == (alg, kid)
    # other.org has one key without kid: no kid needed.
    token = domains.svid(domains.ed, alg="EdDSA", kid=None, sub="spiffe://other.org/job")
    attestation = await domains.attesters.verify(token, audience=AUDIENCE)
    assert (attestation.trust_domain, attestation.key_id) == ("other.org", None)


async def test_es384_with_a_p384_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"keys": [{**public_members(key), "kid": "p384"}]}))
    clock = FakeClock()
    attesters = Attesters.from_setting({"example.org": str(path)}, clock=clock)
    now = int(clock())
    token = jwt.encode({"sub": WORKLOAD, "aud": AUDIENCE, "exp": now + 30}, key, algorithm="ES384")
    assert (await attesters.verify(token, audience=AUDIENCE)).algorithm == "ES384"
    p256 = ec.generate_private_key(ec.SECP256R1())
    wrong_type = jwt.encode({"sub": WORKLOAD, "aud": AUDIENCE, "exp": now + 30}, p256, algorithm="ES256")
    await refused(attesters, wrong_type, "attestation.algorithm")


async def test_aud_must_name_the_broker_alone(domains: Domains) -> None:
    token = domains.svid(aud=[AUDIENCE])
    assert (await domains.attesters.verify(token, audience=AUDIENCE)).subject == WORKLOAD
    # Another audience of the SVID could redeem it here first: refused.
    await refused(domains.attesters, domains.svid(aud=["https://elsewhere.test", AUDIENCE]), "attestation.audience")
    await refused(domains.attesters, domains.svid(aud=["https://elsewhere.test"]), "attestation.audience")
    await refused(domains.attesters, domains.svid(aud=[]), "attestation.audience")


async def test_expected_subject(domains: Domains) -> None:
    token = domains.svid()
    assert (await domains.attesters.verify(token, audience=AUDIENCE, expected_subject=WORKLOAD)).subject == WORKLOAD
    error = await refused(
        domains.attesters, domains.svid(), "attestation.subject_mismatch", expected_subject=WORKLOAD + "-admin"
    )
    assert WORKLOAD + "-admin" not in str(error)  # the registered ID is not revealed


# -- what is refused --------------------------------------------------------------------


async def test_wrong_audience(domains: Domains) -> None:
    error = await refused(domains.attesters, domains.svid(aud="https://elsewhere.test"), "attestation.audience")
    assert AUDIENCE in str(error)


async def test_expired(domains: Domains) -> None:
    token = domains.svid(lifetime=30)
    domains.clock.advance(30 + 4)
    assert (await domains.attesters.verify(token, audience=AUDIENCE)).subject == WORKLOAD  # within the leeway
    domains.clock.advance(1)
    await refused(domains.attesters, token, "attestation.expired")


async def test_too_long_lived(domains: Domains) -> None:
    await refused(domains.attesters, domains.svid(lifetime=301), "attestation.lifetime")
    await refused(domains.attesters, domains.svid(lifetime=120), "attestation.lifetime", max_lifetime=60)
    # Without iat: exp - now is the bound.
    await refused(domains.attesters, domains.svid(lifetime=301, with_iat=False), "attestation.lifetime")
    attestation = await domains.attesters.verify(domains.svid(lifetime=300, with_iat=False), audience=AUDIENCE)
    assert attestation.issued_at is None
    assert attestation.replay[1] == attestation.expires_at - 300
    # A backdated iat counts: exp - iat is over the bound although exp is near.
    backdated = domains.svid(lifetime=60, claims={"iat": int(domains.clock()) - 250})
    await refused(domains.attesters, backdated, "attestation.lifetime")


async def test_iat_or_nbf_in_the_future(domains: Domains) -> None:
    now = int(domains.clock())
    await refused(domains.attesters, domains.svid(claims={"iat": now + 30}), "attestation.not_yet_valid")
    await refused(domains.attesters, domains.svid(claims={"nbf": now + 30}), "attestation.not_yet_valid")


async def test_exp_is_required(domains: Domains) -> None:
    now = int(domains.clock())
    token = jwt.encode({"sub": WORKLOAD, "aud": AUDIENCE, "iat": now}, domains.p256, "ES256", headers={"kid": "k1"})
    await refused(domains.attesters, token, "attestation.malformed")


async def test_a_key_of_another_domain_never_verifies(domains: Domains) -> None:
    # example.org's sub signed with other.org's key: example.org has no such key.
    await refused(domains.attesters, domains.svid(domains.ed, alg="EdDSA", kid=None), "attestation.key_unknown")
    # ... and naming an example.org kid does not help: the signature is checked with k1.
    forged = domains.svid(domains.ed, alg="EdDSA", kid="k1")
    await refused(domains.attesters, forged, "attestation.algorithm")
    impostor = ec.generate_private_key(ec.SECP256R1())
    await refused(domains.attesters, domains.svid(impostor, kid="k1"), "attestation.signature_invalid")
    # other.org's sub signed with example.org's key k1: other.org's bundle does not hold it.
    await refused(domains.attesters, domains.svid(sub="spiffe://other.org/job", kid="k1"), "attestation.key_unknown")
    await refused(domains.attesters, domains.svid(sub="spiffe://other.org/job", kid=None), "attestation.algorithm")


async def test_sub_of_an_unconfigured_domain(domains: Domains) -> None:
    error = await refused(
        domains.attesters, domains.svid(sub="spiffe://evil.example/ns/prod"), "attestation.trust_domain_unknown"
    )
    assert "example.org" not in str(error)  # the configured domains are not listed


@pytest.mark.parametrize(
    "sub",
    [
        "spiffe://example.org",
        "spiffe://example.org/",
        "spiffe://example.org/a//b",
        "spiffe://example.org/a/../b",
        "spiffe://Example.org/a",
        "spiffe://example.org:443/a",
        "SPIFFE://example.org/a",
        "https://example.org/a",
        "spiffe://example.org/a?x=1",
    ],
)
async def test_sub_must_be_a_workload_spiffe_id(domains: Domains, sub: str) -> None:
    await refused(domains.attesters, domains.svid(sub=sub), "attestation.subject_invalid")


async def test_alg_none_and_hs256_are_refused(domains: Domains) -> None:
    now = int(domains.clock())
    claims = {"sub": WORKLOAD, "aud": AUDIENCE, "iat": now, "exp": now + 60}
    header = b64(json.dumps({"alg": "none", "kid": "k1"}).encode())
    unsigned = f"{header}.{b64(json.dumps(claims).encode())}."
    await refused(domains.attesters, unsigned, "attestation.algorithm")
    hs256 = jwt.encode(claims, "a shared secret of at least 32 bytes!", algorithm="HS256", headers={"kid": "k1"})
    await refused(domains.attesters, hs256, "attestation.algorithm")


async def test_alg_must_fit_the_key(domains: Domains) -> None:
    # RS256 header naming the P-256 key: refused before any verification.
    await refused(domains.attesters, domains.svid(domains.rsa, alg="RS256", kid="k1"), "attestation.algorithm")


async def test_kid_selects_the_key(domains: Domains) -> None:
    await refused(domains.attesters, domains.svid(kid="k9"), "attestation.key_unknown")
    # The bundle's x509-svid key signs certificates, never JWT-SVIDs.
    await refused(domains.attesters, domains.svid(domains.x509_ca, kid="x1"), "attestation.key_unknown")
    # example.org has two jwt-svid keys: a kid is required.
    await refused(domains.attesters, domains.svid(kid=None), "attestation.key_unknown")
    # A kid names one key, and alg must fit that key's type.
    await refused(domains.attesters, domains.svid(domains.rsa, alg="RS256", kid="k1"), "attestation.algorithm")
    await refused(domains.attesters, domains.svid(kid="k2"), "attestation.algorithm")


@pytest.mark.parametrize(
    "member",
    [
        {"jku": "https://evil.example/jwks.json"},
        {"x5u": "https://evil.example/cert.pem"},
        {"jwk": {"kty": "EC"}},
        {"x5c": ["MIIB"]},
        {"crit": ["exp"]},
        {"typ": "dpop+jwt"},
    ],
)
async def test_forbidden_header_members(domains: Domains, member: dict[str, Any]) -> None:
    await refused(domains.attesters, domains.svid(headers=member), "attestation.header")


async def test_size_and_shape(domains: Domains) -> None:
    await refused(domains.attesters, domains.svid(claims={"pad": "x" * 9000}), "attestation.too_large")
    await refused(domains.attesters, "not-a-jwt", "attestation.malformed")
    await refused(domains.attesters, "a.b.c", "attestation.malformed")
    token = domains.svid()
    header, payload, signature = token.split(".")
    await refused(domains.attesters, f"{header}.{b64(b'[1]')}.{signature}", "attestation.malformed")
    # A changed payload no longer matches its signature.
    claims = json.loads(unb64(payload))
    claims["sub"] = WORKLOAD + "-admin"
    tampered = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    await refused(domains.attesters, tampered, "attestation.signature_invalid")


async def test_replay_key_without_jti_survives_signature_malleability(domains: Domains) -> None:
    """ECDSA's (r, s) and (r, n - s) both verify: the key must be the same for both."""
    token = domains.svid(jti=None)
    first = await domains.attesters.verify(token, audience=AUDIENCE)
    assert first.jti is None
    assert first.replay[0].startswith("attestation-sha256:")
    header, payload, signature = token.split(".")
    raw = unb64(signature)  # JWS ES256: r and s, 32 bytes each
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    twin = f"{header}.{payload}.{b64(r.to_bytes(32, 'big') + (P256_ORDER - s).to_bytes(32, 'big'))}"
    assert twin != token
    second = await domains.attesters.verify(twin, audience=AUDIENCE)
    assert second.replay == first.replay
    # Other claims, another key.
    other = await domains.attesters.verify(domains.svid(jti=None, lifetime=61), audience=AUDIENCE)
    assert other.replay[0] != first.replay[0]


# -- bundles and settings ---------------------------------------------------------------


def config_error(setting: dict[str, str], **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        Attesters.from_setting(setting, **kwargs)
    return str(info.value)


def test_spiffe_bundle_with_only_x509_keys_has_no_usable_keys(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "bundle.json"
    entry = {**public_members(key), "use": "x509-svid", "kid": "x1"}
    path.write_text(json.dumps({"keys": [entry], "spiffe_sequence": 1}))
    message = config_error({"example.org": str(path)})
    assert "attesters.example.org" in message
    assert "no usable jwt-svid keys" in message


def test_bad_entries_each_get_a_line(tmp_path: Path) -> None:
    not_json = tmp_path / "not.json"
    not_json.write_text("keys: []")
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"keys": []}))
    message = config_error(
        {
            "missing.org": str(tmp_path / "nope.json"),
            "notjson.org": str(not_json),
            "secret.org": str(secret),
            "empty.org": str(empty),
            "Upper.org": str(empty),
            "spiffe://prefixed.org": str(empty),
            "plain.org": "http://plain.org/bundle",
            "fetched.org": "https://fetched.org/bundle",
        }
    )
    lines = message.splitlines()
    assert len(lines) == 8, message
    expectations = {
        "attesters.missing.org": "no such file",
        "attesters.notjson.org": "not JSON",
        "attesters.secret.org": "private key material",
        "attesters.empty.org": "no usable signing keys",
        "attesters.Upper.org": "lowercase",
        "attesters.spiffe://prefixed.org": "'prefixed.org'",
        "attesters.plain.org": "not https",
        "attesters.fetched.org": "guarded fetcher",
    }
    for prefix, words in expectations.items():
        assert any(line.startswith(prefix + ":") and words in line for line in lines), (prefix, message)


def test_bundle_key_problems(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (refused, as it should)
    a = ec.generate_private_key(ec.SECP256R1())
    b = ec.generate_private_key(ec.SECP256R1())
    cases: dict[str, tuple[Any, str]] = {
        "small.org": ({"keys": [public_members(small)]}, "1024 bits"),
        "dup.org": ({"keys": [{**public_members(a), "kid": "x"}, {**public_members(b), "kid": "x"}]}, "share kid"),
        "nokid.org": ({"keys": [public_members(a), public_members(b)]}, "not all have a kid"),
        "svidnokid.org": ({"keys": [{**public_members(a), "use": "jwt-svid"}]}, "without kid"),
        "badpoint.org": ({"keys": [{**public_members(a), "y": public_members(b)["y"]}]}, "valid public key"),
        "noarray.org": ({"keys": {}}, '"keys" array'),
    }
    setting = {}
    for domain, (document, _) in cases.items():
        path = tmp_path / f"{domain}.json"
        path.write_text(json.dumps(document))
        setting[domain] = str(path)
    message = config_error(setting)
    for domain, (_, words) in cases.items():
        assert any(line.startswith(f"attesters.{domain}:") and words in line for line in message.splitlines()), (
            domain,
            message,
        )


def test_parse_spiffe_id() -> None:
    assert parse_spiffe_id("spiffe://example.org/ns/prod/sa/api") == ("example.org", "/ns/prod/sa/api")
    with pytest.raises(ValueError, match="no path"):
        parse_spiffe_id("spiffe://example.org")
    with pytest.raises(ValueError, match="longer than"):
        parse_spiffe_id("spiffe://example.org/" + "a" * 2100)


async def test_a_rewritten_bundle_file_is_picked_up_and_a_bad_rewrite_keeps_the_last_good(domains: Domains) -> None:
    rotated = ec.generate_private_key(ec.SECP256R1())
    await refused(domains.attesters, domains.svid(rotated, kid="k3"), "attestation.key_unknown")
    bundle = dict(domains.example_bundle)
    bundle["keys"] = [*bundle["keys"], {**public_members(rotated), "use": "jwt-svid", "kid": "k3"}]
    domains.write("example.json", bundle)
    domains.clock.advance(2)
    assert (await domains.attesters.verify(domains.svid(rotated, kid="k3"), audience=AUDIENCE)).key_id == "k3"
    domains.write("example.json", "{ half written")
    domains.clock.advance(2)
    assert (await domains.attesters.verify(domains.svid(rotated, kid="k3"), audience=AUDIENCE)).key_id == "k3"


# -- https bundles ----------------------------------------------------------------------

URL = "https://bundles.example.org/example.org.json"


class Fetcher:
    """The injected guarded fetcher: serves `body` or raises, and counts its calls."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.fail = False
        self.gate: asyncio.Event | None = None  # when set: each fetch waits for it
        self.urls: list[str] = []

    async def __call__(self, url: str) -> bytes:
        self.urls.append(url)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise OSError("connection refused")
        return self.body


def url_attesters(domains: Domains, fetcher: Fetcher, **kwargs: Any) -> Attesters:
    return Attesters.from_setting({"example.org": URL}, fetch_jwks=fetcher, clock=domains.clock, **kwargs)


async def test_https_bundle_is_fetched_once_and_cached_for_its_refresh_hint(domains: Domains) -> None:
    fetcher = Fetcher(json.dumps(domains.example_bundle).encode())
    attesters = url_attesters(domains, fetcher)
    assert fetcher.urls == []  # nothing fetched before it is needed
    await attesters.verify(domains.svid(), audience=AUDIENCE)
    await attesters.verify(domains.svid(), audience=AUDIENCE)
    assert fetcher.urls == [URL]
    domains.clock.advance(299)  # spiffe_refresh_hint: 300
    await attesters.verify(domains.svid(), audience=AUDIENCE)
    assert len(fetcher.urls) == 1
    domains.clock.advance(1)
    await attesters.verify(domains.svid(), audience=AUDIENCE)
    assert len(fetcher.urls) == 2


async def test_refresh_hint_is_bounded(domains: Domains) -> None:
    fetcher = Fetcher(json.dumps({**domains.example_bundle, "spiffe_refresh_hint": 1}).encode())
    attesters = url_attesters(domains, fetcher)
    await attesters.verify(domains.svid(), audience=AUDIENCE)
    domains.clock.advance(29)
    await attesters.verify(domains.svid(), audience=AUDIENCE)
    assert len(fetcher.urls) == 1  # at least 30 s, whatever the hint says
    fetcher.body = json.dumps({**domains.example_bundle, "spiffe_refresh_hint": 10**9}).encode()
    domains.clock.advance(1)
    await attesters.verify(domains.svid(), audience=AUDIENCE)
    domains.clock.advance(3600)
    await attesters.verify(domains.svid(), audience=AUDIENCE)
    assert len(fetcher.urls) == 3  # at most an hour


async def test_last_good_bundle_is_kept_when_the_fetch_fails(
    domains: Domains, caplog: pytest.LogCaptureFixture
) -> None:
    fetcher = Fetcher(json.dumps(domains.example_bundle).encode())
    attesters = url_attesters(domains, fetcher, max_stale_seconds=3600)
    await attesters.verify(domains.svid(), audience=AUDIENCE)
    fetcher.fail = True
    domains.clock.advance(301)
    assert (await attesters.verify(domains.svid(), audience=AUDIENCE)).subject == WORKLOAD
    assert len(fetcher.urls) == 2
    # A failed fetch is not retried on every request.
    domains.clock.advance(5)
    await attesters.verify(domains.svid(), audience=AUDIENCE)
    assert len(fetcher.urls) == 2
    # A document that is not a bundle is a failed fetch too.
    fetcher.fail = False
    fetcher.body = b"<html>maintenance</html>"
    domains.clock.advance(10)
    assert (await attesters.verify(domains.svid(), audience=AUDIENCE)).subject == WORKLOAD
    assert len(fetcher.urls) == 3
    # ... but not forever: past the staleness bound it is refused.
    fetcher.fail = True
    domains.clock.advance(3600)
    error = await refused(attesters, domains.svid(), "attestation.keys_unavailable")
    assert "connection refused" not in str(error)  # the fetcher's error is for the log only
    failures = [r for r in caplog.records if r.name == "tokenbroker.attestation"]
    assert failures
    assert getattr(failures[-1], "error", None) == "connection refused"
    assert getattr(failures[-1], "trust_domain", None) == "example.org"


async def test_a_bundle_never_fetched_is_unavailable(domains: Domains) -> None:
    fetcher = Fetcher(b"")
    fetcher.fail = True
    attesters = url_attesters(domains, fetcher)
    await refused(attesters, domains.svid(), "attestation.keys_unavailable")
    await refused(attesters, domains.svid(), "attestation.keys_unavailable")
    assert len(fetcher.urls) == 1  # retried after RETRY_SECONDS, not at once
    fetcher.fail = False
    fetcher.body = json.dumps(domains.example_bundle).encode()
    domains.clock.advance(10)
    assert (await attesters.verify(domains.svid(), audience=AUDIENCE)).subject == WORKLOAD


async def test_an_unknown_kid_refetches_at_most_every_30_seconds(domains: Domains) -> None:
    fetcher = Fetcher(json.dumps(domains.example_bundle).encode())
    attesters = url_attesters(domains, fetcher)
    await attesters.verify(domains.svid(), audience=AUDIENCE)
    rotated = ec.generate_private_key(ec.SECP256R1())

    def token() -> str:
        return domains.svid(rotated, kid="k3")

    await refused(attesters, token(), "attestation.key_unknown")
    assert len(fetcher.urls) == 1  # just fetched: an unknown kid does not make another fetch
    bundle = dict(domains.example_bundle)
    bundle["keys"] = [*bundle["keys"], {**public_members(rotated), "use": "jwt-svid", "kid": "k3"}]
    fetcher.body = json.dumps(bundle).encode()
    domains.clock.advance(30)
    assert (await attesters.verify(token(), audience=AUDIENCE)).key_id == "k3"
    assert len(fetcher.urls) == 2


async def test_concurrent_requests_share_one_fetch(domains: Domains) -> None:
    release = asyncio.Event()
    body = json.dumps(domains.example_bundle).encode()
    urls: list[str] = []

    async def slow_fetch(url: str) -> bytes:
        urls.append(url)
        await release.wait()
        return body

    attesters = Attesters.from_setting({"example.org": URL}, fetch_jwks=slow_fetch, clock=domains.clock)
    pending = [asyncio.create_task(attesters.verify(domains.svid(), audience=AUDIENCE)) for _ in range(5)]
    await asyncio.sleep(0.01)
    release.set()
    results = await asyncio.gather(*pending)
    assert [r.subject for r in results] == [WORKLOAD] * 5
    assert urls == [URL]


async def test_a_slow_refresh_does_not_hold_up_requests_that_have_keys(domains: Domains) -> None:
    fetcher = Fetcher(json.dumps(domains.example_bundle).encode())
    attesters = url_attesters(domains, fetcher)
    await attesters.verify(domains.svid(), audience=AUDIENCE)
    fetcher.gate = release = asyncio.Event()
    domains.clock.advance(300)
    refreshing = asyncio.create_task(attesters.verify(domains.svid(), audience=AUDIENCE))
    await asyncio.sleep(0.01)
    assert fetcher.urls == [URL, URL]
    quick = await asyncio.wait_for(attesters.verify(domains.svid(), audience=AUDIENCE), timeout=1)
    assert quick.subject == WORKLOAD
    assert not refreshing.done()
    release.set()
    assert (await refreshing).subject == WORKLOAD
