"""The `tokenbroker` command line: run the broker (`serve`), manage its signing keys
(`keys`), its registry of MCP clients and servers (`clients`, `servers`), and talk to a
running broker (`issue`, `validate`, `revoke`, `sessions`, `healthcheck`).

Output meant for programs (tokens, validations, sessions, JSON) goes to stdout; messages
for people go to stderr. Errors a user can cause print one line and exit non-zero."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import enum
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from tokenbroker.errors import TokenBrokerError

F = TypeVar("F", bound=Callable[..., Any])

DEMO_CLIENT = "demo-client"
DEMO_SERVER = "demo-server"
DEMO_SCOPES = ("tools:list", "tools:call", "resources:read", "prompts:get")


# -- plumbing ------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class _Group(click.Group):
    """Turns errors a user can cause into one line and exit status 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except TokenBrokerError as exc:
            raise click.ClickException(_one_line(exc)) from None
        except FileNotFoundError as exc:
            raise click.ClickException(f"{exc.filename}: no such file") from None
        except PermissionError as exc:
            raise click.ClickException(f"{exc.filename}: permission denied") from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or _one_line(exc)}") from None
        except ValueError as exc:  # bad PEM, bad CIDR, bad TOML, bad JSON ...
            raise click.ClickException(_one_line(exc)) from None
        except Exception as exc:
            grpc = sys.modules.get("grpc")
            if grpc is not None and isinstance(exc, grpc.RpcError):
                raise click.ClickException(_rpc_error(exc)) from None
            jwt = sys.modules.get("jwt")
            if jwt is not None and isinstance(exc, jwt.PyJWTError):
                raise click.ClickException(_one_line(exc)) from None
            raise


def _rpc_error(exc: Any) -> str:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    name = getattr(code, "name", str(code))
    if name == "UNAVAILABLE":
        return f"the broker is not reachable ({details}): is `tokenbroker serve` running at that --target?"
    return f"the broker refused: {name}: {details}" if details else f"the broker refused: {name}"


class _State:
    """What every command shares: the --config path, settings loaded on first use."""

    def __init__(self, config_file: Path | None) -> None:
        self.config_file = config_file
        self._settings: Any = None

    def settings(self, **overrides: Any) -> Any:
        from tokenbroker.config import Settings

        if overrides:
            return Settings.load(self.config_file, **overrides)
        if self._settings is None:
            self._settings = Settings.load(self.config_file)
        return self._settings

    def registry(self) -> Any:
        from tokenbroker.registry_file import FileRegistry

        return FileRegistry(self.settings().registry_file)


pass_state = click.make_pass_decorator(_State)


def _info(message: str) -> None:
    click.echo(message, err=True)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(_jsonable(value), indent=2))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a NamedTuple (Validation)
        return {k: _jsonable(v) for k, v in value._asdict().items()}
    if isinstance(value, enum.IntEnum):
        return value.name
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _write_private(path: Path, data: bytes, *, force: bool = False) -> None:
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


def _read_secret_file(path: Path, what: str) -> str:
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


def _refuse_secret_value(option: str, file_option: str, env: str) -> Callable[[click.Context, Any, Any], None]:
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


def _scopes(values: Iterable[str]) -> tuple[str, ...]:
    """`--scope a --scope "b c"` -> ("a", "b", "c"), without duplicates."""
    return tuple(dict.fromkeys(s for value in values for s in value.split()))


def _fail(message: str) -> NoReturn:
    raise click.ClickException(message)


# -- the group -------------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    ctx.obj = _State(config_file)


# -- serve -----------------------------------------------------------------------------------


@main.command()
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
    state: _State,
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
            _fail(f"{name} {path} does not exist: fix the path in the config or TOKENBROKER_{name.upper()}")
    try:
        from tokenbroker.service.server import TlsFiles, build_server
        from tokenbroker.service.server import serve as run_server
    except ImportError as exc:
        _fail(f"the gRPC service is not available in this installation ({exc})")

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
        if settings.tls_cert_file is not None
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
        if inspect.isawaitable(server):
            server = await server
        await run_server(server, grace=settings.grace_seconds)

    try:
        asyncio.run(run())
    except RuntimeError as exc:
        if "bind" in str(exc).lower():
            _fail(f"cannot listen on {settings.listen} ({exc}): is another broker running? choose --listen")
        raise
    except KeyboardInterrupt:
        pass
    finally:
        components.metrics.stop_http()
        components.audit.close()


