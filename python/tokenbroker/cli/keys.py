"""`tokenbroker keys`: the broker's Ed25519 signing keys, kept in a private JWKS file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from tokenbroker.cli._errors import OneLineErrors, fail, one_line
from tokenbroker.cli._output import info, print_json
from tokenbroker.cli._state import State, pass_state

if TYPE_CHECKING:
    from tokenbroker.keyring import Keyring

_file_option = click.option(
    "--file", "file", type=click.Path(dir_okay=False, path_type=Path), help="Key file (default: key_file)."
)


@click.group(cls=OneLineErrors)
def keys() -> None:
    """The broker's Ed25519 signing keys (a private JWKS file)."""


def _key_file(state: State, file: Path | None) -> Path:
    path = file or state.settings().key_file
    if path is None:
        raise click.UsageError("no key file: pass --file or set key_file in the config (TOKENBROKER_KEY_FILE)")
    return Path(path)


def _load_keyring(path: Path) -> Keyring:
    from tokenbroker.keyring import Keyring

    if not path.exists():
        fail(f"key file {path} does not exist: create it with `tokenbroker keys generate --out {path}`")
    try:
        return Keyring.load(path)
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"key file {path} holds no usable signing key ({one_line(exc)})")


@keys.command("generate")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="File to create.")
@click.option("--kid", help="Key id (default: the key's RFC 7638 thumbprint).")
@click.option("--force", is_flag=True, help="Replace an existing file (its tokens stop validating).")
def keys_generate(out: Path, kid: str | None, force: bool) -> None:
    """Create a key file with one new signing key."""
    from tokenbroker.keyring import Keyring

    if out.exists() and not force:
        fail(
            f"{out} already exists: rotate it with `tokenbroker keys rotate --file {out}`, "
            "or pass --force to replace it (tokens it signed stop validating)"
        )
    if kid:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        keyring = Keyring.from_pem(pem, kid)
    else:
        keyring = Keyring.generate()
    out.parent.mkdir(parents=True, exist_ok=True)
    keyring.save(out)
    info(f"wrote signing key {keyring.active_kid!r} to {out} (private: keep it 0600)")


@keys.command("rotate")
@_file_option
@pass_state
def keys_rotate(state: State, file: Path | None) -> None:
    """Add a new active key; the old ones keep verifying until retired."""
    path = _key_file(state, file)
    keyring = _load_keyring(path)
    kid = keyring.rotate()
    keyring.save(path)
    others = [k for k in keyring.kids if k != kid]
    info(
        f"new active key {kid!r} in {path}; still verifying: {', '.join(others) or 'none'} "
        "(restart the broker to sign with it)"
    )


@keys.command("retire")
@click.argument("kid")
@_file_option
@pass_state
def keys_retire(state: State, kid: str, file: Path | None) -> None:
    """Remove a key: tokens it signed stop validating."""
    path = _key_file(state, file)
    keyring = _load_keyring(path)
    if kid not in keyring.kids:
        fail(f"key {kid!r} is not in {path}: `tokenbroker keys show --file {path}` lists the keys")
    if kid == keyring.active_kid:
        fail(f"key {kid!r} is the active key: rotate first with `tokenbroker keys rotate --file {path}`")
    keyring.retire(kid)
    keyring.save(path)
    info(f"retired key {kid!r} from {path}")


@keys.command("jwks")
@_file_option
@pass_state
def keys_jwks(state: State, file: Path | None) -> None:
    """Print the public JWKS (for MCP servers and standard JWT libraries)."""
    print_json(_load_keyring(_key_file(state, file)).jwks())


@keys.command("show")
@_file_option
@pass_state
def keys_show(state: State, file: Path | None) -> None:
    """Print the key ids and which one signs (never the keys themselves)."""
    path = _key_file(state, file)
    keyring = _load_keyring(path)
    print_json({"file": str(path), "active_kid": keyring.active_kid, "kids": keyring.kids})
