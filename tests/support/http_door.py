"""A real `tokenbroker serve` (memory store) whose HTTP door has clients and a server
registered through the CLI, for the tests that hold the door to its OpenAPI description
(tests/test_http_openapi.py, tests/test_http_schemathesis.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from tokenbroker.cli import main
from tokenbroker_bench.servers import free_port

from support.broker_process import BrokerProcess, broker_env

# An audience is a resource URI the tokens name; nothing ever connects to it.
AUDIENCE = "https://mcp.test/mcp"
SCOPES = ("tools:call", "tools:list")
# Bearer binding and a secret: what the MCP SDK's client-credentials provider is.
SECRET_CLIENT = "sdk-client"
# DPoP binding, an Ed25519 key (private_key_jwt) and a DPoP nonce required at /token.
KEY_CLIENT = "agent"
SERVER = "mcp-server"


@dataclass
class Door:
    broker: BrokerProcess
    client_secret: str
    api_key: str
    client_key: Path

    @property
    def url(self) -> str:
        """The issuer (`public_url`), which is also where the HTTP door listens."""
        return self.broker.http_url

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"


def _cli(env: dict[str, str], *args: str) -> None:
    result = CliRunner().invoke(main, list(args), env=env)
    if result.exit_code != 0:
        raise RuntimeError(f"tokenbroker {' '.join(args[:2])} failed: {result.output.strip()}")


def start_door(workdir: Path, **settings: str) -> Door:
    """Registers the clients and the server in `workdir`'s registry, then starts the
    broker with `settings` (TOKENBROKER_* by setting name) on free loopback ports."""
    http_port = free_port()
    env = broker_env(workdir, f"http://127.0.0.1:{http_port}")
    env.update({f"TOKENBROKER_{name.upper()}": value for name, value in settings.items()})
    cli = {name: env[name] for name in ("TOKENBROKER_REGISTRY_FILE", "TOKENBROKER_ISSUER")}
    secret, api_key, key = workdir / "client-secret", workdir / "api-key", workdir / "client-key.pem"
    policy = ["--audience", AUDIENCE, *(arg for scope in SCOPES for arg in ("--scope", scope)), "--approve"]
    commands = [
        ["clients", "add", SECRET_CLIENT, "--generate-secret", "--secret-file", str(secret), "--binding", "bearer"],
        ["clients", "add", KEY_CLIENT, "--generate-key", str(key), "--binding", "dpop", "--require-dpop-nonce"],
    ]
    for command in commands:
        _cli(cli, *command, *policy)
    _cli(cli, "servers", "add", SERVER, "--audience", AUDIENCE, "--generate-api-key", "--api-key-file", str(api_key))
    broker = BrokerProcess(workdir, env, http_port=http_port).start()
    return Door(broker, secret.read_text().strip(), api_key.read_text().strip(), key)