def _register_demo(registry: Any, settings: Any, demo_dir: Path, audience: str) -> None:
    """Registers `demo-server` (admin, API key) and `demo-client` (approved, Ed25519 key)
    and writes their credentials under `demo_dir` (0700 directory, 0600 files)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from tokenbroker.issuance import public_jwk
    from tokenbroker.registry import ClientRecord, ClientStatus, ServerRecord
    from tokenbroker.registry_file import generate_secret, hash_secret

    demo_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(demo_dir, 0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_file, api_key_file = demo_dir / "client-key.pem", demo_dir / "api-key"
    api_key = generate_secret()
    _write_private(key_file, pem, force=True)
    _write_private(api_key_file, api_key.encode() + b"\n", force=True)
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
    target = _local_target(settings.listen)
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


def _local_target(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    if host in ("0.0.0.0", "", "*"):  # noqa: S104 (mapping a wildcard bind to a dialable address)
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


# -- keys ------------------------------------------------------------------------------------


@main.group(cls=_Group)
def keys() -> None:
    """The broker's Ed25519 signing keys (a private JWKS file)."""


def _key_file(state: _State, file: Path | None) -> Path:
    path = file or state.settings().key_file
    if path is None:
        raise click.UsageError("no key file: pass --file or set key_file in the config (TOKENBROKER_KEY_FILE)")
    return Path(path)


def _load_keyring(path: Path) -> Any:
    from tokenbroker.keyring import Keyring

    if not path.exists():
        _fail(f"key file {path} does not exist: create it with `tokenbroker keys generate --out {path}`")
    try:
        return Keyring.load(path)
    except (ValueError, UnicodeDecodeError) as exc:
        _fail(f"key file {path} holds no usable signing key ({_one_line(exc)})")


@keys.command("generate")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="File to create.")
@click.option("--kid", help="Key id (default: the key's RFC 7638 thumbprint).")
@click.option("--force", is_flag=True, help="Replace an existing file (its tokens stop validating).")
def keys_generate(out: Path, kid: str | None, force: bool) -> None:
    """Create a key file with one new signing key."""
    from tokenbroker.keyring import Keyring

    if out.exists() and not force:
        _fail(
            f"{out} already exists: rotate it with `tokenbroker keys rotate --file {out}`, "
            "or pass --force to replace it (tokens it signed stop validating)"
        )
    if kid:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        keyring = Keyring.from_pem(pem, kid)
    else:
        keyring = Keyring.generate()
    out.parent.mkdir(parents=True, exist_ok=True)
    keyring.save(out)
    _info(f"wrote signing key {keyring.active_kid!r} to {out} (private: keep it 0600)")


@keys.command("rotate")
@click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path), help="Key file (default: key_file).")
@pass_state
def keys_rotate(state: _State, file: Path | None) -> None:
    """Add a new active key; the old ones keep verifying until retired."""
    path = _key_file(state, file)
    keyring = _load_keyring(path)
    kid = keyring.rotate()
    keyring.save(path)
    others = [k for k in keyring.kids if k != kid]
    _info(
        f"new active key {kid!r} in {path}; still verifying: {', '.join(others) or 'none'} "
        "(restart the broker to sign with it)"
    )


@keys.command("retire")
@click.argument("kid")
@click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path), help="Key file (default: key_file).")
@pass_state
def keys_retire(state: _State, kid: str, file: Path | None) -> None:
    """Remove a key: tokens it signed stop validating."""
    path = _key_file(state, file)
    keyring = _load_keyring(path)
    if kid not in keyring.kids:
        _fail(f"key {kid!r} is not in {path}: `tokenbroker keys show --file {path}` lists the keys")
    if kid == keyring.active_kid:
        _fail(f"key {kid!r} is the active key: rotate first with `tokenbroker keys rotate --file {path}`")
    keyring.retire(kid)
    keyring.save(path)
    _info(f"retired key {kid!r} from {path}")


@keys.command("jwks")
@click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path), help="Key file (default: key_file).")
@pass_state
def keys_jwks(state: _State, file: Path | None) -> None:
    """Print the public JWKS (for MCP servers and standard JWT libraries)."""
    _print_json(_load_keyring(_key_file(state, file)).jwks())


@keys.command("show")
@click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path), help="Key file (default: key_file).")
@pass_state
def keys_show(state: _State, file: Path | None) -> None:
    """Print the key ids and which one signs (never the keys themselves)."""
    path = _key_file(state, file)
    keyring = _load_keyring(path)
    _print_json({"file": str(path), "active_kid": keyring.active_kid, "kids": keyring.kids})


