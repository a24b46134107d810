"""ClientAuthenticator: who may get a token, with real Ed25519 and P-256 client keys."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tokenbroker import MemoryStore
from tokenbroker.client_assertion import make_client_assertion, public_jwk
from tokenbroker.client_auth import AUTH_FAILED, ClientAuthenticator
from tokenbroker.errors import AuthenticationError, ClientNotAllowedError
from tokenbroker.registry import ClientRecord, ClientStatus
from tokenbroker.registry_file import FileRegistry, generate_secret, hash_secret

from support.brokers import FakeClock

ISSUER = "https://broker.test"
AUDIENCE = "https://mcp.test/mcp"
DPOP_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock()
        self.registry = FileRegistry(tmp_path / "registry.toml")
        self.store = MemoryStore()
        self.auth = ClientAuthenticator(self.registry, self.store, assertion_audience=ISSUER, clock=self.clock)
        self.ed_key = ed25519.Ed25519PrivateKey.generate()
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.secret = generate_secret()

    def add(self, client_id: str = "agent", **fields: Any) -> ClientRecord:
        values: dict[str, Any] = {
            "status": ClientStatus.APPROVED,
            "public_jwk": public_jwk(self.ed_key),
            "allowed_audiences": (AUDIENCE,),
            "allowed_scopes": ("tools:call", "tools:list"),
        }
        values.update(fields)
        record = ClientRecord(client_id, **values)
        self.registry.put_client(record)
        return record

    def assertion(self, client_id: str = "agent", key: Any = None, **kw: Any) -> str:
        kw.setdefault("now", int(self.clock()))
        return make_client_assertion(key or self.ed_key, client_id, ISSUER, **kw)

    def authenticate(self, **kw: Any) -> ClientRecord:
        kw.setdefault("client_id", "agent")
        kw.setdefault("audience", AUDIENCE)
        kw.setdefault("scopes", ["tools:call"])
        kw.setdefault("dpop_jkt", DPOP_JKT)  # the clients here have the default binding, dpop
        if "client_secret" not in kw and "client_assertion" not in kw:
            kw["client_assertion"] = self.assertion(kw["client_id"])
        return self.auth.authenticate(**kw)


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def signed(key: Any, claims: dict[str, Any], algorithm: str = "EdDSA", headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def claims(s: Setup, **over: Any) -> dict[str, Any]:
    now = int(s.clock())
    base: dict[str, Any] = {
        "iss": "agent",
        "sub": "agent",
        "aud": ISSUER,
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def test_ed25519_assertion_is_accepted(s: Setup) -> None:
    record = s.add()
    assert s.authenticate() == record


def test_p256_assertion_is_accepted(s: Setup) -> None:
    s.add(public_jwk=public_jwk(s.ec_key))
    assert s.authenticate(client_assertion=s.assertion(key=s.ec_key)).client_id == "agent"


def test_pem_private_key_signs_assertions(s: Setup) -> None:
    s.add()
    pem = s.ed_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert s.authenticate(client_assertion=s.assertion(key=pem)).client_id == "agent"


def test_replayed_assertion_is_refused(s: Setup) -> None:
    s.add()
    assertion = s.assertion()
    s.authenticate(client_assertion=assertion)
    with pytest.raises(AuthenticationError) as info:
        s.authenticate(client_assertion=assertion)
    assert info.value.rule == "credential.assertion_replayed"  # type: ignore[attr-defined]


async def test_replayed_assertion_is_refused_async(s: Setup) -> None:
    s.add()
    assertion = s.assertion()
    kw: dict[str, Any] = {"client_id": "agent", "audience": AUDIENCE, "scopes": ["tools:call"], "dpop_jkt": DPOP_JKT}
    await s.auth.aauthenticate(client_assertion=assertion, **kw)
    with pytest.raises(AuthenticationError, match="already used"):
        await s.auth.aauthenticate(client_assertion=assertion, **kw)


def test_expired_assertion_is_refused(s: Setup) -> None:
    s.add()
    assertion = s.assertion(lifetime=30)
    s.clock.advance(60)
    with pytest.raises(AuthenticationError) as info:
        s.authenticate(client_assertion=assertion)
    assert info.value.rule == "credential.assertion_expired"  # type: ignore[attr-defined]


def test_assertion_for_another_audience_is_refused(s: Setup) -> None:
    s.add()
    wrong = make_client_assertion(s.ed_key, "agent", "https://other-broker.test", now=int(s.clock()))
    with pytest.raises(AuthenticationError) as info:
        s.authenticate(client_assertion=wrong)
    assert info.value.rule == "credential.assertion_audience"  # type: ignore[attr-defined]


def test_assertion_signed_by_another_key_is_refused(s: Setup) -> None:
    s.add()
    other = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(AuthenticationError) as info:
        s.authenticate(client_assertion=s.assertion(key=other))
    assert info.value.rule == "credential.assertion_invalid"  # type: ignore[attr-defined]
    assert str(info.value) == AUTH_FAILED  # the answer an unknown client gets too (issue #8 item 6)


def test_long_lived_assertion_is_refused(s: Setup) -> None:
    s.add()
    with pytest.raises(AuthenticationError) as info:
        s.authenticate(client_assertion=s.assertion(lifetime=3600))
    assert info.value.rule == "credential.assertion_lifetime"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"exp": None}, "exp is required"),
        ({"jti": None}, "jti"),
        ({"sub": "someone-else"}, "sub"),
        ({"iss": "someone-else"}, "iss"),
    ],
)
def test_assertion_missing_or_wrong_claims_is_refused(s: Setup, over: dict[str, Any], message: str) -> None:
    s.add()
    with pytest.raises(AuthenticationError, match=message):
        s.authenticate(client_assertion=signed(s.ed_key, claims(s, **over)))


def test_assertion_with_the_wrong_algorithm_is_refused(s: Setup) -> None:
    s.add()
    forged = signed(s.secret, claims(s), algorithm="HS256")
    with pytest.raises(AuthenticationError, match="alg must be EdDSA"):
        s.authenticate(client_assertion=forged)


def test_assertion_with_an_embedded_key_is_refused(s: Setup) -> None:
    s.add()
    header = {"jwk": public_jwk(s.ed_key)}
    with pytest.raises(AuthenticationError, match="'jwk'"):
        s.authenticate(client_assertion=signed(s.ed_key, claims(s), headers=header))


def test_unknown_client_is_refused(s: Setup) -> None:
    # UNAUTHENTICATED, like a wrong credential (issue #8 item 6: no client enumeration).
    with pytest.raises(AuthenticationError) as info:
        s.authenticate(client_id="nobody", client_assertion="x.y.z")
    assert info.value.rule == "client.unknown"  # type: ignore[attr-defined]


def test_pending_client_is_told_how_to_get_approved(s: Setup) -> None:
    s.add(status=ClientStatus.PENDING)
    with pytest.raises(ClientNotAllowedError) as info:
        s.authenticate()
    assert info.value.rule == "client.pending"  # type: ignore[attr-defined]
    assert str(info.value) == "client 'agent' is pending approval: run `tokenbroker clients approve agent`"


def test_disabled_client_is_refused(s: Setup) -> None:
    s.add(status=ClientStatus.DISABLED)
    with pytest.raises(ClientNotAllowedError) as info:
        s.authenticate()
    assert info.value.rule == "client.disabled"  # type: ignore[attr-defined]


def test_missing_credential_is_refused(s: Setup) -> None:
    s.add()
    with pytest.raises(AuthenticationError) as info:
        s.auth.authenticate(client_id="agent", audience=AUDIENCE, scopes=[])
    assert info.value.rule == "credential.missing"  # type: ignore[attr-defined]


def test_client_secret_is_accepted(s: Setup) -> None:
    s.add(public_jwk=None, secret_hash=hash_secret(s.secret))
    assert s.authenticate(client_secret=s.secret).client_id == "agent"


def test_wrong_client_secret_is_refused(s: Setup) -> None:
    s.add(public_jwk=None, secret_hash=hash_secret(s.secret))
    with pytest.raises(AuthenticationError) as info:
        s.authenticate(client_secret=("B" if s.secret[0] == "A" else "A") + s.secret[1:])
    assert info.value.rule == "credential.secret_invalid"  # type: ignore[attr-defined]


def test_secret_of_a_key_only_client_is_refused(s: Setup) -> None:
    s.add()
    with pytest.raises(AuthenticationError) as info:
        s.authenticate(client_secret=s.secret)
    assert info.value.rule == "credential.no_secret"  # type: ignore[attr-defined]


def test_audience_outside_the_allowlist_is_refused(s: Setup) -> None:
    s.add()
    with pytest.raises(ClientNotAllowedError, match="clients update agent") as info:
        s.authenticate(audience="https://other.test/mcp")
    assert info.value.rule == "audience.not_allowed"  # type: ignore[attr-defined]


def test_scope_outside_the_allowlist_is_refused(s: Setup) -> None:
    s.add()
    with pytest.raises(ClientNotAllowedError, match="admin") as info:
        s.authenticate(scopes=["tools:call", "admin"])
    assert info.value.rule == "scope.not_allowed"  # type: ignore[attr-defined]


def test_space_separated_scopes_are_checked_one_by_one(s: Setup) -> None:
    s.add()
    s.authenticate(scopes="tools:call tools:list")
    with pytest.raises(ClientNotAllowedError):
        s.authenticate(scopes="tools:call admin")


@pytest.mark.parametrize("ip", ["10.1.2.3", "ipv4:10.1.2.3:5555", "::ffff:10.1.2.3", "[fd00::1]:443"])
def test_source_inside_the_allowed_networks_is_accepted(s: Setup, ip: str) -> None:
    s.add(allowed_cidrs=("10.0.0.0/8", "fd00::/8"))
    s.authenticate(client_ip=ip)


@pytest.mark.parametrize("ip", ["192.168.1.1", None, "not-an-ip"])
def test_source_outside_the_allowed_networks_is_refused(s: Setup, ip: str | None) -> None:
    s.add(allowed_cidrs=("10.0.0.0/8",))
    with pytest.raises(ClientNotAllowedError) as info:
        s.authenticate(client_ip=ip)
    assert info.value.rule == "source.cidr"  # type: ignore[attr-defined]


def test_no_networks_means_any_source(s: Setup) -> None:
    s.add()
    s.authenticate(client_ip="203.0.113.9")


def test_approval_in_the_file_takes_effect_without_restart(s: Setup) -> None:
    s.add(status=ClientStatus.PENDING)
    with pytest.raises(ClientNotAllowedError):
        s.authenticate()
    s.registry.update_client("agent", status=ClientStatus.APPROVED)
    s.authenticate()


def test_make_client_assertion_claims(s: Setup) -> None:
    assertion = make_client_assertion(s.ed_key, "agent", ISSUER, kid="k1", lifetime=30)
    header = jwt.get_unverified_header(assertion)
    assert header["alg"] == "EdDSA"
    assert header["kid"] == "k1"
    body = jwt.decode(assertion, s.ed_key.public_key(), algorithms=["EdDSA"], audience=ISSUER)
    assert body["iss"] == body["sub"] == "agent"
    assert body["exp"] - body["iat"] == 30
    assert abs(body["iat"] - time.time()) < 5
    assert len(body["jti"]) >= 32


def test_a_client_without_a_valid_credential_does_not_learn_its_status(s: Setup) -> None:
    s.add(status=ClientStatus.PENDING)
    with pytest.raises(AuthenticationError) as info:
        s.authenticate(client_assertion=None)
    assert info.value.rule == "credential.missing"  # type: ignore[attr-defined]
    assert "pending" not in str(info.value)
