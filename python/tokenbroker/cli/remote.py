"""The commands that call a running broker over gRPC: `issue` (as a client), `validate`,
`revoke` and `sessions` (as an MCP server, with its API key), and `healthcheck`. The
gRPC client is imported inside each command, so the local commands never load grpc."""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tokenbroker._core import LIMITS
from tokenbroker.cli._errors import fail, rpc_error
from tokenbroker.cli._output import info, print_json
from tokenbroker.cli._secrets import read_secret_file, refuse_secret_value, write_private
from tokenbroker.cli._state import State, local_target, pass_state
from tokenbroker.cli._values import scopes as split_scopes

if TYPE_CHECKING:
    from tokenbroker import ProofSigner
    from tokenbroker.client import BrokerClient

F = TypeVar("F", bound=Callable[..., Any])


def _remote_options(func: F) -> F:
    """--target and --api-key-file (the calling MCP server's key, never on the command line)."""
    options = [
        click.option("--target", help="host:port of the broker (default: from the `listen` setting)."),
        click.option(
            "--api-key-file",
            type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path),
            help="File holding the calling MCP server's API key (`-`: stdin; or set TOKENBROKER_API_KEY).",
        ),
        click.option(
            "--api-key",
            hidden=True,
            expose_value=False,
            callback=refuse_secret_value("--api-key", "--api-key-file", "TOKENBROKER_API_KEY"),
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _client(state: State, target: str | None, api_key_file: Path | None) -> BrokerClient:
    """A `BrokerClient` with the calling server's API key from --api-key-file (`-`:
    stdin) or TOKENBROKER_API_KEY, never from the command line."""
    from tokenbroker.client import BrokerClient

    api_key = os.environ.get("TOKENBROKER_API_KEY", "").strip() or None
    if api_key_file:
        api_key = read_secret_file(api_key_file, "API key")
    return BrokerClient(target or local_target(state.settings().listen), api_key=api_key)


def _proof_signer(path: Path, *, create: bool) -> ProofSigner:
    """The DPoP key in `path` (32 secret bytes, base64url), created (0600) when missing."""
    from tokenbroker import ProofSigner

    if path.exists():
        text = path.read_text(encoding="ascii").strip()
        try:
            secret = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except ValueError:
            secret = b""
        if len(secret) != 32:
            fail(f"{path} is not a DPoP key file (32 bytes, base64url): remove it to generate a new one")
        return ProofSigner(secret)
    if not create:
        fail(f"DPoP key file {path} does not exist: the key is created by `tokenbroker issue --dpop-key {path}`")
    signer = ProofSigner()
    encoded = base64.urlsafe_b64encode(signer.secret_bytes()).rstrip(b"=")
    write_private(path, encoded + b"\n")
    info(f"generated a DPoP key in {path}")
    return signer


@click.command()
@click.option("--client-id", required=True, help="The client asking for the token.")
@click.option("--key", "key_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Client PEM key.")
@click.option(
    "--client-secret-file",
    "--secret-file",
    "secret_file",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path),
    help="File holding the client secret (`-`: stdin; or set TOKENBROKER_CLIENT_SECRET).",
)
@click.option(
    "--client-secret",
    hidden=True,
    expose_value=False,
    callback=refuse_secret_value("--client-secret", "--client-secret-file", "TOKENBROKER_CLIENT_SECRET"),
)
@click.option("--audience", required=True, help="The MCP server's resource URI.")
@click.option("--scope", "scopes", multiple=True, help="Scope to ask for (repeatable).")
@click.option("--ttl", "ttl_seconds", type=click.IntRange(1, LIMITS.max_lifetime_seconds), help="Lifetime in seconds.")
@click.option("--session-id", help="Continue this session (default: open a new one).")
@click.option("--once", is_flag=True, help="A single-use token.")
@click.option("--dpop-key", type=click.Path(dir_okay=False, path_type=Path), help="Bind to this DPoP key file.")
@click.option("--issuer", help="The broker's issuer, the assertion's aud (default: the `issuer` setting).")
@_remote_options
@pass_state
def issue(
    state: State,
    client_id: str,
    key_file: Path | None,
    secret_file: Path | None,
    audience: str,
    scopes: tuple[str, ...],
    ttl_seconds: int | None,
    session_id: str | None,
    once: bool,
    dpop_key: Path | None,
    issuer: str | None,
    target: str | None,
    api_key_file: Path | None,
) -> None:
    """Ask a broker for a token; prints it and its session as JSON. The client proves
    itself with --key (signs a client assertion) or its secret: --client-secret-file FILE
    (`-`: stdin) or TOKENBROKER_CLIENT_SECRET."""
    from tokenbroker.client_assertion import make_client_assertion

    env_secret = os.environ.get("TOKENBROKER_CLIENT_SECRET", "").strip()
    if key_file and secret_file:
        raise click.UsageError("give --key PEM_FILE (signs a client assertion) or --client-secret-file FILE, not both")
    if not key_file and not secret_file and not env_secret:
        raise click.UsageError(
            "give --key PEM_FILE (signs a client assertion), --client-secret-file FILE (`-`: stdin) "
            "or set TOKENBROKER_CLIENT_SECRET"
        )
    if secret_file and api_key_file and str(secret_file) == str(api_key_file) == "-":
        raise click.UsageError("only one of --client-secret-file and --api-key-file can be read from stdin")
    credential: dict[str, Any] = {}  # client_assertion or client_secret
    if key_file:
        assertion_audience = issuer or state.settings().issuer_url
        credential["client_assertion"] = make_client_assertion(key_file.read_bytes(), client_id, assertion_audience)
    else:
        credential["client_secret"] = read_secret_file(secret_file, "client secret") if secret_file else env_secret
    signer = _proof_signer(dpop_key, create=True) if dpop_key else None
    client = _client(state, target, api_key_file)
    try:
        issued = client.issue(
            client_id=client_id,
            audience=audience,
            scopes=list(split_scopes(scopes)),
            ttl_seconds=ttl_seconds,
            session_id=session_id,
            dpop_jkt=signer.jkt if signer else None,
            once=once,
            **credential,
        )
    finally:
        client.close()
    print_json(issued)