# -- clients ---------------------------------------------------------------------------------


def _client_json(record: Any) -> dict[str, Any]:
    data = _jsonable(record)
    data["secret_hash"] = "set" if record.secret_hash else None
    return dict(data)


def _load_public_key(path: Path) -> dict[str, str]:
    from tokenbroker.issuance import public_jwk

    data = path.read_bytes()
    if data.lstrip().startswith(b"{"):
        from tokenbroker.registry_file import check_public_jwk

        return check_public_jwk(json.loads(data), where=str(path))
    try:
        return public_jwk(data)
    except ValueError as exc:
        _fail(f"{path}: {exc} (expected an Ed25519 or P-256 public key in PEM, or a public JWK)")


def _generate_client_key(key_type: str) -> tuple[bytes, dict[str, str]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from tokenbroker.issuance import public_jwk

    key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey = (
        ed25519.Ed25519PrivateKey.generate() if key_type == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem, public_jwk(key)


@main.group(cls=_Group)
def clients() -> None:
    """MCP clients: who may get tokens, for which audiences and scopes."""


_policy_option = click.option(
    "--policy",
    type=click.Choice(["reject", "evict_oldest"]),
    help="What one session too many does (default: reject).",
)


@clients.command("add")
@click.argument("client_id")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="PEM or JWK file.")
@click.option(
    "--generate-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Generate a key pair; write the private key (PEM, 0600) here.",
)
@click.option("--key-type", type=click.Choice(["ed25519", "p256"]), default="ed25519", show_default=True)
@click.option("--generate-secret", is_flag=True, help="Generate a client secret (printed once).")
@click.option(
    "--secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --generate-secret: write the secret here (0600) instead of printing it.",
)
@click.option("--audience", "audiences", multiple=True, help="Resource URI it may get tokens for (repeatable).")
@click.option("--scope", "scopes", multiple=True, help="Scope it may ask for (repeatable).")
@click.option("--max-sessions", type=click.IntRange(1), help="Concurrent sessions (default: the max_sessions setting).")
@_policy_option
@click.option("--cidr", "cidrs", multiple=True, help="Network it may ask from, e.g. 10.0.0.0/8 (repeatable).")
@click.option(
    "--binding",
    type=click.Choice(["dpop", "mtls", "bearer"]),
    default="dpop",
    show_default=True,
    help="What its tokens are bound to: its DPoP key, its mTLS certificate, or nothing (bearer).",
)
@click.option("--approve", is_flag=True, help="Approve at once (new clients are pending otherwise).")
@pass_state
def clients_add(
    state: _State,
    client_id: str,
    public_key: Path | None,
    generate_key: Path | None,
    key_type: str,
    generate_secret: bool,
    secret_file: Path | None,
    audiences: tuple[str, ...],
    scopes: tuple[str, ...],
    max_sessions: int | None,
    policy: str | None,
    cidrs: tuple[str, ...],
    binding: str,
    approve: bool,
) -> None:
    """Register a client (pending until approved). Only hashes of secrets are stored."""
    from tokenbroker.models import LimitPolicy
    from tokenbroker.registry import Binding, ClientRecord, ClientStatus
    from tokenbroker.registry_file import check_cidr, check_id, hash_secret
    from tokenbroker.registry_file import generate_secret as new_secret

    if public_key and generate_key:
        raise click.UsageError("give --public-key or --generate-key, not both")
    if not (public_key or generate_key or generate_secret):
        raise click.UsageError("give a credential: --public-key PEM_FILE, --generate-key OUT_FILE or --generate-secret")
    if secret_file and not generate_secret:
        raise click.UsageError("--secret-file goes with --generate-secret")
    check_id("client", client_id)
    registry = state.registry()
    if registry.client(client_id) is not None:
        _fail(
            f"client {client_id!r} already exists: change it with `tokenbroker clients update {client_id}` "
            f"or remove it with `tokenbroker clients remove {client_id}`"
        )
    pem: bytes | None = None
    jwk = _load_public_key(public_key) if public_key else None
    if generate_key:
        pem, jwk = _generate_client_key(key_type)
    secret = new_secret() if generate_secret else None
    record = ClientRecord(
        client_id,
        status=ClientStatus.APPROVED if approve else ClientStatus.PENDING,
        public_jwk=jwk,
        secret_hash=hash_secret(secret) if secret else None,
        allowed_audiences=tuple(dict.fromkeys(audiences)),
        allowed_scopes=_scopes(scopes),
        max_sessions=max_sessions or state.settings().max_sessions,
        limit_policy=LimitPolicy(policy or "reject"),
        allowed_cidrs=tuple(check_cidr(c) for c in cidrs),
        binding=Binding(binding),
    )
    written: list[Path] = []
    try:
        if generate_key and pem is not None:
            _write_private(generate_key, pem)
            written.append(generate_key)
        if secret_file and secret:
            _write_private(secret_file, secret.encode() + b"\n")
            written.append(secret_file)
        registry.add_client(record)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    if generate_key:
        _info(f"wrote the client's private key to {generate_key} (for the client; the broker keeps the public key)")
    if secret and secret_file:
        _info(f"wrote the client secret to {secret_file} (only its hash is stored)")
    elif secret:
        _info("client secret (shown once; only its hash is stored):")
        click.echo(secret)
    status = "approved" if approve else f"pending: approve it with `tokenbroker clients approve {client_id}`"
    _info(f"registered client {client_id!r} in {registry.path} ({status})")
    if not audiences:
        _info(
            f"note: client {client_id!r} may not get tokens for any audience yet: "
            f"add one with `tokenbroker clients update {client_id} --audience URI`"
        )


@clients.command("update")
@click.argument("client_id")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="New public key.")
@click.option("--audience", "audiences", multiple=True, help="Replace the allowed audiences (repeatable).")
@click.option("--scope", "scopes", multiple=True, help="Replace the allowed scopes (repeatable).")
@click.option("--max-sessions", type=click.IntRange(1))
@_policy_option
@click.option("--cidr", "cidrs", multiple=True, help="Replace the allowed networks (repeatable).")
@click.option("--any-source", is_flag=True, help="Remove the network restriction.")
@click.option(
    "--binding", type=click.Choice(["dpop", "mtls", "bearer"]), help="What its tokens are bound to (see clients add)."
)
@pass_state
def clients_update(
    state: _State,
    client_id: str,
    public_key: Path | None,
    audiences: tuple[str, ...],
    scopes: tuple[str, ...],
    max_sessions: int | None,
    policy: str | None,
    cidrs: tuple[str, ...],
    any_source: bool,
    binding: str | None,
) -> None:
    """Change a client's key or policy; each list given replaces the old one."""
    from tokenbroker.models import LimitPolicy
    from tokenbroker.registry import Binding
    from tokenbroker.registry_file import check_cidr

    if cidrs and any_source:
        raise click.UsageError("give --cidr or --any-source, not both")
    changes: dict[str, Any] = {}
    if public_key:
        changes["public_jwk"] = _load_public_key(public_key)
    if audiences:
        changes["allowed_audiences"] = tuple(dict.fromkeys(audiences))
    if scopes:
        changes["allowed_scopes"] = _scopes(scopes)
    if max_sessions is not None:
        changes["max_sessions"] = max_sessions
    if policy:
        changes["limit_policy"] = LimitPolicy(policy)
    if cidrs:
        changes["allowed_cidrs"] = tuple(check_cidr(c) for c in cidrs)
    if any_source:
        changes["allowed_cidrs"] = ()
    if binding:
        changes["binding"] = Binding(binding)
    if not changes:
        raise click.UsageError(
            "nothing to change: give --audience, --scope, --public-key, --max-sessions, --binding, ..."
        )
    record = state.registry().update_client(client_id, **changes)
    _info(f"updated client {client_id!r}")
    _print_json(_client_json(record))


