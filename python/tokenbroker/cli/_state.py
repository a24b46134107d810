"""What every command shares: the --config path and the settings and registry it names,
loaded on first use (a command that needs neither never reads the config)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from tokenbroker.config import Settings
    from tokenbroker.registry_file import FileRegistry


class State:
    """The root group's context object: the --config path, settings loaded on first use."""

    def __init__(self, config_file: Path | None) -> None:
        self.config_file = config_file
        self._settings: Settings | None = None

    def settings(self, **overrides: Any) -> Settings:
        from tokenbroker.config import Settings

        if overrides:
            return Settings.load(self.config_file, **overrides)
        if self._settings is None:
            self._settings = Settings.load(self.config_file)
        return self._settings

    def registry(self) -> FileRegistry:
        from tokenbroker.registry_file import FileRegistry

        return FileRegistry(self.settings().registry_file)


pass_state = click.make_pass_decorator(State)


def local_target(listen: str) -> str:
    """The address to dial for a broker bound to `listen` (a wildcard bind: loopback)."""
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "", "*"):  # noqa: S104 (mapping a wildcard bind to a dialable address)
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"
