"""A real Caddy (Debian's, `make gateways` installs it) running the shipped
contrib/gateways/Caddyfile in front of an MCP server, on a free loopback port: the shipped
file with its documented example addresses replaced, the site served over plain HTTP on
127.0.0.1, Caddy's admin endpoint off and its data under the test's directory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenbroker_bench.servers import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
SHIPPED = ROOT / "contrib" / "gateways" / "Caddyfile"
UPSTREAM, BROKER, SITE = "127.0.0.1:8000", "127.0.0.1:8080", "mcp.example.com {"


def caddy_binary() -> str:
    found = shutil.which("caddy")
    if found is None:
        raise RuntimeError("caddy is missing: run `make gateways` (as root: apt-get install caddy)")
    return found


@dataclass
class CaddyGateway:
    workdir: Path
    upstream_port: int
    broker_port: int
    api_key: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self, timeout: float = 20.0) -> CaddyGateway:
        self.workdir.mkdir(parents=True, exist_ok=True)
        text = SHIPPED.read_text()
        for example in (UPSTREAM, BROKER, SITE):
            assert example in text, f"{SHIPPED.name} no longer holds {example!r}: update tests/support/caddy_gateway.py"
        text = (
            text.replace(UPSTREAM, f"127.0.0.1:{self.upstream_port}")
            .replace(BROKER, f"127.0.0.1:{self.broker_port}")
            .replace(SITE, f"http://127.0.0.1:{self.port} {{")
        )
        config = self.workdir / "Caddyfile"
        config.write_text("{\n\tadmin off\n\tauto_https off\n}\n\n" + text)
        env = {
            **os.environ,
            "TOKENBROKER_GATEWAY_API_KEY": self.api_key,
            "HOME": str(self.workdir),
            "XDG_DATA_HOME": str(self.workdir / "data"),
            "XDG_CONFIG_HOME": str(self.workdir / "config"),
        }
        log = (self.workdir / "caddy.log").open("ab")
        command = [caddy_binary(), "run", "--config", str(config), "--adapter", "caddyfile"]
        self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"caddy exited: {(self.workdir / 'caddy.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("caddy did not listen in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def log(self) -> str:
        path = self.workdir / "caddy.log"
        return path.read_text() if path.exists() else ""


__all__ = ["CaddyGateway", "caddy_binary"]