def _set_status(state: _State, client_id: str, status: Any) -> Any:
    return state.registry().update_client(client_id, status=status)


@clients.command("approve")
@click.argument("client_id")
@pass_state
def clients_approve(state: _State, client_id: str) -> None:
    """Let a client get tokens."""
    from tokenbroker.registry import ClientStatus

    _set_status(state, client_id, ClientStatus.APPROVED)
    _info(f"approved client {client_id!r}: it may get tokens now")


@clients.command("disable")
@click.argument("client_id")
@pass_state
def clients_disable(state: _State, client_id: str) -> None:
    """Stop a client getting new tokens."""
    from tokenbroker.registry import ClientStatus

    _set_status(state, client_id, ClientStatus.DISABLED)
    _info(
        f"disabled client {client_id!r}: it gets no new tokens; end its live sessions at once with "
        f"`tokenbroker revoke client {client_id}`"
    )


@clients.command("remove")
@click.argument("client_id")
@pass_state
def clients_remove(state: _State, client_id: str) -> None:
    """Delete a client from the registry."""
    state.registry().remove_client(client_id)
    _info(
        f"removed client {client_id!r}; tokens it holds stay valid until they expire unless you run "
        f"`tokenbroker revoke client {client_id}`"
    )


@clients.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def clients_list(state: _State, as_json: bool) -> None:
    """List the registered clients."""
    records = state.registry().clients()
    if as_json:
        _print_json([_client_json(r) for r in records])
        return
    if not records:
        _info("no clients registered: add one with `tokenbroker clients add ID --generate-key FILE --audience URI`")
        return
    rows = [("CLIENT", "STATUS", "CREDENTIAL", "BINDING", "AUDIENCES", "SCOPES")]
    for r in records:
        credential = "+".join(n for n, v in (("key", r.public_jwk), ("secret", r.secret_hash)) if v) or "none"
        rows.append(
            (
                r.client_id,
                str(r.status),
                credential,
                str(r.binding),
                ",".join(r.allowed_audiences),
                " ".join(r.allowed_scopes),
            )
        )
    _print_table(rows)


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@clients.command("show")
@click.argument("client_id")
@pass_state
def clients_show(state: _State, client_id: str) -> None:
    """Print one client as JSON (a secret shows as "set", never its hash)."""
    record = state.registry().client(client_id)
    if record is None:
        _fail(f"client {client_id!r} is not registered: `tokenbroker clients list` shows the registered ones")
    _print_json(_client_json(record))


