"""`tokenbroker clients`: the registry's MCP clients, who may get tokens for which
audiences and scopes, with which credential and binding."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tokenbroker.cli._errors import OneLineErrors, fail
from tokenbroker.cli._output import info, jsonable, print_json, print_table
from tokenbroker.cli._secrets import write_private
from tokenbroker.cli._state import State, pass_state
from tokenbroker.cli._values import scopes as split_scopes

if TYPE_CHECKING:
    from tokenbroker.registry import ClientRecord, ClientStatus

_Command = TypeVar("_Command", bound=Callable[..., Any])


@click.group(cls=OneLineErrors)
def clients() -> None:
    """MCP clients: who may get tokens, for which audiences and scopes."""


def _client_json(record: ClientRecord) -> dict[str, Any]:
    data = jsonable(record)
    data["secret_hash"] = "set" if record.secret_hash else None
    return dict(data)


def _load_public_key(path: Path) -> dict[str, str]:
    from tokenbroker.client_assertion import public_jwk

    data = path.read_bytes()
    if data.lstrip().startswith(b"{"):
        from tokenbroker.registry_file import check_public_jwk

        return check_public_jwk(json.loads(data), where=str(path))
    try:
        return public_jwk(data)
    except ValueError as exc:
        fail(f"{path}: {exc} (expected an Ed25519, P-256 or RSA public key in PEM, or a public JWK)")


def _generate_client_key(key_type: str) -> tuple[bytes, dict[str, str]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    from tokenbroker.client_assertion import PrivateKey, public_jwk

    key: PrivateKey
    if key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif key_type == "p256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:  # rsa: 2048 bits, what the MCP SDK's RS256 clients usually hold
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem, public_jwk(key)


_policy_option = click.option(
    "--policy",
    type=click.Choice(["reject", "evict_oldest"]),
    help="What one session too many does (default: reject).",
)


def _nonce_option(default: bool | None) -> Callable[[_Command], _Command]:
    return click.option(
        "--require-dpop-nonce/--no-require-dpop-nonce",
        default=default,
        help="Its DPoP proofs at the token endpoint must carry a nonce the broker issued (RFC 9449 section 8; "
        "binding dpop only)." + (" Default: off." if default is not None else ""),
    )


@clients.command("add")
@click.argument("client_id")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="PEM or JWK file.")
@click.option(
    "--generate-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Generate a key pair; write the private key (PEM, 0600) here.",
)
@click.option(
    "--key-type",
    type=click.Choice(["ed25519", "p256", "rsa"]),
    default="ed25519",
    show_default=True,
    help="With --generate-key: Ed25519 (EdDSA), P-256 (ES256) or RSA 2048 (RS256/PS256, the MCP SDK's default).",
)
@click.option("--generate-secret", is_flag=True, help="Generate a client secret (printed once).")
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --generate-secret: write the secret here (0600) instead of printing it.",
)
@click.option("--audience", "audiences", multiple=True, help="Resource URI it may get tokens for (repeatable).")
@click.option("--scope", "scopes", multiple=True, help="Scope it may ask for (repeatable).")
@click.option("--max-sessions", type=click.IntRange(1), help="Concurrent sessions (default: the max_sessions setting).")
@_policy_option
@click.option("--cidr", "cidrs", multiple=True, help="Network it may ask from, e.g. 10.0.0.0/8 (repeatable).")
@click.option(
    "--binding",
    type=click.Choice(["dpop", "mtls", "bearer"]),
    default="dpop",
    show_default=True,
    help="What its tokens are bound to: its DPoP key, its mTLS certificate, or nothing (bearer).",
)
@_nonce_option(False)
@click.option("--approve", is_flag=True, help="Approve at once (new clients are pending otherwise).")
@pass_state
def clients_add(
    state: State,
    client_id: str,
    public_key: Path | None,
    generate_key: Path | None,
    key_type: str,
    generate_secret: bool,
    secret_file: Path | None,
    audiences: tuple[str, ...],
    scopes: tuple[str, ...],
    max_sessions: int | None,
    policy: str | None,
    cidrs: tuple[str, ...],
    binding: str,
    require_dpop_nonce: bool,
    approve: bool,
) -> None:
    """Register a client (pending until approved). Only hashes of secrets are stored."""
    from tokenbroker.models import LimitPolicy
    from tokenbroker.registry import Binding, ClientRecord, ClientStatus
    from tokenbroker.registry_file import check_cidr, check_id, hash_secret
    from tokenbroker.registry_file import generate_secret as new_secret

    if public_key and generate_key:
        raise click.UsageError("give --public-key or --generate-key, not both")
    if not (public_key or generate_key or generate_secret):
        raise click.UsageError("give a credential: --public-key PEM_FILE, --generate-key OUT_FILE or --generate-secret")
    if secret_file and not generate_secret:
        raise click.UsageError("--secret-file goes with --generate-secret")
    check_id("client", client_id)
    registry = state.registry()
    if registry.client(client_id) is not None:
        fail(
            f"client {client_id!r} already exists: change it with `tokenbroker clients update {client_id}` "
            f"or remove it with `tokenbroker clients remove {client_id}`"
        )
    pem: bytes | None = None
    jwk = _load_public_key(public_key) if public_key else None
    if generate_key:
        pem, jwk = _generate_client_key(key_type)
    secret = new_secret() if generate_secret else None
    record = ClientRecord(
        client_id,
        status=ClientStatus.APPROVED if approve else ClientStatus.PENDING,
        public_jwk=jwk,
        secret_hash=hash_secret(secret) if secret else None,
        allowed_audiences=tuple(dict.fromkeys(audiences)),
        allowed_scopes=split_scopes(scopes),
        max_sessions=max_sessions or state.settings().max_sessions,
        limit_policy=LimitPolicy(policy or "reject"),
        allowed_cidrs=tuple(check_cidr(c) for c in cidrs),
        binding=Binding(binding),
        require_dpop_nonce=require_dpop_nonce,
    )
    # The files are written before the registry entry, and removed again when it fails:
    # a client is never registered without the key or secret it was given.
    written: list[Path] = []
    try:
        if generate_key and pem is not None:
            write_private(generate_key, pem)
            written.append(generate_key)
        if secret_file and secret:
            write_private(secret_file, secret.encode() + b"\n")
            written.append(secret_file)
        registry.add_client(record)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    if generate_key:
        info(f"wrote the client's private key to {generate_key} (for the client; the broker keeps the public key)")
    if secret and secret_file:
        info(f"wrote the client secret to {secret_file} (only its hash is stored)")
    elif secret:
        info("client secret (shown once; only its hash is stored):")
        click.echo(secret)
    status = "approved" if approve else f"pending: approve it with `tokenbroker clients approve {client_id}`"
    info(f"registered client {client_id!r} in {registry.path} ({status})")
    if not audiences:
        info(
            f"note: client {client_id!r} may not get tokens for any audience yet: "
            f"add one with `tokenbroker clients update {client_id} --audience URI`"
        )


@clients.command("update")
@click.argument("client_id")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="New public key.")
@click.option("--audience", "audiences", multiple=True, help="Replace the allowed audiences (repeatable).")
@click.option("--scope", "scopes", multiple=True, help="Replace the allowed scopes (repeatable).")
@click.option("--max-sessions", type=click.IntRange(1))
@_policy_option
@click.option("--cidr", "cidrs", multiple=True, help="Replace the allowed networks (repeatable).")
@click.option("--any-source", is_flag=True, help="Remove the network restriction.")
@click.option(
    "--binding", type=click.Choice(["dpop", "mtls", "bearer"]), help="What its tokens are bound to (see clients add)."
)
@_nonce_option(None)
@pass_state
def clients_update(
    state: State,
    client_id: str,
    public_key: Path | None,
    audiences: tuple[str, ...],
    scopes: tuple[str, ...],
    max_sessions: int | None,
    policy: str | None,
    cidrs: tuple[str, ...],
    any_source: bool,
    binding: str | None,
    require_dpop_nonce: bool | None,
) -> None:
    """Change a client's key or policy; each list given replaces the old one."""
    from tokenbroker.models import LimitPolicy
    from tokenbroker.registry import Binding
    from tokenbroker.registry_file import check_cidr

    if cidrs and any_source:
        raise click.UsageError("give --cidr or --any-source, not both")
    changes: dict[str, Any] = {}
    if public_key:
        changes["public_jwk"] = _load_public_key(public_key)
    if audiences:
        changes["allowed_audiences"] = tuple(dict.fromkeys(audiences))
    if scopes:
        changes["allowed_scopes"] = split_scopes(scopes)
    if max_sessions is not None:
        changes["max_sessions"] = max_sessions
    if policy:
        changes["limit_policy"] = LimitPolicy(policy)
    if cidrs:
        changes["allowed_cidrs"] = tuple(check_cidr(c) for c in cidrs)
    if any_source:
        changes["allowed_cidrs"] = ()
    if binding:
        changes["binding"] = Binding(binding)
    if require_dpop_nonce is not None:
        changes["require_dpop_nonce"] = require_dpop_nonce
    if not changes:
        raise click.UsageError(
            "nothing to change: give --audience, --scope, --public-key, --max-sessions, --binding, "
            "--require-dpop-nonce, ..."
        )
    record = state.registry().update_client(client_id, **changes)
    info(f"updated client {client_id!r}")
    print_json(_client_json(record))


