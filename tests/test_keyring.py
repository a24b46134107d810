import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tokenbroker import Keyring
from tokenbroker._core import KeySet, jwk_thumbprint
from tokenbroker.errors import InvalidArgumentError, InvalidKeyError, UnknownKeyIdError

# RFC 8037 Appendix A.1 private key and A.3 thumbprint.
RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def _pem(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_default_kid_is_the_rfc7638_thumbprint():
    keyring = Keyring.from_jwk({"kty": "OKP", "crv": "Ed25519", "d": RFC8037_D, "x": RFC8037_X})
    assert keyring.active_kid == RFC8037_THUMBPRINT
    assert jwk_thumbprint(json.dumps({"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X})) == RFC8037_THUMBPRINT


def test_from_pem_reads_a_pkcs8_ed25519_key_and_keeps_an_explicit_kid():
    pem = _pem(ed25519.Ed25519PrivateKey.generate())
    assert Keyring.from_pem(pem, kid="k1").active_kid == "k1"
    assert Keyring.from_pem(pem).to_pem() == pem


@pytest.mark.parametrize(
    "pem",
    [
        b"not a pem",
        b"\xff\xfe",
        _pem(ec.generate_private_key(ec.SECP256R1())),
        _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    ],
    ids=["garbage", "binary", "p256", "rsa", "public-key"],
)
def test_from_pem_rejects_anything_but_an_ed25519_private_key(pem):
    with pytest.raises(InvalidKeyError):
        Keyring.from_pem(pem)


def test_save_and_load_round_trip_every_key(tmp_path):
    keyring = Keyring.generate()
    first = keyring.active_kid
    second = keyring.rotate()
    path = tmp_path / "keys.json"
    keyring.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = Keyring.load(path)
    assert loaded.kids == [first, second]
    assert loaded.active_kid == second
    pem_path = tmp_path / "key.pem"
    pem_path.write_bytes(keyring.to_pem(first))
    assert Keyring.load(pem_path).active_kid == first


def test_jwks_is_public_and_verifies_with_cryptography():
    keyring = Keyring.generate()
    jwks = keyring.jwks()
    assert all("d" not in k for k in jwks["keys"])
    key = jwt.PyJWK(jwks["keys"][0])
    assert key.key_id == keyring.active_kid


def test_rotate_keeps_old_keys_and_retire_removes_them():
    keyring = Keyring.generate()
    old = keyring.active_kid
    new = keyring.rotate()
    assert {k["kid"] for k in keyring.jwks()["keys"]} == {old, new}
    with pytest.raises(InvalidArgumentError):
        keyring.retire(new)
    keyring.retire(old)
    assert keyring.kids == [new]
    with pytest.raises(UnknownKeyIdError):
        keyring.retire(old)


def test_key_set_is_the_keyrings_own_set_not_a_copy():
    """What a Broker hands its engine: rotation and retirement on the keyring show there."""
    keyring = Keyring.generate()
    keys = keyring.key_set
    assert isinstance(keys, KeySet)
    old = keyring.active_kid
    new = keyring.rotate()
    assert keys.active_kid == new
    keyring.retire(old)
    assert keys.kids() == keyring.kids == [new]


def test_jwk_with_mismatched_public_part_is_rejected():
    other = Keyring.generate().to_jwk(private=True)
    with pytest.raises(InvalidKeyError):
        Keyring.from_jwk({"kty": "OKP", "crv": "Ed25519", "d": RFC8037_D, "x": other["x"]})
