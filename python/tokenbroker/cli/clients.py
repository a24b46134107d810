"""`tokenbroker clients`: the registry's MCP clients, who may get tokens for which
audiences and scopes, with which credential and binding, who owns them, who approved
them and until when, and how old their key may grow.

Dates on the command line are ISO 8601 in UTC: a date (`2026-12-31`, meaning 00:00 UTC
that day) or a date and time (`2026-12-31T18:00:00Z`; without an offset it is UTC). JSON
output shows times the same way; the registry file keeps them as Unix seconds.

With `redis_url` set (the same settings `serve` reads: `--config`, `TOKENBROKER_REDIS_URL`)
the clients' status, approvals and pinned documents are read from and written to the state
every replica shares through Redis (`tokenbroker.registry_shared`), so `approve` and
`disable` reach every replica within a second; keys, audiences and the rest of a client's
static configuration still go to the registry file."""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
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
    from tokenbroker.registry_file import FileRegistry

_Command = TypeVar("_Command", bound=Callable[..., Any])


@click.group(cls=OneLineErrors)
def clients() -> None:
    """MCP clients: who may get tokens, for which audiences and scopes."""


_TIME_FIELDS = ("approved_at", "approved_until", "key_created_at", "key_not_after")
_KEY_TYPE_OF_KTY = {"OKP": "ed25519", "EC": "p256", "RSA": "rsa"}
_DAY_SECONDS = 86_400
_REGISTRY_META = "tokenbroker.clients.registry"


def _now() -> int:
    return int(time.time())


def _registry(state: State) -> FileRegistry:
    """The registry these commands read and change: the file; with `redis_url` set (the
    same settings `serve` reads), the file with the clients' dynamic state shared through
    Redis, so an approval made here reaches every replica (`tokenbroker.registry_shared`).
    One per command, closed when it ends."""
    context = click.get_current_context()
    registry: FileRegistry | None = context.meta.get(_REGISTRY_META)
    if registry is None:
        settings = state.settings()
        if settings.redis_url:
            from tokenbroker.registry_shared import SharedRegistry

            shared = SharedRegistry.connect(settings)
            context.call_on_close(shared.close)
            registry = shared
        else:
            registry = state.registry()
        context.meta[_REGISTRY_META] = registry
    return registry


def _iso(unix_seconds: int | None) -> str | None:
    """A Unix time as ISO 8601 UTC ("2026-12-31T18:00:00Z"); None stays None."""
    if unix_seconds is None:
        return None
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(option: str, value: str) -> int:
    """An ISO 8601 date or date and time (UTC unless it names an offset) as Unix seconds."""
    text = value.strip()
    how = f"{option} {value[:40]!r} is not a date: write ISO 8601 in UTC, e.g. 2026-12-31 or 2026-12-31T18:00:00Z"
    try:
        if len(text) == 10:  # a date alone: its first second, UTC
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp())
    except (ValueError, OverflowError):
        fail(how)


def _future_time(option: str, value: str, now: int, instead: str) -> int:
    """`_parse_time`, refusing a time that is not after `now`."""
    moment = _parse_time(option, value)
    if moment <= now:
        fail(f"{option} {value[:40]} is not in the future (it is {_iso(now)} now): give a later date{instead}")
    return moment


def _approver(by: str | None) -> str:
    """Who approves: --by, else the name of the user running the command."""
    from tokenbroker.registry_file import check_text

    if by is None:
        try:
            by = getpass.getuser()
        except Exception:  # no LOGNAME/USER and no passwd entry (KeyError, OSError)
            fail("cannot tell who is approving (no user name in the environment): give --by NAME")
    return check_text("--by", by, 128)


def _approval(state: State, by: str | None, until: str | None, for_days: int | None, now: int) -> dict[str, Any]:
    """The record fields of a manual approval made now: who, when, until when, which rule.
    Until: --until, or now + --for-days, or now + the approval_ttl_days setting."""
    from tokenbroker.registry import ClientStatus

    if until is not None and for_days is not None:
        raise click.UsageError("give --until or --for-days, not both")
    if until is not None:
        approved_until = _future_time("--until", until, now, ", or --for-days N")
    else:
        days = for_days if for_days is not None else int(getattr(state.settings(), "approval_ttl_days", 90))
        approved_until = now + days * _DAY_SECONDS
    return {
        "status": ClientStatus.APPROVED,
        "approved_by": _approver(by),
        "approved_at": now,
        "approved_until": approved_until,
        "approval_rule": "manual",
    }


