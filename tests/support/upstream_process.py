"""examples/gateway_upstream.py (an MCP SDK server with no auth code) as a real process on
a free loopback port; ready once it answers HTTP at all; stopped with SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tokenbroker_bench.servers import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "examples" / "gateway_upstream.py"


@dataclass
class UpstreamProcess:
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self, timeout: float = 30.0) -> UpstreamProcess:
        log = (self.workdir / f"upstream-{self.port}.log").open("ab")
        command = [sys.executable, str(SCRIPT), "--port", str(self.port), "--json-response"]
        self.process = subprocess.Popen(command, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the upstream exited: {(self.workdir / f'upstream-{self.port}.log').read_text()}")
            try:
                httpx.get(self.url, timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the upstream MCP server did not answer in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


__all__ = ["UpstreamProcess"]
