"""What the commands print: JSON and tables for programs on stdout, messages for people
on stderr."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click


def info(message: str) -> None:
    """A message for people: stderr, so stdout stays parseable."""
    click.echo(message, err=True)


def print_json(value: Any) -> None:
    click.echo(json.dumps(jsonable(value), indent=2))


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types: dataclasses and NamedTuples become objects, enums
    their names or values, paths strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a NamedTuple (Validation)
        return {k: jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, enum.IntEnum):
        return value.name
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns, the first row a header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
