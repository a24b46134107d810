"""`Keyring`: the broker's Ed25519 signing keys. One key is active for signing; rotation
keeps the previous keys for verification until they are retired."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenbroker._core import KeySet


class Keyring:
    """Ed25519 keys by `kid` (default: the key's RFC 7638 thumbprint)."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        """An empty keyring; use `generate`, `from_pem`, `from_jwk` or `load`."""
        self._keys = KeySet()

    @classmethod
    def generate(cls) -> Keyring:
        """A keyring with one new random key."""
        keyring = cls()
        keyring._keys.generate()
        return keyring

    @classmethod
    def from_pem(cls, pem: bytes, kid: str | None = None) -> Keyring:
        """A keyring holding one Ed25519 PKCS#8 private key in PEM.

        Raises `InvalidKeyError` for anything else (another key type, a public key, garbage).
        """
        keyring = cls()
        keyring.add_pem(pem, kid)
        return keyring

    @classmethod
    def from_jwk(cls, jwk: dict[str, Any] | str) -> Keyring:
        """A keyring from a private OKP JWK, or from a JWKS of them (the last one active)."""
        keyring = cls()
        doc = json.loads(jwk) if isinstance(jwk, str) else jwk
        for key in doc.get("keys", [doc]):
            keyring._keys.add_jwk(json.dumps(key))
        return keyring

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """Reads a keyring saved by `save` (a private JWKS) or a single PEM key."""
        data = Path(path).read_bytes()
        if data.lstrip().startswith(b"-----BEGIN"):
            return cls.from_pem(data)
        return cls.from_jwk(data.decode())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes every key, private parts included, as a JWKS readable by the owner only."""
        doc = {"keys": [self.to_jwk(kid, private=True) for kid in self.kids]}
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a leftover temp file keeps its old mode through O_CREAT
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, target)

    def add_pem(self, pem: bytes, kid: str | None = None) -> str:
        """Adds a PKCS#8 PEM private key and makes it the active one; returns its kid."""
        try:
            text = pem.decode("ascii")
        except UnicodeDecodeError:
            from tokenbroker.errors import InvalidKeyError

            raise InvalidKeyError("invalid key: PEM must be ASCII") from None
        return self._keys.add_pem(text, kid)

    def to_pem(self, kid: str | None = None) -> bytes:
        """The private key (default: the active one) as PKCS#8 PEM."""
        return self._keys.private_pem(kid or self.active_kid).encode("ascii")

    def to_jwk(self, kid: str | None = None, *, private: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._keys.jwk_json(kid or self.active_kid, private))
        return result

    def rotate(self) -> str:
        """Generates a new active key; tokens signed by the old ones still validate."""
        return self._keys.rotate()

    def retire(self, kid: str) -> None:
        """Removes a key: its tokens stop validating. The active key cannot be retired."""
        self._keys.retire(kid)

    @property
    def active_kid(self) -> str:
        kid = self._keys.active_kid
        if kid is None:
            from tokenbroker.errors import InvalidArgumentError

            raise InvalidArgumentError("the keyring is empty")
        return kid

    @property
    def kids(self) -> list[str]:
        return self._keys.kids()

    @property
    def key_set(self) -> KeySet:
        """The engine's `KeySet` these keys live in: what a `Broker` hands its engine to
        sign and verify with, so that rotation and retirement here take effect there at
        once (the engine holds the same set, not a copy)."""
        return self._keys

    def jwks(self) -> dict[str, Any]:
        """The public JWKS (RFC 7517) of every key that can still verify."""
        result: dict[str, Any] = json.loads(self._keys.jwks_json())
        return result

    def __repr__(self) -> str:
        return f"Keyring(active_kid={self._keys.active_kid!r}, keys={len(self.kids)})"
