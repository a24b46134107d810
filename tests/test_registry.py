"""FileRegistry: TOML round trip, hashes only, constant-time lookups, reload on change."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from tokenbroker.errors import InvalidArgumentError
from tokenbroker.models import LimitPolicy
from tokenbroker.registry import ClientRecord, ClientStatus, Registry, ServerRecord
from tokenbroker.registry_file import (
    FileRegistry,
    RegistryFileError,
    generate_secret,
    hash_secret,
    secret_matches,
)
from tokenbroker.secret_format import parse

JWK = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "registry.toml"


def test_a_missing_file_is_an_empty_registry(path: Path) -> None:
    registry = FileRegistry(path)
    assert registry.client("x") is None
    assert registry.clients() == []
    assert isinstance(registry, Registry)


def test_client_round_trips_through_the_file(path: Path) -> None:
    record = ClientRecord(
        "agent-7",
        status=ClientStatus.APPROVED,
        public_jwk=JWK,
        allowed_audiences=("https://mcp.example.com/mcp",),
        allowed_scopes=("tools:call", "tools:list"),
        max_sessions=3,
        limit_policy=LimitPolicy.EVICT_OLDEST,
        allowed_cidrs=("10.0.0.0/8",),
    )
    FileRegistry(path).add_client(record)
    assert FileRegistry(path).client("agent-7") == record


def test_public_jwk_is_an_inline_table(path: Path) -> None:
    FileRegistry(path).add_client(ClientRecord("agent-7", public_jwk=JWK))
    text = path.read_text()
    assert 'public_jwk = { kty = "OKP", crv = "Ed25519", x = ' in text
    assert "[clients.agent-7.public_jwk]" not in text


def test_ids_with_dots_and_urls_are_quoted_keys(path: Path) -> None:
    FileRegistry(path).add_client(ClientRecord("https://app.example/client.json"))
    data = tomllib.loads(path.read_text())
    assert "https://app.example/client.json" in data["clients"]


def test_file_is_written_owner_only(path: Path) -> None:
    FileRegistry(path).add_client(ClientRecord("a"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_only_the_secret_hash_is_stored(path: Path) -> None:
    secret, api_key = generate_secret(), generate_secret()
    registry = FileRegistry(path)
    registry.add_client(ClientRecord("a", secret_hash=hash_secret(secret)))
    registry.add_server(ServerRecord("s", audiences=("https://x",), api_key_hash=hash_secret(api_key)))
    text = path.read_text()
    assert secret not in text
    assert api_key not in text
    assert hash_secret(secret) in text


def test_generated_secrets_are_scanner_matchable_and_random() -> None:
    secret = generate_secret()
    assert parse(secret) == "client_secret"
    assert parse(generate_secret("server_api_key")) == "server_api_key"
    assert secret != generate_secret()


def test_secret_matches_only_the_right_secret() -> None:
    secret = generate_secret()
    assert secret_matches(secret, hash_secret(secret))
    assert not secret_matches(secret + "x", hash_secret(secret))
    assert not secret_matches(secret, None)
    assert not secret_matches("", hash_secret(""))


def test_server_is_found_by_its_api_key(path: Path) -> None:
    key_a, key_b = generate_secret(), generate_secret()
    registry = FileRegistry(path)
    registry.add_server(ServerRecord("a", audiences=("https://a",), api_key_hash=hash_secret(key_a)))
    registry.add_server(ServerRecord("b", audiences=("https://b",), api_key_hash=hash_secret(key_b), admin=True))
    found = registry.server_by_api_key(key_b)
    assert found is not None
    assert found.server_id == "b"
    assert found.admin
    assert registry.server_by_api_key("wrong") is None
    assert registry.server_by_api_key("") is None


def test_server_is_found_by_its_certificate(path: Path) -> None:
    registry = FileRegistry(path)
    registry.add_server(ServerRecord("a", audiences=("https://a",), cert_thumbprint="abc123"))
    found = registry.server_by_cert("abc123")
    assert found is not None
    assert found.server_id == "a"
    assert registry.server_by_cert("abc124") is None


def test_adding_an_existing_client_is_refused(path: Path) -> None:
    registry = FileRegistry(path)
    registry.add_client(ClientRecord("a"))
    with pytest.raises(InvalidArgumentError, match="already exists"):
        registry.add_client(ClientRecord("a"))


def test_update_and_remove(path: Path) -> None:
    registry = FileRegistry(path)
    registry.add_client(ClientRecord("a"))
    updated = registry.update_client("a", status=ClientStatus.APPROVED, allowed_scopes=("s",))
    assert updated.status is ClientStatus.APPROVED
    assert FileRegistry(path).client("a") == updated
    registry.remove_client("a")
    assert FileRegistry(path).client("a") is None
    with pytest.raises(InvalidArgumentError, match="clients list"):
        registry.remove_client("a")


def test_a_private_key_is_never_registered(path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="private key"):
        FileRegistry(path).add_client(ClientRecord("a", public_jwk={**JWK, "d": "secret"}))


def test_an_id_with_braces_is_refused(path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="not valid"):
        FileRegistry(path).add_client(ClientRecord("a{b}"))


def test_a_bad_file_names_the_problem(path: Path) -> None:
    path.write_text('[clients.a]\nstatus = "maybe"\n')
    with pytest.raises(RegistryFileError, match=r"\[clients.a\].*maybe"):
        FileRegistry(path)
    path.write_text("[clients.a]\nstatus = \n")
    with pytest.raises(RegistryFileError, match="not valid TOML"):
        FileRegistry(path)
    path.write_text('[clients.a]\ncolour = "red"\n')
    with pytest.raises(RegistryFileError, match="unknown field"):
        FileRegistry(path)


def test_changes_to_the_file_are_picked_up_within_a_second(path: Path) -> None:
    clock = FakeClock()
    running = FileRegistry(path, clock=clock)
    FileRegistry(path).add_client(ClientRecord("a", status=ClientStatus.PENDING))
    clock.now += 0.5
    assert running.client("a") is None  # not re-checked yet: at most one stat per second
    clock.now += 0.6
    record = running.client("a")
    assert record is not None
    assert record.status is ClientStatus.PENDING
    FileRegistry(path).update_client("a", status=ClientStatus.APPROVED)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    clock.now += 1.1
    record = running.client("a")
    assert record is not None
    assert record.status is ClientStatus.APPROVED


def test_a_broken_edit_keeps_the_last_good_records(path: Path) -> None:
    clock = FakeClock()
    FileRegistry(path).add_client(ClientRecord("a", status=ClientStatus.APPROVED))
    running = FileRegistry(path, clock=clock)
    path.write_text("this is not toml = = =")
    clock.now += 2
    assert running.client("a") is not None


def test_hand_written_file_is_read(path: Path) -> None:
    path.write_text(
        """
