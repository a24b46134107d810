"""The processes a bench run talks to, all on 127.0.0.1 free ports, each a subprocess of
its own session (so a Ctrl-C reaches only the bench, which then stops them in order):

- the broker under test: `tokenbroker serve` with a temporary key file and registry, the
  embedded memory store or the bench's own redis-server;
- `redis-server` (no persistence, temporary directory);
- the reference servers `reference_noop` (the transport's ceiling) and `reference_pyjwt`
  (PyJWT + redis-py, what a user would write).

`Deployment` writes the key file, the public JWKS, the registry (one approved client, one
MCP server with an API key) and issues tokens through a running broker. Every process is
registered in a `ProcessSet`; `ProcessSet.stop_all()` (also run at interpreter exit)
stops whatever is still running: SIGTERM, then SIGKILL after a grace period."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped,unused-ignore]
from cryptography.hazmat.primitives.asymmetric import ed25519
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped,unused-ignore]

from tokenbroker import ProofSigner
from tokenbroker.client import BrokerClient
from tokenbroker.client_assertion import make_client_assertion, public_jwk
from tokenbroker.keyring import Keyring
from tokenbroker.registry import Binding, ClientRecord, ClientStatus, ServerRecord
from tokenbroker.registry_file import FileRegistry, generate_secret, hash_secret

HOST = "127.0.0.1"
ISSUER = "https://broker.bench.test"
AUDIENCE = "https://mcp.bench.test/mcp"
HTTP_METHOD = "POST"
CLIENT_ID = "bench-client"
BEARER_CLIENT_ID = "bench-bearer-client"  # binding bearer: the bench's bearer-token runs
SERVER_ID = "bench-server"
SCOPES = ("tools:call",)
TOKEN_TTL_SECONDS = 3600
API_KEY_ENV = "TOKENBROKER_BENCH_API_KEY"  # how the PyJWT reference learns the API key (never argv)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def redis_server_path() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    return "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None


def _clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment for a child: ours without TOKENBROKER_* (a user's own broker
    settings must not leak into the bench's brokers), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBROKER_")}
    env.update(extra)
    return env


# -- processes ---------------------------------------------------------------------------------


@dataclass(eq=False)
class ManagedProcess:
    """One child process with its log file; `stop()` is idempotent."""

    name: str
    command: list[str]
    log_file: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} is not started")
        return int(self.process.pid)

    def start(self) -> ManagedProcess:
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(  # our own interpreter and redis-server, no shell
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL when it has not exited after `timeout` seconds."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                self.process.wait(timeout=timeout)
        return self.process.returncode


class ProcessSet:
    """Every process a run started; `stop_all()` stops the live ones, newest first."""

    _all: list[ProcessSet] = []  # every live set, for the atexit safety net

    def __init__(self) -> None:
        self._processes: list[ManagedProcess] = []
        ProcessSet._all.append(self)

    def add(self, process: ManagedProcess) -> ManagedProcess:
        self._processes.append(process)
        return process

    def stop(self, process: ManagedProcess) -> int | None:
        code = process.stop()
        if process in self._processes:
            self._processes.remove(process)
        return code

    def stop_all(self) -> None:
        while self._processes:
            process = self._processes.pop()
            with contextlib.suppress(Exception):
                process.stop()

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()
        with contextlib.suppress(ValueError):
            ProcessSet._all.remove(self)


@atexit.register
def _stop_leftovers() -> None:
    for group in list(ProcessSet._all):
        group.stop_all()


# -- redis ----------------------------------------------------------------------------------


def redis_command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One inline command on a fresh connection; the raw reply (b"" when nobody answers).
    A socket of its own, so it never shares (or counts as) the load's connections."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall((" ".join(args) + "\r\n").encode())
            reply = b""
            while b"\r\n" not in reply:
                chunk = sock.recv(65536)
                if not chunk:
                    return reply
                reply += chunk
            if reply.startswith(b"$"):
                header_end = reply.index(b"\r\n")
                size = int(reply[1:header_end])
                while len(reply) < header_end + 2 + size + 2:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
            return reply
    except OSError:
        return b""


@dataclass(eq=False)
class RedisProcess:
    """A redis-server of the bench alone: loopback, no persistence."""

    process: ManagedProcess
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @classmethod
    def start(cls, processes: ProcessSet, workdir: Path) -> RedisProcess:
        binary = redis_server_path()
        if binary is None:
            raise RuntimeError("redis-server is not installed (`make redis` installs it); or pass --stores memory")
        port = free_port()
        directory = workdir / f"redis-{port}"
        directory.mkdir(parents=True)
        command = [
            binary,
            "--bind",
            HOST,
            "--port",
            str(port),
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
        ]
        managed = processes.add(ManagedProcess("redis-server", command, directory / "redis.log").start())
        deadline = time.monotonic() + START_TIMEOUT
        while not redis_command(port, "PING", timeout=0.5).startswith(b"+PONG"):
            if not managed.alive():
                raise RuntimeError(f"redis-server exited: {managed.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer within {START_TIMEOUT:.0f} s")
            time.sleep(0.05)
        return cls(managed, port, directory)

    def info(self, section: str = "") -> dict[str, str]:
        """INFO as a dict."""
        raw = redis_command(self.port, "INFO", *([section] if section else []))
        body = raw.split(b"\r\n", 1)[1] if raw.startswith(b"$") else b""
        pairs = (line.split(":", 1) for line in body.decode(errors="replace").splitlines() if ":" in line)
        return {k: v for k, v in pairs}

    def counters(self) -> dict[str, int]:
        """The INFO stats counters the bench divides by validations."""
        stats = self.info("stats")
        names = ("total_commands_processed", "total_reads_processed")
        return {name: int(stats[name]) for name in names if stats.get(name, "").isdigit()}

    def flush(self) -> None:
        redis_command(self.port, "FLUSHALL")


# -- deployment -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credential:
    """An issued token and, when DPoP-bound, the secret of the key its proofs need. Bench
    material only (generated for this run); never logged."""

    token: str
    dpop_secret: bytes | None


@dataclass
class Deployment:
    """Keys and registry shared by every broker of a run (and the references' JWKS)."""

    workdir: Path
    client_key: ed25519.Ed25519PrivateKey
    api_key: str
    key_file: Path
    jwks_file: Path
    registry_file: Path
    processes: ProcessSet

    @classmethod
    def create(cls, workdir: Path, processes: ProcessSet) -> Deployment:
        key_file, jwks_file = workdir / "keys.json", workdir / "jwks.json"
        keyring = Keyring.generate()
        keyring.save(key_file)
        jwks_file.write_text(json.dumps(keyring.jwks()))
        client_key = ed25519.Ed25519PrivateKey.generate()
        api_key = generate_secret()
        registry = FileRegistry(workdir / "registry.toml")
        registry.add_client(
            ClientRecord(
                CLIENT_ID,
                status=ClientStatus.APPROVED,
                public_jwk=public_jwk(client_key),
                allowed_audiences=(AUDIENCE,),
                allowed_scopes=SCOPES,
                max_sessions=100_000,
            )
        )
        dpop_client = registry.client(CLIENT_ID)
        assert dpop_client is not None
        registry.add_client(replace(dpop_client, client_id=BEARER_CLIENT_ID, binding=Binding.BEARER))
        registry.add_server(ServerRecord(SERVER_ID, audiences=(AUDIENCE,), api_key_hash=hash_secret(api_key)))
        return cls(workdir, client_key, api_key, key_file, jwks_file, registry.path, processes)

    # -- the servers ---------------------------------------------------------------------------

    def _wait_serving(self, process: ManagedProcess, target: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not serving(target):
            if not process.alive():
                raise RuntimeError(f"{process.name} exited at startup: {process.log_tail()}")
            if time.monotonic() > deadline:
                self.processes.stop(process)
                raise RuntimeError(f"{process.name} did not become SERVING within {START_TIMEOUT:.0f} s")
            time.sleep(0.1)

    def start_broker(
        self, redis_url: str | None, *, detection: bool = True, env: Mapping[str, str] | None = None
    ) -> tuple[ManagedProcess, str]:
        """`tokenbroker serve` with the memory store (no `redis_url`) or Redis (and detection
        on, its default, or off), `env` (TOKENBROKER_* settings) added; returns the process
        and its target once health says SERVING."""
        port = free_port()
        target = f"{HOST}:{port}"
        env = _clean_env(
            {
                "TOKENBROKER_LISTEN": target,
                "TOKENBROKER_HTTP_LISTEN": f"{HOST}:0",  # gRPC is measured here; HTTP on any free port
                "TOKENBROKER_ISSUER": ISSUER,
                "TOKENBROKER_KEY_FILE": str(self.key_file),
                "TOKENBROKER_REGISTRY_FILE": str(self.registry_file),
                "TOKENBROKER_AUDIT_FILE": str(self.workdir / f"audit-{port}.jsonl"),
                "TOKENBROKER_LOG_LEVEL": "warning",
                "TOKENBROKER_GRACE_SECONDS": "1",
                **({"TOKENBROKER_REDIS_URL": redis_url} if redis_url else {}),
                **({} if detection else {"TOKENBROKER_DETECTION": "false"}),
                **(env or {}),
            }
        )
        command = [sys.executable, "-c", "from tokenbroker.cli import main; main()", "serve"]
        name = "tokenbroker serve (" + ("redis" if redis_url else "memory") + ")"
        process = ManagedProcess(name, command, self.workdir / f"broker-{port}.log", env=env, cwd=self.workdir)
        self.processes.add(process.start())
        self._wait_serving(process, target)
        return process, target

    def start_reference(self, kind: str, redis_url: str | None = None) -> tuple[ManagedProcess, str]:
        """`reference_noop` or `reference_pyjwt` (which needs `redis_url`)."""
        port = free_port()
        target = f"{HOST}:{port}"
        args: list[str] = ["--port", str(port)]
        extra: dict[str, str] = {}
        if kind == "pyjwt":
            if not redis_url:
                raise ValueError("the PyJWT reference needs a redis_url")
            args += ["--jwks", str(self.jwks_file), "--issuer", ISSUER, "--redis-url", redis_url]
            extra[API_KEY_ENV] = self.api_key
        elif kind != "noop":
            raise ValueError(f"unknown reference server {kind!r}")
        command = [sys.executable, "-m", f"tokenbroker_bench.reference_{kind}", *args]
        process = ManagedProcess(f"reference_{kind}", command, self.workdir / f"reference-{kind}-{port}.log")
        process.env = _clean_env(extra)
        self.processes.add(process.start())
        self._wait_serving(process, target)
        return process, target

    # -- tokens -----------------------------------------------------------------------------

    def issue_tokens(self, target: str, count: int, *, dpop: bool) -> list[Credential]:
        """`count` tokens, each in a session of its own, issued by the broker at `target`
        over gRPC (client assertion, as a real client); DPoP-bound to a key per token, or
        bearer."""
        credentials = []
        with BrokerClient(target, timeout=10.0) as client:
            client_id = CLIENT_ID if dpop else BEARER_CLIENT_ID
            for _ in range(count):
                signer = ProofSigner() if dpop else None
                issued = client.issue(
                    client_id=client_id,
                    client_assertion=make_client_assertion(self.client_key, client_id, ISSUER),
                    audience=AUDIENCE,
                    scopes=list(SCOPES),
                    ttl_seconds=TOKEN_TTL_SECONDS,
                    dpop_jkt=signer.jkt if signer is not None else None,
                )
                credentials.append(Credential(issued.access_token, signer.secret_bytes() if signer else None))
        return credentials


def serving(target: str, timeout: float = 0.5) -> bool:
    """True when the gRPC server at `target` answers health SERVING."""
    try:
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            answer: Any = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


__all__ = [
    "API_KEY_ENV",
    "AUDIENCE",
    "HOST",
    "HTTP_METHOD",
    "ISSUER",
    "Credential",
    "Deployment",
    "ManagedProcess",
    "ProcessSet",
    "RedisProcess",
    "free_port",
    "redis_server_path",
    "serving",
]
