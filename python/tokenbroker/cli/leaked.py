"""`tokenbroker leaked SECRET|FILE`: a client secret or server API key was exposed (a
scanner found it in a commit, a log, a paste). The command finds what the secret unlocks,
by its hash (the registry holds nothing else), takes that away at once and says what to
rotate (DESIGN, "Detection events"):

- a client secret: the client is disabled and its secret hash forgotten, so no later
  approval can let the leaked secret back in; its live sessions are revoked over gRPC
  (RevokeClient, with an admin server's API key: --api-key-file or TOKENBROKER_API_KEY);
- a server API key: its hash is removed, so the key no longer authenticates.

Each finding emits a `credential_leaked` event (critical, governance) whose evidence holds
the kind, a fingerprint (the first 8 characters of the stored hash) and what it unlocked,
never the secret. stdout gets a JSON summary, stderr the progress.

What is read: FILE (`-`: stdin), scanned for secrets in tokenbroker's format
(`tokenbroker.secret_format`) and, since secrets minted before that format look like any
other text, each whole non-empty line as a candidate too. A secret itself is accepted as
the argument only in that format (`tbk_...`/`tbs_...`, checksum verified): the command
line is visible to every user of the machine, which costs nothing for a secret already
leaked and disabled a moment later, but any other text could be a mistyped path, so it is
refused rather than guessed at.

Exit status: 0 when everything found was taken away; 1 when nothing registered matches;
2 when a client was disabled but its sessions could not be revoked (no admin key, broker
unreachable or refusing): they stay valid until they expire unless revoked."""

from __future__ import annotations

import dataclasses
import hmac
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tokenbroker.cli._errors import fail, one_line
from tokenbroker.cli._output import info, print_json
from tokenbroker.cli._state import State, pass_state
from tokenbroker.cli.remote import _client, _remote_options

if TYPE_CHECKING:
    from tokenbroker.events import Events
    from tokenbroker.registry import ServerRecord
    from tokenbroker.registry_file import FileRegistry
    from tokenbroker.secret_format import Kind

# Bounds: a leaked file is read whole, so it is capped (a larger one is refused, not cut:
# the secret could be past the cut); a line longer than any secret is no whole-line candidate.
MAX_INPUT_BYTES = 4 * 1024 * 1024
MAX_LINE_CHARS = 512
FINGERPRINT_CHARS = 8
NOTHING_FOUND = "no registered client secret or server API key matches"


@dataclass(frozen=True, slots=True)
class Finding:
    """A registered credential that a candidate unlocks: a client's secret or a server's key."""

    kind: Kind
    owner: str  # the client id or the server id
    fingerprint: str  # the first characters of the stored hash: names it, reveals nothing


def candidates(text: str) -> list[str]:
    """What in `text` may be a leaked secret, each once, in order: every secret in
    tokenbroker's format, then every whole non-empty line (an older secret, or one a
    scanner cut out) up to `MAX_LINE_CHARS`."""
    from tokenbroker import secret_format

    found = dict.fromkeys(secret_format.find(text))
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and len(stripped) <= MAX_LINE_CHARS:
            found.setdefault(stripped)
    return list(found)


def findings(registry: FileRegistry, secrets: list[str]) -> list[Finding]:
    """The clients and servers whose stored hash is that of one of `secrets`, compared in
    constant time against every record."""
    from tokenbroker.registry_file import hash_secret

    hashes = [hash_secret(s).encode("ascii") for s in secrets]
    found: dict[tuple[str, str], Finding] = {}

    def check(kind: Kind, owner: str, stored: str | None) -> None:
        if not stored:
            return
        stored_bytes = stored.encode("ascii", "replace")
        if any(hmac.compare_digest(h, stored_bytes) for h in hashes):
            found.setdefault((kind, owner), Finding(kind, owner, stored[:FINGERPRINT_CHARS]))

    for client in registry.clients():
        check("client_secret", client.client_id, client.secret_hash)
    for server in registry.servers():
        check("server_api_key", server.server_id, server.api_key_hash)
    return list(found.values())


