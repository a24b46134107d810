"""Secrets a scanner can match exactly (issue 12, "Secret scanning"): the tbk_/tbs_ format
with its checksum (`tokenbroker.secret_format`), the rules shipped under contrib/ (the
detect-secrets plugin, run for real over a git repository, and the gitleaks config), and
secrets minted before the format, which still authenticate."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import string
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from tokenbroker import MemoryStore, secret_format
from tokenbroker.client_auth import ClientAuthenticator
from tokenbroker.registry_file import FileRegistry, generate_secret, hash_secret
from tokenbroker.secret_format import KINDS, LENGTH, PATTERN, PREFIXES, checksum, find, mint, parse

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
PLUGIN = CONTRIB / "detect_secrets_tokenbroker.py"
DETECT_SECRETS = Path(sys.executable).with_name("detect-secrets")
# Pinned: a change of alphabet, order or checksum would break every scanner rule shipped.
KNOWN_API_KEY = "tbk_" + "0" * 40 + "4Zoz4a"  # CRC32 4193854256 in base62
KNOWN_SECRET = "tbs_" + "abcdefghij" * 4 + "3nnQOd"


def plugin_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("detect_secrets_tokenbroker", PLUGIN)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wrong_last_char(secret: str) -> str:
    return secret[:-1] + ("A" if secret[-1] != "A" else "B")


# -- the format ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_minted_secret_round_trips_to_its_kind(kind: secret_format.Kind) -> None:
    secret = mint(kind)
    assert secret.startswith(PREFIXES[kind])
    assert len(secret) == LENGTH == 50
    assert re.fullmatch(r"tb[ks]_[0-9A-Za-z]{46}", secret)
    assert parse(secret) == kind
    assert list(find(f"key={secret}\n")) == [secret]


def test_the_prefixes_are_those_scanners_look_for() -> None:
    assert PREFIXES == {"server_api_key": "tbk_", "client_secret": "tbs_"}
    assert generate_secret("server_api_key").startswith("tbk_")
    assert generate_secret("client_secret").startswith("tbs_")


def test_minted_secrets_differ_and_spread_over_the_alphabet() -> None:
    minted = {mint("client_secret") for _ in range(200)}
    assert len(minted) == 200
    bodies = "".join(s[4:44] for s in minted)
    assert set(bodies) == set(secret_format.ALPHABET)  # 8000 draws miss none of 62 symbols


def test_the_checksum_is_crc32_in_six_base62_digits() -> None:
    digits = KNOWN_API_KEY[-6:]
    value = sum(secret_format.ALPHABET.index(c) * 62**i for i, c in enumerate(reversed(digits)))
    assert value == 4193854256
    assert checksum(KNOWN_API_KEY[:-6]) == digits
    assert parse(KNOWN_API_KEY) == "server_api_key"
    assert parse(KNOWN_SECRET) == "client_secret"


@pytest.mark.parametrize("kind", KINDS)
def test_near_misses_are_not_secrets(kind: secret_format.Kind) -> None:
    secret = mint(kind)
    other_prefix = "tbs_" if secret.startswith("tbk_") else "tbk_"
    letter = next(i for i in range(4, LENGTH) if secret[i].isalpha())
    misses = {
        "wrong checksum": wrong_last_char(secret),
        "wrong prefix": other_prefix + secret[4:],
        "unknown prefix": "tbx_" + secret[4:],
        "upper-case prefix": secret[:4].upper() + secret[4:],
        "case changed": secret[:letter] + secret[letter].swapcase() + secret[letter + 1 :],
        "truncated": secret[:-1],
        "one more character": secret + "0",
        "surrounding space": f" {secret}",
        "empty": "",
    }
    for why, text in misses.items():
        assert parse(text) is None, why
    del misses["surrounding space"]  # the secret is in it: find() finds it there
    assert list(find(" ".join(misses.values()))) == []


def test_find_needs_word_boundaries() -> None:
    secret = mint("server_api_key")
    assert list(find(f'"{secret}"')) == [secret]
    assert list(find(f"x{secret}")) == []
    assert list(find(f"{secret}0")) == []


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        mint("token")  # type: ignore[arg-type]


# -- secrets minted before the format -----------------------------------------------------------

# Made by the earlier generate_secret (32 random bytes, base64url) and stored as the file did.
OLD_SECRET = "wAaHvlhactyskli_L0NUH4UyMga6nF0JvYiEK5bmCiI"
OLD_SECRET_HASH = "CmbmNGhYrhB4SnKEG3c_y8Svj43yyCtkI-r_ohfQKUQ"
OLD_API_KEY = "0bgI41N9mYP9Yj1kBi11SjJidtsAGK3ahQqK1qcDLyM"
OLD_API_KEY_HASH = "8NetpFFiFd_hvd9EgKwzeZZdN5pKoc2Ez_0kB0D3eM4"


def test_secrets_minted_before_the_format_still_authenticate(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(
        "[clients.old-agent]\n"
        'status = "approved"\n'
        f'secret_hash = "{OLD_SECRET_HASH}"\n'
        'allowed_audiences = ["https://mcp.test/mcp"]\n'
        'allowed_scopes = ["tools:call"]\n'
        'binding = "bearer"\n\n'
        "[servers.old-server]\n"
        'audiences = ["https://mcp.test/mcp"]\n'
        f'api_key_hash = "{OLD_API_KEY_HASH}"\n'
    )
    registry = FileRegistry(path)
    assert parse(OLD_SECRET) is None
    assert parse(OLD_API_KEY) is None
    auth = ClientAuthenticator(registry, MemoryStore(), assertion_audience="https://broker.test")
    record = auth.authenticate(
        client_id="old-agent", client_secret=OLD_SECRET, audience="https://mcp.test/mcp", scopes=["tools:call"]
    )
    assert record.client_id == "old-agent"
    server = registry.server_by_api_key(OLD_API_KEY)
    assert server is not None
    assert server.server_id == "old-server"
    assert hash_secret(OLD_SECRET) == OLD_SECRET_HASH


# -- the rules shipped under contrib/ -----------------------------------------------------------


def test_the_plugin_repeats_the_format_exactly() -> None:
    plugin = plugin_module()
    assert plugin.PATTERN == PATTERN
    assert plugin.ALPHABET == secret_format.ALPHABET
    rng = random.Random(20261212)
    letters = string.ascii_letters + string.digits + "_-"
    for _ in range(2000):
        prefix = rng.choice(["tbk_", "tbs_"])
        body = "".join(rng.choice(secret_format.ALPHABET) for _ in range(40))
        assert plugin.checksum(prefix + body) == checksum(prefix + body)
        real = prefix + body + checksum(prefix + body)
        assert plugin.is_tokenbroker_secret(real)
        assert parse(real) is not None
        noise = prefix + "".join(rng.choice(letters) for _ in range(rng.choice([45, 46, 47])))
        assert plugin.is_tokenbroker_secret(noise) is (parse(noise) is not None)
        mutated = real[:-1] + rng.choice(secret_format.ALPHABET)
        assert plugin.is_tokenbroker_secret(mutated) is (parse(mutated) is not None) is (mutated == real)


def test_the_gitleaks_rules_match_the_format() -> None:
    config = tomllib.loads((CONTRIB / "gitleaks.toml").read_text())
    assert config["extend"] == {"useDefault": True}
    rules = {rule["id"]: rule for rule in config["rules"]}
    kinds: dict[str, secret_format.Kind] = {
        "tokenbroker-server-api-key": "server_api_key",
        "tokenbroker-client-secret": "client_secret",
    }
    assert set(rules) == set(kinds)
    for rule_id, kind in kinds.items():
        rule = rules[rule_id]
        assert rule["regex"] == secret_format.KIND_PATTERNS[kind]
        assert rule["keywords"] == [PREFIXES[kind]]
        assert rule["description"]
        regex = re.compile(rule["regex"], re.ASCII)
        assert regex.search(f"key: {mint(kind)}")
        other: secret_format.Kind = "client_secret" if kind == "server_api_key" else "server_api_key"
        assert not regex.search(mint(other))


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_detect_secrets_with_the_plugin_finds_the_real_secret_only(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    secret = mint("client_secret")
    lines = [
        "# settings of an MCP agent",
        "BROKER=broker.example.com:50051",
        f"TOKENBROKER_CLIENT_SECRET={secret}",  # line 3: the one finding
        f"OLD_CLIENT_SECRET={wrong_last_char(secret)}",  # a near-miss: wrong checksum
        f"EXAMPLE_API_KEY=tbk_{'Z' * 46}",  # same prefix, garbage
        f"TRUNCATED=tbs_{secret[4:-2]}",
    ]
    (repo / "agent.env").write_text("\n".join(lines) + "\n")
    git(repo, "add", "agent.env")
    git(repo, "commit", "-q", "-m", "agent settings")

    listed = subprocess.run(
        [str(DETECT_SECRETS), "scan", "--plugin", str(PLUGIN), "--list-all-plugins"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.split()
    assert "TokenbrokerSecretDetector" in listed
    others = [name for name in listed if name != "TokenbrokerSecretDetector"]
    assert len(others) > 10  # detect-secrets' own plugins, each disabled below
    command = [str(DETECT_SECRETS), "scan", "--plugin", str(PLUGIN)]
    for name in others:
        command += ["--disable-plugin", name]
    scan = subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True, timeout=120)
    baseline = json.loads(scan.stdout)

    assert [p["name"] for p in baseline["plugins_used"]] == ["TokenbrokerSecretDetector"]
    results = baseline["results"]
    assert list(results) == ["agent.env"]
    (finding,) = results["agent.env"]
    assert finding["type"] == "Tokenbroker Secret"
    assert finding["line_number"] == 3
    assert finding["hashed_secret"] == hashlib.sha1(secret.encode()).hexdigest()  # noqa: S324 (detect-secrets' own)
