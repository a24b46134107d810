"""The root `tokenbroker` group. Its commands live one group per module and are imported
only when named on the command line (or listed by `--help`): the lazy loading of click's
docs ("Lazily Loading Subcommands")."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import click

from tokenbroker.cli._errors import OneLineErrors
from tokenbroker.cli._state import State

# Command name -> "module:attribute" of the click command or group.
COMMANDS: dict[str, str] = {
    "audit": "tokenbroker.cli.audit:audit",
    "bench": "tokenbroker.cli.bench:bench",
    "clients": "tokenbroker.cli.clients:clients",
    "events": "tokenbroker.cli.events:events",
    "healthcheck": "tokenbroker.cli.remote:healthcheck",
    "issue": "tokenbroker.cli.remote:issue",
    "keys": "tokenbroker.cli.keys:keys",
    "leaked": "tokenbroker.cli.leaked:leaked",
    "revoke": "tokenbroker.cli.remote:revoke",
    "serve": "tokenbroker.cli.serve:serve",
    "servers": "tokenbroker.cli.servers:servers",
    "sessions": "tokenbroker.cli.remote:sessions",
    "validate": "tokenbroker.cli.remote:validate",
}


class LazyGroup(OneLineErrors):
    """A group whose commands are named up front and imported on first use."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = self.lazy_commands.get(cmd_name)
        if where is None:
            return super().get_command(ctx, cmd_name)
        module_name, _, attribute = where.partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):  # a wrong entry in COMMANDS, not a user's error
            raise TypeError(f"{where} is not a click command")
        return command


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TOKENBROKER_CONFIG",
    help="TOML configuration file; TOKENBROKER_* environment variables override it.",
)
@click.version_option(package_name="tokenbroker", prog_name="tokenbroker")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None) -> None:
    """Short-lived, session- and audience-bound tokens for MCP servers."""
    from tokenbroker.logs import configure_logging

    # Until `serve` applies the configured level: warnings only, for people, on stderr
    # (stdout carries the commands' output).
    configure_logging("warning", json=False)
    ctx.obj = State(config_file)
