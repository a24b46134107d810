"""A client record's own detection policy (issue 12): its usage window, which its tokens
carry as the `usage_window` claim, and its action per signal. The real registry file, the
real CLI (CliRunner), and a real `tokenbroker serve` whose two doors (HTTP /token, gRPC
IssueToken) issue the tokens and whose gRPC door validates them."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import tokenbroker.registry_file
from tokenbroker import Reason
from tokenbroker.cli import main
from tokenbroker.client import BrokerClient
from tokenbroker.detection.detector import parse_window
from tokenbroker.detection.signals import Action, Signal
from tokenbroker.errors import InvalidArgumentError
from tokenbroker.registry import Binding, ClientRecord, ClientStatus
from tokenbroker.registry_file import (
    FileRegistry,
    RegistryFileError,
    check_detection_actions,
    check_usage_window,
    client_from_dict,
    client_to_dict,
)

from support.broker_process import BrokerProcess
from support.oauth import AUDIENCE_A, OAuthDeployment, claims_of, http_client, secret_token

ISSUER = "https://broker.test"
SECRET = "policy-secret-" + "s" * 30
SERVER_KEY = "policy-server-key-" + "k" * 30
ALL_SIGNALS = "new_network, concurrent_origins, resource_breadth, outside_usage_window, burst_after_auth"
ALL_ACTIONS = "alert, deny, revoke_session"


# -- the record and the file ----------------------------------------------------------------------


def test_the_file_round_trip_keeps_the_window_and_actions_in_one_spelling(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    FileRegistry(path).add_client(
        ClientRecord(
            "night-agent",
            status=ClientStatus.APPROVED,
            secret_hash="x" * 43,
            usage_window=" 22-06 ",
            detection_actions=("concurrent_origins = revoke_session", "new_network=deny", "burst_after_auth=alert"),
        )
    )
    text = path.read_text()
    table = tomllib.loads(text)["clients"]["night-agent"]
    # Over midnight is stored as two ranges; the actions in the signals' order.
    assert table["usage_window"] == "00-06,22-24"
    assert table["detection_actions"] == [
        "new_network=deny",
        "concurrent_origins=revoke_session",
        "burst_after_auth=alert",
    ]
    record = FileRegistry(path).client("night-agent")  # read back by a new reader
    assert record is not None
    assert record.usage_window == "00-06,22-24"
    assert record.usage_window_mask() == parse_window("22-06") == sum(1 << h for h in (22, 23, 0, 1, 2, 3, 4, 5))
    assert record.detection_policy() == {
        Signal.NEW_NETWORK: Action.DENY,
        Signal.CONCURRENT_ORIGINS: Action.REVOKE_SESSION,
        Signal.BURST_AFTER_AUTH: Action.ALERT,
    }
    # The shared registry's shape (Redis) round-trips the same way.
    assert client_from_dict("night-agent", client_to_dict(record), "test") == record


def test_a_file_written_before_detection_policies_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text('[clients.old]\nstatus = "approved"\nsecret_hash = "abc"\nallowed_audiences = ["https://a"]\n')
    record = FileRegistry(path).client("old")
    assert record is not None
    assert record.usage_window is None
    assert record.detection_actions == ()
    assert record.usage_window_mask() is None
    assert record.detection_policy() == {}
    # ... and a record without them is written without them.
    FileRegistry(path).update_client("old", owner="team-a")
    assert "usage_window" not in path.read_text()
    assert "detection_actions" not in path.read_text()


@pytest.mark.parametrize(
    ("field", "value", "fragments"),
    [
        ("usage_window", '"25-03"', ("usage_window '25-03'", '"08-18"')),
        ("usage_window", '"08-08"', ("usage_window '08-08'", "ends at another hour")),
        ("usage_window", '""', ("usage_window ''", '"22-06"')),
        ("usage_window", '"8am-6pm"', ("usage_window '8am-6pm'",)),
        ("usage_window", "8", ("usage_window must be UTC hour ranges",)),
        ("detection_actions", '["new_network=kill"]', ("unknown action 'kill'", ALL_ACTIONS)),
        ("detection_actions", '["stolen=deny"]', ("unknown signal 'stolen'", ALL_SIGNALS)),
        ("detection_actions", '["new_network"]', ("is not SIGNAL=ACTION", ALL_SIGNALS, ALL_ACTIONS)),
        ("detection_actions", '["new_network=deny", "new_network=alert"]', ("'new_network' is given twice",)),
        ("detection_actions", '"new_network=deny"', ("must be a list of texts",)),
        ("detection_actions", "[1]", ("must be a list of texts",)),
    ],
)
def test_a_bad_value_in_the_file_is_refused_naming_the_client(
    tmp_path: Path, field: str, value: str, fragments: tuple[str, ...]
) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(f'[clients.bad]\nstatus = "approved"\n{field} = {value}\n')
    with pytest.raises(RegistryFileError) as refused:
        FileRegistry(path)
    message = str(refused.value)
    assert "[clients.bad]" in message, message
    assert field in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_records_made_in_code_are_checked_too(tmp_path: Path) -> None:
    registry = FileRegistry(tmp_path / "registry.toml")
    registry.add_client(ClientRecord("agent", secret_hash="x"))
    with pytest.raises(InvalidArgumentError, match="usage_window '24-01'"):
        registry.update_client("agent", usage_window="24-01")
    with pytest.raises(InvalidArgumentError, match="at most one entry per signal"):
        registry.update_client("agent", detection_actions=tuple(f"{s.value}=deny" for s in Signal) * 2)
    with pytest.raises(InvalidArgumentError, match="at most 200 characters"):
        check_usage_window("08-18," * 40)
    stored = registry.client("agent")
    assert stored is not None
    assert stored.usage_window is None
    assert stored.detection_actions == ()


def test_the_example_at_the_top_of_the_file_module_is_valid() -> None:
    doc = tokenbroker.registry_file.__doc__ or ""
    example = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert example is not None
    client = tomllib.loads(example.group(1))["clients"]["agent-7"]
    assert check_usage_window(client["usage_window"]) == client["usage_window"]
    assert check_detection_actions(client["detection_actions"]) == tuple(client["detection_actions"])
    for signal in Signal:  # the example names every signal the broker knows
        assert signal.value in doc


# -- the CLI ---------------------------------------------------------------------------------------


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


def refused(result: Result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    for fragment in fragments:
        assert fragment in message, message


def shown(env: dict[str, str], client_id: str = "agent") -> dict[str, object]:
    printed = json.loads(ok(env, "clients", "show", client_id).stdout)
    assert isinstance(printed, dict)
    return printed


def add(env: dict[str, str], *options: str) -> Result:
    return run(env, "clients", "add", "agent", "--generate-secret", "--secret-file", env["SECRET_FILE"], *options)


@pytest.fixture
def cli_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**env, "SECRET_FILE": str(tmp_path / "secret")}


def test_clients_add_takes_a_usage_window_and_actions_and_show_prints_them(cli_env: dict[str, str]) -> None:
    result = add(
        cli_env,
        "--usage-window",
        "22-06",
        "--on-signal",
        "concurrent_origins=revoke_session",
        "--on-signal",
        "new_network=deny",
    )
    assert result.exit_code == 0, result.output
    printed = shown(cli_env)
    assert printed["usage_window"] == "00-06,22-24"
    assert printed["detection_actions"] == ["new_network=deny", "concurrent_origins=revoke_session"]
    # Without them: no window (the broker may learn one), no actions of its own.
    ok(cli_env, "clients", "add", "plain", "--generate-secret", "--secret-file", cli_env["SECRET_FILE"] + "2")
    plain = shown(cli_env, "plain")
    assert plain["usage_window"] is None
    assert plain["detection_actions"] == []


def test_clients_update_changes_one_signal_at_a_time_and_clears(cli_env: dict[str, str]) -> None:
    ok(cli_env, "clients", "add", "agent", "--generate-secret", "--secret-file", cli_env["SECRET_FILE"])
    ok(cli_env, "clients", "update", "agent", "--usage-window", "08-18", "--on-signal", "new_network=deny")
    ok(cli_env, "clients", "update", "agent", "--on-signal", "resource_breadth=revoke_session")
    printed = shown(cli_env)
    assert printed["usage_window"] == "08-18"
    assert printed["detection_actions"] == ["new_network=deny", "resource_breadth=revoke_session"]
    # SIGNAL=alert sets that one back to alert and keeps the others.
    ok(cli_env, "clients", "update", "agent", "--on-signal", "new_network=alert")
    assert shown(cli_env)["detection_actions"] == ["new_network=alert", "resource_breadth=revoke_session"]
    # Clearing, then one new action, in one command.
    ok(cli_env, "clients", "update", "agent", "--clear-signal-actions", "--on-signal", "burst_after_auth=deny")
    assert shown(cli_env)["detection_actions"] == ["burst_after_auth=deny"]
    ok(cli_env, "clients", "update", "agent", "--clear-signal-actions", "--usage-window", "")
    printed = shown(cli_env)
    assert printed["usage_window"] is None
    assert printed["detection_actions"] == []
    stored = FileRegistry(cli_env["TOKENBROKER_REGISTRY_FILE"]).client("agent")
    assert stored is not None
    assert stored.usage_window is None
    assert stored.detection_actions == ()


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (("--on-signal", "new_network"), ("--on-signal", "is not SIGNAL=ACTION", ALL_SIGNALS, ALL_ACTIONS)),
        (("--on-signal", "stolen_key=deny"), ("--on-signal", "unknown signal 'stolen_key'", ALL_SIGNALS)),
        (("--on-signal", "new_network=block"), ("--on-signal", "unknown action 'block'", ALL_ACTIONS)),
        (
            ("--on-signal", "new_network=deny", "--on-signal", "new_network=alert"),
            ("--on-signal", "'new_network' is given twice"),
        ),
        (("--usage-window", "9-5pm"), ("--usage-window '9-5pm'", '"08-18"')),
        (("--usage-window", "18-18"), ("--usage-window '18-18'",)),
    ],
)
def test_bad_options_are_refused_with_what_is_accepted(
    cli_env: dict[str, str], options: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    refused(add(cli_env, *options), *fragments)
    assert FileRegistry(cli_env["TOKENBROKER_REGISTRY_FILE"]).client("agent") is None  # nothing half-added
    ok(cli_env, "clients", "add", "agent", "--generate-secret", "--secret-file", cli_env["SECRET_FILE"])
    refused(run(cli_env, "clients", "update", "agent", *options), *fragments)
    assert shown(cli_env)["detection_actions"] == []


def test_an_empty_window_at_add_is_a_usage_error(cli_env: dict[str, str]) -> None:
    refused(add(cli_env, "--usage-window", ""), "removes a window", "08-18")


# -- the doors: tokens carry the record's window; its actions apply --------------------------------


def _hour_range(start: int) -> str:
    """One UTC hour starting at `start` (0-23), as a window ("23-24", never "23-00")."""
    return f"{start:02d}-{start + 1:02d}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """A real `serve` (memory store, detection on) with clients of each kind of window."""
    hour = datetime.now(UTC).hour
    away = (hour + 12) % 24  # an hour no test can reach before its token is validated
    d = OAuthDeployment(tmp_path_factory.mktemp("detection-policy"))
    bearer = {"binding": Binding.BEARER}
    d.add_secret_client("office", SECRET, usage_window="08-18", **bearer)
    d.add_secret_client("unwindowed", SECRET, **bearer)
    d.add_secret_client("always", SECRET, usage_window="00-24", **bearer)
    deny = ("outside_usage_window=deny",)
    d.add_secret_client("off-hours", SECRET, usage_window=_hour_range(away), detection_actions=deny, **bearer)
    d.add_secret_client("off-hours-alert", SECRET, usage_window=_hour_range(away), **bearer)
    d.add_server("mcp", (AUDIENCE_A,), SERVER_KEY)
    process = d.broker()
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log.read_text()[-2000:]


Issue = Callable[[BrokerProcess, str], str]  # a door: the access token it issues to a client


def _http_token(broker: BrokerProcess, client_id: str) -> str:
    with http_client() as http:
        answer = secret_token(http, broker, client_id, SECRET)
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    assert isinstance(token, str)
    return token


def _grpc_token(broker: BrokerProcess, client_id: str) -> str:
    with BrokerClient(broker.target, timeout=5) as client:
        return client.issue(client_id=client_id, client_secret=SECRET, audience=AUDIENCE_A).access_token


@pytest.mark.parametrize("issue", [_http_token, _grpc_token], ids=["http", "grpc"])
def test_a_token_carries_its_clients_usage_window(served: BrokerProcess, issue: Issue) -> None:
    assert claims_of(issue(served, "office"))["usage_window"] == parse_window("08-18") == 0b111111111100000000
    assert claims_of(issue(served, "always"))["usage_window"] == (1 << 24) - 1
    # No window of its own and no history to learn one from (a fresh broker): no claim.
    assert "usage_window" not in claims_of(issue(served, "unwindowed"))


@pytest.mark.parametrize("issue", [_http_token, _grpc_token], ids=["http", "grpc"])
def test_the_clients_action_decides_a_use_outside_its_window(served: BrokerProcess, issue: Issue) -> None:
    with BrokerClient(served.target, api_key=SERVER_KEY, timeout=5) as server:
        denied = server.validate(issue(served, "off-hours"), audience=AUDIENCE_A)
        alerted = server.validate(issue(served, "off-hours-alert"), audience=AUDIENCE_A)
        inside = server.validate(issue(served, "always"), audience=AUDIENCE_A)
    assert denied.reason == Reason.ANOMALY, denied
    assert not denied.valid
    assert alerted.valid, alerted  # the default action, alert: answered as if nothing was seen
    assert inside.valid, inside
