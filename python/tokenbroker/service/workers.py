"""`tokenbroker serve --workers N`: N broker processes on one listen port, so that more
than one core serves (one Python process is bound by its GIL outside the Rust engine).

The parent only supervises: it resolves the settings, loads the signing keys, registers
the demo, then starts N workers, forwards SIGTERM and SIGINT to them and waits; when one
dies unasked it says which, stops the others and fails. Each worker is a whole broker:
its own gRPC server, bound with SO_REUSEPORT so that the kernel spreads new connections
over the workers (one connection stays on its worker), its own health service, admission
bounds and Redis connections. The workers share state only through Redis, which is why
more than one needs the Redis store.

How a worker starts, and why so:

- A fresh interpreter (the CLI re-invoked as `serve --as-worker`), never a fork: gRPC is
  not fork-safe, and a fresh process inherits no state of the parent at all.
- In a process group of its own: a terminal's Ctrl-C reaches only the parent, which
  forwards it once (a second signal would cut a worker's graceful shutdown short).
- Its settings and keys arrive as one JSON line on its stdin (the handoff), never on the
  command line or in the environment: a Redis URL may hold a password, keys are secret.
  The parent loads the keys once: N workers creating a missing key file would race, and
  an ephemeral key must be one key in every worker or each refuses the others' tokens.
- The parent keeps that stdin open while the worker lives (the lifeline). End of file
  means the parent is gone, even by SIGKILL: the worker stops itself rather than serve
  on, orphaned, a port that a restarted broker would share with it unknowingly.

Per worker: the metrics endpoint (worker i serves `metrics_port + i - 1`, port 0 a free
port each; Prometheus scrapes every one and sums), the health service, the admission
bounds, and the failed-authentication and audit-refusal allowances (so the pool allows N
times the configured rates). Shared: the Redis state, the registry file (every worker
reloads it when it changes) and the audit file (one append per line: no interleaving)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from tokenbroker.config import Settings
from tokenbroker.keyring import Keyring

log = structlog.get_logger("tokenbroker")

# A worker: this interpreter running the CLI's `serve --as-worker`.
WORKER_COMMAND = (
    sys.executable,
    "-c",
    "from tokenbroker.cli import main; main(prog_name='tokenbroker')",
    "serve",
    "--as-worker",
)
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_SECONDS = 0.1
# How long past grace_seconds a worker may take to stop (closing Redis, the audit file
# and the interpreter) before the parent kills it.
STOP_MARGIN_SECONDS = 10.0


class WorkerError(Exception):
    """A worker could not be set up, died unasked, or did not stop in time; the message
    says which worker and what happened."""


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Worker `number` (from 1) of `count`; printed "1/4"."""

    number: int
    count: int

    def __str__(self) -> str:
        return f"{self.number}/{self.count}"

    def metrics_port(self, configured: int | None) -> int | None:
        """This worker's metrics port: `configured + number - 1`, so that every worker's
        counters can be scraped; 0 (a free port each) and None (off) stay as they are."""
        return configured + self.number - 1 if configured else configured


@dataclass(frozen=True, slots=True)
class Handoff:
    """What the parent gives a worker on its stdin: its slot, the settings as the parent
    resolved them (config file, environment and options), and the signing keys."""

    slot: WorkerSlot
    settings: Settings
    keyring: Keyring

    def encode(self) -> bytes:
        """One JSON line. The keys as the key file holds them (a private JWKS), the active
        key last, as `Keyring.from_jwk` reads it."""
        active = self.keyring.active_kid
        kids = [kid for kid in self.keyring.kids if kid != active] + [active]
        document = {
            "worker": self.slot.number,
            "workers": self.slot.count,
            "settings": self.settings.model_dump(mode="json"),
            "keys": {"keys": [self.keyring.to_jwk(kid, private=True) for kid in kids]},
        }
        return json.dumps(document).encode() + b"\n"

    @classmethod
    def read(cls, fd: int = 0) -> Handoff:
        """The handoff line from `fd`. Read unbuffered: what follows on the pipe is the
        lifeline, watched by `watch_parent`."""
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(fd, 65536)
            if not chunk:
                raise WorkerError(
                    "--as-worker is for the workers that `tokenbroker serve --workers N` starts: "
                    "stdin ended before the settings arrived"
                )
            data += chunk
        document = json.loads(data)
        return cls(
            WorkerSlot(int(document["worker"]), int(document["workers"])),
            Settings.model_validate(document["settings"]),
            Keyring.from_jwk(document["keys"]),
        )


def watch_parent(fd: int = 0) -> threading.Thread:
    """Stops this worker when the lifeline `fd` ends (the parent is gone): SIGTERM to
    itself, the same graceful stop as when the parent forwards one."""

    def watch() -> None:
        # os.read, not sys.stdin: a daemon thread blocked in a buffered read can abort
        # the interpreter's shutdown; a raw read just ends with the process.
        with contextlib.suppress(OSError):
            while os.read(fd, 4096):
                pass  # the parent writes nothing after the handoff
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="tb-lifeline", daemon=True)
    thread.start()
    return thread


