"""The `tokenbroker` CLI: local commands against real files; remote commands against an
in-process stand-in for `BrokerClient`; `serve` against a stand-in service module."""

from __future__ import annotations

import itertools
import json
import stat
import sys
import types
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tokenbroker import Broker, Keyring, MemoryStore, Validation
from tokenbroker.cli import main
from tokenbroker.client_auth import ClientAuthenticator
from tokenbroker.registry import ClientStatus
from tokenbroker.registry_file import FileRegistry, hash_secret
from tokenbroker.secret_format import parse
from tokenbroker_bench.servers import free_port

AUDIENCE = "https://mcp.test/mcp"
ISSUER = "https://broker.test"


@pytest.fixture
def env(tmp_path: Path, no_tokenbroker_env: None) -> dict[str, str]:
    return {
        "TOKENBROKER_REGISTRY_FILE": str(tmp_path / "registry.toml"),
        "TOKENBROKER_ISSUER": ISSUER,
        "TOKENBROKER_HTTP_LISTEN": "127.0.0.1:0",
    }


def run(env: dict[str, str], *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, input=input)


def registry(env: dict[str, str]) -> FileRegistry:
    return FileRegistry(env["TOKENBROKER_REGISTRY_FILE"])


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.count("\n") == 0, message
    for fragment in fragments:
        assert fragment in message


# -- keys ---------------------------------------------------------------------------------------


def test_keys_generate_show_rotate_jwks(env: dict[str, str], tmp_path: Path) -> None:
    key_file = tmp_path / "keys.json"
    result = run(env, "keys", "generate", "--out", str(key_file), "--kid", "k1")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    shown = json.loads(run(env, "keys", "show", "--file", str(key_file)).stdout)
    assert shown["active_kid"] == "k1"
    assert set(shown) == {"file", "active_kid", "kids"}

    assert run(env, "keys", "rotate", "--file", str(key_file)).exit_code == 0
    keyring = Keyring.load(key_file)
    assert len(keyring.kids) == 2
    assert keyring.active_kid != "k1"

    jwks = json.loads(run(env, "keys", "jwks", "--file", str(key_file)).stdout)
    assert {k["kid"] for k in jwks["keys"]} == set(keyring.kids)
    assert all("d" not in k for k in jwks["keys"])


def test_keys_generate_refuses_to_overwrite(env: dict[str, str], tmp_path: Path) -> None:
    key_file = tmp_path / "keys.json"
    run(env, "keys", "generate", "--out", str(key_file))
    result = run(env, "keys", "generate", "--out", str(key_file))
    assert_one_line_error(result, "already exists", "keys rotate")


def test_keys_default_to_the_configured_key_file(env: dict[str, str], tmp_path: Path) -> None:
    key_file = tmp_path / "keys.json"
    run(env, "keys", "generate", "--out", str(key_file))
    result = run({**env, "TOKENBROKER_KEY_FILE": str(key_file)}, "keys", "show")
    assert json.loads(result.stdout)["file"] == str(key_file)


def test_keys_without_a_file_say_how_to_give_one(env: dict[str, str]) -> None:
    result = run(env, "keys", "show")
    assert result.exit_code == 2
    assert "--file" in result.stderr


def test_keys_on_a_missing_file_say_how_to_create_it(env: dict[str, str]) -> None:
    assert_one_line_error(run(env, "keys", "show", "--file", "nope.json"), "keys generate --out nope.json")


# -- clients ------------------------------------------------------------------------------------


def test_clients_add_generates_a_key_and_stores_only_the_public_part(env: dict[str, str], tmp_path: Path) -> None:
    key_out = tmp_path / "agent.pem"
    result = run(
        env, "clients", "add", "agent", "--generate-key", str(key_out), "--audience", AUDIENCE, "--scope", "tools:call"
    )
    assert result.exit_code == 0, result.output
    assert "clients approve agent" in result.stderr
    assert stat.S_IMODE(key_out.stat().st_mode) == 0o600
    record = registry(env).client("agent")
    assert record is not None
    assert record.status is ClientStatus.PENDING
    assert record.public_jwk is not None
    assert "d" not in record.public_jwk
    text = Path(env["TOKENBROKER_REGISTRY_FILE"]).read_text()
    assert "PRIVATE" not in text


