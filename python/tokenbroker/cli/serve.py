"""`tokenbroker serve`: run the gRPC broker, optionally with a demo client and server
registered and their credentials written for the walk-through the README shows, and
optionally as N worker processes sharing the port (`--workers`, on the Redis store; see
tokenbroker.service.workers)."""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tokenbroker.cli._errors import fail
from tokenbroker.cli._secrets import write_private
from tokenbroker.cli._state import State, local_target, pass_state

if TYPE_CHECKING:
    from tokenbroker.config import Settings
    from tokenbroker.keyring import Keyring
    from tokenbroker.registry_file import FileRegistry
    from tokenbroker.service.workers import WorkerSlot

DEMO_CLIENT = "demo-client"
DEMO_SDK_CLIENT = "demo-sdk-client"  # an unmodified MCP SDK client: a secret, Bearer tokens
DEMO_SERVER = "demo-server"
DEMO_SCOPES = ("tools:list", "tools:call", "resources:read", "prompts:get")


@dataclass(frozen=True, slots=True)
class _Demo:
    """What --demo registers: where its credentials go, the demo MCP server's URI."""

    directory: Path
    audience: str


@click.command()
@click.option("--listen", help="host:port to bind (default: the `listen` setting, 127.0.0.1:50051).")
@click.option(
    "--http-listen",
    help="host:port of the OAuth HTTP server (default: the `http_listen` setting, 127.0.0.1:8080; '' turns it off).",
)
@click.option("--redis-url", help="Redis URL for shared state (default: the embedded in-memory store).")
@click.option(
    "--workers",
    type=int,
    help="Broker processes sharing the port (default: the `workers` setting, 1); more than one needs --redis-url.",
)
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
# Internal: how `--workers N` starts each worker (tokenbroker.service.workers).
@click.option("--as-worker", is_flag=True, hidden=True)
@pass_state
def serve(
    state: State,
    listen: str | None,
    http_listen: str | None,
    redis_url: str | None,
    workers: int | None,
    demo: bool,
    demo_dir: Path,
    demo_audience: str,
    reflection: bool | None,
    as_worker: bool,
) -> None:
    """Run the broker (gRPC, and the OAuth HTTP server on http_listen) until SIGTERM or SIGINT."""
    from tokenbroker.logs import configure_logging

    if as_worker:
        _serve_as_worker()
        return
    settings = state.settings(
        listen=listen, http_listen=http_listen, redis_url=redis_url, reflection=reflection, workers=workers
    )
    configure_logging(settings.log_level, json=settings.log_json)
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            fail(f"{name} {path} does not exist: fix the path in the config or TOKENBROKER_{name.upper()}")
    setup = _Demo(demo_dir, demo_audience) if demo else None
    if settings.workers > 1:
        _serve_workers(settings, setup)
    else:
        _serve_here(settings, demo=setup)


def _serve_workers(settings: Settings, demo: _Demo | None) -> None:
    """The parent of `--workers N`: refuses what N processes cannot do, loads the keys
    and registers the demo once, then supervises (tokenbroker.service.workers)."""
    import structlog

    from tokenbroker.app import load_keyring
    from tokenbroker.registry_file import FileRegistry
    from tokenbroker.service.workers import WorkerError, WorkerSlot, port_taken, run_workers

    count = settings.workers
    if not settings.redis_url:
        raise click.UsageError(
            f"--workers {count} needs the Redis store (redis_url): each worker would have its own in-memory "
            "sessions and replay records, so a proof replayed to another worker would pass"
        )
    if int(settings.listen.rpartition(":")[2]) == 0:
        raise click.UsageError(
            f"--workers {count} needs a fixed port in --listen, not {settings.listen}: "
            "with port 0 each worker would listen on a port of its own"
        )
    last_metrics_port = WorkerSlot(count, count).metrics_port(settings.metrics_port)
    if last_metrics_port is not None and last_metrics_port > 65535:
        raise click.UsageError(
            f"--workers {count} serve metrics on ports metrics_port to metrics_port + {count - 1}, one each: "
            f"metrics_port {settings.metrics_port} leaves no room for them; choose a lower one"
        )
    if settings.http_listen and int(settings.http_listen.rpartition(":")[2]) == 0:
        raise click.UsageError(f"--workers {count} needs a fixed port in --http-listen, not {settings.http_listen}")
    taken = port_taken(settings.listen)
    if taken is not None:
        fail(f"cannot listen on {settings.listen} ({taken.strerror}): is another broker running? choose --listen")
    taken = port_taken(settings.http_listen) if settings.http_listen else None
    if taken is not None:
        fail(
            f"cannot listen for HTTP on {settings.http_listen} ({taken.strerror}): is another broker running? "
            "choose --http-listen"
        )
    keyring = load_keyring(settings)
    if demo is not None:
        _register_demo(FileRegistry(settings.registry_file), settings, demo.directory, demo.audience)
    log = structlog.get_logger("tokenbroker")
    log.info("tokenbroker starting workers", **settings.public_summary(), workers=count, kid=keyring.active_kid)
    try:
        run_workers(settings, keyring)
    except WorkerError as exc:
        fail(str(exc))


def _serve_as_worker() -> None:
    """One worker of `--workers N`: its settings and keys from the parent, the lifeline
    watched (tokenbroker.service.workers), then a broker as without --workers."""
    import structlog

    from tokenbroker.logs import configure_logging
    from tokenbroker.service.workers import Handoff, WorkerError, watch_parent

    try:
        handoff = Handoff.read()
    except WorkerError as exc:
        fail(str(exc))
    watch_parent()
    configure_logging(handoff.settings.log_level, json=handoff.settings.log_json)
    structlog.contextvars.bind_contextvars(worker=str(handoff.slot))  # on every line it logs
    _serve_here(handoff.settings, keyring=handoff.keyring, slot=handoff.slot)


