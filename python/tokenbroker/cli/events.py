"""`tokenbroker events`: the broker's detection and governance events as JSON lines, one
event a line (`WatchEvents`, an admin server's key). Without `--follow` it prints the
events the broker keeps and exits 0; with it, it goes on printing each new one until
Ctrl-C (exit 0) or the broker ends the stream."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tokenbroker.cli._errors import fail, one_line, rpc_error
from tokenbroker.cli._state import State, pass_state
from tokenbroker.cli.remote import _client, _remote_options
from tokenbroker.errors import TokenBrokerError


@click.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they come (Ctrl-C ends).")
@click.option("--client", "client_id", default="", metavar="ID", help="Only this client's events.")
@_remote_options
@pass_state
def events(state: State, follow: bool, client_id: str, target: str | None, api_key_file: Path | None) -> None:
    """Print the broker's events as JSON lines: event, signal, severity, client_id,
    session_id, source_ip, action, evidence (an object), time. Needs an admin server's
    key (--api-key-file or TOKENBROKER_API_KEY)."""
    client = _client(state, target, api_key_file)
    try:
        for event in client.watch_events(client_id, follow=follow):
            click.echo(json.dumps(event, separators=(",", ":"), ensure_ascii=False))  # echo flushes: one line each
    except KeyboardInterrupt:
        return  # Ctrl-C is how --follow ends
    except TokenBrokerError as exc:
        cause = exc.__cause__
        fail(rpc_error(cause) if cause is not None and hasattr(cause, "details") else one_line(exc))
    finally:
        client.close()
