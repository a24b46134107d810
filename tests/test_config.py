"""Settings: defaults, the TOML file, TOKENBROKER_* overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenbroker.config import ConfigError, Settings


@pytest.fixture(autouse=True)
def clean_env(no_tokenbroker_env: None) -> None:
    """Every test here reads settings: none may come from the developer's shell."""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokenbroker.toml"
    path.write_text(text)
    return path


def test_defaults_run_an_embedded_broker_on_localhost() -> None:
    settings = Settings.load()
    assert settings.listen == "127.0.0.1:50051"
    assert settings.redis_url is None
    assert settings.key_file is None
    assert settings.default_ttl_seconds == 300
    assert settings.metrics_port is None
    assert settings.public_summary()["store"] == "memory"


def test_toml_file_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, 'listen = "0.0.0.0:6000"\ndefault_ttl_seconds = 120\nredis_url = "redis://r:6379/0"\n')
    settings = Settings.load(path)
    assert settings.listen == "0.0.0.0:6000"
    assert settings.default_ttl_seconds == 120
    assert settings.redis_url == "redis://r:6379/0"
    assert settings.public_summary()["store"] == "redis"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'listen = "0.0.0.0:6000"\ndefault_ttl_seconds = 120\n')
    monkeypatch.setenv("TOKENBROKER_DEFAULT_TTL_SECONDS", "60")
    monkeypatch.setenv("TOKENBROKER_KEY_FILE", "/etc/tb/keys.json")
    settings = Settings.load(path)
    assert settings.default_ttl_seconds == 60
    assert settings.listen == "0.0.0.0:6000"
    assert settings.key_file == Path("/etc/tb/keys.json")


def test_explicit_values_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENBROKER_LISTEN", "127.0.0.1:7000")
    assert Settings.load(listen="127.0.0.1:8000").listen == "127.0.0.1:8000"
    assert Settings.load(listen=None).listen == "127.0.0.1:7000"


def test_ttl_above_an_hour_is_refused_with_the_setting_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENBROKER_DEFAULT_TTL_SECONDS", "7200")
    with pytest.raises(ConfigError, match=r"default_ttl_seconds \(TOKENBROKER_DEFAULT_TTL_SECONDS\).*3600"):
        Settings.load()


def test_unknown_setting_in_the_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting 'lisen'"):
        Settings.load(write(tmp_path, 'lisen = "x"\n'))


def test_missing_config_file_is_refused() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load("/nonexistent/tokenbroker.toml")


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.load(write(tmp_path, "listen = \n"))


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LISTEN", "50051", "host:port"),
        ("REDIS_URL", "http://redis", "redis://"),
        ("METRICS_PORT", "70000", "65535"),
        ("LOG_LEVEL", "loud", "log_level"),
        ("TLS_CERT_FILE", "/x/cert.pem", "go together"),
        ("HTTP_MAX_INFLIGHT", "0", r"http_max_inflight \(TOKENBROKER_HTTP_MAX_INFLIGHT\).*1 to 100000"),
    ],
)
def test_bad_values_are_explained(monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str) -> None:
    monkeypatch.setenv(f"TOKENBROKER_{name}", value)
    with pytest.raises(ConfigError, match=message):
        Settings.load()


def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENBROKER_LOG_LEVEL", "DEBUG")
    assert Settings.load().log_level == "debug"


def test_empty_redis_url_means_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENBROKER_REDIS_URL", "")
    assert Settings.load().redis_url is None


def test_summary_and_repr_never_show_the_redis_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENBROKER_REDIS_URL", "redis://:hunter2@redis:6379/0")
    settings = Settings.load()
    assert "hunter2" not in str(settings.public_summary())
    assert "hunter2" not in repr(settings)
    assert settings.redis_url == "redis://:hunter2@redis:6379/0"


def test_other_tokenbroker_variables_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENBROKER_TESTDATA", "/somewhere")
    monkeypatch.setenv("TOKENBROKER_API_KEY", "k")
    assert Settings.load().listen == "127.0.0.1:50051"