def test_clients_add_generates_a_secret_printed_once(env: dict[str, str]) -> None:
    result = run(env, "clients", "add", "agent", "--generate-secret", "--audience", AUDIENCE, "--approve")
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert parse(secret) == "client_secret"  # tbs_..., the format secret scanners match
    record = registry(env).client("agent")
    assert record is not None
    assert record.status is ClientStatus.APPROVED
    assert record.secret_hash == hash_secret(secret)
    assert secret not in Path(env["TOKENBROKER_REGISTRY_FILE"]).read_text()
    assert secret not in run(env, "clients", "show", "agent").stdout
    assert record.secret_hash not in run(env, "clients", "show", "agent").stdout


def test_clients_add_secret_to_a_file(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "secret"
    result = run(env, "clients", "add", "agent", "--generate-secret", "--secret-file", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    record = registry(env).client("agent")
    assert record is not None
    assert record.secret_hash == hash_secret(out.read_text().strip())


def test_clients_add_with_a_public_key_and_policy(env: dict[str, str], tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = tmp_path / "pub.pem"
    pem.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    result = run(
        env,
        *("clients", "add", "agent", "--public-key", str(pem), "--audience", AUDIENCE),
        *("--scope", "a b", "--scope", "c", "--max-sessions", "2", "--policy", "evict_oldest"),
        *("--cidr", "10.1.2.3/8"),
    )
    assert result.exit_code == 0, result.output
    record = registry(env).client("agent")
    assert record is not None
    assert record.public_jwk is not None
    assert record.public_jwk["crv"] == "P-256"
    assert record.allowed_scopes == ("a", "b", "c")
    assert record.max_sessions == 2
    assert record.limit_policy == "evict_oldest"
    assert record.allowed_cidrs == ("10.0.0.0/8",)


def test_clients_add_needs_one_credential(env: dict[str, str]) -> None:
    result = run(env, "clients", "add", "agent", "--audience", AUDIENCE)
    assert result.exit_code == 2
    assert "--generate-secret" in result.stderr


def test_clients_add_twice_says_how_to_change_it(env: dict[str, str]) -> None:
    run(env, "clients", "add", "agent", "--generate-secret")
    assert_one_line_error(run(env, "clients", "add", "agent", "--generate-secret"), "clients update agent")


def test_clients_add_bad_cidr_is_one_line(env: dict[str, str]) -> None:
    assert_one_line_error(run(env, "clients", "add", "agent", "--generate-secret", "--cidr", "10.0.0/33"), "10.0.0/33")


def test_clients_approve_disable_list_remove(env: dict[str, str]) -> None:
    run(env, "clients", "add", "agent", "--generate-secret", "--audience", AUDIENCE)
    assert run(env, "clients", "approve", "agent").exit_code == 0
    record = registry(env).client("agent")
    assert record is not None
    assert record.status is ClientStatus.APPROVED
    result = run(env, "clients", "disable", "agent")
    assert "revoke client agent" in result.stderr
    listed = run(env, "clients", "list")
    assert "agent" in listed.stdout
    assert "disabled" in listed.stdout
    assert json.loads(run(env, "clients", "list", "--json").stdout)[0]["status"] == "disabled"
    assert run(env, "clients", "remove", "agent").exit_code == 0
    assert registry(env).client("agent") is None


def test_clients_update_replaces_lists(env: dict[str, str]) -> None:
    run(env, "clients", "add", "agent", "--generate-secret", "--audience", AUDIENCE, "--cidr", "10.0.0.0/8")
    result = run(env, "clients", "update", "agent", "--audience", "https://b", "--scope", "x", "--any-source")
    assert result.exit_code == 0, result.output
    record = registry(env).client("agent")
    assert record is not None
    assert record.allowed_audiences == ("https://b",)
    assert record.allowed_scopes == ("x",)
    assert record.allowed_cidrs == ()


def test_unknown_client_commands_are_one_line(env: dict[str, str]) -> None:
    assert_one_line_error(run(env, "clients", "approve", "ghost"), "'ghost' is not registered", "clients list")
    assert_one_line_error(run(env, "clients", "show", "ghost"), "'ghost' is not registered")


def test_a_broken_registry_file_is_one_line(env: dict[str, str]) -> None:
    Path(env["TOKENBROKER_REGISTRY_FILE"]).write_text("[clients.a\n")
    assert_one_line_error(run(env, "clients", "list"), "not valid TOML")


# -- servers ------------------------------------------------------------------------------------


def test_servers_add_prints_the_api_key_once_and_stores_its_hash(env: dict[str, str]) -> None:
    result = run(env, "servers", "add", "mcp", "--audience", AUDIENCE, "--generate-api-key", "--admin")
    assert result.exit_code == 0, result.output
    api_key = result.stdout.strip()
    found = registry(env).server_by_api_key(api_key)
    assert found is not None
    assert found.admin
    assert api_key not in Path(env["TOKENBROKER_REGISTRY_FILE"]).read_text()
    assert "mcp" in run(env, "servers", "list").stdout
    assert run(env, "servers", "remove", "mcp").exit_code == 0
    assert registry(env).server("mcp") is None


def test_servers_add_needs_a_credential(env: dict[str, str]) -> None:
    assert run(env, "servers", "add", "mcp", "--audience", AUDIENCE).exit_code == 2


# -- configuration ------------------------------------------------------------------------------


def test_config_file_is_used_and_bad_settings_are_one_line(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "tb.toml"
    config.write_text(f'registry_file = "{tmp_path / "other.toml"}"\n')
    result = run({"TOKENBROKER_ISSUER": ISSUER}, "--config", str(config), "clients", "add", "a", "--generate-secret")
    assert result.exit_code == 0, result.output
    assert FileRegistry(tmp_path / "other.toml").client("a") is not None
    bad = {**env, "TOKENBROKER_DEFAULT_TTL_SECONDS": "0"}
    assert_one_line_error(run(bad, "clients", "list"), "default_ttl_seconds")
    assert_one_line_error(run(env, "--config", "missing.toml", "clients", "list"), "missing.toml")


# -- what the CLI loads ---------------------------------------------------------------------------


def test_help_loads_neither_grpc_nor_redis_nor_the_bench() -> None:
    import subprocess

    # A fresh interpreter: this one has grpc loaded already.
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from tokenbroker.cli import main\n"
        "result = CliRunner().invoke(main, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "for name in ('bench', 'clients', 'keys', 'serve', 'servers', 'issue', 'validate', 'healthcheck'):\n"
        "    assert f'  {name} ' in result.output, result.output\n"
        "loaded = sorted(m for m in sys.modules if m.partition('.')[0] in ('grpc', 'redis', 'tokenbroker_bench'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_bench_without_the_suite_says_how_to_install_it(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes an import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "tokenbroker_bench", None)
    monkeypatch.setitem(sys.modules, "tokenbroker_bench.runner", None)
    result = run(env, "bench", "--quick")
    assert result.exit_code == 1
    assert_one_line_error(result, "the benchmark suite is not installed", "`pip install -e benches` (or `make venv`)")


# -- remote commands, against an in-process stand-in for BrokerClient -----------------------------


class InProcessClient:
    """Does what the gRPC service does for these calls, in process."""

    instances: list[InProcessClient] = []
    broker: Broker
    authenticator: ClientAuthenticator

    def __init__(self, target: str, *, api_key: str | None = None) -> None:
        self.target = target
        self.api_key = api_key
        self.closed = False
        InProcessClient.instances.append(self)

    def issue(self, *, client_id: str, audience: str, scopes: list[str], **kw: Any) -> Any:
        record = self.authenticator.authenticate(
            client_id=client_id,
            client_assertion=kw.pop("client_assertion", None),
            client_secret=kw.pop("client_secret", None),
            audience=audience,
            scopes=scopes,
            dpop_jkt=kw.get("dpop_jkt"),
            cert_thumbprint=kw.get("cert_thumbprint"),
        )
        return self.broker.issue(
            client_id=client_id, audience=audience, scopes=scopes, session_limit=record.session_limit, **kw
        )

    def validate(self, token: str, **kw: Any) -> Validation:
        return self.broker.validate(token, **kw)

    def revoke_session(self, session_id: str) -> int:
        return self.broker.revoke_session(session_id)

    def revoke_client(self, client_id: str) -> int:
        return self.broker.revoke_client(client_id)

    def revoke_token(self, jti: str) -> int:
        return self.broker.revoke_token(jti)

    def sessions(self, client_id: str) -> list[Any]:
        return self.broker.sessions(client_id)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def remote(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> type[InProcessClient]:
    store = MemoryStore()
    InProcessClient.broker = Broker(Keyring.generate(), issuer=ISSUER, store=store)
    ticks = itertools.count(step=10)  # every lookup re-checks the file the CLI commands edit
    live_registry = FileRegistry(env["TOKENBROKER_REGISTRY_FILE"], clock=lambda: float(next(ticks)))
    InProcessClient.authenticator = ClientAuthenticator(live_registry, store, assertion_audience=ISSUER)
    InProcessClient.instances = []
    module = types.ModuleType("tokenbroker.client")
    module.BrokerClient = InProcessClient  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tokenbroker.client", module)
    return InProcessClient


def issue_json(env: dict[str, str], *extra: str) -> dict[str, Any]:
    result = run(env, "issue", "--client-id", "agent", "--audience", AUDIENCE, "--scope", "tools:call", *extra)
    assert result.exit_code == 0, result.output
    issued: dict[str, Any] = json.loads(result.stdout)
    return issued


def test_issue_with_a_key_then_validate_with_dpop_then_replay(
    env: dict[str, str], tmp_path: Path, remote: type[InProcessClient]
) -> None:
    key = tmp_path / "agent.pem"
    dpop = tmp_path / "dpop-key"
    run(env, "clients", "add", "agent", "--generate-key", str(key), "--audience", AUDIENCE, "--scope", "tools:call")
    run(env, "clients", "approve", "agent")

    issued = issue_json(env, "--key", str(key), "--dpop-key", str(dpop), "--target", "127.0.0.1:1")
    assert issued["token_type"] == "DPoP"
    assert issued["scopes"] == ["tools:call"]
    assert stat.S_IMODE(dpop.stat().st_mode) == 0o600
    assert remote.instances[-1].target == "127.0.0.1:1"
    assert remote.instances[-1].closed

    token = issued["access_token"]
    # The API key from the environment: the command line would show it to everyone (issue #8 item 9).
    with_key = {**env, "TOKENBROKER_API_KEY": "k"}
    result = run(with_key, "validate", token, "--audience", AUDIENCE, "--dpop-key", str(dpop))
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["valid"] is True
    assert answer["reason"] == "OK"
    assert answer["client_id"] == "agent"
    assert remote.instances[-1].api_key == "k"

    proof = result.stderr.rsplit(" ", 1)[-1].strip()
    replay = run(env, "validate", token, "--audience", AUDIENCE, "--proof", proof, "--uri", AUDIENCE)
    assert replay.exit_code == 1
    assert json.loads(replay.stdout)["reason"] == "REPLAYED"

    stolen = run(env, "validate", token, "--audience", AUDIENCE)
    assert stolen.exit_code == 1
    assert json.loads(stolen.stdout)["reason"] == "PROOF_MISSING"


def test_issue_with_a_secret_file_and_revoke(
    env: dict[str, str], tmp_path: Path, remote: type[InProcessClient]
) -> None:
    secret = tmp_path / "secret"
    # Binding bearer: this client wants unbound tokens (dpop, the default, needs a DPoP key).
    run(env, "clients", "add", "agent", "--generate-secret", "--secret-file", str(secret), "--binding", "bearer")
    run(env, "clients", "update", "agent", "--audience", AUDIENCE, "--scope", "tools:call")
    run(env, "clients", "approve", "agent")
    issued = issue_json(env, "--secret-file", str(secret))
    assert issued["token_type"] == "Bearer"

    listed = json.loads(run(env, "sessions", "agent").stdout)
    assert [s["session_id"] for s in listed] == [issued["session_id"]]
    assert json.loads(run(env, "revoke", "session", "--", issued["session_id"]).stdout) == {"revoked": 1}
    result = run(env, "validate", issued["access_token"], "--audience", AUDIENCE)
    assert result.exit_code == 1
    assert json.loads(result.stdout)["reason"] == "SESSION_REVOKED"


def test_issue_for_a_pending_client_says_how_to_approve(
    env: dict[str, str], tmp_path: Path, remote: type[InProcessClient]
) -> None:
    key = tmp_path / "agent.pem"
    run(env, "clients", "add", "agent", "--generate-key", str(key), "--audience", AUDIENCE)
    result = run(env, "issue", "--client-id", "agent", "--key", str(key), "--audience", AUDIENCE)
    assert_one_line_error(result, "pending approval", "tokenbroker clients approve agent")


def test_issue_needs_exactly_one_credential(env: dict[str, str], remote: type[InProcessClient]) -> None:
    assert run(env, "issue", "--client-id", "agent", "--audience", AUDIENCE).exit_code == 2


def test_validate_reads_the_token_from_stdin(env: dict[str, str], remote: type[InProcessClient]) -> None:
    result = run(env, "validate", "-", "--audience", AUDIENCE, input="not-a-token\n")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["reason"] == "MALFORMED"


# -- healthcheck against a real gRPC health service ------------------------------------------------


@pytest.fixture
def health_server() -> Iterator[tuple[str, Any]]:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_healthcheck_exit_status_follows_the_serving_status(
    env: dict[str, str], health_server: tuple[str, Any]
) -> None:
    from grpc_health.v1 import health_pb2

    target, servicer = health_server
    result = run(env, "healthcheck", "--target", target)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "SERVING"
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = run(env, "healthcheck", "--target", target)
    assert result.exit_code == 1
    assert result.stdout.strip() == "NOT_SERVING"


def test_healthcheck_of_nothing_is_one_line(env: dict[str, str]) -> None:
    result = run(env, "healthcheck", "--target", "127.0.0.1:1", "--timeout", "0.5")
    assert_one_line_error(result, "127.0.0.1:1")


# -- serve, against a stand-in service module -----------------------------------------------------


@pytest.fixture
def fake_service(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    calls: dict[str, Any] = {}

    class TlsFiles:
        def __init__(self, **kw: Any) -> None:
            self.kw = kw

    def build_server(broker: Broker, **kw: Any) -> str:
        calls["broker"] = broker
        calls.update(kw)
        return "server"

    async def serve(server: Any, grace: float) -> None:
        calls["served"] = (server, grace)

    module = types.ModuleType("tokenbroker.service.server")
    module.TlsFiles = TlsFiles  # type: ignore[attr-defined]
    module.build_server = build_server  # type: ignore[attr-defined]
    module.serve = serve  # type: ignore[attr-defined]
    package = types.ModuleType("tokenbroker.service")
    package.server = module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tokenbroker.service", package)
    monkeypatch.setitem(sys.modules, "tokenbroker.service.server", module)
    return calls


def test_serve_wires_the_components_into_the_service(
    env: dict[str, str], tmp_path: Path, fake_service: dict[str, Any]
) -> None:
    key_file = tmp_path / "keys.json"
    result = run(
        {**env, "TOKENBROKER_KEY_FILE": str(key_file), "TOKENBROKER_GRACE_SECONDS": "2"},
        *("serve", "--listen", "127.0.0.1:6001"),
    )
    assert result.exit_code == 0, result.output
    assert fake_service["listen"] == "127.0.0.1:6001"
    assert fake_service["served"] == ("server", 2.0)
    assert fake_service["tls"] is None
    assert isinstance(fake_service["registry"], FileRegistry)
    assert isinstance(fake_service["authenticator"], ClientAuthenticator)
    assert fake_service["broker"].issuer == ISSUER
    assert key_file.exists()  # a configured but missing key file is created
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    startup = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "tokenbroker starting" and e.get("store") == "memory" for e in startup)
    assert "PRIVATE" not in result.output
    assert '"d"' not in result.output


def test_serve_demo_registers_a_client_and_server(
    env: dict[str, str], tmp_path: Path, fake_service: dict[str, Any]
) -> None:
    demo_dir = tmp_path / "demo"
    result = run(env, "serve", "--demo", "--demo-dir", str(demo_dir))
    assert result.exit_code == 0, result.output
    key_file, api_key_file = demo_dir / "client-key.pem", demo_dir / "api-key"
    assert str(key_file) in result.stdout
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(api_key_file.stat().st_mode) == 0o600
    reg = registry(env)
    client = reg.client("demo-client")
    assert client is not None
    assert client.status is ClientStatus.APPROVED
    server = reg.server_by_api_key(api_key_file.read_text().strip())
    assert server is not None
    assert server.server_id == "demo-server"
    api_key = api_key_file.read_text().strip()
    assert api_key not in result.output


def test_serve_with_a_bad_key_file_is_one_line(
    env: dict[str, str], tmp_path: Path, fake_service: dict[str, Any]
) -> None:
    key_file = tmp_path / "keys.json"
    key_file.write_text("garbage")
    result = run({**env, "TOKENBROKER_KEY_FILE": str(key_file)}, "serve")
    assert result.exit_code == 1
    assert f"key file {key_file}" in result.stderr
    assert "Traceback" not in result.output


def test_serve_with_a_missing_tls_file_is_one_line(env: dict[str, str], fake_service: dict[str, Any]) -> None:
    tls = {"TOKENBROKER_TLS_CERT_FILE": "nope.pem", "TOKENBROKER_TLS_KEY_FILE": "nope.key"}
    assert_one_line_error(run({**env, **tls}, "serve"), "tls_cert_file nope.pem does not exist")


# -- end to end: `serve --demo` in its own process, the real gRPC client -------------------------


def test_serve_demo_end_to_end_over_grpc(env: dict[str, str], tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    target = f"127.0.0.1:{free_port()}"
    demo = tmp_path / "demo"
    audience = "http://127.0.0.1:8000/mcp"
    command = [sys.executable, "-c", "from tokenbroker.cli import main; main()", "serve", "--demo"]
    process = subprocess.Popen(
        [*command, "--demo-dir", str(demo), "--listen", target],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while run(env, "healthcheck", "--target", target, "--timeout", "0.5").exit_code != 0:
            assert process.poll() is None, process.communicate()[1].decode()
            assert time.monotonic() < deadline, "the broker did not become SERVING"
            time.sleep(0.1)
        remote = ("--target", target)
        admin = (*remote, "--api-key-file", str(demo / "api-key"))
        dpop = str(tmp_path / "dpop-key")
        result = run(
            env,
            *("issue", *remote, "--client-id", "demo-client", "--key", str(demo / "client-key.pem")),
            *("--audience", audience, "--scope", "tools:call", "--dpop-key", dpop),
        )
        assert result.exit_code == 0, result.output
        issued = json.loads(result.stdout)
        token = issued["access_token"]

        result = run(env, "validate", *admin, "--audience", audience, "--dpop-key", dpop, token)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["client_id"] == "demo-client"
        proof = result.stderr.rsplit(" ", 1)[-1].strip()
        replay = run(env, "validate", *admin, "--audience", audience, "--proof", proof, token)
        assert replay.exit_code == 1
        assert json.loads(replay.stdout)["reason"] == "REPLAYED"

        assert json.loads(run(env, "revoke", *admin, "client", "demo-client").stdout) == {"revoked": 1}
        fresh = run(env, "validate", *admin, "--audience", audience, "--dpop-key", dpop, token)
        assert json.loads(fresh.stdout)["reason"] == "CLIENT_REVOKED"

        refused = run(
            env,
            *("issue", *remote, "--client-id", "demo-client", "--key", str(demo / "client-key.pem")),
            *("--audience", "https://elsewhere.test/mcp"),
        )
        assert_one_line_error(refused, "may not get tokens for audience", "clients update demo-client")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr.decode()
    logs = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "tokenbroker starting" for e in logs)
    assert token not in stderr.decode()
    audit = [e for e in logs if e.get("audit")]
    assert {(e["event"], e["decision"], e["rule"]) for e in audit} >= {
        ("issue", "grant", "client.approved"),
        ("issue", "refuse", "audience.not_allowed"),
    }


def test_a_client_metadata_document_id_takes_no_key_or_secret_of_its_own(env: dict[str, str], tmp_path: Path) -> None:
    # Its keys are its document's, pinned at approval; a key given here would let it in
    # over gRPC IssueToken with no document or pin check.
    url = "https://agents.example/client.json"
    assert_one_line_error(run(env, "clients", "add", url, "--generate-secret"), "metadata document")
    assert_one_line_error(run(env, "clients", "rotate-key", url), "rotate-key is refused")
    key = tmp_path / "key.pem"
    assert run(env, "clients", "add", "other", "--generate-key", str(key)).exit_code == 0
    assert_one_line_error(run(env, "clients", "update", url, "--public-key", str(key)), "--public-key is refused")
