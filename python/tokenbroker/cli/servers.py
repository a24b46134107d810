"""`tokenbroker servers`: the registry's MCP servers, who may validate tokens for which
audiences (and, as admins, revoke them and list sessions)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tokenbroker.cli._errors import OneLineErrors, fail
from tokenbroker.cli._output import info, jsonable, print_json, print_table
from tokenbroker.cli._secrets import write_private
from tokenbroker.cli._state import State, pass_state

# RFC 6749 section 3.3 scope-token.
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")

if TYPE_CHECKING:
    from tokenbroker.registry import ServerRecord


@click.group(cls=OneLineErrors)
def servers() -> None:
    """MCP servers: who may validate tokens, for which audiences."""


def _server_json(record: ServerRecord) -> dict[str, Any]:
    data = jsonable(record)
    data["api_key_hash"] = "set" if record.api_key_hash else None
    return dict(data)


@servers.command("add")
@click.argument("server_id")
@click.option("--audience", "audiences", multiple=True, required=True, help="Its resource URI (repeatable).")
@click.option("--admin", is_flag=True, help="May also revoke tokens and list sessions.")
@click.option(
    "--relay-client-ip",
    is_flag=True,
    help="Believed when it relays a client's address at IssueToken (a gateway), for its own audiences only.",
)
@click.option(
    "--required-scope",
    "required_scopes",
    multiple=True,
    help="A scope every request the gateway doors (/authz, Envoy) let through for it must carry (repeatable).",
)
@click.option("--cert-thumbprint", help="base64url SHA-256 of its mTLS client certificate (DER).")
@click.option("--generate-api-key", is_flag=True, help="Generate an API key (printed once).")
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --generate-api-key: write the key here (0600) instead of printing it.",
)
@click.option("--label", "labels", multiple=True, help="key=value label (repeatable).")
@pass_state
def servers_add(
    state: State,
    server_id: str,
    audiences: tuple[str, ...],
    admin: bool,
    relay_client_ip: bool,
    required_scopes: tuple[str, ...],
    cert_thumbprint: str | None,
    generate_api_key: bool,
    api_key_file: Path | None,
    labels: tuple[str, ...],
) -> None:
    """Register an MCP server. Only the hash of its API key is stored."""
    from tokenbroker.registry import ServerRecord
    from tokenbroker.registry_file import check_id, generate_secret, hash_secret

    if not (generate_api_key or cert_thumbprint):
        raise click.UsageError("give a credential: --generate-api-key and/or --cert-thumbprint")
    if api_key_file and not generate_api_key:
        raise click.UsageError("--api-key-file goes with --generate-api-key")
    label_map: dict[str, str] = {}
    for label in labels:
        name, sep, value = label.partition("=")
        if not sep or not name:
            raise click.UsageError(f"label {label!r} must be key=value")
        label_map[name] = value
    check_id("server", server_id)
    bad = [scope for scope in required_scopes if not _SCOPE.fullmatch(scope)]
    if bad:
        raise click.UsageError(f"--required-scope {bad[0]!r} is not a scope (printable ASCII, no space, quote or \\)")
    registry = state.registry()
    if registry.server(server_id) is not None:
        fail(f"server {server_id!r} already exists: remove it first with `tokenbroker servers remove {server_id}`")
    api_key = generate_secret("server_api_key") if generate_api_key else None
    record = ServerRecord(
        server_id,
        audiences=tuple(dict.fromkeys(audiences)),
        api_key_hash=hash_secret(api_key) if api_key else None,
        cert_thumbprint=cert_thumbprint,
        admin=admin,
        relay_client_ip=relay_client_ip,
        labels=label_map,
        required_scopes=tuple(dict.fromkeys(required_scopes)),
    )
    if api_key_file and api_key:
        write_private(api_key_file, api_key.encode() + b"\n")
    try:
        registry.add_server(record)
    except BaseException:  # no key file for a server that was not registered
        if api_key_file:
            api_key_file.unlink(missing_ok=True)
        raise
    if api_key and api_key_file:
        info(f"wrote the API key to {api_key_file} (only its hash is stored)")
    elif api_key:
        info("API key (shown once; only its hash is stored):")
        click.echo(api_key)
    info(f"registered server {server_id!r} in {registry.path}")


@servers.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def servers_list(state: State, as_json: bool) -> None:
    """List the registered servers."""
    records = state.registry().servers()
    if as_json:
        print_json([_server_json(r) for r in records])
        return
    if not records:
        info("no servers registered: add one with `tokenbroker servers add ID --audience URI --generate-api-key`")
        return
    rows = [("SERVER", "ADMIN", "CREDENTIAL", "AUDIENCES")]
    for r in records:
        credential = "+".join(n for n, v in (("api-key", r.api_key_hash), ("cert", r.cert_thumbprint)) if v) or "none"
        rows.append((r.server_id, "yes" if r.admin else "no", credential, ",".join(r.audiences)))
    print_table(rows)


@servers.command("show")
@click.argument("server_id")
@pass_state
def servers_show(state: State, server_id: str) -> None:
    """Print one server as JSON."""
    record = state.registry().server(server_id)
    if record is None:
        fail(f"server {server_id!r} is not registered: `tokenbroker servers list` shows the registered ones")
    print_json(_server_json(record))


@servers.command("remove")
@click.argument("server_id")
@pass_state
def servers_remove(state: State, server_id: str) -> None:
    """Delete a server: its API key stops working."""
    state.registry().remove_server(server_id)
    info(f"removed server {server_id!r}")