def _status_label(record: ClientRecord, now: int) -> str:
    """The effective status for people: an approval without an end says so."""
    status = record.effective_status(now)
    if status == "approved" and record.approved_until is None:
        return "approved (no expiry)"
    return status


def _client_json(record: ClientRecord, now: int, key_max_age_seconds: int | None = None) -> dict[str, Any]:
    """The record for `show` and `list --json`: the effective status and the governance
    fields first ("approver" is the approved_by of the design's contract), times in ISO
    8601 UTC, the RFC 7638 thumbprint of its key; a secret shows as "set"."""
    from tokenbroker.registry_file import jwk_thumbprint

    rest = jsonable(record)
    rest["secret_hash"] = "set" if record.secret_hash else None
    for name in _TIME_FIELDS:
        rest[name] = _iso(getattr(record, name))
    data: dict[str, Any] = {
        "client_id": record.client_id,
        "status": record.effective_status(now),
        "owner": record.owner,
        "approver": record.approved_by,
    }
    data.update({k: v for k, v in rest.items() if k not in data})
    data["key_thumbprint"] = jwk_thumbprint(record.public_jwk) if record.public_jwk is not None else None
    data["key_expires_at"] = _iso(record.key_deadline(key_max_age_seconds))
    return data


def _key_max_age_seconds(state: State) -> int | None:
    days = getattr(state.settings(), "client_key_max_age_days", None)
    return int(days) * _DAY_SECONDS if days is not None else None


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


def _no_credentials_for_documents(client_id: str, what: str) -> None:
    """A CIMD client's keys are its document's, pinned at approval: a key or secret given
    here would let it in through gRPC IssueToken with no document or pin check."""
    if client_id.startswith("https://"):
        fail(
            f"{client_id} names a client metadata document: its keys come from that document and are pinned by "
            f"`tokenbroker clients approve {client_id}`, so {what} is refused"
        )


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


def _usage_window_option(clears: bool) -> Callable[[_Command], _Command]:
    return click.option(
        "--usage-window",
        metavar="HOURS",
        help='The UTC hours it works in, e.g. "08-18", "22-06" or "08-12,13-18" (end exclusive); its tokens carry '
        "them and a use outside is the outside_usage_window signal. Without one the broker may learn it."
        + (' "" removes it.' if clears else ""),
    )


_on_signal_option = click.option(
    "--on-signal",
    "on_signal",
    multiple=True,
    metavar="SIGNAL=ACTION",
    help="Its own action for a detection signal, over the detection_actions setting (repeatable). Signals: "
    "new_network, concurrent_origins, resource_breadth, outside_usage_window, burst_after_auth; actions: "
    "alert, deny, revoke_session.",
)


def _usage_window(value: str) -> str | None:
    """--usage-window in the registry's spelling; "" (update: remove it) is None."""
    from tokenbroker.registry_file import check_usage_window

    return check_usage_window(value, "--usage-window") if value.strip() else None