[clients.agent]
status = "approved"
public_jwk = { kty = "EC", crv = "P-256", x = "a", y = "b" }
allowed_audiences = ["https://mcp"]

[servers.mcp]
audiences = ["https://mcp"]
cert_thumbprint = "t"
labels = { env = "prod" }
"""
    )
    registry = FileRegistry(path)
    client = registry.client("agent")
    assert client is not None
    assert client.public_jwk == {"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}
    assert client.max_sessions == 10
    server = registry.server("mcp")
    assert server is not None
    assert server.labels == {"env": "prod"}


def test_writers_in_several_processes_lose_no_change(tmp_path: Path) -> None:
    # `serve` records CIMD clients while operators run the CLI: each change is a
    # read-modify-write of the whole file, and one must never drop another's.
    import subprocess
    import sys

    path = tmp_path / "registry.toml"
    script = (
        "import sys\n"
        "from tokenbroker.registry import ClientRecord\n"
        "from tokenbroker.registry_file import FileRegistry\n"
        "registry = FileRegistry(sys.argv[1])\n"
        "for n in range(25):\n"
        "    registry.add_client(ClientRecord(f'{sys.argv[2]}-{n}'))\n"
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, str(path), name]) for name in ("a", "b", "c")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    assert len(FileRegistry(path).clients()) == 75