def _set_status(state: State, client_id: str, status: ClientStatus) -> ClientRecord:
    return state.registry().update_client(client_id, status=status)


@clients.command("approve")
@click.argument("client_id")
@pass_state
def clients_approve(state: State, client_id: str) -> None:
    """Let a client get tokens."""
    from tokenbroker.registry import ClientStatus

    _set_status(state, client_id, ClientStatus.APPROVED)
    info(f"approved client {client_id!r}: it may get tokens now")


@clients.command("disable")
@click.argument("client_id")
@pass_state
def clients_disable(state: State, client_id: str) -> None:
    """Stop a client getting new tokens."""
    from tokenbroker.registry import ClientStatus

    _set_status(state, client_id, ClientStatus.DISABLED)
    info(
        f"disabled client {client_id!r}: it gets no new tokens; end its live sessions at once with "
        f"`tokenbroker revoke client {client_id}`"
    )


@clients.command("remove")
@click.argument("client_id")
@pass_state
def clients_remove(state: State, client_id: str) -> None:
    """Delete a client from the registry."""
    state.registry().remove_client(client_id)
    info(
        f"removed client {client_id!r}; tokens it holds stay valid until they expire unless you run "
        f"`tokenbroker revoke client {client_id}`"
    )


@clients.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def clients_list(state: State, as_json: bool) -> None:
    """List the registered clients."""
    records = state.registry().clients()
    if as_json:
        print_json([_client_json(r) for r in records])
        return
    if not records:
        info("no clients registered: add one with `tokenbroker clients add ID --generate-key FILE --audience URI`")
        return
    rows = [("CLIENT", "STATUS", "CREDENTIAL", "BINDING", "AUDIENCES", "SCOPES")]
    for r in records:
        credential = "+".join(n for n, v in (("key", r.public_jwk), ("secret", r.secret_hash)) if v) or "none"
        rows.append(
            (
                r.client_id,
                str(r.status),
                credential,
                str(r.binding),
                ",".join(r.allowed_audiences),
                " ".join(r.allowed_scopes),
            )
        )
    print_table(rows)


@clients.command("show")
@click.argument("client_id")
@pass_state
def clients_show(state: State, client_id: str) -> None:
    """Print one client as JSON (a secret shows as "set", never its hash)."""
    record = state.registry().client(client_id)
    if record is None:
        fail(f"client {client_id!r} is not registered: `tokenbroker clients list` shows the registered ones")
    print_json(_client_json(record))