def _signal_actions(current: tuple[str, ...], given: tuple[str, ...]) -> tuple[str, ...]:
    """`current` with each --on-signal SIGNAL=ACTION set (replacing that signal's entry),
    checked; fails naming the bad entry and the accepted signals and actions."""
    from tokenbroker.registry import signal_actions
    from tokenbroker.registry_file import check_detection_actions

    try:
        merged = {**signal_actions(current), **signal_actions(given)}
    except ValueError as exc:
        fail(f"--on-signal: {exc}")
    return check_detection_actions([f"{signal}={action}" for signal, action in merged.items()], "--on-signal")


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
@click.option("--owner", help="The team or contact that answers for this client.")
@click.option("--spiffe-id", help="Its workload's SPIFFE ID (spiffe://trust-domain/path), for attestation.")
@click.option(
    "--require-attestation/--no-require-attestation",
    default=False,
    help="It gets tokens only with a fresh attestation of its --spiffe-id. Default: off.",
)
@_usage_window_option(clears=False)
@_on_signal_option
@click.option("--key-not-after", metavar="DATE", help="Refuse its credential after this date (ISO 8601, UTC).")
@click.option("--approve", is_flag=True, help="Approve at once (new clients are pending otherwise).")
@click.option("--by", metavar="NAME", help="With --approve: who approves (default: your user name).")
@click.option("--until", metavar="DATE", help="With --approve: the approval ends then (default: approval_ttl_days).")
@click.option("--for-days", type=click.IntRange(1, 3650), help="With --approve: the approval lasts this many days.")
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
    owner: str | None,
    spiffe_id: str | None,
    require_attestation: bool,
    usage_window: str | None,
    on_signal: tuple[str, ...],
    key_not_after: str | None,
    approve: bool,
    by: str | None,
    until: str | None,
    for_days: int | None,
) -> None:
    """Register a client (pending until approved). Only hashes of secrets are stored."""
    if public_key or generate_key or generate_secret:
        _no_credentials_for_documents(client_id, "a key or secret of its own")
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
    if not approve and (by is not None or until is not None or for_days is not None):
        raise click.UsageError("--by, --until and --for-days go with --approve")
    check_id("client", client_id)
    now = _now()
    approval: dict[str, Any] = (
        _approval(state, by, until, for_days, now) if approve else {"status": ClientStatus.PENDING}
    )
    not_after = _future_time("--key-not-after", key_not_after, now, "") if key_not_after else None
    if usage_window is not None and not usage_window.strip():
        raise click.UsageError('--usage-window "" removes a window (clients update); give hours such as 08-18')
    window = _usage_window(usage_window) if usage_window is not None else None
    detection_actions = _signal_actions((), on_signal)
    registry = _registry(state)
    if registry.client(client_id) is not None:
        fail(
            f"client {client_id!r} already exists: change it with `tokenbroker clients update {client_id}` "
            f"or remove it with `tokenbroker clients remove {client_id}`"
        )
    pem: bytes | None = None
    jwk = _load_public_key(public_key) if public_key else None
    if generate_key:
        pem, jwk = _generate_client_key(key_type)
    secret = new_secret("client_secret") if generate_secret else None
    record = ClientRecord(
        client_id,
        public_jwk=jwk,
        secret_hash=hash_secret(secret) if secret else None,
        allowed_audiences=tuple(dict.fromkeys(audiences)),
        allowed_scopes=split_scopes(scopes),
        max_sessions=max_sessions or state.settings().max_sessions,
        limit_policy=LimitPolicy(policy or "reject"),
        allowed_cidrs=tuple(check_cidr(c) for c in cidrs),
        binding=Binding(binding),
        require_dpop_nonce=require_dpop_nonce,
        owner=owner,
        key_created_at=now,
        key_not_after=not_after,
        spiffe_id=spiffe_id,
        require_attestation=require_attestation,
        usage_window=window,
        detection_actions=detection_actions,
        **approval,
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
    status = (
        f"approved until {_iso(approval['approved_until'])}"
        if approve
        else f"pending: approve it with `tokenbroker clients approve {client_id}`"
    )
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
@click.option("--owner", help="The team or contact that answers for this client.")
@click.option("--spiffe-id", help="Its workload's SPIFFE ID (spiffe://trust-domain/path).")
@click.option(
    "--require-attestation/--no-require-attestation",
    default=None,
    help="It gets tokens only with a fresh attestation of its --spiffe-id.",
)
@_usage_window_option(clears=True)
@_on_signal_option
@click.option(
    "--clear-signal-actions",
    is_flag=True,
    help="Drop its own actions: every signal follows the detection_actions setting again (then --on-signal applies).",
)
@click.option(
    "--key-not-after",
    metavar="DATE",
    help="Refuse its credential after this date (ISO 8601, UTC). A new --public-key drops the old date.",
)
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
    owner: str | None,
    spiffe_id: str | None,
    require_attestation: bool | None,
    usage_window: str | None,
    on_signal: tuple[str, ...],
    clear_signal_actions: bool,
    key_not_after: str | None,
) -> None:
    """Change a client's key or policy; each list given replaces the old one. A new
    --public-key is a rotation (see rotate-key): its age counts from now."""
    if public_key:
        _no_credentials_for_documents(client_id, "--public-key")
    from tokenbroker.models import LimitPolicy
    from tokenbroker.registry import Binding
    from tokenbroker.registry_file import check_cidr

    if cidrs and any_source:
        raise click.UsageError("give --cidr or --any-source, not both")
    changes: dict[str, Any] = {}
    now = _now()
    if public_key:
        changes["public_jwk"] = _load_public_key(public_key)
        changes["key_created_at"] = now
        changes["key_not_after"] = None  # the old key's end does not carry over to a new key
    if key_not_after:
        changes["key_not_after"] = _future_time("--key-not-after", key_not_after, now, "")
    if owner is not None:
        changes["owner"] = owner
    if spiffe_id is not None:
        changes["spiffe_id"] = spiffe_id
    if require_attestation is not None:
        changes["require_attestation"] = require_attestation
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
    if usage_window is not None:
        changes["usage_window"] = _usage_window(usage_window)
    if on_signal or clear_signal_actions:
        current = () if clear_signal_actions else _current_signal_actions(state, client_id)
        changes["detection_actions"] = _signal_actions(current, on_signal)
    if not changes:
        raise click.UsageError(
            "nothing to change: give --audience, --scope, --public-key, --max-sessions, --binding, "
            "--require-dpop-nonce, --owner, --spiffe-id, --require-attestation, --usage-window, --on-signal, "
            "--key-not-after, ..."
        )
    record = _registry(state).update_client(client_id, **changes)
    info(f"updated client {client_id!r}")
    print_json(_client_json(record, now, _key_max_age_seconds(state)))


