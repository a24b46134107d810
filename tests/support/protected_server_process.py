"""examples/protected_server.py as a real process on a free loopback port, for end-to-end
tests: `BrokerAuthMiddleware` in front of the SDK's streamable HTTP app, validating every
request over gRPC against a broker. Ready once its protected resource metadata answers
(it needs no token); stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tokenbroker_bench.servers import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "examples" / "protected_server.py"


@dataclass
class ProtectedServerProcess:
    """`broker_target` is the broker's gRPC host:port; `options` are more command-line
    options of the example (e.g. `--authorization-server URL`, `--require-dpop-nonce`)."""

    workdir: Path
    broker_target: str
    api_key_file: Path
    options: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its MCP endpoint, which is also its resource URI (the audience of its tokens)."""
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def metadata_url(self) -> str:
        """RFC 9728 section 3.1: the well-known prefix between the host and the path."""
        return f"http://127.0.0.1:{self.port}/.well-known/oauth-protected-resource/mcp"

    @property
    def log(self) -> Path:
        return self.workdir / f"protected-server-{self.port}.log"

    def start(self, timeout: float = 30.0) -> ProtectedServerProcess:
        command = [
            sys.executable,
            str(SCRIPT),
            *("--broker", self.broker_target, "--api-key-file", str(self.api_key_file)),
            *("--audience", self.url, "--port", str(self.port)),
            *self.options,
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=log, env=dict(os.environ))
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"MCP server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.metadata_url, timeout=0.5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()  # a test that fails here must not leave a server behind
                raise RuntimeError(f"MCP server did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