def _read_source(source: str, api_key_file: Path | None) -> tuple[str, str]:
    """The text to scan and where it came from ("stdin", the file, "the command line")."""
    from tokenbroker import secret_format

    if source == "-":
        if api_key_file is not None and str(api_key_file) == "-":
            raise click.UsageError("only one of SECRET|FILE and --api-key-file can be read from stdin")
        return _bounded(sys.stdin.read(MAX_INPUT_BYTES + 1), "stdin"), "stdin"
    path = Path(source)
    if path.is_dir():
        raise click.UsageError(f"{source} is a directory: give the file that holds the leaked secret")
    if path.is_file():
        with path.open("rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
        return _bounded(data.decode("utf-8", "replace"), str(path)), str(path)
    if secret_format.parse(source) is not None:
        return source, "the command line"
    # Never echoed: it may be a secret.
    raise click.UsageError(
        "SECRET|FILE is neither a file nor a secret in tokenbroker's format (tbk_... or tbs_... with a valid "
        "checksum): put the leaked secret in a file and pass its path, or `-` to read it from stdin"
    )


def _bounded(text: str, where: str) -> str:
    if len(text) > MAX_INPUT_BYTES:
        fail(
            f"{where} holds more than {MAX_INPUT_BYTES // (1024 * 1024)} MiB: put the lines that hold the leaked "
            "secret in a file of their own"
        )
    return text


def _revoke_sessions(
    state: State, client_ids: list[str], target: str | None, api_key_file: Path | None
) -> tuple[dict[str, int], str | None]:
    """Each client's live sessions revoked over gRPC (admin RevokeClient): the counts,
    and why not, when they were not."""
    from tokenbroker.errors import TokenBrokerError

    if not client_ids:
        return {}, None
    if api_key_file is None and not os.environ.get("TOKENBROKER_API_KEY", "").strip():
        return {}, "no admin API key was given (--api-key-file FILE or TOKENBROKER_API_KEY)"
    client = _client(state, target, api_key_file)
    revoked: dict[str, int] = {}
    try:
        for client_id in client_ids:
            revoked[client_id] = client.revoke_client(client_id)
    except TokenBrokerError as exc:
        return revoked, f"the broker at {client.target} did not revoke them: {one_line(exc)}"
    finally:
        client.close()
    return revoked, None


def _server_command(record: ServerRecord) -> str:
    """The commands that give server `record` a new API key and keep what else it had
    (`servers` has no rotation of its own: a server is re-added with a new key)."""
    server = shlex.quote(record.server_id)
    parts = ["tokenbroker servers add", server]
    parts += [f"--audience {shlex.quote(audience)}" for audience in record.audiences]
    parts += ["--admin"] if record.admin else []
    parts += ["--relay-client-ip"] if record.relay_client_ip else []
    parts += [f"--required-scope {shlex.quote(scope)}" for scope in record.required_scopes]
    parts += [f"--cert-thumbprint {shlex.quote(record.cert_thumbprint)}"] if record.cert_thumbprint else []
    parts += [f"--label {shlex.quote(f'{name}={value}')}" for name, value in sorted(record.labels.items())]
    parts += ["--generate-api-key --api-key-file NEW_API_KEY_FILE"]
    return f"tokenbroker servers remove {server} && {' '.join(parts)}"


@click.command()
@click.argument("source", metavar="SECRET|FILE")
@_remote_options
@pass_state
def leaked(state: State, source: str, target: str | None, api_key_file: Path | None) -> None:
    """A client secret or server API key leaked: find what it unlocks, disable that, revoke
    its sessions, emit `credential_leaked` and say what to rotate. FILE (`-`: stdin) holds
    the leaked text; a secret itself is accepted only in tokenbroker's format (tbk_/tbs_).
    --api-key-file is an admin server's key, to revoke sessions on the running broker."""
    from tokenbroker.cli.clients import _registry
    from tokenbroker.events import Events
    from tokenbroker.registry import ClientStatus

    text, where = _read_source(source, api_key_file)
    if where == "the command line":
        info("note: the secret was given on the command line (seen by ps, kept in shell history): disabling it now")
    registry = _registry(state)
    found = findings(registry, candidates(text))
    if not found:
        fail(f"{NOTHING_FOUND} what {where} holds (`tokenbroker clients list`, `servers list` show what is registered)")
    clients = [f for f in found if f.kind == "client_secret"]
    servers = [f for f in found if f.kind == "server_api_key"]

    # Clients first (no new tokens, and the secret forgotten), then their live sessions,
    # then the server keys: a leaked admin key given as --api-key-file still revokes.
    for finding in clients:
        registry.update_client(finding.owner, status=ClientStatus.DISABLED, secret_hash=None)
        info(f"disabled client {finding.owner!r} and forgot its secret (fingerprint {finding.fingerprint})")
    revoked, not_revoked = _revoke_sessions(state, [f.owner for f in clients], target, api_key_file)
    for client_id, count in revoked.items():
        info(f"revoked {count} live session(s) of client {client_id!r}")
    server_records: dict[str, ServerRecord] = {}
    for finding in servers:
        record = registry.server(finding.owner)
        if record is None:  # removed since it was found: its key works nowhere
            continue
        server_records[finding.owner] = record
        registry.put_server(dataclasses.replace(record, api_key_hash=None))
        info(f"removed the API key of server {finding.owner!r} (fingerprint {finding.fingerprint}): it works no more")

    events = Events()
    try:
        report = [_client_entry(events, finding, revoked.get(finding.owner)) for finding in clients]
        report += [_server_entry(events, finding, server_records.get(finding.owner)) for finding in servers]
    finally:
        events.close()  # the events are delivered (the log line at least) before the command ends
    not_ended = [f.owner for f in clients if f.owner not in revoked]
    print_json({"found": report, "sessions_not_revoked": not_ended})
    if not_revoked is not None:
        info(
            f"sessions were NOT revoked: {not_revoked}. Their tokens stay valid until they expire: run "
            + "; ".join(
                f"`tokenbroker revoke client {shlex.quote(o)} --api-key-file ADMIN_KEY_FILE`" for o in not_ended
            )
        )
        sys.exit(2)


def _client_entry(events: Events, finding: Finding, sessions_revoked: int | None) -> dict[str, Any]:
    """The `credential_leaked` event of a leaked client secret, and its part of the summary."""
    from tokenbroker.events import CREDENTIAL_LEAKED

    events.emit(
        CREDENTIAL_LEAKED,
        client_id=finding.owner,
        action="deny" if sessions_revoked is None else "revoke_session",
        severity="critical",
        evidence={"kind": finding.kind, "fingerprint": finding.fingerprint, "unlocks": f"client {finding.owner}"},
    )
    client = shlex.quote(finding.owner)
    ended = "sessions NOT revoked" if sessions_revoked is None else f"revoked {sessions_revoked} live session(s)"
    return {
        "kind": finding.kind,
        "fingerprint": finding.fingerprint,
        "unlocks": {"client": finding.owner},
        "done": ["disabled the client", "forgot its secret hash", ended],
        "sessions_revoked": sessions_revoked,
        "rotate": {
            "replace": f"the client secret that {finding.owner} is configured with "
            "(TOKENBROKER_CLIENT_SECRET, --client-secret-file), and every copy of the leaked one",
            "command": f"tokenbroker clients rotate-key {client} --generate-secret --secret-file NEW_SECRET_FILE "
            f"&& tokenbroker clients approve {client}",
        },
    }


def _server_entry(events: Events, finding: Finding, record: ServerRecord | None) -> dict[str, Any]:
    """The `credential_leaked` event of a leaked server API key, and its part of the summary."""
    from tokenbroker.events import CREDENTIAL_LEAKED

    events.emit(
        CREDENTIAL_LEAKED,
        client_id="",  # a server's key unlocks no client
        action="deny",
        severity="critical",
        evidence={"kind": finding.kind, "fingerprint": finding.fingerprint, "unlocks": f"server {finding.owner}"},
    )
    return {
        "kind": finding.kind,
        "fingerprint": finding.fingerprint,
        "unlocks": {"server": finding.owner, "admin": bool(record and record.admin)},
        "done": ["removed its API key hash: the key no longer authenticates"],
        "rotate": {
            "replace": f"the API key that MCP server {finding.owner} is configured with "
            "(TOKENBROKER_API_KEY, --api-key-file), and every copy of the leaked one",
            "command": _server_command(record)
            if record
            else f"tokenbroker servers add {shlex.quote(finding.owner)} ...",
        },
    }