def _current_signal_actions(state: State, client_id: str) -> tuple[str, ...]:
    """The client's own actions now, which --on-signal changes one signal at a time."""
    record = _registry(state).client(client_id)
    if record is None:
        fail(f"client {client_id!r} is not registered: `tokenbroker clients list` shows the registered ones")
    return tuple(record.detection_actions)


def _set_status(state: State, client_id: str, status: ClientStatus) -> ClientRecord:
    return _registry(state).update_client(client_id, status=status)


@clients.command("approve")
@click.argument("client_id")
@click.option("--by", metavar="NAME", help="Who approves (default: your user name).")
@click.option(
    "--until", metavar="DATE", help="The approval ends then (ISO 8601, UTC; default: now + approval_ttl_days)."
)
@click.option("--for-days", type=click.IntRange(1, 3650), help="The approval lasts this many days.")
@click.option(
    "--expect-thumbprint",
    "expected",
    multiple=True,
    metavar="THUMBPRINT",
    help="CIMD: the key thumbprints you reviewed (repeatable); refused unless the document lists exactly these.",
)
@click.option(
    "--accept-new-keys",
    is_flag=True,
    help="CIMD: pin the document's keys although they differ from those recorded when it was seen.",
)
@pass_state
def clients_approve(
    state: State,
    client_id: str,
    by: str | None,
    until: str | None,
    for_days: int | None,
    expected: tuple[str, ...],
    accept_new_keys: bool,
) -> None:
    """Let a client get tokens until a date; records who approved it, when and how.
    Approving again renews an approval (also an expired one). For a client metadata
    document, its keys are fetched now and pinned; they must be the ones reviewed (those
    `clients show` listed, or --expect-thumbprint), unless --accept-new-keys."""
    approval = _approval(state, by, until, for_days, _now())
    pinned = ""
    if client_id.startswith("https://"):
        approval.update(_pin_document(state, client_id))
        now_pins = tuple(approval["pinned_thumbprints"])
        _check_reviewed_keys(_registry(state).client(client_id), client_id, now_pins, expected, accept_new_keys)
        pinned = f", pinned key(s) {' '.join(now_pins)} of its document"
        if _registry(state).client(client_id) is None:  # approved before its first request
            _add_cimd_record(state, client_id, approval)
            approval = {}
    if approval:
        _registry(state).update_client(client_id, **approval)
    stored = _registry(state).client(client_id)
    assert stored is not None
    assert stored.approved_until is not None
    info(
        f"approved client {client_id!r} until {_iso(stored.approved_until)} (by {stored.approved_by}, "
        f"rule manual{pinned}): it may get tokens now"
    )