# -- servers ---------------------------------------------------------------------------------


@main.group(cls=_Group)
def servers() -> None:
    """MCP servers: who may validate tokens, for which audiences."""


def _server_json(record: Any) -> dict[str, Any]:
    data = _jsonable(record)
    data["api_key_hash"] = "set" if record.api_key_hash else None
    return dict(data)


@servers.command("add")
@click.argument("server_id")
@click.option("--audience", "audiences", multiple=True, required=True, help="Its resource URI (repeatable).")
@click.option("--admin", is_flag=True, help="May also revoke tokens and list sessions.")
@click.option(
    "--relay-client-ip",
    is_flag=True,
    help="Believed when it relays a client's address at IssueToken (a gateway), for its own audiences only.",
)
@click.option("--cert-thumbprint", help="base64url SHA-256 of its mTLS client certificate (DER).")
@click.option("--generate-api-key", is_flag=True, help="Generate an API key (printed once).")
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --generate-api-key: write the key here (0600) instead of printing it.",
)
@click.option("--label", "labels", multiple=True, help="key=value label (repeatable).")
@pass_state
def servers_add(
    state: _State,
    server_id: str,
    audiences: tuple[str, ...],
    admin: bool,
    relay_client_ip: bool,
    cert_thumbprint: str | None,
    generate_api_key: bool,
    api_key_file: Path | None,
    labels: tuple[str, ...],
) -> None:
    """Register an MCP server. Only the hash of its API key is stored."""
    from tokenbroker.registry import ServerRecord
    from tokenbroker.registry_file import check_id, generate_secret, hash_secret

    if not (generate_api_key or cert_thumbprint):
        raise click.UsageError("give a credential: --generate-api-key and/or --cert-thumbprint")
    if api_key_file and not generate_api_key:
        raise click.UsageError("--api-key-file goes with --generate-api-key")
    label_map: dict[str, str] = {}
    for label in labels:
        name, sep, value = label.partition("=")
        if not sep or not name:
            raise click.UsageError(f"label {label!r} must be key=value")
        label_map[name] = value
    check_id("server", server_id)
    registry = state.registry()
    if registry.server(server_id) is not None:
        _fail(f"server {server_id!r} already exists: remove it first with `tokenbroker servers remove {server_id}`")
    api_key = generate_secret() if generate_api_key else None
    record = ServerRecord(
        server_id,
        audiences=tuple(dict.fromkeys(audiences)),
        api_key_hash=hash_secret(api_key) if api_key else None,
        cert_thumbprint=cert_thumbprint,
        admin=admin,
        relay_client_ip=relay_client_ip,
        labels=label_map,
    )
    if api_key_file and api_key:
        _write_private(api_key_file, api_key.encode() + b"\n")
    try:
        registry.add_server(record)
    except BaseException:
        if api_key_file:
            api_key_file.unlink(missing_ok=True)
        raise
    if api_key and api_key_file:
        _info(f"wrote the API key to {api_key_file} (only its hash is stored)")
    elif api_key:
        _info("API key (shown once; only its hash is stored):")
        click.echo(api_key)
    _info(f"registered server {server_id!r} in {registry.path}")


