"""Secrets on disk, never on the command line: files the CLI writes are the owner's only
(0600), secrets it reads come from a file or stdin, and an option that took a secret as
its value is refused with the way to pass it instead."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def write_private(path: Path, data: bytes, *, force: bool = False) -> None:
    """Writes `data` to a new file readable by the owner only (0600)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise click.ClickException(f"{path} already exists: choose another file or remove it first") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def read_secret_file(path: Path, what: str) -> str:
    """The secret in `path` (`-`: the first line of stdin), stripped; never empty."""
    if str(path) == "-":
        value = sys.stdin.readline().strip()
        if not value:
            raise click.ClickException(f"stdin is empty: it should hold the {what}")
        return value
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise click.ClickException(f"{path} is empty: it should hold the {what}")
    return value


def refuse_secret_value(option: str, file_option: str, env: str) -> Callable[[click.Context, Any, Any], None]:
    """The callback of a removed option that took a secret on the command line."""

    def refuse(ctx: click.Context, param: Any, value: Any) -> None:
        if value is not None:
            raise click.UsageError(
                f"{option} is not accepted: a secret on the command line is visible to every user of the machine "
                f"(/proc/PID/cmdline, ps). Put it in a file and pass {file_option} FILE (or {file_option} - to read "
                f"it from stdin), or set {env}",
                ctx=ctx,
            )

    return refuse