def _check_reviewed_keys(
    record: ClientRecord | None,
    client_id: str,
    now_pins: tuple[str, ...],
    expected: tuple[str, ...],
    accept_new_keys: bool,
) -> None:
    """The keys about to be pinned are the ones the operator reviewed: a publishing
    workflow must not swap them between the review and the approval."""
    if expected:
        if set(expected) != set(now_pins):
            fail(
                f"the document of {client_id} lists keys {' '.join(now_pins) or 'none'}, not the "
                f"--expect-thumbprint ones {' '.join(expected)}: review the document again"
            )
        return
    recorded = tuple(record.pinned_thumbprints) if record is not None else ()
    if recorded and set(recorded) != set(now_pins) and not accept_new_keys:
        fail(
            f"the keys of {client_id} changed since it was recorded (recorded {' '.join(recorded)}; now "
            f"{' '.join(now_pins) or 'none'}): review them, then approve with --expect-thumbprint or --accept-new-keys"
        )


def _pin_document(state: State, client_id: str) -> dict[str, Any]:
    """The document's keys at approval time, fetched now (SSRF-guarded, no cache)."""
    import asyncio

    from tokenbroker.app import cimd_fetcher
    from tokenbroker.cimd import CimdDocumentError, CimdFetchError, load_client_document

    try:
        document = asyncio.run(
            load_client_document(cimd_fetcher(state.settings()), client_id, approved=True, refresh=True)
        )
    except (CimdFetchError, CimdDocumentError) as exc:
        fail(f"cannot approve {client_id}: its client metadata document cannot be used: {exc}")
    return {
        "pinned_thumbprints": tuple(sorted(document.thumbprints)),
        "document_fingerprint": document.fingerprint,
        "document_domain": document.domain,
    }


def _add_cimd_record(state: State, client_id: str, approval: dict[str, Any]) -> None:
    from tokenbroker.registry import ClientRecord

    settings = state.settings()
    record = ClientRecord(
        client_id,
        allowed_audiences=tuple(settings.cimd_default_audiences),
        allowed_scopes=tuple(settings.cimd_default_scopes),
        max_sessions=settings.max_sessions,
        **approval,
    )
    _registry(state).add_client(record)  # `approval` holds status approved


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
    _registry(state).remove_client(client_id)
    info(
        f"removed client {client_id!r}; tokens it holds stay valid until they expire unless you run "
        f"`tokenbroker revoke client {client_id}`"
    )