@servers.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def servers_list(state: _State, as_json: bool) -> None:
    """List the registered servers."""
    records = state.registry().servers()
    if as_json:
        _print_json([_server_json(r) for r in records])
        return
    if not records:
        _info("no servers registered: add one with `tokenbroker servers add ID --audience URI --generate-api-key`")
        return
    rows = [("SERVER", "ADMIN", "CREDENTIAL", "AUDIENCES")]
    for r in records:
        credential = "+".join(n for n, v in (("api-key", r.api_key_hash), ("cert", r.cert_thumbprint)) if v) or "none"
        rows.append((r.server_id, "yes" if r.admin else "no", credential, ",".join(r.audiences)))
    _print_table(rows)


@servers.command("show")
@click.argument("server_id")
@pass_state
def servers_show(state: _State, server_id: str) -> None:
    """Print one server as JSON."""
    record = state.registry().server(server_id)
    if record is None:
        _fail(f"server {server_id!r} is not registered: `tokenbroker servers list` shows the registered ones")
    _print_json(_server_json(record))


@servers.command("remove")
@click.argument("server_id")
@pass_state
def servers_remove(state: _State, server_id: str) -> None:
    """Delete a server: its API key stops working."""
    state.registry().remove_server(server_id)
    _info(f"removed server {server_id!r}")


# -- remote commands -------------------------------------------------------------------------


def _remote_options(func: F) -> F:
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
            callback=_refuse_secret_value("--api-key", "--api-key-file", "TOKENBROKER_API_KEY"),
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _client(state: _State, target: str | None, api_key_file: Path | None) -> Any:
    """A `BrokerClient` with the calling server's API key from --api-key-file (`-`:
    stdin) or TOKENBROKER_API_KEY, never from the command line."""
    try:
        from tokenbroker.client import BrokerClient
    except ImportError as exc:
        _fail(f"the gRPC client is not available in this installation ({exc})")

    api_key = os.environ.get("TOKENBROKER_API_KEY", "").strip() or None
    if api_key_file:
        api_key = _read_secret_file(api_key_file, "API key")
    return BrokerClient(target or _local_target(state.settings().listen), api_key=api_key)


def _proof_signer(path: Path, *, create: bool) -> Any:
    """The DPoP key in `path` (32 secret bytes, base64url), created (0600) when missing."""
    from tokenbroker import ProofSigner

    if path.exists():
        text = path.read_text(encoding="ascii").strip()
        try:
            secret = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except ValueError:
            secret = b""
        if len(secret) != 32:
            _fail(f"{path} is not a DPoP key file (32 bytes, base64url): remove it to generate a new one")
        return ProofSigner(secret)
    if not create:
        _fail(f"DPoP key file {path} does not exist: the key is created by `tokenbroker issue --dpop-key {path}`")
    signer = ProofSigner()
    encoded = base64.urlsafe_b64encode(signer.secret_bytes()).rstrip(b"=")
    _write_private(path, encoded + b"\n")
    _info(f"generated a DPoP key in {path}")
    return signer


