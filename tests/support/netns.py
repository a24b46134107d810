"""Real network namespaces for end-to-end tests: one server namespace and two host
namespaces, each host joined to the server by its own veth pair, the two hosts in
different /16s (10.71 and 10.72), so the broker sees two genuinely different client
networks without any address outside these namespaces and their loopbacks.

    srv  10.71.0.1/24 <-veth-> 10.71.0.2/24  a
    srv  10.72.0.1/24 <-veth-> 10.72.0.2/24  b

Names are unique per run (`tbXXXX-srv`, `-a`, `-b`), so parallel runs and leftovers of a
crashed one never collide. `Namespaces.delete` (run by the `namespaces()` context manager
even on failure) stops what still runs inside them (processes this test started: nothing
else can be in a namespace created here) and deletes them, which removes the veths.

Creating namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and `ip` (iproute2);
without them `NetnsError` says so: the test fails, it never skips."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

IP = shutil.which("ip") or "/usr/sbin/ip"
SERVER_A, HOST_A = "10.71.0.1", "10.71.0.2"  # srv <-> a
SERVER_B, HOST_B = "10.72.0.1", "10.72.0.2"  # srv <-> b
COMMAND_SECONDS = 10.0  # every `ip` command is bounded


class NetnsError(RuntimeError):
    """A namespace could not be created or set up (the message says which step and why)."""


def _ip(*args: str) -> str:
    try:
        done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=COMMAND_SECONDS, check=False)
    except FileNotFoundError:
        raise NetnsError(f"{IP} not found: network namespaces need iproute2 (apt-get install iproute2)") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"ip {' '.join(args)} did not finish within {COMMAND_SECONDS:g} s") from None
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@dataclass
class Namespaces:
    """The three namespaces of one run (see module doc)."""

    tag: str = field(default_factory=lambda: "tb" + secrets.token_hex(2))
    created: list[str] = field(default_factory=list)

    @property
    def server(self) -> str:
        return f"{self.tag}-srv"

    @property
    def a(self) -> str:
        return f"{self.tag}-a"

    @property
    def b(self) -> str:
        return f"{self.tag}-b"

    def create(self) -> Namespaces:
        """Creates the namespaces, the veth pairs and their addresses, loopbacks up.
        Raises `NetnsError` (after removing whatever it made) when any step fails."""
        if os.geteuid() != 0:
            raise NetnsError(f"network namespaces need root; this test runs as uid {os.geteuid()}")
        try:
            for name in (self.server, self.a, self.b):
                _ip("netns", "add", name)
                self.created.append(name)
                _ip("-n", name, "link", "set", "lo", "up")
            for host, server_address, host_address in ((self.a, SERVER_A, HOST_A), (self.b, SERVER_B, HOST_B)):
                side = host.rsplit("-", 1)[1]
                server_end, host_end = f"{self.tag}s{side}", f"{self.tag}{side}s"  # at most 15 characters
                # Created inside the server namespace: the root namespace never holds them.
                _ip("-n", self.server, "link", "add", server_end, "type", "veth", "peer", "name", host_end)
                _ip("-n", self.server, "link", "set", host_end, "netns", host)
                _ip("-n", self.server, "addr", "add", f"{server_address}/24", "dev", server_end)
                _ip("-n", host, "addr", "add", f"{host_address}/24", "dev", host_end)
                _ip("-n", self.server, "link", "set", server_end, "up")
                _ip("-n", host, "link", "set", host_end, "up")
        except NetnsError:
            self.delete()
            raise
        return self

    def command(self, namespace: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside `namespace` (`ip netns exec` execs it: its pid is the process's)."""
        return [IP, "netns", "exec", namespace, *argv]

    def pids(self, namespace: str) -> list[int]:
        """The processes running inside `namespace`."""
        try:
            return [int(p) for p in _ip("netns", "pids", namespace).split()]
        except NetnsError:
            return []

    def delete(self) -> None:
        """Stops what still runs inside the namespaces (SIGKILL: the test's own processes,
        left behind by a failure), then deletes them. Never raises."""
        for name in reversed(self.created):
            for pid in self.pids(name):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with suppress(NetnsError):
                _ip("netns", "del", name)
        self.created.clear()


@contextmanager
def namespaces() -> Iterator[Namespaces]:
    """Fresh namespaces (see module doc), deleted on exit whatever happened."""
    made = Namespaces().create()
    try:
        yield made
    finally:
        made.delete()


@dataclass
class NamespacedProcess:
    """One process inside a namespace, its output in `log`; stopped with SIGTERM, then
    SIGKILL when it does not end within `stop_seconds`."""

    namespaces: Namespaces
    namespace: str
    argv: Sequence[str]
    log: Path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    stdout: int | None = None  # subprocess.PIPE: read `process.stdout` (then `log` holds stderr only)
    stop_seconds: float = 10.0
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> NamespacedProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.namespaces.command(self.namespace, self.argv),
                env={**os.environ, **self.env},
                cwd=self.cwd,
                stdout=self.stdout if self.stdout is not None else log,
                stderr=log,
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, chars: int = 3000) -> str:
        """The end of its log, for a failure's message."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.stop_seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def wait_for(self, ready: str, timeout: float) -> None:
        """Waits until `ready` appears in its log; `RuntimeError` (with the log's end) when
        it exits first or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while ready not in self.tail(1_000_000):
            if not self.alive():
                raise RuntimeError(f"{self.argv[:3]} exited before {ready!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.argv[:3]} did not print {ready!r} within {timeout:g} s:\n{self.tail()}")
            time.sleep(0.05)


__all__ = [
    "HOST_A",
    "HOST_B",
    "SERVER_A",
    "SERVER_B",
    "NamespacedProcess",
    "Namespaces",
    "NetnsError",
    "namespaces",
]
