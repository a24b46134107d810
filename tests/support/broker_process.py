"""A real `tokenbroker serve` process for end-to-end tests, configured through
TOKENBROKER_* environment variables, on a free 127.0.0.1 port, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenbroker_bench.servers import free_port


@dataclass
class BrokerProcess:
    workdir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        """The HTTP door's base URL (what `public_url` is unless the test set it)."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"broker-{self.port}.log"

    def start(self, timeout: float = 30.0) -> BrokerProcess:
        env = {
            **os.environ,
            "TOKENBROKER_HTTP_LISTEN": f"127.0.0.1:{self.http_port}",
            **self.env,
            "TOKENBROKER_LISTEN": self.target,
        }
        command = [sys.executable, "-c", "from tokenbroker.cli import main; main()", "serve"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, cwd=self.workdir, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self.serving():
            if self.process.poll() is not None:
                raise RuntimeError(f"broker exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.process.kill()  # a test that fails here must not leave a broker behind
                self.process.wait()
                raise RuntimeError(f"broker did not become SERVING: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        return self

    def serving(self) -> bool:
        try:
            with grpc.insecure_channel(self.target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def broker_env(
    workdir: Path, issuer: str, *, audit: bool = True, grace_seconds: float = 1, **settings: str
) -> dict[str, str]:
    """The TOKENBROKER_* settings of a test broker whose key, registry (and audit) files
    live in `workdir`; `settings` adds more, by setting name (`log_level="warning"`)."""
    env = {
        "TOKENBROKER_ISSUER": issuer,
        "TOKENBROKER_KEY_FILE": str(workdir / "keys.json"),
        "TOKENBROKER_REGISTRY_FILE": str(workdir / "registry.toml"),
        "TOKENBROKER_GRACE_SECONDS": f"{grace_seconds:g}",
    }
    if audit:
        env["TOKENBROKER_AUDIT_FILE"] = str(workdir / "audit.jsonl")
    env.update({f"TOKENBROKER_{name.upper()}": value for name, value in settings.items()})
    return env