@click.command()
@click.argument("token")
@click.option("--audience", required=True, help="Your own resource URI.")
@click.option("--dpop-key", type=click.Path(dir_okay=False, path_type=Path), help="Sign a fresh proof with this key.")
@click.option("--proof", help="An explicit DPoP proof (e.g. to show that a replay is refused).")
@click.option("--method", "http_method", default="POST", show_default=True, help="HTTP method the proof covers.")
@click.option("--uri", "http_uri", help="HTTP URI the proof covers (default: the audience).")
@click.option("--scope", "required_scopes", multiple=True, help="Scope the token must carry (repeatable).")
@_remote_options
@pass_state
def validate(
    state: State,
    token: str,
    audience: str,
    dpop_key: Path | None,
    proof: str | None,
    http_method: str,
    http_uri: str | None,
    required_scopes: tuple[str, ...],
    target: str | None,
    api_key_file: Path | None,
) -> None:
    """Validate TOKEN (`-` reads it from stdin); prints the answer as JSON and exits 0
    when valid, 1 when not."""
    if token == "-":  # noqa: S105 (stdin marker, not a password)
        if api_key_file is not None and str(api_key_file) == "-":
            raise click.UsageError("only one of TOKEN and --api-key-file can be read from stdin")
        token = sys.stdin.read().strip()
    if dpop_key and proof:
        raise click.UsageError("give --dpop-key (signs a fresh proof) or --proof, not both")
    uri = http_uri or audience
    if dpop_key:
        proof = _proof_signer(dpop_key, create=False).sign(http_method, uri, token)
        info(f"DPoP proof (pass it with --proof to replay it): {proof}")
    client = _client(state, target, api_key_file)
    try:
        answer = client.validate(
            token,
            audience=audience,
            dpop_proof=proof,
            http_method=http_method if proof else None,
            http_uri=uri if proof else None,
            required_scopes=list(split_scopes(required_scopes)),
        )
    finally:
        client.close()
    print_json(answer)
    if not answer.valid:
        sys.exit(1)


@click.command()
@click.argument("kind", type=click.Choice(["session", "client", "token"]))
@click.argument("ident", metavar="ID")
@_remote_options
@pass_state
def revoke(state: State, kind: str, ident: str, target: str | None, api_key_file: Path | None) -> None:
    """Revoke a session, every session of a client, or one token (by jti). An ID that
    starts with `-` goes after `--`: `tokenbroker revoke session -- -abc`."""
    client = _client(state, target, api_key_file)
    try:
        method = {"session": client.revoke_session, "client": client.revoke_client, "token": client.revoke_token}[kind]
        count = method(ident)
    finally:
        client.close()
    print_json({"revoked": count})


@click.command()
@click.argument("client_id")
@_remote_options
@pass_state
def sessions(state: State, client_id: str, target: str | None, api_key_file: Path | None) -> None:
    """List a client's live sessions as JSON."""
    client = _client(state, target, api_key_file)
    try:
        found = client.sessions(client_id)
    finally:
        client.close()
    print_json(list(found))


@click.command()
@click.option("--target", help="host:port of the broker (default: from the `listen` setting).")
@click.option("--service", default="", help="Service name to check (default: the whole server).")
@click.option("--timeout", type=click.FloatRange(0.1, 60), default=3.0, show_default=True, help="Seconds.")
@click.option(
    "--ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Use TLS, trusting this CA."
)
@pass_state
def healthcheck(state: State, target: str | None, service: str, timeout: float, ca_file: Path | None) -> None:
    """Exit 0 when the broker answers SERVING (grpc.health.v1), 1 otherwise."""
    import grpc  # type: ignore[import-untyped,unused-ignore]
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped,unused-ignore]

    address = target or local_target(state.settings().listen)
    channel = (
        grpc.secure_channel(address, grpc.ssl_channel_credentials(ca_file.read_bytes()))
        if ca_file
        else grpc.insecure_channel(address)
    )
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    except grpc.RpcError as exc:
        fail(f"broker at {address} is not healthy: {rpc_error(exc)}")
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    click.echo(status)
    if status != "SERVING":
        sys.exit(1)
