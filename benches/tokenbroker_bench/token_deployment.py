"""The processes and registered clients of the token endpoint bench (`benches/token_endpoint.py`),
all on 127.0.0.1 free ports:

- `tokenbroker serve` with its HTTP door (memory store, or the bench's redis-server), the
  issuer being the door's own URL, so that an SDK client can follow discovery to it;
- `token_http_server`: the same HTTP app under uvicorn with a chosen HTTP implementation
  and event loop (h11, httptools, uvloop), to choose the stack by measurement;
- `resource_stub`: a protected resource that answers 401 and publishes its RFC 9728
  metadata, for the SDK-style loop.

One client per assertion algorithm (EdDSA, ES256, RS256; `binding` bearer, what the SDK's
providers need) and one EdDSA client with `binding` dpop. Their private keys are this run's
own, generated here, and only ever handed to a child process on its stdin."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tokenbroker.client_assertion import PrivateKey, public_jwk
from tokenbroker.keyring import Keyring
from tokenbroker.registry import Binding, ClientRecord, ClientStatus
from tokenbroker.registry_file import FileRegistry
from tokenbroker_bench.servers import HOST, START_TIMEOUT, ManagedProcess, ProcessSet, free_port

SCOPE = "tools:call"
RSA_BITS = 2048  # what an SDK user generates; the broker takes 2048 to 8192
MAX_SESSIONS = 1000  # a DPoP client's concurrent instances (one session per DPoP key)
STORES = ("memory", "redis")
# name -> (HTTP implementation, event loop, socket) of the stacks compared: uvicorn's names,
# and how the listening socket is made (`token_http_server`: "proto0" is `serve`'s bind before the TCP_NODELAY fix).
STACKS = {
    "h11-proto0-socket": ("h11", "asyncio", "proto0"),
    "h11": ("h11", "asyncio", "nodelay"),
    "httptools": ("httptools", "asyncio", "nodelay"),
    "httptools+uvloop": ("httptools", "uvloop", "nodelay"),
}


@dataclass(frozen=True, slots=True)
class BenchClient:
    """A registered client and its private key (this run's, never logged)."""

    client_id: str
    algorithm: str  # the JWS algorithm of its assertions
    binding: str  # "bearer" or "dpop"
    key: PrivateKey

    def private_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii")


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """A child's environment: ours without TOKENBROKER_* (a user's own broker settings must
    not reach the bench's servers), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBROKER_")}
    env.update(extra)
    return env


def _generate(algorithm: str) -> PrivateKey:
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise ValueError(f"no client key for algorithm {algorithm!r}: EdDSA, ES256 or RS256")


@dataclass(eq=False)
class HttpServerProcess:
    """A running HTTP door: the process, its base URL (= the issuer) and what runs it."""

    process: ManagedProcess
    url: str
    label: str

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def pid(self) -> int:
        return self.process.pid


def http_status(url: str, path: str, timeout: float = 1.0) -> int | None:
    """The status of GET `path` at `url` (http://127.0.0.1:port), None when nobody answers."""
    host_port = url.removeprefix("http://")
    host, _, port = host_port.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


@dataclass
class TokenDeployment:
    """Keys, registry and clients shared by every server of one run."""

    workdir: Path
    processes: ProcessSet
    key_file: Path
    registry_file: Path
    audience: str  # the resource stub's URL: the one audience every client may have
    resource_port: int
    clients: dict[str, BenchClient]  # by (algorithm, binding) name, e.g. "EdDSA/bearer"
    extra_path: str | None = None  # put first on PYTHONPATH of the stack servers only (httptools, uvloop)

    @classmethod
    def create(cls, workdir: Path, processes: ProcessSet, *, extra_path: str | None = None) -> TokenDeployment:
        key_file = workdir / "keys.json"
        Keyring.generate().save(key_file)
        resource_port = free_port()
        audience = f"http://{HOST}:{resource_port}/mcp"
        registry = FileRegistry(workdir / "registry.toml")
        clients: dict[str, BenchClient] = {}
        for algorithm, binding in (("EdDSA", "bearer"), ("ES256", "bearer"), ("RS256", "bearer"), ("EdDSA", "dpop")):
            client = BenchClient(f"bench-{algorithm.lower()}-{binding}", algorithm, binding, _generate(algorithm))
            registry.add_client(
                ClientRecord(
                    client.client_id,
                    status=ClientStatus.APPROVED,
                    public_jwk=public_jwk(client.key),
                    allowed_audiences=(audience,),
                    allowed_scopes=(SCOPE,),
                    max_sessions=MAX_SESSIONS,
                    binding=Binding(binding),
                )
            )
            clients[f"{algorithm}/{binding}"] = client
        return cls(workdir, processes, key_file, registry.path, audience, resource_port, clients, extra_path)

    def _env(self, http_port: int, redis_url: str | None, **extra: str) -> dict[str, str]:
        url = f"http://{HOST}:{http_port}"
        env = {
            "TOKENBROKER_LISTEN": f"{HOST}:{free_port()}",
            "TOKENBROKER_HTTP_LISTEN": f"{HOST}:{http_port}",
            "TOKENBROKER_PUBLIC_URL": url,
            "TOKENBROKER_KEY_FILE": str(self.key_file),
            "TOKENBROKER_REGISTRY_FILE": str(self.registry_file),
            # A grant writes its audit line, as in production: that is part of its cost.
            "TOKENBROKER_AUDIT_FILE": str(self.workdir / f"audit-{http_port}.jsonl"),
            "TOKENBROKER_LOG_LEVEL": "warning",
            "TOKENBROKER_GRACE_SECONDS": "1",
            **({"TOKENBROKER_REDIS_URL": redis_url} if redis_url else {}),
            **extra,
        }
        return _clean_env(env)

    def _start(self, name: str, command: list[str], env: dict[str, str], url: str) -> HttpServerProcess:
        port = url.rpartition(":")[2]
        process = ManagedProcess(name, command, self.workdir / f"{name.split()[0]}-{port}.log", env=env)
        process.cwd = self.workdir
        self.processes.add(process.start())
        deadline = time.monotonic() + START_TIMEOUT
        while http_status(url, "/healthz", timeout=0.5) != 200:
            if not process.alive():
                raise RuntimeError(f"{name} exited at startup: {process.log_tail()}")
            if time.monotonic() > deadline:
                self.processes.stop(process)
                raise RuntimeError(f"{name} did not answer GET /healthz within {START_TIMEOUT:.0f} s")
            time.sleep(0.1)
        return HttpServerProcess(process, url, name)

    def start_serve(self, redis_url: str | None = None, env: dict[str, str] | None = None) -> HttpServerProcess:
        """`tokenbroker serve` (gRPC and HTTP, as shipped) on the memory store or Redis,
        `env` (TOKENBROKER_* settings) added."""
        port = free_port()
        command = [sys.executable, "-c", "from tokenbroker.cli import main; main()", "serve"]
        name = "serve " + ("redis" if redis_url else "memory")
        return self._start(name, command, self._env(port, redis_url, **(env or {})), f"http://{HOST}:{port}")

    def start_stack(self, stack: str, redis_url: str | None = None) -> HttpServerProcess:
        """The HTTP app alone under uvicorn with the `stack`'s HTTP implementation and loop."""
        http, loop, how = STACKS[stack]
        port = free_port()
        command = [sys.executable, "-m", "tokenbroker_bench.token_http_server", "--http", http, "--loop", loop]
        command += ["--socket", how]
        env = self._env(port, redis_url)
        if self.extra_path:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (self.extra_path, env.get("PYTHONPATH")) if p)
        return self._start(f"stack-{stack}", command, env, f"http://{HOST}:{port}")

    def start_resource(self, issuer: str) -> HttpServerProcess:
        """The protected resource of the SDK-style loop, its metadata naming `issuer`."""
        url = f"http://{HOST}:{self.resource_port}"
        command = [
            sys.executable,
            "-m",
            "tokenbroker_bench.resource_stub",
            "--port",
            str(self.resource_port),
            "--resource",
            self.audience,
            "--issuer",
            issuer,
        ]
        return self._start("resource-stub", command, _clean_env({}), url)


def probe_auto_http() -> str:
    """Which HTTP implementation uvicorn's `http="auto"` (what `tokenbroker serve` uses)
    picks in a child with `start_serve`'s environment: httptools when it is importable
    there, else h11."""
    code = "import importlib.util, json; print(json.dumps(importlib.util.find_spec('httptools') is not None))"
    env = _clean_env({})
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return "httptools" if json.loads(done.stdout) else "h11"


__all__ = [
    "SCOPE",
    "STACKS",
    "STORES",
    "BenchClient",
    "HttpServerProcess",
    "TokenDeployment",
    "http_status",
    "probe_auto_http",
]
