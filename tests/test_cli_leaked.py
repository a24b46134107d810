"""`tokenbroker leaked SECRET|FILE` (issue 12, "Secret scanning"): against a real registry
file in-process, and against a real `tokenbroker serve` process whose sessions it revokes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tokenbroker import Keyring, Reason
from tokenbroker.cli import main
from tokenbroker.cli.leaked import MAX_INPUT_BYTES, NOTHING_FOUND, candidates
from tokenbroker.client import BrokerClient
from tokenbroker.errors import AuthenticationError, ClientNotAllowedError
from tokenbroker.registry import Binding, ClientRecord, ClientStatus, ServerRecord
from tokenbroker.registry_file import FileRegistry, hash_secret
from tokenbroker.secret_format import mint

from support.broker_process import BrokerProcess, broker_env

AUDIENCE = "https://mcp.test/mcp"
ISSUER = "https://broker.test"
OLD_SECRET = "wAaHvlhactyskli_L0NUH4UyMga6nF0JvYiEK5bmCiI"  # the base64url format minted before tbs_
CLI = [sys.executable, "-c", "from tokenbroker.cli import main; main()"]


@dataclass
class Setup:
    tmp_path: Path
    env: dict[str, str]
    client_secret: str
    api_key: str
    admin_key: str

    @property
    def registry(self) -> FileRegistry:
        return FileRegistry(self.env["TOKENBROKER_REGISTRY_FILE"])

    def file(self, name: str, text: str) -> Path:
        path = self.tmp_path / name
        path.write_text(text)
        return path


def register(registry: FileRegistry, client_secret: str, api_key: str, admin_key: str) -> None:
    registry.add_client(
        ClientRecord(
            "agent-7",
            status=ClientStatus.APPROVED,
            secret_hash=hash_secret(client_secret),
            allowed_audiences=(AUDIENCE,),
            allowed_scopes=("tools:call",),
            binding=Binding.BEARER,
        )
    )
    registry.add_client(
        ClientRecord("bystander", status=ClientStatus.APPROVED, secret_hash=hash_secret(mint("client_secret")))
    )
    registry.add_server(
        ServerRecord("mcp-1", audiences=(AUDIENCE,), api_key_hash=hash_secret(api_key), labels={"team": "a b"})
    )
    registry.add_server(ServerRecord("ops", admin=True, api_key_hash=hash_secret(admin_key)))


@pytest.fixture
def setup(tmp_path: Path, no_tokenbroker_env: None) -> Setup:
    env = {"TOKENBROKER_REGISTRY_FILE": str(tmp_path / "registry.toml"), "TOKENBROKER_ISSUER": ISSUER}
    found = Setup(tmp_path, env, mint("client_secret"), mint("server_api_key"), mint("server_api_key"))
    register(found.registry, found.client_secret, found.api_key, found.admin_key)
    return found


def run(setup: Setup, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["leaked", *args], env={**setup.env, **(env or {})}, input=input)


def assert_never_printed(result: Result, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.stdout
        assert secret not in result.stderr


def event_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "credential_leaked" in line]


# -- in-process, a real registry file ---------------------------------------------------------------


def test_a_leaked_client_secret_disables_the_client_and_says_sessions_were_not_revoked(setup: Setup) -> None:
    leaked = setup.file("paste.txt", f"found in a CI log:\n  export TOKENBROKER_CLIENT_SECRET={setup.client_secret}\n")
    result = run(setup, str(leaked))
    assert result.exit_code == 2, result.output  # disabled, but its live sessions are not revoked
    record = setup.registry.client("agent-7")
    assert record is not None
    assert record.status is ClientStatus.DISABLED
    assert record.secret_hash is None  # a later approval cannot let the leaked secret back in
    bystander = setup.registry.client("bystander")
    assert bystander is not None
    assert bystander.status is ClientStatus.APPROVED

    summary = json.loads(result.stdout)
    (finding,) = summary["found"]
    assert finding["kind"] == "client_secret"
    assert finding["unlocks"] == {"client": "agent-7"}
    assert finding["fingerprint"] == hash_secret(setup.client_secret)[:8]
    assert finding["sessions_revoked"] is None
    assert "tokenbroker clients rotate-key agent-7 --generate-secret" in finding["rotate"]["command"]
    assert summary["sessions_not_revoked"] == ["agent-7"]
    assert "sessions were NOT revoked" in result.stderr
    assert "no admin API key" in result.stderr
    assert "tokenbroker revoke client agent-7" in result.stderr

    (event,) = event_lines(result)
    assert "critical" in event
    assert "deny" in event
    assert hash_secret(setup.client_secret)[:8] in event
    assert_never_printed(result, setup.client_secret)


def test_a_leaked_server_key_from_stdin_stops_authenticating(setup: Setup) -> None:
    result = run(setup, "-", input=f'{{"api_key": "{setup.api_key}"}}\n')
    assert result.exit_code == 0, result.output
    registry = setup.registry
    assert registry.server_by_api_key(setup.api_key) is None
    server = registry.server("mcp-1")
    assert server is not None
    assert server.api_key_hash is None
    assert server.audiences == (AUDIENCE,)
    assert registry.server_by_api_key(setup.admin_key) is not None  # only the leaked one goes

    (finding,) = json.loads(result.stdout)["found"]
    assert finding["kind"] == "server_api_key"
    assert finding["unlocks"] == {"server": "mcp-1", "admin": False}
    command = finding["rotate"]["command"]
    assert command.startswith("tokenbroker servers remove mcp-1 && tokenbroker servers add mcp-1")
    assert f"--audience {AUDIENCE}" in command
    assert "--label 'team=a b'" in command
    assert "--generate-api-key" in command
    (event,) = event_lines(result)
    assert "deny" in event
    assert_never_printed(result, setup.api_key)


def test_an_old_format_secret_on_a_line_of_its_own_is_found(setup: Setup) -> None:
    setup.registry.update_client("agent-7", secret_hash=hash_secret(OLD_SECRET))
    result = run(setup, str(setup.file("old.txt", f"\n  {OLD_SECRET}  \nunrelated text\n")))
    assert result.exit_code == 2, result.output
    assert json.loads(result.stdout)["found"][0]["unlocks"] == {"client": "agent-7"}
    assert_never_printed(result, OLD_SECRET)


def test_a_file_with_a_client_secret_and_a_server_key_takes_both_away(setup: Setup) -> None:
    result = run(setup, str(setup.file("dump.env", f"A={setup.client_secret}\nB={setup.api_key}\n")))
    assert result.exit_code == 2, result.output
    kinds = sorted(f["kind"] for f in json.loads(result.stdout)["found"])
    assert kinds == ["client_secret", "server_api_key"]
    assert len(event_lines(result)) == 2


def test_a_secret_in_the_format_is_accepted_as_the_argument(setup: Setup) -> None:
    result = run(setup, setup.api_key)
    assert result.exit_code == 0, result.output
    assert "command line" in result.stderr
    assert setup.registry.server_by_api_key(setup.api_key) is None
    assert setup.api_key not in result.stdout


def test_any_other_argument_is_refused_without_echoing_it(setup: Setup) -> None:
    result = run(setup, OLD_SECRET)
    assert result.exit_code == 2
    assert "neither a file nor a secret" in result.stderr
    assert_never_printed(result, OLD_SECRET)
    record = setup.registry.client("agent-7")
    assert record is not None
    assert record.status is ClientStatus.APPROVED


def test_nothing_registered_matches(setup: Setup) -> None:
    result = run(setup, str(setup.file("other.txt", f"{mint('client_secret')}\nhello\n")))
    assert result.exit_code == 1
    assert NOTHING_FOUND in result.stderr
    assert result.stdout == ""


def test_stdin_cannot_hold_both_the_leak_and_the_admin_key(setup: Setup) -> None:
    result = run(setup, "-", "--api-key-file", "-", input=setup.client_secret)
    assert result.exit_code == 2
    assert "only one of" in result.stderr


def test_a_file_over_the_bound_is_refused(setup: Setup) -> None:
    big = setup.tmp_path / "big.log"
    big.write_bytes(b"x" * (MAX_INPUT_BYTES + 1))
    result = run(setup, str(big))
    assert result.exit_code == 1
    assert "MiB" in result.stderr


def test_candidates_are_format_matches_then_whole_lines_each_once() -> None:
    secret = mint("client_secret")
    text = f"key={secret}\n{secret}\n\n   \n{'y' * 600}\n plain \n"
    assert candidates(text) == [secret, f"key={secret}", "plain"]


# -- against a real broker: the sessions are revoked ------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path, no_tokenbroker_env: None) -> Iterator[tuple[Setup, BrokerProcess]]:
    Keyring.generate().save(tmp_path / "keys.json")
    env = broker_env(tmp_path, ISSUER, audit=False, log_level="warning")
    found = Setup(tmp_path, env, mint("client_secret"), mint("server_api_key"), mint("server_api_key"))
    register(found.registry, found.client_secret, found.api_key, found.admin_key)
    process = BrokerProcess(tmp_path, dict(env)).start()
    try:
        yield found, process
    finally:
        assert process.stop() == 0, process.log.read_text()[-2000:]


def issue(process: BrokerProcess, secret: str) -> Any:
    with BrokerClient(process.target, timeout=5) as client:
        return client.issue(client_id="agent-7", client_secret=secret, audience=AUDIENCE, scopes=["tools:call"])


def test_leaked_revokes_the_clients_live_sessions_on_the_running_broker(broker: tuple[Setup, BrokerProcess]) -> None:
    setup, process = broker
    issued = issue(process, setup.client_secret)
    with BrokerClient(process.target, api_key=setup.api_key, timeout=5) as server:
        assert server.validate(issued.access_token, audience=AUDIENCE).valid

    leaked_file = setup.file("leak.txt", setup.client_secret + "\n")
    admin_file = setup.file("admin-key", setup.admin_key + "\n")
    done = subprocess.run(
        [*CLI, "leaked", str(leaked_file), "--target", process.target, "--api-key-file", str(admin_file)],
        env={**os.environ, **setup.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (finding,) = json.loads(done.stdout)["found"]
    assert finding["sessions_revoked"] == 1
    assert "revoke_session" in done.stderr
    assert "credential_leaked" in done.stderr
    assert setup.client_secret not in done.stdout + done.stderr

    with BrokerClient(process.target, api_key=setup.api_key, timeout=5) as server:
        assert server.validate(issued.access_token, audience=AUDIENCE).reason is Reason.CLIENT_REVOKED
    record = setup.registry.client("agent-7")
    assert record is not None
    assert record.status is ClientStatus.DISABLED
    assert refused_within(5.0, lambda: issue(process, setup.client_secret))  # the broker re-reads its registry


def refused_within(seconds: float, call: Any) -> bool:
    """Whether `call` is refused (the client's secret unknown or the client disabled)
    before `seconds` pass: the broker re-reads a changed registry file about once a second."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            call()
        except (AuthenticationError, ClientNotAllowedError):
            return True
        time.sleep(0.2)
    return False