@main.command()
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
    callback=_refuse_secret_value("--client-secret", "--client-secret-file", "TOKENBROKER_CLIENT_SECRET"),
)
@click.option("--audience", required=True, help="The MCP server's resource URI.")
@click.option("--scope", "scopes", multiple=True, help="Scope to ask for (repeatable).")
@click.option("--ttl", "ttl_seconds", type=click.IntRange(1, 3600), help="Lifetime in seconds.")
@click.option("--session-id", help="Continue this session (default: open a new one).")
@click.option("--once", is_flag=True, help="A single-use token.")
@click.option("--dpop-key", type=click.Path(dir_okay=False, path_type=Path), help="Bind to this DPoP key file.")
@click.option("--issuer", help="The broker's issuer, the assertion's aud (default: the `issuer` setting).")
@_remote_options
@pass_state
def issue(
    state: _State,
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
    from tokenbroker.issuance import make_client_assertion

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
    credential: dict[str, str] = {}
    if key_file:
        assertion_audience = issuer or state.settings().issuer
        credential["client_assertion"] = make_client_assertion(key_file.read_bytes(), client_id, assertion_audience)
    else:
        credential["client_secret"] = _read_secret_file(secret_file, "client secret") if secret_file else env_secret
    signer = _proof_signer(dpop_key, create=True) if dpop_key else None
    client = _client(state, target, api_key_file)
    try:
        issued = client.issue(
            client_id=client_id,
            audience=audience,
            scopes=list(_scopes(scopes)),
            ttl_seconds=ttl_seconds,
            session_id=session_id,
            dpop_jkt=signer.jkt if signer else None,
            once=once,
            **credential,
        )
    finally:
        _close(client)
    _print_json(issued)


@main.command()
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
    state: _State,
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
        _info(f"DPoP proof (pass it with --proof to replay it): {proof}")
    client = _client(state, target, api_key_file)
    try:
        answer = client.validate(
            token,
            audience=audience,
            dpop_proof=proof,
            http_method=http_method if proof else None,
            http_uri=uri if proof else None,
            required_scopes=list(_scopes(required_scopes)),
        )
    finally:
        _close(client)
    _print_json(answer)
    if not answer.valid:
        sys.exit(1)


@main.command()
@click.argument("kind", type=click.Choice(["session", "client", "token"]))
@click.argument("ident", metavar="ID")
@_remote_options
@pass_state
def revoke(state: _State, kind: str, ident: str, target: str | None, api_key_file: Path | None) -> None:
    """Revoke a session, every session of a client, or one token (by jti). An ID that
    starts with `-` goes after `--`: `tokenbroker revoke session -- -abc`."""
    client = _client(state, target, api_key_file)
    try:
        method = {"session": client.revoke_session, "client": client.revoke_client, "token": client.revoke_token}[kind]
        count = method(ident)
    finally:
        _close(client)
    _print_json({"revoked": count})


@main.command()
@click.argument("client_id")
@_remote_options
@pass_state
def sessions(state: _State, client_id: str, target: str | None, api_key_file: Path | None) -> None:
    """List a client's live sessions as JSON."""
    client = _client(state, target, api_key_file)
    try:
        found = client.sessions(client_id)
    finally:
        _close(client)
    _print_json(list(found))


@main.command()
@click.option("--target", help="host:port of the broker (default: from the `listen` setting).")
@click.option("--service", default="", help="Service name to check (default: the whole server).")
@click.option("--timeout", type=click.FloatRange(0.1, 60), default=3.0, show_default=True, help="Seconds.")
@click.option(
    "--ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Use TLS, trusting this CA."
)
@pass_state
def healthcheck(state: _State, target: str | None, service: str, timeout: float, ca_file: Path | None) -> None:
    """Exit 0 when the broker answers SERVING (grpc.health.v1), 1 otherwise."""
    import grpc  # type: ignore[import-untyped,unused-ignore]
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped,unused-ignore]

    address = target or _local_target(state.settings().listen)
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
        _fail(f"broker at {address} is not healthy: {_rpc_error(exc)}")
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    click.echo(status)
    if status != "SERVING":
        sys.exit(1)


# -- bench -----------------------------------------------------------------------------------


