"""How the CLI fails: one line on stderr and exit status 1, never a traceback, for every
error a user can cause (a bad file, a refused call, an unreachable broker)."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from tokenbroker.errors import TokenBrokerError
from tokenbroker.status import status_name_of


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (its type's name when it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def fail(message: str) -> NoReturn:
    raise click.ClickException(message)


def rpc_error(exc: Any) -> str:
    """A grpc.RpcError as a sentence, with a hint when the broker is not reachable."""
    name = status_name_of(exc)
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    if name == "UNAVAILABLE":
        return f"the broker is not reachable ({details}): is `tokenbroker serve` running at that --target?"
    return f"the broker refused: {name}: {details}" if details else f"the broker refused: {name}"


class OneLineErrors(click.Group):
    """Turns errors a user can cause into one line and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except TokenBrokerError as exc:
            raise click.ClickException(one_line(exc)) from None
        except FileNotFoundError as exc:
            raise click.ClickException(f"{exc.filename}: no such file") from None
        except PermissionError as exc:
            raise click.ClickException(f"{exc.filename}: permission denied") from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or one_line(exc)}") from None
        except ValueError as exc:  # bad PEM, bad CIDR, bad TOML, bad JSON ...
            raise click.ClickException(one_line(exc)) from None
        except Exception as exc:
            # grpc and jwt are looked up, not imported: a command that never loaded them
            # cannot have raised their errors, and importing grpc here would cost every command.
            grpc = sys.modules.get("grpc")
            if grpc is not None and isinstance(exc, grpc.RpcError):
                raise click.ClickException(rpc_error(exc)) from None
            jwt = sys.modules.get("jwt")
            if jwt is not None and isinstance(exc, jwt.PyJWTError):
                raise click.ClickException(one_line(exc)) from None
            raise
