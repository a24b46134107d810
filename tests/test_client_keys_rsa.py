"""RSA client keys (RS256, PS256) for `private_key_jwt`, as the MCP SDK's
`SignedJWTParameters` signs them by default, and the per-client `require_dpop_nonce` flag:
real keys, a real registry file, the real CLI."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tokenbroker import MemoryStore
from tokenbroker.cli import main
from tokenbroker.client_assertion import PrivateKey, load_private_key, make_client_assertion, public_jwk
from tokenbroker.client_auth import AUTH_FAILED, ClientAuthenticator
from tokenbroker.errors import AuthenticationError, InvalidArgumentError
from tokenbroker.registry import Binding, ClientRecord, ClientStatus
from tokenbroker.registry_file import FileRegistry, RegistryFileError, check_public_jwk

from support.brokers import FakeClock

ISSUER = "https://broker.test"
AUDIENCE = "https://mcp.test/mcp"
DPOP_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def weak_rsa_key() -> rsa.RSAPrivateKey:
    """Too short to register: the point of the tests that use it."""
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505


def pkcs8(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def spki(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def uint(number: int) -> str:
    return b64url(number.to_bytes((number.bit_length() + 7) // 8, "big"))


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock()
        self.registry = FileRegistry(tmp_path / "registry.toml")
        self.auth = ClientAuthenticator(self.registry, MemoryStore(), assertion_audience=ISSUER, clock=self.clock)

    def add(self, key: Any, client_id: str = "agent", **fields: Any) -> ClientRecord:
        values: dict[str, Any] = {
            "status": ClientStatus.APPROVED,
            "public_jwk": public_jwk(key),
            "allowed_audiences": (AUDIENCE,),
            "allowed_scopes": ("tools:call",),
        }
        values.update(fields)
        record = ClientRecord(client_id, **values)
        self.registry.put_client(record)
        return record

    def claims(self, client_id: str = "agent") -> dict[str, Any]:
        now = int(self.clock())
        return {"iss": client_id, "sub": client_id, "aud": ISSUER, "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex}

    def authenticate(self, assertion: str, client_id: str = "agent") -> ClientRecord:
        return self.auth.authenticate(
            client_id=client_id, client_assertion=assertion, audience=AUDIENCE, scopes=["tools:call"], dpop_jkt=DPOP_JKT
        )

    def refused(self, assertion: str, client_id: str = "agent") -> AuthenticationError:
        with pytest.raises(AuthenticationError) as info:
            self.authenticate(assertion, client_id)
        return info.value


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


# -- verification -------------------------------------------------------------------------------


def test_rs256_assertion_of_an_rsa_client_is_accepted(s: Setup, rsa_key: rsa.RSAPrivateKey) -> None:
    s.add(rsa_key)
    assertion = make_client_assertion(rsa_key, "agent", ISSUER, now=int(s.clock()))
    assert jwt.get_unverified_header(assertion)["alg"] == "RS256"
    assert s.authenticate(assertion).client_id == "agent"


def test_ps256_assertion_of_an_rsa_client_is_accepted(s: Setup, rsa_key: rsa.RSAPrivateKey) -> None:
    s.add(rsa_key)
    assertion = make_client_assertion(rsa_key, "agent", ISSUER, now=int(s.clock()), algorithm="PS256")
    assert jwt.get_unverified_header(assertion)["alg"] == "PS256"
    assert s.authenticate(assertion).client_id == "agent"


def test_ps256_assertion_signed_by_pyjwt_verifies(s: Setup, rsa_key: rsa.RSAPrivateKey) -> None:
    s.add(rsa_key)
    assertion = jwt.encode(s.claims(), pkcs8(rsa_key), algorithm="PS256", headers={"typ": "JWT"})
    assert s.authenticate(assertion).client_id == "agent"


def test_rs256_and_ps256_assertions_signed_by_joserfc_verify(s: Setup, rsa_key: rsa.RSAPrivateKey) -> None:
    from joserfc import jwt as jose_jwt
    from joserfc.jwk import RSAKey

    s.add(rsa_key)
    key = RSAKey.import_key(pkcs8(rsa_key))
    for algorithm in ("RS256", "PS256"):
        assertion = jose_jwt.encode({"alg": algorithm}, s.claims(), key, algorithms=[algorithm])
        assert s.authenticate(assertion).client_id == "agent"


async def test_the_mcp_sdks_signed_jwt_assertion_is_accepted(s: Setup, rsa_key: rsa.RSAPrivateKey) -> None:
    from mcp.client.auth.extensions.client_credentials import SignedJWTParameters

    s.add(rsa_key)
    parameters = SignedJWTParameters(issuer="agent", subject="agent", signing_key=pkcs8(rsa_key).decode("ascii"))
    assert parameters.signing_algorithm == "RS256"  # the SDK's default, which this test is about
    assertion = await parameters.create_assertion_provider()(ISSUER)  # the SDK passes the issuer as aud
    assert jwt.get_unverified_header(assertion)["alg"] == "RS256"
    record = await s.auth.aauthenticate(
        client_id="agent", client_assertion=assertion, audience=AUDIENCE, scopes=["tools:call"], dpop_jkt=DPOP_JKT
    )
    assert record.client_id == "agent"


def test_rs256_assertion_against_an_ed25519_client_gets_the_generic_answer(
    s: Setup, rsa_key: rsa.RSAPrivateKey
) -> None:
    s.add(ed25519.Ed25519PrivateKey.generate())
    refused = s.refused(make_client_assertion(rsa_key, "agent", ISSUER, now=int(s.clock())))
    assert str(refused) == AUTH_FAILED
    assert refused.rule == "credential.assertion_invalid"  # type: ignore[attr-defined]


def test_eddsa_assertion_against_an_rsa_client_gets_the_generic_answer(s: Setup, rsa_key: rsa.RSAPrivateKey) -> None:
    s.add(rsa_key)
    refused = s.refused(make_client_assertion(ed25519.Ed25519PrivateKey.generate(), "agent", ISSUER))
    assert str(refused) == AUTH_FAILED


def test_a_key_that_names_ps256_verifies_nothing_else(s: Setup, rsa_key: rsa.RSAPrivateKey) -> None:
    s.add(rsa_key, public_jwk={**public_jwk(rsa_key), "alg": "PS256"})
    now = int(s.clock())
    assert str(s.refused(make_client_assertion(rsa_key, "agent", ISSUER, now=now))) == AUTH_FAILED
    assert s.authenticate(make_client_assertion(rsa_key, "agent", ISSUER, now=now, algorithm="PS256"))


def test_rs256_assertion_signed_by_another_rsa_key_gets_the_generic_answer(
    s: Setup, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    s.add(rsa_key)
    refused = s.refused(make_client_assertion(other_rsa_key, "agent", ISSUER, now=int(s.clock())))
    assert str(refused) == AUTH_FAILED
    assert refused.rule == "credential.assertion_invalid"  # type: ignore[attr-defined]


def test_an_unknown_clients_rs256_assertion_gets_the_answer_a_bad_signature_gets(
    s: Setup, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    s.add(rsa_key)
    now = int(s.clock())
    unknown = s.refused(make_client_assertion(rsa_key, "nobody", ISSUER, now=now), client_id="nobody")
    bad_signature = s.refused(make_client_assertion(other_rsa_key, "agent", ISSUER, now=now))
    assert str(unknown) == str(bad_signature) == AUTH_FAILED
    assert type(unknown) is type(bad_signature)
    assert unknown.rule == "client.unknown"  # type: ignore[attr-defined]


def test_alg_none_is_refused(s: Setup, rsa_key: rsa.RSAPrivateKey) -> None:
    s.add(rsa_key)
    unsigned = jwt.encode(s.claims(), "", algorithm="none")
    with pytest.raises(AuthenticationError, match="alg must be EdDSA, ES256, RS256 or PS256"):
        s.authenticate(unsigned)


def test_hs256_keyed_with_the_rsa_public_key_is_refused(s: Setup, rsa_key: rsa.RSAPrivateKey) -> None:
    # The classic confusion: an HMAC whose secret is the client's (public) RSA key.
    s.add(rsa_key)
    signing_input = (
        b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64url(json.dumps(s.claims()).encode())
    )
    mac = hmac.new(spki(rsa_key), signing_input.encode("ascii"), hashlib.sha256).digest()
    with pytest.raises(AuthenticationError, match="alg must be"):
        s.authenticate(f"{signing_input}.{b64url(mac)}")


# -- the client's side --------------------------------------------------------------------------


def test_make_client_assertion_refuses_an_algorithm_the_key_cannot_sign_with(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="RS256 or PS256"):
        make_client_assertion(rsa_key, "agent", ISSUER, algorithm="ES256")
    with pytest.raises(ValueError, match="EdDSA"):
        make_client_assertion(ed25519.Ed25519PrivateKey.generate(), "agent", ISSUER, algorithm="PS256")
    with pytest.raises(ValueError, match="ES256"):
        make_client_assertion(ec.generate_private_key(ec.SECP256R1()), "agent", ISSUER, algorithm="RS256")


def test_an_rsa_private_key_loads_from_pkcs8_and_pkcs1_pem(rsa_key: rsa.RSAPrivateKey) -> None:
    pkcs1 = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    for pem in (pkcs8(rsa_key), pkcs1):
        loaded = load_private_key(pem)
        assert isinstance(loaded, rsa.RSAPrivateKey)
        assert public_jwk(pem) == public_jwk(rsa_key) == public_jwk(spki(rsa_key))


def test_a_1024_bit_rsa_private_key_is_refused(weak_rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="1024 bits"):
        load_private_key(pkcs8(weak_rsa_key))
    with pytest.raises(ValueError, match="1024 bits"):
        public_jwk(spki(weak_rsa_key))


# -- registration -------------------------------------------------------------------------------


def test_the_registered_rsa_jwk_is_clean(rsa_key: rsa.RSAPrivateKey) -> None:
    numbers = rsa_key.public_key().public_numbers()
    padded_n = b64url(b"\0" + numbers.n.to_bytes(256, "big"))  # some libraries add a zero octet
    jwk = {"kty": "RSA", "n": padded_n, "e": "AQAB", "kid": "k1", "use": "sig", "key_ops": ["verify"], "x": "junk"}
    assert check_public_jwk(jwk) == {"kty": "RSA", "n": uint(numbers.n), "e": "AQAB", "kid": "k1", "use": "sig"}


def test_a_1024_bit_rsa_key_is_refused_at_registration(tmp_path: Path, weak_rsa_key: rsa.RSAPrivateKey) -> None:
    weak = weak_rsa_key.public_key().public_numbers()
    jwk = {"kty": "RSA", "n": uint(weak.n), "e": uint(weak.e)}
    with pytest.raises(InvalidArgumentError, match="1024 bits: RSA client keys need at least 2048 bits"):
        FileRegistry(tmp_path / "registry.toml").add_client(ClientRecord("agent", public_jwk=jwk))
    assert FileRegistry(tmp_path / "registry.toml").client("agent") is None


def test_an_rsa_key_over_8192_bits_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="8193 bits: at most 8192"):
        check_public_jwk({"kty": "RSA", "n": uint((1 << 8192) + 1), "e": "AQAB"})


@pytest.mark.parametrize(("e", "why"), [(1, "odd number of at least 3"), (65538, "odd"), (1 << 300 | 1, "too large")])
def test_a_bad_rsa_exponent_is_refused(rsa_key: rsa.RSAPrivateKey, e: int, why: str) -> None:
    n = rsa_key.public_key().public_numbers().n
    with pytest.raises(InvalidArgumentError, match=why):
        check_public_jwk({"kty": "RSA", "n": uint(n), "e": uint(e)})


def test_an_rsa_exponent_of_3_is_accepted(rsa_key: rsa.RSAPrivateKey) -> None:
    n = rsa_key.public_key().public_numbers().n
    assert check_public_jwk({"kty": "RSA", "n": uint(n), "e": "Aw"})["e"] == "Aw"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"n": "not base64!"}, "not base64url"),
        ({"n": None}, "lacks its 'n'"),
        ({"d": "AQAB"}, "private key"),
        ({"qi": "AQAB"}, "private key"),
        ({"alg": "ES256"}, "use RS256 or PS256"),
        ({"use": "enc"}, "use must be 'sig'"),
    ],
)
def test_an_unusable_rsa_jwk_is_refused(rsa_key: rsa.RSAPrivateKey, change: dict[str, Any], why: str) -> None:
    jwk = {**public_jwk(rsa_key), **change}
    with pytest.raises(InvalidArgumentError, match=why):
        check_public_jwk({k: v for k, v in jwk.items() if v is not None})


def test_an_rsa_client_round_trips_through_the_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "registry.toml"
    record = ClientRecord(
        "agent", status=ClientStatus.APPROVED, public_jwk=public_jwk(rsa_key), require_dpop_nonce=True
    )
    FileRegistry(path).add_client(record)
    assert FileRegistry(path).client("agent") == record
    assert "require_dpop_nonce = true" in path.read_text()


def test_require_dpop_nonce_defaults_off_and_is_not_written(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    FileRegistry(path).add_client(ClientRecord("agent", public_jwk=public_jwk(ed25519.Ed25519PrivateKey.generate())))
    record = FileRegistry(path).client("agent")
    assert record is not None
    assert record.require_dpop_nonce is False
    assert "require_dpop_nonce" not in path.read_text()


def test_a_hand_written_require_dpop_nonce_must_be_a_boolean(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text('[clients.agent]\nrequire_dpop_nonce = "yes"\n')
    with pytest.raises(RegistryFileError, match="require_dpop_nonce must be true or false"):
        FileRegistry(path)


def test_a_dpop_nonce_needs_binding_dpop(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"binding bearer.*cannot require a DPoP nonce"):
        FileRegistry(tmp_path / "r.toml").add_client(
            ClientRecord("agent", binding=Binding.BEARER, require_dpop_nonce=True)
        )
    path = tmp_path / "hand.toml"
    path.write_text('[clients.agent]\nbinding = "mtls"\nrequire_dpop_nonce = true\n')
    with pytest.raises(RegistryFileError, match=r"\[clients.agent\].*binding mtls"):
        FileRegistry(path)


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path, no_tokenbroker_env: None) -> dict[str, str]:
    return {"TOKENBROKER_REGISTRY_FILE": str(tmp_path / "registry.toml"), "TOKENBROKER_ISSUER": ISSUER}


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.count("\n") == 0, message
    for fragment in fragments:
        assert fragment in message


def test_cli_generates_an_rsa_key_whose_assertions_verify(env: dict[str, str], tmp_path: Path) -> None:
    key_file = tmp_path / "agent.pem"
    result = run(
        env,
        *("clients", "add", "agent", "--generate-key", str(key_file), "--key-type", "rsa"),
        *("--audience", AUDIENCE, "--scope", "tools:call", "--approve"),
    )
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = load_private_key(key_file.read_bytes())
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    registry = FileRegistry(env["TOKENBROKER_REGISTRY_FILE"])
    record = registry.client("agent")
    assert record is not None
    assert record.public_jwk == public_jwk(key)
    assert "PRIVATE" not in Path(env["TOKENBROKER_REGISTRY_FILE"]).read_text()
    shown = json.loads(run(env, "clients", "show", "agent").stdout)
    assert shown["public_jwk"]["kty"] == "RSA"

    auth = ClientAuthenticator(registry, MemoryStore(), assertion_audience=ISSUER)
    for algorithm in ("RS256", "PS256"):
        assertion = make_client_assertion(key_file.read_bytes(), "agent", ISSUER, algorithm=algorithm)
        assert auth.authenticate(
            client_id="agent", client_assertion=assertion, audience=AUDIENCE, scopes=["tools:call"], dpop_jkt=DPOP_JKT
        )


def test_cli_registers_an_rsa_public_key_from_pem_or_jwk(
    env: dict[str, str], tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    pem, jwk_file = tmp_path / "pub.pem", tmp_path / "pub.jwk"
    pem.write_bytes(spki(rsa_key))
    jwk_file.write_text(json.dumps(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)))
    assert run(env, "clients", "add", "a", "--public-key", str(pem)).exit_code == 0
    assert run(env, "clients", "add", "b", "--public-key", str(jwk_file)).exit_code == 0
    registry = FileRegistry(env["TOKENBROKER_REGISTRY_FILE"])
    a, b = registry.client("a"), registry.client("b")
    assert a is not None
    assert b is not None
    assert a.public_jwk == b.public_jwk == public_jwk(rsa_key)


def test_cli_refuses_a_1024_bit_rsa_public_key_in_one_line(
    env: dict[str, str], tmp_path: Path, weak_rsa_key: rsa.RSAPrivateKey
) -> None:
    weak = weak_rsa_key
    pem, jwk_file = tmp_path / "weak.pem", tmp_path / "weak.jwk"
    pem.write_bytes(spki(weak))
    jwk_file.write_text(json.dumps(jwt.algorithms.RSAAlgorithm.to_jwk(weak.public_key(), as_dict=True)))
    one_line_error(run(env, "clients", "add", "a", "--public-key", str(pem)), "1024 bits")
    one_line_error(run(env, "clients", "add", "b", "--public-key", str(jwk_file)), "1024 bits", "at least 2048")
    assert FileRegistry(env["TOKENBROKER_REGISTRY_FILE"]).clients() == []


def test_cli_require_dpop_nonce_round_trip(env: dict[str, str]) -> None:
    result = run(env, "clients", "add", "agent", "--generate-secret")
    assert result.exit_code == 0, result.output
    assert json.loads(run(env, "clients", "show", "agent").stdout)["require_dpop_nonce"] is False

    assert run(env, "clients", "update", "agent", "--require-dpop-nonce").exit_code == 0
    record = FileRegistry(env["TOKENBROKER_REGISTRY_FILE"]).client("agent")
    assert record is not None
    assert record.require_dpop_nonce is True
    assert json.loads(run(env, "clients", "show", "agent").stdout)["require_dpop_nonce"] is True
    assert json.loads(run(env, "clients", "list", "--json").stdout)[0]["require_dpop_nonce"] is True

    assert run(env, "clients", "update", "agent", "--no-require-dpop-nonce").exit_code == 0
    assert json.loads(run(env, "clients", "show", "agent").stdout)["require_dpop_nonce"] is False


def test_cli_add_with_require_dpop_nonce(env: dict[str, str]) -> None:
    assert run(env, "clients", "add", "agent", "--generate-secret", "--require-dpop-nonce").exit_code == 0
    record = FileRegistry(env["TOKENBROKER_REGISTRY_FILE"]).client("agent")
    assert record is not None
    assert record.require_dpop_nonce is True


def test_cli_refuses_a_dpop_nonce_for_a_bearer_client_in_one_line(env: dict[str, str]) -> None:
    result = run(env, "clients", "add", "agent", "--generate-secret", "--binding", "bearer", "--require-dpop-nonce")
    one_line_error(result, "cannot require a DPoP nonce", "--no-require-dpop-nonce")
    assert FileRegistry(env["TOKENBROKER_REGISTRY_FILE"]).client("agent") is None