def _csv(value: str, what: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not items:
        raise click.BadParameter(f"give at least one {what}, comma-separated")
    return items


class _BenchProgress:
    """click's progress bar over the planned seconds of load, with one line per level
    (printed above the bar on a terminal, as plain lines otherwise)."""

    def __init__(self, bar: Any, tty: bool) -> None:
        self._bar = bar
        self._tty = tty
        self._pending = 0.0

    def advance(self, seconds: float) -> None:
        self._pending += seconds * 10
        step = int(self._pending)
        remaining = self._bar.length - self._bar.pos
        if step > 0 and remaining > 0:
            self._bar.update(min(step, remaining))
        self._pending -= step

    def describe(self, text: str) -> None:
        if self._tty:  # (click prints every new label as a line when stderr is not a terminal)
            self._bar.label = text.ljust(38)[:38]
            self._bar.render_progress()

    def note(self, text: str) -> None:
        if self._tty:
            click.echo("\r\x1b[K" + text, err=True)
            self._bar.render_progress()
        else:
            click.echo(text, err=True)


@main.command()
@click.option("--modes", default="unary,stream,batch", show_default=True, help="Validation RPCs to load.")
@click.option("--stores", default="memory,redis", show_default=True, help="The broker's stores to test.")
@click.option("--concurrency", default="1,4,16,64", show_default=True, help="Requests in flight, per level.")
@click.option("--duration", type=click.FloatRange(0.1, 600), default=5.0, show_default=True, help="Seconds per level.")
@click.option(
    "--warmup", type=click.FloatRange(0, 60), default=1.0, show_default=True, help="Unrecorded seconds first."
)
@click.option("--batch-size", type=click.IntRange(1, 1000), default=64, show_default=True, help="Requests per batch.")
@click.option("--references/--no-references", default=True, show_default=True, help="Also load the reference servers.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("benches/results"),
    show_default=True,
    help="Directory for the JSON, Markdown and PNG files.",
)
@click.option("--name", default="grpc", show_default=True, help="Base name of the result files.")
@click.option(
    "--soak", type=click.FloatRange(0, 3600), default=0.0, help="Then N seconds of unary load, RSS per second."
)
@click.option(
    "--soak-warmup",
    type=click.FloatRange(0, 3600),
    default=0.0,
    show_default=True,
    help="Unrecorded seconds of soak load first (replay records live 65 s: RSS grows until then).",
)
@click.option(
    "--binding", type=click.Choice(["dpop", "bearer"]), default="dpop", show_default=True, help="Token binding."
)
@click.option("--tokens", type=click.IntRange(1, 100_000), default=256, show_default=True, help="Distinct tokens.")
@click.option("--channels", type=click.IntRange(1, 64), default=1, show_default=True, help="gRPC channels per server.")
@click.option(
    "--quick", is_flag=True, help="A few seconds in all (a smoke test): short levels, concurrency 1,8, batch 16."
)
@click.pass_context
def bench(
    ctx: click.Context,
    modes: str,
    stores: str,
    concurrency: str,
    duration: float,
    warmup: float,
    batch_size: int,
    references: bool,
    out: Path,
    name: str,
    soak: float,
    soak_warmup: float,
    binding: str,
    tokens: int,
    channels: int,
    quick: bool,
) -> None:
    """Load-test the gRPC service: real `tokenbroker serve` processes (memory store and a
    redis-server of its own), and the two reference servers, from this separate process.
    Writes OUT/NAME.json, .md and .png: throughput, latency percentiles, server CPU and
    RSS, Redis round trips, and the issue's targets, met or missed."""
    import signal

    try:
        from tokenbroker.bench.runner import BenchConfig, Runner
    except ImportError as exc:
        _fail(f"the bench needs the `bench` extra (matplotlib, psutil): {exc}")

    def default(param: str) -> bool:
        return ctx.get_parameter_source(param) in (click.core.ParameterSource.DEFAULT, None)

    if quick:
        duration = 0.3 if default("duration") else duration
        warmup = 0.1 if default("warmup") else warmup
        concurrency = "1,8" if default("concurrency") else concurrency
        tokens = 16 if default("tokens") else tokens
        # Small batches: a slow reference server must answer some within a 0.3 s level.
        batch_size = 16 if default("batch_size") else batch_size
        soak = 2.0 if default("soak") else soak
    try:
        levels = tuple(int(c) for c in _csv(concurrency, "concurrency level"))
    except ValueError:
        raise click.BadParameter(
            "concurrency levels are integers, e.g. 1,4,16,64", param_hint="--concurrency"
        ) from None
    config = BenchConfig(
        modes=_csv(modes, "mode"),
        stores=_csv(stores, "store"),
        concurrency=levels,
        duration=duration,
        warmup=warmup,
        batch_size=batch_size,
        references=references,
        out=out,
        soak=soak,
        soak_warmup=soak_warmup,
        binding=binding,
        tokens=tokens,
        channels=channels,
        name=name,
        command="tokenbroker bench " + " ".join(sys.argv[sys.argv.index("bench") + 1 :] if "bench" in sys.argv else []),
    )
    config.check()

    def terminate(signum: int, frame: Any) -> None:
        # Our own handler for both signals (asyncio's would only cancel a task): the first
        # ends the level in flight and unwinds, stopping every process; a second raises.
        if stopping:
            raise KeyboardInterrupt
        stopping.append(signum)
        _info("stopping: ending the current level and the servers (again to force)")
        Runner.interrupt()

    stopping: list[int] = []
    previous = {signum: signal.signal(signum, terminate) for signum in (signal.SIGINT, signal.SIGTERM)}
    tty = sys.stderr.isatty()
    try:
        with click.progressbar(
            length=max(1, int(config.planned_seconds() * 10)), label="starting".ljust(38), file=sys.stderr, width=24
        ) as bar:
            runner = Runner(config, _BenchProgress(bar, tty))
            result = runner.run()
    except RuntimeError as exc:
        _fail(_one_line(exc))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    paths = runner.paths
    for target in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        value = "-" if target["value"] is None else f"{target['value']:,.3f}{target['unit']}"
        _info(f"{verdict:>12}  {target['target']}: {value} ({target['op']} {target['threshold']:,}{target['unit']})")
    for path in paths.values():
        click.echo(str(path))


def _close(client: Any) -> None:
    close = getattr(client, "close", None)
    if callable(close):
        close()


__all__ = ["main"]