@clients.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def clients_list(state: State, as_json: bool) -> None:
    """List the registered clients."""
    records = _registry(state).clients()
    now = _now()
    if as_json:
        max_age = _key_max_age_seconds(state)
        print_json([_client_json(r, now, max_age) for r in records])
        return
    if not records:
        info("no clients registered: add one with `tokenbroker clients add ID --generate-key FILE --audience URI`")
        return
    rows = [("CLIENT", "STATUS", "APPROVED UNTIL", "OWNER", "CREDENTIAL", "BINDING", "AUDIENCES", "SCOPES")]
    for r in records:
        credential = "+".join(n for n, v in (("key", r.public_jwk), ("secret", r.secret_hash)) if v) or "none"
        rows.append(
            (
                r.client_id,
                _status_label(r, now),
                _iso(r.approved_until) or "-",
                r.owner or "-",
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
    """Print one client as JSON: its effective status (pending, approved, disabled, or
    expired when approved_until has passed), owner, approver, approval times and rule, key
    thumbprint and dates, pinned thumbprints, attestation, binding, usage window and its
    own detection actions (a secret shows as "set", never its hash)."""
    record = _registry(state).client(client_id)
    if record is None:
        fail(f"client {client_id!r} is not registered: `tokenbroker clients list` shows the registered ones")
    print_json(_client_json(record, _now(), _key_max_age_seconds(state)))


@clients.command("rotate-key")
@click.argument("client_id")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Generate a new key pair; write its private key (PEM, 0600) here.",
)
@click.option(
    "--key-type",
    type=click.Choice(["ed25519", "p256", "rsa"]),
    help="With --out: the new key's type (default: the type of the current key, else ed25519).",
)
@click.option(
    "--public-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Register this public key (PEM or JWK) instead of generating one.",
)
@click.option("--generate-secret", is_flag=True, help="Replace its client secret (the new one is shown once).")
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --generate-secret: write the new secret here (0600) instead of printing it.",
)
@click.option(
    "--key-not-after",
    metavar="DATE",
    help="Refuse the new credential after this date (ISO 8601, UTC; default: no end date; the old one's is dropped).",
)
@pass_state
def clients_rotate_key(
    state: State,
    client_id: str,
    out: Path | None,
    key_type: str | None,
    public_key: Path | None,
    generate_secret: bool,
    secret_file: Path | None,
    key_not_after: str | None,
) -> None:
    """Replace a client's key (or secret): the old one stops working at once, the new
    one's age counts from now. Prints the new key's RFC 7638 thumbprint (JSON)."""
    _no_credentials_for_documents(client_id, "rotate-key")
    from tokenbroker.registry_file import generate_secret as new_secret
    from tokenbroker.registry_file import hash_secret, jwk_thumbprint

    if out and public_key:
        raise click.UsageError("give --out (generate a key) or --public-key (register one), not both")
    if key_type and not out:
        raise click.UsageError("--key-type goes with --out (a generated key)")
    if secret_file and not generate_secret:
        raise click.UsageError("--secret-file goes with --generate-secret")
    if not (out or public_key or generate_secret):
        raise click.UsageError(
            "give the new credential: --out FILE (generate a key, its private key written there), "
            "--public-key FILE (a public key you made) or --generate-secret"
        )
    registry = _registry(state)
    current = registry.client(client_id)
    if current is None:
        fail(f"client {client_id!r} is not registered: `tokenbroker clients list` shows the registered ones")
    now = _now()
    changes: dict[str, Any] = {
        "key_created_at": now,
        "key_not_after": _future_time("--key-not-after", key_not_after, now, "") if key_not_after else None,
    }
    pem: bytes | None = None
    if public_key:
        changes["public_jwk"] = _load_public_key(public_key)
        if current.public_jwk is not None and jwk_thumbprint(changes["public_jwk"]) == jwk_thumbprint(
            current.public_jwk
        ):
            fail(f"{public_key} holds the key client {client_id!r} already has: a rotation needs a new key")
    if out:
        current_type = _KEY_TYPE_OF_KTY.get(str((current.public_jwk or {}).get("kty")), "ed25519")
        pem, changes["public_jwk"] = _generate_client_key(key_type or current_type)
    secret = new_secret("client_secret") if generate_secret else None
    if secret:
        changes["secret_hash"] = hash_secret(secret)
    written: list[Path] = []  # as in add: no registered credential without its file
    try:
        if out and pem is not None:
            write_private(out, pem)
            written.append(out)
        if secret_file and secret:
            write_private(secret_file, secret.encode() + b"\n")
            written.append(secret_file)
        record = registry.update_client(client_id, **changes)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    if out:
        info(f"wrote the client's new private key to {out}: give it to the client, the old key no longer works")
    if secret_file:
        info(f"wrote the client's new secret to {secret_file} (only its hash is stored)")
    if "public_jwk" in changes and current.secret_hash and not secret:
        info(f"note: client {client_id!r} also has a client secret, unchanged: replace it with --generate-secret")
    if secret and current.public_jwk is not None and "public_jwk" not in changes:
        info(f"note: client {client_id!r} also has a key, unchanged: replace it with --out FILE or --public-key FILE")
    info(
        f"rotated the credential of client {client_id!r}; tokens it already holds stay valid until they expire "
        f"unless you run `tokenbroker revoke client {client_id}`"
    )
    result: dict[str, Any] = {
        "client_id": client_id,
        "key_thumbprint": jwk_thumbprint(record.public_jwk) if record.public_jwk is not None else None,
        "key_created_at": _iso(record.key_created_at),
        "key_not_after": _iso(record.key_not_after),
    }
    if secret and not secret_file:
        result["client_secret"] = secret  # shown once; only its hash is stored
    print_json(result)
