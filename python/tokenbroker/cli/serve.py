"""`tokenbroker serve`: run the gRPC broker, optionally with a demo client and server
registered and their credentials written for the walk-through the README shows."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tokenbroker.cli._errors import fail
from tokenbroker.cli._secrets import write_private
from tokenbroker.cli._state import State, local_target, pass_state

if TYPE_CHECKING:
    from tokenbroker.config import Settings
    from tokenbroker.registry_file import FileRegistry

DEMO_CLIENT = "demo-client"
DEMO_SERVER = "demo-server"
DEMO_SCOPES = ("tools:list", "tools:call", "resources:read", "prompts:get")


@click.command()
@click.option("--listen", help="host:port to bind (default: the `listen` setting, 127.0.0.1:50051).")
@click.option("--redis-url", help="Redis URL for shared state (default: the embedded in-memory store).")
@click.option("--demo", is_flag=True, help="Register a demo MCP server and client, and write their credentials.")
@click.option(
    "--demo-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".tokenbroker-demo"),
    show_default=True,
    help="Where --demo writes the demo client's key and the server's API key.",
)
@click.option(
    "--demo-audience", default="http://127.0.0.1:8000/mcp", show_default=True, help="The demo MCP server's URI."
)
@click.option(
    "--reflection/--no-reflection",
    default=None,
    help="Serve gRPC server reflection (default: the `reflection` setting, off).",
)
@pass_state
def serve(
    state: State,
    listen: str | None,
    redis_url: str | None,
    demo: bool,
    demo_dir: Path,
    demo_audience: str,
    reflection: bool | None,
) -> None:
    """Run the gRPC broker until SIGTERM or SIGINT."""
    import structlog

    from tokenbroker.app import build_components
    from tokenbroker.logs import configure_logging

    settings = state.settings(listen=listen, redis_url=redis_url, reflection=reflection)
    configure_logging(settings.log_level, json=settings.log_json)
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            fail(f"{name} {path} does not exist: fix the path in the config or TOKENBROKER_{name.upper()}")
    from tokenbroker.service.server import TlsFiles, build_server
    from tokenbroker.service.server import serve as run_server

    components = build_components(settings)
    if demo:
        _register_demo(components.registry, settings, demo_dir, demo_audience)
    tls = (
        TlsFiles(
            cert_file=settings.tls_cert_file,
            key_file=settings.tls_key_file,
            client_ca_file=settings.tls_client_ca_file,
            require_client_cert=settings.tls_require_client_cert,
        )
        # Settings hold both files or neither; naming both here tells the type checker.
        if settings.tls_cert_file is not None and settings.tls_key_file is not None
        else None
    )
    metrics_port = None
    if settings.metrics_port is not None:
        metrics_port = components.metrics.start_http(settings.metrics_port, settings.metrics_host)
    summary = settings.public_summary() | {"store": components.store_kind, "metrics_port": metrics_port}
    log = structlog.get_logger("tokenbroker")
    log.info("tokenbroker starting", **summary, kid=components.broker.keyring.active_kid)

    async def run() -> None:
        server = build_server(
            components.broker,
            registry=components.registry,
            authenticator=components.authenticator,
            audit=components.audit,
            metrics=components.metrics,
            listen=settings.listen,
            tls=tls,
            admission=settings,
            reflection=settings.reflection,
        )
        await run_server(server, grace=settings.grace_seconds)

    try:
        asyncio.run(run())
    except RuntimeError as exc:
        if "bind" in str(exc).lower():
            fail(f"cannot listen on {settings.listen} ({exc}): is another broker running? choose --listen")
        raise
    except KeyboardInterrupt:
        pass
    finally:
        components.metrics.stop_http()
        components.audit.close()


def _register_demo(registry: FileRegistry, settings: Settings, demo_dir: Path, audience: str) -> None:
    """Registers `demo-server` (admin, API key) and `demo-client` (approved, Ed25519 key)
    and writes their credentials under `demo_dir` (0700 directory, 0600 files)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from tokenbroker.client_assertion import public_jwk
    from tokenbroker.registry import ClientRecord, ClientStatus, ServerRecord
    from tokenbroker.registry_file import generate_secret, hash_secret

    demo_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(demo_dir, 0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_file, api_key_file = demo_dir / "client-key.pem", demo_dir / "api-key"
    api_key = generate_secret()
    write_private(key_file, pem, force=True)
    write_private(api_key_file, api_key.encode() + b"\n", force=True)
    registry.put_server(ServerRecord(DEMO_SERVER, audiences=(audience,), api_key_hash=hash_secret(api_key), admin=True))
    registry.put_client(
        ClientRecord(
            DEMO_CLIENT,
            status=ClientStatus.APPROVED,
            public_jwk=public_jwk(key),
            allowed_audiences=(audience,),
            allowed_scopes=DEMO_SCOPES,
            max_sessions=settings.max_sessions,
        )
    )
    target = local_target(settings.listen)
    dpop_file = demo_dir / "dpop-key"
    click.echo(
        f"demo: registered client {DEMO_CLIENT!r} and MCP server {DEMO_SERVER!r} (audience {audience}, admin) "
        f"in {registry.path}\n"
        f"demo: client private key: {key_file}\n"
        f"demo: server API key:     {api_key_file}\n"
        "demo: try, in another shell:\n"
        f"  tokenbroker issue --target {target} --client-id {DEMO_CLIENT} --key {key_file} "
        f"--audience {audience} --scope tools:call --dpop-key {dpop_file}\n"
        f"  tokenbroker validate --target {target} --api-key-file {api_key_file} --audience {audience} "
        f"--dpop-key {dpop_file} --method POST --uri {audience} TOKEN"
    )