def port_taken(listen: str) -> OSError | None:
    """The EADDRINUSE error when something already listens on `listen` ("host:port"),
    else None. The workers ask to share the port, and the kernel lets them join another
    process that asked too (a pool that never stopped, a broker of other settings) and
    split its traffic, so the parent looks first, with a probe that does not ask."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        addresses = socket.getaddrinfo(
            None if host in ("", "*") else host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError):
        return None  # the workers' own bind names what is wrong with the address
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                # As gRPC does: connections in TIME_WAIT from a stopped broker own nothing.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return exc
    return None


@dataclass(eq=False)
class _Worker:
    slot: WorkerSlot
    process: subprocess.Popen[bytes]

    def __str__(self) -> str:
        return f"worker {self.slot} (pid {self.process.pid})"

    def how_it_ended(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def close_lifeline(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()


@dataclass(eq=False)
class _Pool:
    """The parent's side: starts the workers, relays signals, watches them end."""

    settings: Settings
    keyring: Keyring
    command: Sequence[str]
    live: list[_Worker] = field(default_factory=list)
    received: list[int] = field(default_factory=list)  # signals not yet forwarded
    forwarded: set[int] = field(default_factory=set)

    @property
    def stop_seconds(self) -> float:
        return self.settings.grace_seconds + STOP_MARGIN_SECONDS

    def run(self) -> None:
        previous = {signum: signal.signal(signum, self._note) for signum in FORWARDED_SIGNALS}
        try:
            self._start()
            failure = self._supervise()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._stop_the_rest()  # none left, unless something above raised
        if failure is not None:
            raise WorkerError(failure)

    def _note(self, signum: int, frame: object) -> None:
        # A signal handler: note it only; the supervising loop forwards it.
        self.received.append(signum)

    def _start(self) -> None:
        count = self.settings.workers
        for number in range(1, count + 1):
            slot = WorkerSlot(number, count)
            # Own process group: see the module doc (signals come from the parent only).
            process = subprocess.Popen(self.command, stdin=subprocess.PIPE, process_group=0)  # noqa: S603 (our own interpreter and CLI)
            worker = _Worker(slot, process)
            self.live.append(worker)
            assert process.stdin is not None  # stdin=PIPE
            with contextlib.suppress(BrokenPipeError):  # died at once: _supervise says so
                process.stdin.write(Handoff(slot, self.settings, self.keyring).encode())
                process.stdin.flush()
            log.info(f"worker {slot} started (pid {process.pid})", worker=str(slot), pid=process.pid)

    def _supervise(self) -> str | None:
        """Waits until every worker has ended; the first failure, if any."""
        failure: str | None = None
        deadline: float | None = None  # set once the workers were asked to stop
        while True:
            while self.received:
                signum = self.received.pop(0)
                if deadline is None:
                    log.info("stopping the workers", signal=signal.Signals(signum).name)
                    deadline = time.monotonic() + self.stop_seconds
                self._signal(signum)
            for worker in [w for w in self.live if w.process.poll() is not None]:
                self.live.remove(worker)
                worker.close_lifeline()
                if deadline is None:  # nobody asked it to stop
                    failure = f"{worker} {worker.how_it_ended()}: stopped the other workers"
                    log.error(f"{worker} {worker.how_it_ended()}; stopping the other workers")
                    deadline = time.monotonic() + self.stop_seconds
                    self._signal(signal.SIGTERM)
                elif self._stopped_as_asked(worker):
                    log.info(f"{worker} stopped")
                else:
                    log.error(f"{worker} {worker.how_it_ended()} while stopping")
                    failure = failure or f"{worker} {worker.how_it_ended()} while stopping"
            if not self.live:
                return failure
            if deadline is not None and time.monotonic() > deadline:
                names = ", ".join(str(w) for w in self.live)
                self._kill_the_rest()
                return failure or f"{names} did not stop within {self.stop_seconds:g} s: killed"
            time.sleep(POLL_SECONDS)

    def _stopped_as_asked(self, worker: _Worker) -> bool:
        """Status 0, or killed by a signal it was sent before it could handle it (a
        worker asked to stop while it was still starting)."""
        code = worker.process.returncode
        return code == 0 or (code is not None and -code in self.forwarded)

    def _signal(self, signum: int) -> None:
        self.forwarded.add(signum)
        for worker in self.live:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)

    def _stop_the_rest(self) -> None:
        if not self.live:
            return
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_seconds
        for worker in self.live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        self._kill_the_rest()

    def _kill_the_rest(self) -> None:
        for worker in self.live:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            worker.process.wait()
            worker.close_lifeline()
        self.live.clear()


def run_workers(settings: Settings, keyring: Keyring, *, command: Sequence[str] = WORKER_COMMAND) -> None:
    """Runs `settings.workers` workers of `settings`, signing with `keyring`, until
    SIGTERM or SIGINT (forwarded to each) has stopped them all. Raises `WorkerError`
    when one dies unasked (after stopping the others), ends badly while stopping, or is
    still running `grace_seconds` + `STOP_MARGIN_SECONDS` after being asked to stop."""
    _Pool(settings, keyring, tuple(command)).run()


__all__ = ["WORKER_COMMAND", "Handoff", "WorkerError", "WorkerSlot", "port_taken", "run_workers", "watch_parent"]
