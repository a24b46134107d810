"""Client governance: who owns a client, who approved it, when and until when; approvals
and keys that expire; key rotation. The real registry file, the real CLI (CliRunner) and
the real authenticator with an injected clock; real Ed25519 and P-256 keys."""

from __future__ import annotations

import json
import stat
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tokenbroker import MemoryStore
from tokenbroker._core import jwk_thumbprint as core_thumbprint
from tokenbroker.cli import main
from tokenbroker.client_assertion import load_private_key, make_client_assertion, public_jwk
from tokenbroker.client_auth import (
    AUTH_FAILED,
    ClientAuthenticator,
    ClientRefusedError,
    CredentialExpiredError,
    CredentialRefusedError,
)
from tokenbroker.errors import AuthenticationError, InvalidArgumentError
from tokenbroker.registry import ClientRecord, ClientStatus
from tokenbroker.registry_file import FileRegistry, RegistryFileError, generate_secret, hash_secret, jwk_thumbprint

from support.brokers import FakeClock

ISSUER = "https://broker.test"
AUDIENCE = "https://mcp.test/mcp"
DPOP_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
DAY = 86_400


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path, no_tokenbroker_env: None) -> dict[str, str]:
    return {
        "TOKENBROKER_REGISTRY_FILE": str(tmp_path / "registry.toml"),
        "TOKENBROKER_ISSUER": ISSUER,
        "TOKENBROKER_HTTP_LISTEN": "127.0.0.1:0",
    }


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def ok(env: dict[str, str], *args: str) -> Result:
    result = run(env, *args)
    assert result.exit_code == 0, result.output
    return result


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.count("\n") == 0, message
    for fragment in fragments:
        assert fragment in message, message


def record_of(env: dict[str, str], client_id: str = "agent") -> ClientRecord:
    record = FileRegistry(env["TOKENBROKER_REGISTRY_FILE"]).client(client_id)
    assert record is not None
    return record


