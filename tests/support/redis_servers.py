"""Real redis-server processes for tests: a standalone server and a three-master Redis
Cluster, on free 127.0.0.1 ports, in temporary directories, never persisting to disk.

Plain helpers (no pytest): `RedisServer.start()`, `.stop()`, `.kill()` (SIGKILL),
`.restart()` (same port, empty data); `RedisCluster.start()`, `.stop()`. Every process
started here is also stopped at interpreter exit, whatever happened to the tests."""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenbroker_bench.servers import free_port, redis_command

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
HOST = "127.0.0.1"

_live: set[RedisServer] = set()


def _command(port: int, *args: str, timeout: float = 0.5) -> bytes:
    """One inline command on a fresh connection (the bench's helper; a short timeout here)."""
    return redis_command(port, *args, timeout=timeout)


@dataclass(eq=False)
class RedisServer:
    """One redis-server process. `port` stays the same across `restart()`."""

    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tb-redis-")))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Starts the server and waits until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            REDIS_SERVER,
            "--bind",
            HOST,
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _live.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited: {self.log_tail()}")
            if _command(self.port, "PING").startswith(b"+PONG"):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout} s")

    def kill(self) -> None:
        """SIGKILL: the server vanishes at once, as in a crash (a paused one too)."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None
        _live.discard(self)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung Redis)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stops the server (nothing to save: SIGKILL) and removes its directory."""
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Kills the server (if running) and starts a fresh, empty one on the same port."""
        self.kill()
        return self.start(timeout)

    def info(self, section: str = "") -> dict[str, str]:
        """INFO as a dict (a raw socket, so it never shares a client under test)."""
        raw = _command(self.port, "INFO", *([section] if section else []), timeout=2.0)
        body = raw.split(b"\r\n", 1)[1] if raw.startswith(b"$") else b""
        pairs = (line.split(":", 1) for line in body.decode().splitlines() if ":" in line)
        return {k: v for k, v in pairs}

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.directory / "redis.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""


@dataclass(eq=False)
class RedisCluster:
    """A Redis Cluster of `size` masters, each with `replicas` replicas, all on loopback.
    A replica is promoted `node_timeout_ms` after its master stops answering, however far
    behind it is (`cluster-replica-validity-factor 0`: the chaos suite's lagging replica)."""

    size: int = 3
    replicas: int = 0
    node_timeout_ms: int = 2000
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def port(self) -> int:
        return self.nodes[0].port

    def start(self, timeout: float = 30.0) -> RedisCluster:
        for _ in range(self.size * (1 + self.replicas)):
            node = RedisServer()
            node.extra_args = (
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node.directory / "nodes.conf"),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--cluster-port",
                str(free_port()),
                "--cluster-replica-validity-factor",
                "0",
            )
            self.nodes.append(node.start())
        try:
            addresses = [n.address for n in self.nodes]
            replicas = ("--cluster-replicas", str(self.replicas))
            subprocess.run(
                [REDIS_CLI, "--cluster", "create", *addresses, *replicas, "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Waits until every running node reports cluster_state:ok (and, with replicas,
        every replica is linked to its master)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [n for n in self.nodes if n.process is not None]
            if all(b"cluster_state:ok" in _command(n.port, "CLUSTER", "INFO") for n in live) and all(
                n.info("replication").get("master_link_status", "up") == "up" for n in live
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def role(self, node: RedisServer) -> str:
        """ "master" or "slave", as the node says now."""
        return node.info("replication").get("role", "")

    def masters(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.process is not None and self.role(n) == "master"]

    def replica_of(self, master: RedisServer) -> RedisServer:
        """The (first) running replica of `master`."""
        for node in self.nodes:
            if node is not master and node.process is not None:
                info = node.info("replication")
                if info.get("role") == "slave" and info.get("master_port") == str(master.port):
                    return node
        raise LookupError(f"no replica of the master on port {master.port}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes.clear()


@atexit.register
def _stop_everything() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.stop()