def _serve_here(
    settings: Settings,
    *,
    demo: _Demo | None = None,
    keyring: Keyring | None = None,
    slot: WorkerSlot | None = None,
) -> None:
    """A broker in this process until SIGTERM or SIGINT: alone, or as worker `slot`
    (sharing the port, metrics on its own port, signing with the parent's `keyring`)."""
    import structlog

    from tokenbroker.app import build_components
    from tokenbroker.service.server import TlsFiles, build_server
    from tokenbroker.service.server import serve as run_server

    http_socket = _bind_http(settings, reuse_port=slot is not None)
    if http_socket is not None:
        settings = settings.with_http_port(http_socket.getsockname()[1])
    components = build_components(settings, keyring=keyring)
    if demo is not None:
        _register_demo(components.registry, settings, demo.directory, demo.audience)
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
    metrics_port = settings.metrics_port if slot is None else slot.metrics_port(settings.metrics_port)
    if metrics_port is not None:
        metrics_port = components.metrics.start_http(metrics_port, settings.metrics_host)
    summary = settings.public_summary() | {"store": components.store_kind, "metrics_port": metrics_port}
    if slot is not None:
        summary["pid"] = os.getpid()
    log = structlog.get_logger("tokenbroker")
    log.info("tokenbroker starting", **summary, kid=components.broker.keyring.active_kid)

    async def run() -> None:
        http = None
        if http_socket is not None:
            from tokenbroker.http.app import build_http_app
            from tokenbroker.http.server import HttpServer

            http = HttpServer(
                build_http_app(components),
                http_socket,
                max_inflight=settings.http_max_inflight,
                on_shed=lambda: components.metrics.admission_refused("http", "inflight"),
            )
            await http.start()
            log.info("tokenbroker HTTP serving", http_listen=settings.http_listen, public_url=settings.issuer_url)
            if _cleartext_exposed(settings):
                log.warning(
                    "the OAuth door listens beyond loopback on plain HTTP and public_url is http://: client "
                    "secrets, assertions and tokens cross the network in clear; put a TLS proxy in front and set "
                    "public_url to its https:// URL"
                )
        try:
            await _serve_grpc()
        finally:
            if http is not None:
                await http.stop()

    async def _serve_grpc() -> None:
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
            reuse_port=slot is not None,
            events=components.events,
            trusted_proxies=settings.trusted_proxies,
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
        components.events.close()  # delivers what is queued, to the audit log too: before it closes
        components.audit.close()


def _cleartext_exposed(settings: Settings) -> bool:
    """Whether clients elsewhere would send credentials to this door in clear."""
    import ipaddress

    host = settings.http_listen.rpartition(":")[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return not loopback and settings.issuer_url.startswith("http://")


def _bind_http(settings: Settings, *, reuse_port: bool) -> socket.socket | None:
    """The HTTP door's socket, bound before anything is served, so that a taken port is
    a clear error at once; None when `http_listen` is empty."""
    if not settings.http_listen:
        return None
    from tokenbroker.http.server import bind

    try:
        return bind(settings.http_listen, reuse_port=reuse_port)
    except (OSError, ValueError) as exc:
        fail(
            f"cannot listen for HTTP on {settings.http_listen} ({getattr(exc, 'strerror', None) or exc}): is another "
            "broker running? choose --http-listen, or --http-listen '' to serve gRPC only"
        )


def _register_demo(registry: FileRegistry, settings: Settings, demo_dir: Path, audience: str) -> None:
    """Registers `demo-server` (admin, API key) and `demo-client` (approved, Ed25519 key)
    and writes their credentials under `demo_dir` (0700 directory, 0600 files)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from tokenbroker.client_assertion import public_jwk
    from tokenbroker.registry import Binding, ClientRecord, ClientStatus, ServerRecord
    from tokenbroker.registry_file import generate_secret, hash_secret

    demo_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(demo_dir, 0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_file, api_key_file = demo_dir / "client-key.pem", demo_dir / "api-key"
    api_key = generate_secret("server_api_key")
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
    sdk_secret = generate_secret("client_secret")
    sdk_secret_file = demo_dir / "sdk-client-secret"
    write_private(sdk_secret_file, sdk_secret.encode() + b"\n", force=True)
    registry.put_client(
        ClientRecord(
            DEMO_SDK_CLIENT,
            status=ClientStatus.APPROVED,
            secret_hash=hash_secret(sdk_secret),
            allowed_audiences=(audience,),
            allowed_scopes=DEMO_SCOPES,
            max_sessions=settings.max_sessions,
            binding=Binding.BEARER,
        )
    )
    target = local_target(settings.listen)
    dpop_file = demo_dir / "dpop-key"
    click.echo(
        f"demo: registered client {DEMO_CLIENT!r} and MCP server {DEMO_SERVER!r} (audience {audience}, admin) "
        f"in {registry.path}\n"
        f"demo: client private key: {key_file}\n"
        f"demo: server API key:     {api_key_file}\n"
        f"demo: client {DEMO_SDK_CLIENT!r} (binding bearer, for unmodified MCP SDK clients): secret in "
        f"{sdk_secret_file}\n"
        f"demo: OAuth metadata:     {settings.issuer_url.rstrip('/')}/.well-known/oauth-authorization-server\n"
        "demo: try, in another shell:\n"
        f"  tokenbroker issue --target {target} --client-id {DEMO_CLIENT} --key {key_file} "
        f"--audience {audience} --scope tools:call --dpop-key {dpop_file}\n"
        f"  tokenbroker validate --target {target} --api-key-file {api_key_file} --audience {audience} "
        f"--dpop-key {dpop_file} --method POST --uri {audience} TOKEN"
    )
