"""`tokenbroker audit`: check the hash chain of an audit file (`verify`) and ask it what
let a session or token in (`why`). Both read the file as it is on disk, streaming, and
need no running broker (the chain: `tokenbroker.audit_chain`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from tokenbroker.cli._errors import OneLineErrors, fail
from tokenbroker.cli._output import print_json
from tokenbroker.cli._state import State, pass_state

if TYPE_CHECKING:
    from tokenbroker.audit_chain import Why

NOTHING_MATCHED = 2
"""`why`'s exit status when no grant names the id (1 is a broken chain or a bad file)."""

_FILE = click.Path(dir_okay=False, path_type=Path)


class NothingMatched(click.ClickException):
    exit_code = NOTHING_MATCHED


@click.group(cls=OneLineErrors)
def audit() -> None:
    """The audit file: check its hash chain, ask why a session was let in."""


@audit.command("verify")
@click.argument("file", type=_FILE)
@click.option(
    "--expect-last",
    metavar="HASH",
    help="A last hash printed earlier and kept elsewhere: fail unless the file still passes through it "
    "(catches lines cut off the end, which the chain alone cannot see).",
)
def audit_verify(file: Path, expect_last: str | None) -> None:
    """Check FILE's hash chain. Exit 0 and print the line count and the last hash (keep
    it elsewhere, for --expect-last); exit 1 naming the first bad line: edited, removed,
    reordered, or not an audit line."""
    from tokenbroker.audit_chain import BrokenChain, is_hash, verify

    expected = expect_last.strip().lower() if expect_last is not None else None
    if expected is not None and not is_hash(expected):
        fail("--expect-last must be 64 hex digits: the last hash an earlier `tokenbroker audit verify` printed")
    try:
        verified = verify(file, expect=expected)
    except BrokenChain as broken:
        fail(f"{file}: {broken}")
    through = (
        "" if verified.expected_at is None else f", passes through the expected hash (line {verified.expected_at})"
    )
    click.echo(f"{file}: {verified.lines} lines, chain intact{through}, last hash {verified.last_hash}")


@audit.command("why")
@click.argument("ident", metavar="SESSION_ID|JTI")
@click.argument("file", type=_FILE, required=False)
@click.option("--file", "file_option", type=_FILE, help="The audit file (default: the audit_file setting).")
@click.option("--no-verify", is_flag=True, help="Read a file whose chain is broken (skipping lines that are not JSON).")
@pass_state
def audit_why(state: State, ident: str, file: Path | None, file_option: Path | None, no_verify: bool) -> None:
    """Print (JSON) the decisions that let session or token SESSION_ID|JTI in: its grants
    (rule, door, auth method, binding, scope, client, approval), then the decisions made
    on that session, its tokens and its client, each with who owns it. Refuses a file
    whose chain is broken (exit 1) unless --no-verify; exit 2 when no grant names it."""
    from tokenbroker.audit import scrub
    from tokenbroker.audit_chain import BrokenChain, why

    path = _audit_file(state, file, file_option)
    shown = scrub(ident)  # someone may paste a token instead of its jti
    try:
        found = why(path, ident, verify=not no_verify)
    except BrokenChain as broken:
        fail(f"{path}: {broken}; `--no-verify` reads it anyway")
    if found is None:
        hint = " (that is a token: pass its jti or session id)" if shown != ident else ""
        raise NothingMatched(
            f"no grant of session or token {shown!r} in {path}{hint}: pass the session_id that "
            "`tokenbroker issue` printed, or a token's jti, and the audit file of the broker that issued it"
        )
    print_json(scrub(_as_json(found, path)))


def _audit_file(state: State, file: Path | None, file_option: Path | None) -> Path:
    if file is not None and file_option is not None and file != file_option:
        fail(f"two audit files given ({file} and --file {file_option}): give one")
    path = file or file_option or state.settings().audit_file
    if path is None:
        fail("no audit file: pass FILE (or --file), or set audit_file (TOKENBROKER_AUDIT_FILE)")
    return path


def _as_json(found: Why, path: Path) -> dict[str, object]:
    return {
        "query": found.query,
        "found_as": list(found.found_as),
        "file": str(path),
        "verified": found.verified,
        "lines": found.lines,
        "last_hash": found.last_hash,
        "sessions": list(found.sessions),
        "clients": list(found.clients),
        "decisions": list(found.decisions),
        "truncated": found.truncated,
    }