def unix(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


class Door:
    """The authenticator over the CLI's registry file, on one fake clock (the registry's
    once-a-second reload check runs on it too), with the events it reports."""

    def __init__(self, env: dict[str, str], *, key_max_age_seconds: int | None = None) -> None:
        self.clock = FakeClock()
        self.events: list[dict[str, Any]] = []
        self.registry = FileRegistry(env["TOKENBROKER_REGISTRY_FILE"], clock=self.clock)
        self.auth = ClientAuthenticator(
            self.registry,
            MemoryStore(),
            assertion_audience=ISSUER,
            clock=self.clock,
            key_max_age_seconds=key_max_age_seconds,
            on_event=self.events.append,
        )

    def at(self, when: float) -> Door:
        self.clock.now = float(when)
        return self

    def see_file_changes(self) -> None:
        self.clock.advance(1.5)  # past the registry's reload interval

    def authenticate(self, key: Any, client_id: str = "agent", **kw: Any) -> ClientRecord:
        if "client_secret" not in kw:
            kw["client_assertion"] = make_client_assertion(key, client_id, ISSUER, now=int(self.clock()))
        return self.auth.authenticate(
            client_id=client_id, audience=AUDIENCE, scopes=["tools:call"], dpop_jkt=DPOP_JKT, **kw
        )


def add_key_client(env: dict[str, str], tmp_path: Path, *extra: str, name: str = "agent.pem") -> Path:
    key_file = tmp_path / name
    ok(
        env,
        "clients",
        "add",
        "agent",
        "--generate-key",
        str(key_file),
        "--audience",
        AUDIENCE,
        "--scope",
        "tools:call",
        *extra,
    )
    return key_file


# -- approval: who, when, until ------------------------------------------------------------------


def test_approve_records_who_when_until_and_the_rule(env: dict[str, str], tmp_path: Path) -> None:
    add_key_client(env, tmp_path)
    pending = record_of(env)
    assert pending.status is ClientStatus.PENDING
    assert pending.approved_by is None
    before = int(datetime.now(UTC).timestamp())
    result = ok(env, "clients", "approve", "agent", "--by", "alice")
    after = int(datetime.now(UTC).timestamp())
    record = record_of(env)
    assert record.status is ClientStatus.APPROVED
    assert record.approved_by == "alice"
    assert record.approval_rule == "manual"
    assert record.approved_at is not None
    assert before <= record.approved_at <= after
    assert record.approved_until == record.approved_at + 90 * DAY  # approval_ttl_days's default
    assert "alice" in result.stderr
    assert datetime.fromtimestamp(record.approved_until, UTC).strftime("%Y-%m-%d") in result.stderr
    # Unix seconds in the file, readable back by anything that reads TOML.
    table = tomllib.loads(Path(env["TOKENBROKER_REGISTRY_FILE"]).read_text())["clients"]["agent"]
    assert table["approved_by"] == "alice"
    assert table["approved_until"] == record.approved_until


def test_approval_ttl_days_setting_until_and_for_days(env: dict[str, str], tmp_path: Path) -> None:
    add_key_client(env, tmp_path)
    ok({**env, "TOKENBROKER_APPROVAL_TTL_DAYS": "7"}, "clients", "approve", "agent", "--by", "a")
    record = record_of(env)
    assert record.approved_at is not None
    assert record.approved_until == record.approved_at + 7 * DAY

    ok(env, "clients", "approve", "agent", "--by", "b", "--for-days", "3")
    record = record_of(env)
    assert record.approved_at is not None
    assert record.approved_until == record.approved_at + 3 * DAY
    assert record.approved_by == "b"

    ok(env, "clients", "approve", "agent", "--by", "c", "--until", "2999-01-31")
    assert record_of(env).approved_until == unix("2999-01-31T00:00:00")
    ok(env, "clients", "approve", "agent", "--by", "c", "--until", "2999-01-31T18:30:00+02:00")
    assert record_of(env).approved_until == unix("2999-01-31T16:30:00")
    ok(env, "clients", "approve", "agent", "--by", "c", "--until", "2999-01-31T18:30:00Z")
    assert record_of(env).approved_until == unix("2999-01-31T18:30:00")


def test_approver_defaults_to_the_os_user(env: dict[str, str], tmp_path: Path) -> None:
    add_key_client(env, tmp_path)
    ok({**env, "LOGNAME": "ops-bob", "USER": "ops-bob"}, "clients", "approve", "agent")
    assert record_of(env).approved_by == "ops-bob"


def test_add_with_approve_records_the_approval(env: dict[str, str]) -> None:
    ok(env, "clients", "add", "agent", "--generate-secret", "--approve", "--by", "carol", "--for-days", "10")
    record = record_of(env)
    assert record.status is ClientStatus.APPROVED
    assert (record.approved_by, record.approval_rule) == ("carol", "manual")
    assert record.approved_at is not None
    assert record.approved_until == record.approved_at + 10 * DAY
    assert record.key_created_at == record.approved_at  # the credential's age counts from registration


def test_bad_and_past_dates_are_refused_in_one_line(env: dict[str, str], tmp_path: Path) -> None:
    add_key_client(env, tmp_path)
    for bad in ("2026-13-01", "next tuesday", "31/12/2030", ""):
        assert_one_line_error(run(env, "clients", "approve", "agent", "--until", bad), "--until", "ISO 8601")
    assert_one_line_error(
        run(env, "clients", "approve", "agent", "--until", "2020-01-01"), "not in the future", "--for-days"
    )
    assert_one_line_error(
        run(env, "clients", "update", "agent", "--key-not-after", "2020-01-01T00:00:00Z"), "not in the future"
    )
    assert_one_line_error(run(env, "clients", "update", "agent", "--key-not-after", "soon"), "ISO 8601")
    assert_one_line_error(
        run(env, "clients", "add", "b", "--generate-secret", "--key-not-after", "2001-02-03"), "not in the future"
    )
    assert_one_line_error(run(env, "clients", "approve", "agent", "--by", "a\nb"), "--by", "one line")
    assert record_of(env).status is ClientStatus.PENDING  # nothing was approved on the way
    assert FileRegistry(env["TOKENBROKER_REGISTRY_FILE"]).client("b") is None
    both = run(env, "clients", "approve", "agent", "--until", "2999-01-01", "--for-days", "3")
    assert both.exit_code == 2
    assert "not both" in both.stderr
    assert run(env, "clients", "add", "c", "--generate-secret", "--by", "x").exit_code == 2  # --by needs --approve


# -- expiry at the authenticator ----------------------------------------------------------------


def test_an_approval_expires_with_the_clock_and_names_the_command(env: dict[str, str], tmp_path: Path) -> None:
    key = load_private_key(add_key_client(env, tmp_path).read_bytes())
    ok(env, "clients", "approve", "agent", "--by", "alice", "--for-days", "1")
    until = record_of(env).approved_until
    assert until is not None
    door = Door(env)

    assert door.at(until - 1).authenticate(key).client_id == "agent"
    assert door.events == []
    with pytest.raises(ClientRefusedError) as refused:
        door.at(until).authenticate(key)
    assert refused.value.rule == "approval.expired"
    assert "pending" in str(refused.value)
    assert "tokenbroker clients approve agent" in str(refused.value)
    assert door.events == [{"event": "approval_expired", "client_id": "agent", "approved_until": until}]
    with pytest.raises(ClientRefusedError):
        door.at(until + 30 * DAY).authenticate(key)
    assert len(door.events) == 2  # once per refusal

    # Re-approval renews it for the running broker, after its next look at the file.
    ok(env, "clients", "approve", "agent", "--by", "bob", "--until", "2999-01-01")
    door.see_file_changes()
    assert door.authenticate(key).approved_by == "bob"
    assert len(door.events) == 2


def test_expiry_refusals_come_only_after_the_credential_verified(env: dict[str, str], tmp_path: Path) -> None:
    add_key_client(env, tmp_path, "--approve", "--by", "a", "--for-days", "1", "--key-not-after", "2999-01-01")
    record = record_of(env)
    assert record.approved_until is not None
    stranger = ed25519.Ed25519PrivateKey.generate()
    door = Door(env).at(unix("2999-06-01T00:00:00"))  # approval and key both expired
    for client_id in ("agent", "ghost"):
        with pytest.raises(CredentialRefusedError) as refused:
            door.authenticate(stranger, client_id=client_id)
        assert str(refused.value) == AUTH_FAILED
        assert not isinstance(refused.value, CredentialExpiredError)
    assert door.events == []  # nothing about the client reached someone without its key


def test_key_not_after_refuses_the_key_holder_with_the_rotate_command(env: dict[str, str], tmp_path: Path) -> None:
    key = load_private_key(
        add_key_client(
            env, tmp_path, "--approve", "--by", "a", "--until", "2999-12-31", "--key-not-after", "2999-01-01"
        ).read_bytes()
    )
    not_after = unix("2999-01-01T00:00:00")
    assert record_of(env).key_not_after == not_after
    door = Door(env)
    assert door.at(not_after - 1).authenticate(key).client_id == "agent"
    with pytest.raises(CredentialExpiredError) as refused:
        door.at(not_after).authenticate(key)
    assert isinstance(refused.value, AuthenticationError)
    assert refused.value.rule == "credential.key_expired"
    assert refused.value.authenticated is True
    assert "tokenbroker clients rotate-key agent" in str(refused.value)
    assert "2999-01-01T00:00:00Z" in str(refused.value)
    assert door.events == [{"event": "key_expired", "client_id": "agent", "key_not_after": not_after}]


def test_a_secret_past_key_not_after_is_refused_too(env: dict[str, str], tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    ok(env, "clients", "add", "agent", "--generate-secret", "--secret-file", str(secret_file), "--audience", AUDIENCE)
    ok(env, "clients", "update", "agent", "--scope", "tools:call", "--key-not-after", "2999-01-01")
    ok(env, "clients", "approve", "agent", "--by", "a", "--until", "2999-12-31")
    secret = secret_file.read_text().strip()
    door = Door(env).at(unix("2999-01-02T00:00:00"))
    with pytest.raises(CredentialExpiredError):
        door.authenticate(None, client_secret=secret)
    with pytest.raises(CredentialRefusedError) as wrong:
        door.authenticate(None, client_secret=generate_secret())
    assert str(wrong.value) == AUTH_FAILED
    assert len(door.events) == 1


def test_key_max_age_counts_from_key_created_at(env: dict[str, str], tmp_path: Path) -> None:
    key = load_private_key(
        add_key_client(env, tmp_path, "--approve", "--by", "a", "--until", "2999-01-01").read_bytes()
    )
    created = record_of(env).key_created_at
    assert created is not None
    door = Door(env, key_max_age_seconds=30 * DAY)
    assert door.at(created + 30 * DAY - 1).authenticate(key).client_id == "agent"
    with pytest.raises(CredentialExpiredError) as refused:
        door.at(created + 30 * DAY).authenticate(key)
    assert refused.value.rule == "credential.key_expired"
    assert door.events == [{"event": "key_expired", "client_id": "agent", "key_not_after": created + 30 * DAY}]
    # The CLI shows the effective end with the setting.
    shown = json.loads(ok({**env, "TOKENBROKER_CLIENT_KEY_MAX_AGE_DAYS": "30"}, "clients", "show", "agent").stdout)
    assert shown["key_expires_at"] == datetime.fromtimestamp(created + 30 * DAY, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_record_without_key_created_at_is_not_held_to_the_max_age(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "registry.toml"
    FileRegistry(path).put_client(
        ClientRecord(
            "agent",
            status=ClientStatus.APPROVED,
            public_jwk=public_jwk(key),
            allowed_audiences=(AUDIENCE,),
            allowed_scopes=("tools:call",),
        )
    )
    door = Door({"TOKENBROKER_REGISTRY_FILE": str(path)}, key_max_age_seconds=DAY)
    assert door.at(door.clock() + 3650 * DAY).authenticate(key).client_id == "agent"


def test_a_failing_event_hook_never_lets_the_client_in(env: dict[str, str], tmp_path: Path) -> None:
    key = load_private_key(add_key_client(env, tmp_path, "--approve", "--by", "a", "--for-days", "1").read_bytes())

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("event sink down")

    clock = FakeClock()
    auth = ClientAuthenticator(
        FileRegistry(env["TOKENBROKER_REGISTRY_FILE"]),
        MemoryStore(),
        assertion_audience=ISSUER,
        clock=clock,
        on_event=broken,
    )
    clock.advance(2 * DAY)
    with pytest.raises(ClientRefusedError) as refused:
        auth.authenticate(
            client_id="agent",
            client_assertion=make_client_assertion(key, "agent", ISSUER, now=int(clock())),
            audience=AUDIENCE,
            scopes=["tools:call"],
            dpop_jkt=DPOP_JKT,
        )
    assert refused.value.rule == "approval.expired"


def test_key_max_age_must_be_positive() -> None:
    with pytest.raises(ValueError, match="key_max_age_seconds"):
        ClientAuthenticator(
            FileRegistry("/nonexistent/r.toml"), MemoryStore(), assertion_audience=ISSUER, key_max_age_seconds=0
        )


# -- rotate-key ---------------------------------------------------------------------------------


def test_rotate_key_old_key_stops_working_new_one_works(env: dict[str, str], tmp_path: Path) -> None:
    old_file = add_key_client(
        env, tmp_path, "--approve", "--by", "a", "--until", "2999-01-01", "--key-not-after", "2998-01-01"
    )
    old_key = load_private_key(old_file.read_bytes())
    door = Door(env)
    assert door.authenticate(old_key).client_id == "agent"

    new_file = tmp_path / "new.pem"
    result = ok(env, "clients", "rotate-key", "agent", "--out", str(new_file))
    assert stat.S_IMODE(new_file.stat().st_mode) == 0o600
    new_key = load_private_key(new_file.read_bytes())
    assert isinstance(new_key, ed25519.Ed25519PrivateKey)  # the type of the key it replaces
    printed = json.loads(result.stdout)
    assert printed["client_id"] == "agent"
    assert printed["key_thumbprint"] == jwk_thumbprint(public_jwk(new_key))
    record = record_of(env)
    assert record.public_jwk == public_jwk(new_key)
    assert record.key_not_after is None  # the old key's end date went with it
    assert record.key_created_at is not None
    assert printed["key_created_at"] == datetime.fromtimestamp(record.key_created_at, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert "PRIVATE" not in Path(env["TOKENBROKER_REGISTRY_FILE"]).read_text()

    door.see_file_changes()
    with pytest.raises(CredentialRefusedError) as refused:
        door.authenticate(old_key)
    assert str(refused.value) == AUTH_FAILED
    assert door.authenticate(new_key).client_id == "agent"


def test_rotate_key_with_a_public_key_revives_an_expired_key(env: dict[str, str], tmp_path: Path) -> None:
    old_key = load_private_key(
        add_key_client(env, tmp_path, "--approve", "--by", "a", "--until", "2999-12-31").read_bytes()
    )
    door = Door(env, key_max_age_seconds=DAY)
    door.clock.advance(2 * DAY)
    with pytest.raises(CredentialExpiredError):
        door.authenticate(old_key)

    new_key = ec.generate_private_key(ec.SECP256R1())
    pub = tmp_path / "new.pub.pem"
    pub.write_bytes(
        new_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    result = ok(env, "clients", "rotate-key", "agent", "--public-key", str(pub), "--key-not-after", "2999-06-01")
    assert json.loads(result.stdout)["key_thumbprint"] == jwk_thumbprint(public_jwk(new_key))
    assert record_of(env).key_not_after == unix("2999-06-01T00:00:00")

    # The new key's age counts from the rotation (the wall clock's now): a broker whose
    # clock reads a minute later takes it and refuses the old one.
    created = record_of(env).key_created_at
    assert created is not None
    later = Door(env, key_max_age_seconds=DAY).at(created + 60)
    assert later.authenticate(new_key).client_id == "agent"
    with pytest.raises(CredentialRefusedError) as refused:
        later.authenticate(old_key)
    assert str(refused.value) == AUTH_FAILED
    assert later.events == []
    assert_one_line_error(run(env, "clients", "rotate-key", "agent", "--public-key", str(pub)), "already has")


def test_rotate_key_replaces_a_secret(env: dict[str, str], tmp_path: Path) -> None:
    old_file, new_file = tmp_path / "old-secret", tmp_path / "new-secret"
    ok(env, "clients", "add", "agent", "--generate-secret", "--secret-file", str(old_file), "--audience", AUDIENCE)
    ok(env, "clients", "update", "agent", "--scope", "tools:call")
    ok(env, "clients", "approve", "agent", "--by", "a")
    result = ok(env, "clients", "rotate-key", "agent", "--generate-secret", "--secret-file", str(new_file))
    assert json.loads(result.stdout)["key_thumbprint"] is None
    new_secret = new_file.read_text().strip()
    assert new_secret not in result.stdout
    assert record_of(env).secret_hash == hash_secret(new_secret)
    door = Door(env)
    with pytest.raises(CredentialRefusedError):
        door.authenticate(None, client_secret=old_file.read_text().strip())
    assert door.authenticate(None, client_secret=new_secret).client_id == "agent"


def test_rotate_key_usage_errors(env: dict[str, str], tmp_path: Path) -> None:
    add_key_client(env, tmp_path)
    assert run(env, "clients", "rotate-key", "agent").exit_code == 2
    assert run(env, "clients", "rotate-key", "agent", "--key-type", "rsa").exit_code == 2
    assert_one_line_error(
        run(env, "clients", "rotate-key", "ghost", "--out", str(tmp_path / "g.pem")), "'ghost' is not registered"
    )
    assert not (tmp_path / "g.pem").exists()


# -- show and list ------------------------------------------------------------------------------


def test_show_prints_the_governance_fields(env: dict[str, str], tmp_path: Path) -> None:
    key_file = add_key_client(
        env,
        tmp_path,
        *("--owner", "team-payments <payments@example.com>", "--spiffe-id", "spiffe://example.org/ns/prod/agent"),
        *(
            "--require-attestation",
            "--approve",
            "--by",
            "alice",
            "--until",
            "2999-01-01",
            "--key-not-after",
            "2998-01-01",
        ),
    )
    shown = json.loads(ok(env, "clients", "show", "agent").stdout)
    record = record_of(env)
    assert shown["status"] == "approved"
    assert shown["owner"] == "team-payments <payments@example.com>"
    assert shown["approver"] == shown["approved_by"] == "alice"
    assert shown["approval_rule"] == "manual"
    assert shown["approved_until"] == "2999-01-01T00:00:00Z"
    assert record.approved_at is not None
    assert shown["approved_at"] == datetime.fromtimestamp(record.approved_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert shown["key_not_after"] == shown["key_expires_at"] == "2998-01-01T00:00:00Z"
    assert shown["key_created_at"] is not None
    assert shown["spiffe_id"] == "spiffe://example.org/ns/prod/agent"
    assert shown["require_attestation"] is True
    assert shown["pinned_thumbprints"] == []
    key = load_private_key(key_file.read_bytes())
    assert shown["key_thumbprint"] == jwk_thumbprint(public_jwk(key))
    assert shown["binding"] == "dpop"


def test_show_and_list_say_expired_and_no_expiry(env: dict[str, str], tmp_path: Path) -> None:
    path = Path(env["TOKENBROKER_REGISTRY_FILE"])
    secret = hash_secret(generate_secret())
    registry = FileRegistry(path)
    now = int(datetime.now(UTC).timestamp())
    registry.put_client(
        ClientRecord(
            "lapsed",
            status=ClientStatus.APPROVED,
            secret_hash=secret,
            approved_by="alice",
            approved_at=now - 100 * DAY,
            approved_until=now - 10 * DAY,
            approval_rule="manual",
        )
    )
    registry.put_client(ClientRecord("legacy", status=ClientStatus.APPROVED, secret_hash=secret))
    registry.put_client(ClientRecord("waiting", secret_hash=secret))
    shown = json.loads(ok(env, "clients", "show", "lapsed").stdout)
    assert shown["status"] == "expired"
    assert shown["approver"] == "alice"
    assert shown["secret_hash"] == "set"
    listed = {r["client_id"]: r for r in json.loads(ok(env, "clients", "list", "--json").stdout)}
    assert {k: v["status"] for k, v in listed.items()} == {
        "lapsed": "expired",
        "legacy": "approved",
        "waiting": "pending",
    }
    assert listed["legacy"]["approved_until"] is None
    rows = {line.split()[0]: line for line in ok(env, "clients", "list").stdout.splitlines()[1:]}
    assert "expired" in rows["lapsed"]
    assert "approved (no expiry)" in rows["legacy"]
    assert "approved" not in rows["waiting"]


def test_update_sets_owner_spiffe_id_and_attestation(env: dict[str, str], tmp_path: Path) -> None:
    add_key_client(env, tmp_path)
    assert_one_line_error(
        run(env, "clients", "update", "agent", "--require-attestation"), "no spiffe_id", "--spiffe-id"
    )
    assert_one_line_error(run(env, "clients", "update", "agent", "--spiffe-id", "https://example.org/x"), "spiffe://")
    ok(env, "clients", "update", "agent", "--owner", "team-a", "--spiffe-id", "spiffe://td.example/agent")
    ok(env, "clients", "update", "agent", "--require-attestation")
    record = record_of(env)
    assert (record.owner, record.spiffe_id, record.require_attestation) == ("team-a", "spiffe://td.example/agent", True)
    ok(env, "clients", "update", "agent", "--no-require-attestation")
    assert record_of(env).require_attestation is False


def test_update_with_a_new_public_key_is_a_rotation(env: dict[str, str], tmp_path: Path) -> None:
    add_key_client(env, tmp_path, "--key-not-after", "2999-01-01")
    first = record_of(env).key_created_at
    pub = tmp_path / "pub.pem"
    pub.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    ok(env, "clients", "update", "agent", "--public-key", str(pub))
    record = record_of(env)
    assert record.key_not_after is None
    assert first is not None
    assert record.key_created_at is not None
    assert record.key_created_at >= first


# -- the registry file --------------------------------------------------------------------------


OLD_FORMAT = """
[clients.agent-7]
status = "approved"
public_jwk = { kty = "OKP", crv = "Ed25519", x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo" }
allowed_audiences = ["https://mcp.example.com/mcp"]
allowed_scopes = ["tools:call"]
max_sessions = 10
limit_policy = "reject"
allowed_cidrs = []
binding = "dpop"
"""


def test_an_old_format_file_still_loads_and_its_approval_does_not_expire(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(OLD_FORMAT)
    record = FileRegistry(path).client("agent-7")
    assert record is not None
    assert record.status is ClientStatus.APPROVED
    assert (record.owner, record.approved_by, record.approved_until, record.key_created_at) == (None, None, None, None)
    assert record.pinned_thumbprints == ()
    assert record.require_attestation is False
    assert record.effective_status(10**11) == "approved"
    assert not record.approval_expired(10**11)
    # Saving it again writes none of the new fields.
    FileRegistry(path).update_client("agent-7", max_sessions=3)
    assert "approved_until" not in path.read_text()
    assert "require_attestation" not in path.read_text()


def full_record() -> ClientRecord:
    return ClientRecord(
        "https://agents.example.com/client.json",
        status=ClientStatus.APPROVED,
        public_jwk={"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
        owner="team-agents",
        approved_by="alice",
        approved_at=1_767_225_600,
        approved_until=1_774_998_000,
        approval_rule="trusted_domain:*.example.com",
        key_created_at=1_767_225_600,
        key_not_after=1_798_761_600,
        spiffe_id="spiffe://example.org/agent",
        require_attestation=True,
        pinned_thumbprints=("kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k",),
        document_fingerprint="sha256:47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU",
        document_domain="agents.example.com",
    )


def test_every_governance_field_round_trips_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    record = full_record()
    FileRegistry(path).put_client(record)
    assert FileRegistry(path).client(record.client_id) == record


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"owner": "team\nevil"}, "one line"),
        ({"owner": "x" * 201}, "owner"),
        ({"owner": "  "}, "owner"),
        ({"approved_by": ""}, "approved_by"),
        ({"approved_at": 1_767_225_600_000}, "milliseconds"),
        ({"approved_until": -1}, "approved_until"),
        ({"approved_until": True}, "approved_until"),
        ({"approved_until": 1_767_225_600}, "later than approved_at"),
        ({"key_not_after": 1_767_225_599}, "later than key_created_at"),
        ({"key_created_at": "2026-01-01"}, "key_created_at"),
        ({"approval_rule": "Manual approval"}, "approval_rule"),
        ({"spiffe_id": "spiffe://example.org"}, "spiffe://trust-domain/path"),
        ({"spiffe_id": "spiffe://Example.org/agent"}, "not a SPIFFE ID"),
        ({"spiffe_id": "spiffe://example.org//agent"}, "not a SPIFFE ID"),
        ({"spiffe_id": "spiffe://example.org/a/../b"}, "'..'"),
        ({"spiffe_id": "spiffe://example.org/" + "a" * 2100}, "not a SPIFFE ID"),
        ({"spiffe_id": None}, "no spiffe_id"),
        ({"pinned_thumbprints": ("short",)}, "pinned_thumbprints"),
        ({"pinned_thumbprints": tuple(f"{i:043d}" for i in range(65))}, "more than 64"),
        ({"document_fingerprint": "has space"}, "document_fingerprint"),
        ({"document_domain": "-bad-.example"}, "document_domain"),
        ({"document_domain": "host:99999"}, "document_domain"),
        ({"require_attestation": "yes"}, "require_attestation"),
    ],
)
def test_bad_governance_fields_are_refused(tmp_path: Path, changes: dict[str, Any], fragment: str) -> None:
    from dataclasses import replace

    with pytest.raises(InvalidArgumentError) as refused:
        FileRegistry(tmp_path / "registry.toml").put_client(replace(full_record(), **changes))
    assert fragment in str(refused.value)
    assert not (tmp_path / "registry.toml").exists()


def test_document_domain_takes_addresses_and_ports(tmp_path: Path) -> None:
    from dataclasses import replace

    registry = FileRegistry(tmp_path / "registry.toml")
    for domain in ("127.0.0.1", "127.0.0.1:8443", "[::1]:8443", "Agents.Example.COM"):
        registry.put_client(replace(full_record(), document_domain=domain))
        stored = registry.client(full_record().client_id)
        assert stored is not None
        assert stored.document_domain == domain.lower()


def test_a_bad_governance_field_in_the_file_names_the_client(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(OLD_FORMAT + 'approved_until = "tomorrow"\n')
    with pytest.raises(RegistryFileError) as refused:
        FileRegistry(path)
    assert "[clients.agent-7]" in str(refused.value)
    assert "approved_until" in str(refused.value)


def test_jwk_thumbprint_known_answers_and_the_core_agrees() -> None:
    # RFC 8037 appendix A.3 (Ed25519) and RFC 7638 section 3.1 (RSA).
    assert jwk_thumbprint(full_record().public_jwk or {}) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    rsa_jwk = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n"
            "3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgd"
            "AZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-"
            "kEgU8awapJzKnqDKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(rsa_jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    p256 = public_jwk(ec.generate_private_key(ec.SECP256R1()))
    assert jwk_thumbprint(p256) == core_thumbprint(json.dumps(p256))
