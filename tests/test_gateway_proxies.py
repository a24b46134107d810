"""`trusted_proxies` (tokenbroker.gateway.proxies): whose word about the client's address
counts, and how X-Forwarded-For is read (from the right, as nginx's real_ip_recursive)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tokenbroker.cli import main
from tokenbroker.config import ConfigError, Settings
from tokenbroker.gateway.proxies import MAX_HOPS, TrustedProxies
from tokenbroker.registry_file import FileRegistry

PROXIES = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "real_ip", "client"),
    [
        ("198.51.100.7", ["203.0.113.1"], [], "198.51.100.7"),  # not a proxy: its own address
        ("127.0.0.1", [], [], "127.0.0.1"),  # a proxy that names nobody
        ("127.0.0.1", ["203.0.113.1"], [], "203.0.113.1"),
        ("127.0.0.1", ["6.6.6.6, 203.0.113.1"], [], "203.0.113.1"),  # the client wrote the left part
        ("127.0.0.1", ["203.0.113.1, 10.1.2.3"], [], "203.0.113.1"),  # through another trusted proxy
        ("127.0.0.1", ["6.6.6.6", "203.0.113.1, 10.1.2.3"], [], "203.0.113.1"),  # several header lines
        ("127.0.0.1", ["10.9.9.9, 10.1.2.3"], [], "10.9.9.9"),  # every hop a proxy: the leftmost
        ("127.0.0.1", ["203.0.113.1, unknown"], [], "127.0.0.1"),  # broken chain: the last trusted hop
        ("127.0.0.1", ["[2001:db8::1]:4711"], [], "2001:db8::1"),
        ("127.0.0.1", ["203.0.113.1:8080"], [], "203.0.113.1"),
        ("::ffff:127.0.0.1", ["203.0.113.1"], [], "203.0.113.1"),  # an IPv4-mapped peer
        ("fd00::5", ["2001:db8::7"], [], "2001:db8::7"),
        ("127.0.0.1", [], ["203.0.113.9"], "203.0.113.9"),  # X-Real-IP when no X-Forwarded-For
        ("127.0.0.1", [], ["203.0.113.9", "6.6.6.6"], "127.0.0.1"),  # two X-Real-IP: neither
        ("127.0.0.1", [], ["not-an-address"], "127.0.0.1"),
        ("198.51.100.7", [], ["203.0.113.9"], "198.51.100.7"),
    ],
)
def test_the_client_address(peer: str, forwarded_for: list[str], real_ip: list[str], client: str) -> None:
    assert PROXIES.client_address(peer, forwarded_for, real_ip) == client


def test_no_trusted_proxies_believes_no_header() -> None:
    assert TrustedProxies().client_address("127.0.0.1", ["203.0.113.1"], ["203.0.113.2"]) == "127.0.0.1"
    assert not TrustedProxies()


def test_a_long_chain_is_read_only_so_far() -> None:
    chain = ", ".join(["10.0.0.1"] * (MAX_HOPS + 50) + ["10.0.0.2"])
    assert PROXIES.client_address("127.0.0.1", ["203.0.113.1, " + chain]) == "10.0.0.1"


def test_the_setting_is_checked_and_canonical() -> None:
    assert Settings.load(trusted_proxies=["127.0.0.1", "10.1.2.3/8"]).trusted_proxies == ["127.0.0.1/32", "10.0.0.0/8"]
    with pytest.raises(ConfigError, match=r"trusted_proxies.*not an address or CIDR"):
        Settings.load(trusted_proxies=["nginx.internal"])


def test_servers_add_records_required_scopes(tmp_path: Path) -> None:
    registry = tmp_path / "registry.toml"
    env = {"TOKENBROKER_REGISTRY_FILE": str(registry)}
    args = ["servers", "add", "gw", "--audience", "https://gw.test/mcp", "--generate-api-key"]
    result = CliRunner().invoke(
        main, [*args, "--required-scope", "tools:call", "--required-scope", "tools:list"], env=env
    )
    assert result.exit_code == 0, result.output
    server = FileRegistry(registry).server("gw")
    assert server is not None
    assert server.required_scopes == ("tools:call", "tools:list")
    assert FileRegistry(registry).server("gw") == server  # read back from the file as written
    bad = CliRunner().invoke(main, ["servers", "add", "gw2", *args[3:], "--required-scope", 'a"b'], env=env)
    assert bad.exit_code != 0
    assert "is not a scope" in bad.output
