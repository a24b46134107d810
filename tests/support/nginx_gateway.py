"""A real nginx (Debian's, `make gateways` installs it) running the shipped
contrib/gateways/nginx.conf in front of an MCP server, on free loopback ports: the shipped
file with its documented example addresses replaced, inside a main configuration whose
paths are all under the test's directory. Stopped with SIGQUIT (graceful), then SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenbroker_bench.servers import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
SHIPPED = ROOT / "contrib" / "gateways" / "nginx.conf"
# The example addresses the shipped file documents; each must be there to be replaced.
UPSTREAM, BROKER, LISTEN, KEY_INCLUDE, PUBLIC_HOST = (
    "127.0.0.1:8000",
    "127.0.0.1:8080",
    "listen 127.0.0.1:8443;",
    "/etc/nginx/tokenbroker-api-key.conf",
    'set $tokenbroker_public_host "mcp.example.com";',
)


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if found is None:
        raise RuntimeError("nginx is missing: run `make gateways` (as root: apt-get install nginx)")
    return found


def render(
    text: str, *, upstream_port: int, broker_port: int, listen_port: int, key_include: Path, shipped: bool = True
) -> str:
    """A configuration (the shipped one: each example address must be there) with the
    test's addresses."""
    for example in (UPSTREAM, BROKER, LISTEN, KEY_INCLUDE, PUBLIC_HOST) if shipped else ():
        if example not in text:
            raise AssertionError(f"{SHIPPED.name} no longer holds {example!r}: update tests/support/nginx_gateway.py")
    return (
        text.replace(UPSTREAM, f"127.0.0.1:{upstream_port}")
        .replace(BROKER, f"127.0.0.1:{broker_port}")
        .replace(LISTEN, f"listen 127.0.0.1:{listen_port};")
        .replace(KEY_INCLUDE, str(key_include))
        .replace(PUBLIC_HOST, f'set $tokenbroker_public_host "127.0.0.1:{listen_port}";')
    )


def main_conf(workdir: Path, site: Path) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the test's 0700 directory
    temp = "\n".join(
        f"    {name}_temp_path {workdir / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}daemon off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    access_log {workdir / "access.log"};
{temp}
    include {site};
}}
"""


@dataclass
class NginxGateway:
    """nginx with the shipped site, `api_key` in its include file."""

    workdir: Path
    upstream_port: int
    broker_port: int
    api_key: str
    port: int = field(default_factory=free_port)
    site_text: str | None = None  # another site than the shipped one (the latency bench's plain proxy)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def conf(self) -> Path:
        return self.workdir / "nginx.conf"

    def write(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        key_include = self.workdir / "tokenbroker-api-key.conf"
        key_include.write_text(f'proxy_set_header X-Tokenbroker-Api-Key "{self.api_key}";\n')
        key_include.chmod(0o600)
        site = self.workdir / "site.conf"
        text = self.site_text if self.site_text is not None else SHIPPED.read_text()
        site.write_text(
            render(
                text,
                upstream_port=self.upstream_port,
                broker_port=self.broker_port,
                listen_port=self.port,
                key_include=key_include,
                shipped=self.site_text is None,
            )
        )
        self.conf.write_text(main_conf(self.workdir, site))
        return self.conf

    def check(self) -> subprocess.CompletedProcess[str]:
        """`nginx -t` on the configuration."""
        self.write()
        command = [
            nginx_binary(),
            "-t",
            "-p",
            str(self.workdir),
            "-c",
            str(self.conf),
            "-e",
            str(self.workdir / "error.log"),
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)

    def start(self, timeout: float = 15.0) -> NginxGateway:
        self.write()
        log = (self.workdir / "nginx.out").open("ab")
        command = [nginx_binary(), "-p", str(self.workdir), "-c", str(self.conf), "-e", str(self.workdir / "error.log")]
        self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.workdir / 'error.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not listen in time")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def error_log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text() if path.exists() else ""


__all__ = ["SHIPPED", "NginxGateway", "nginx_binary", "render"]
