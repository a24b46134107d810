"""`tokenbroker serve --workers N` (issue 9, section 7): what it refuses, the handoff a
worker gets from its parent, and, with real processes and a real redis-server on
loopback, that the workers share the port and the Redis state, stop together, and do not
outlive a worker that died or a parent that was killed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from tokenbroker import Broker, Keyring, MemoryStore, ProofSigner, Reason
from tokenbroker.cli import main
from tokenbroker.client import BrokerClient
from tokenbroker.client_assertion import make_client_assertion
from tokenbroker.config import Settings
from tokenbroker.service.server import build_server
from tokenbroker.service.workers import Handoff, WorkerSlot, port_taken
from tokenbroker_bench.servers import free_port

from support.grpc_servers import RecordingAudit, SecretAuthenticator, default_registry
from support.redis_servers import RedisServer

ISSUER = "https://broker.workers.test"
AUDIENCE = "http://127.0.0.1:8000/mcp"  # the demo's default audience
GRACE_SECONDS = 2.0
# A new TCP connection per channel: grpc would otherwise share one between channels of a
# process, and every call would reach the same worker.
FRESH_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
CLI = (sys.executable, "-c", "from tokenbroker.cli import main; main()")


@pytest.fixture
def env(tmp_path: Path, no_tokenbroker_env: None) -> dict[str, str]:
    return {
        "TOKENBROKER_REGISTRY_FILE": str(tmp_path / "registry.toml"),
        "TOKENBROKER_ISSUER": ISSUER,
        "TOKENBROKER_AUDIT_FILE": str(tmp_path / "audit.jsonl"),
        "TOKENBROKER_GRACE_SECONDS": str(GRACE_SECONDS),
    }


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


# -- what --workers refuses, before any process starts ---------------------------------------


def test_more_than_one_worker_on_the_memory_store_is_a_usage_error(env: dict[str, str]) -> None:
    result = run(env, "serve", "--workers", "2")
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert (
        "--workers 2 needs the Redis store (redis_url): each worker would have its own in-memory sessions and "
        "replay records, so a proof replayed to another worker would pass"
    ) in message


def test_the_workers_setting_is_refused_on_the_memory_store_too(env: dict[str, str]) -> None:
    result = run({**env, "TOKENBROKER_WORKERS": "3"}, "serve")
    assert result.exit_code == 2
    assert "--workers 3 needs the Redis store" in result.stderr


def test_workers_are_bounded_by_the_setting(env: dict[str, str]) -> None:
    result = run(env, "serve", "--workers", "65", "--redis-url", "redis://127.0.0.1:1/0")
    assert result.exit_code == 1
    assert "invalid setting workers (TOKENBROKER_WORKERS): 65 is out of range: use 1 to 64" in result.stderr


def test_workers_need_a_fixed_port(env: dict[str, str]) -> None:
    result = run(env, "serve", "--workers", "2", "--redis-url", "redis://127.0.0.1:1/0", "--listen", "127.0.0.1:0")
    assert result.exit_code == 2
    assert "needs a fixed port" in result.stderr


def test_workers_need_room_for_their_metrics_ports(env: dict[str, str]) -> None:
    result = run(
        {**env, "TOKENBROKER_METRICS_PORT": "65535"},
        *("serve", "--workers", "2", "--redis-url", "redis://127.0.0.1:1/0", "--listen", "127.0.0.1:50999"),
    )
    assert result.exit_code == 2
    assert "metrics_port to metrics_port + 1" in result.stderr


def test_workers_refuse_a_port_another_process_listens_on(env: dict[str, str]) -> None:
    # Without the probe, workers asking for SO_REUSEPORT would join a listener that asked
    # for it too and split its traffic; this one did not ask, which the probe sees alike.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        listen = f"127.0.0.1:{other.getsockname()[1]}"
        assert port_taken(listen) is not None
        result = run(env, "serve", "--workers", "2", "--redis-url", "redis://127.0.0.1:1/0", "--listen", listen)
    assert result.exit_code == 1
    assert f"cannot listen on {listen}" in result.stderr
    assert port_taken(listen) is None


# -- the pieces: the handoff, the slots, the server's port sharing ---------------------------


def test_the_handoff_carries_the_settings_and_keys_through_a_pipe(env: dict[str, str]) -> None:
    keyring = Keyring.generate()
    old_kid = keyring.active_kid
    keyring.rotate()
    settings = Settings.load(redis_url="redis://:hunter2@127.0.0.1:6379/0", workers=4, metrics_port=9100)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, Handoff(WorkerSlot(3, 4), settings, keyring).encode())
        handoff = Handoff.read(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert handoff.slot == WorkerSlot(3, 4)
    assert str(handoff.slot) == "3/4"
    assert handoff.settings == settings
    assert handoff.keyring.active_kid == keyring.active_kid
    assert set(handoff.keyring.kids) == {old_kid, keyring.active_kid}
    # A token the parent's keys sign is one the worker's keys verify (one store: as Redis).
    store = MemoryStore()
    issued = Broker(keyring, issuer=ISSUER, store=store).issue(client_id="c", audience=AUDIENCE, scopes=["s"])
    assert Broker(handoff.keyring, issuer=ISSUER, store=store).validate(issued.access_token, audience=AUDIENCE).valid


def test_each_worker_serves_metrics_on_its_own_port() -> None:
    assert [WorkerSlot(n, 3).metrics_port(9100) for n in (1, 2, 3)] == [9100, 9101, 9102]
    assert WorkerSlot(2, 3).metrics_port(0) == 0
    assert WorkerSlot(2, 3).metrics_port(None) is None


def test_only_servers_built_to_share_a_port_share_it() -> None:
    """grpc asks for SO_REUSEPORT by default on Linux; the broker asks only as a worker."""
    registry = default_registry()

    def server(port: int, reuse_port: bool) -> Any:
        return build_server(
            Broker(Keyring.generate(), issuer=ISSUER),
            registry=registry,
            authenticator=SecretAuthenticator(registry),
            audit=RecordingAudit(),
            listen=f"127.0.0.1:{port}",
            reuse_port=reuse_port,
        )

    port = free_port()
    alone = server(port, reuse_port=False)
    alone.start()
    try:
        with pytest.raises(RuntimeError, match="bind"):
            server(port, reuse_port=True)
    finally:
        alone.stop(None)
    first, second = server(port, reuse_port=True), server(port, reuse_port=True)
    for shared in (first, second):
        shared.start()
    for shared in (first, second):
        shared.stop(None)


# -- real processes: a pool of two workers on a real redis-server ----------------------------


def free_port_pair() -> int:
    """A free port whose successor is free too (the two workers' metrics ports)."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def children_of(pid: int) -> set[int]:
    """The live processes whose parent is `pid` (from /proc; zombies do not count)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            state, ppid = (entry / "stat").read_text().rpartition(")")[2].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def validations(metrics_port: int) -> dict[str, float]:
    """One worker's validation counters by reason, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as answer:
        text = answer.read().decode()
    pattern = r'^tokenbroker_validations_total\{reason="(\w+)"\} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.MULTILINE)}


@dataclass
class Pool:
    """A `tokenbroker serve --workers 2 --demo` process and what it wrote."""

    workdir: Path
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    http_port: int
    worker_pids: dict[int, int] = field(default_factory=dict)  # worker number -> pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return (self.workdir / "pool.log").read_text()

    def started(self) -> bool:
        """True once both workers are started and their metrics endpoints answer."""
        self.worker_pids = {int(n): int(p) for n, p in re.findall(r"worker (\d)/2 started \(pid (\d+)\)", self.log)}
        if len(self.worker_pids) < 2:
            return False
        try:
            for metrics_port in (self.metrics_port, self.metrics_port + 1):
                validations(metrics_port)
        except OSError:
            return False
        return True

    def which_worker(self, call: Callable[[], Any], reason: str) -> tuple[Any, int]:
        """`call()`'s result and the worker (1 or 2) whose `reason` counter it moved."""
        ports = (self.metrics_port, self.metrics_port + 1)
        before = [validations(p).get(reason, 0.0) for p in ports]
        result = call()
        after = [validations(p).get(reason, 0.0) for p in ports]
        moved = [n for n, (b, a) in enumerate(zip(before, after, strict=True), start=1) if a > b]
        assert len(moved) == 1, (before, after)
        return result, moved[0]

    def kill_everything(self) -> None:
        """SIGKILL the parent and any worker still running (a failed test leaves none)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.worker_pids.values():
            with contextlib.suppress(OSError):
                if b"--as-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def pool(env: dict[str, str], tmp_path: Path, redis_server: RedisServer) -> Iterator[Pool]:
    port, metrics_port, http_port = free_port(), free_port_pair(), free_port()
    command = [*CLI, "serve", "--workers", "2", "--redis-url", redis_server.url, "--listen", f"127.0.0.1:{port}"]
    command += ["--http-listen", f"127.0.0.1:{http_port}"]  # shared by the workers too
    command += ["--demo", "--demo-dir", str(tmp_path / "demo")]
    with (tmp_path / "pool.log").open("wb") as log:
        process = subprocess.Popen(
            command,
            env={**os.environ, **env, "TOKENBROKER_METRICS_PORT": str(metrics_port)},
            cwd=tmp_path,
            stdout=log,
            stderr=log,
        )
    running = Pool(tmp_path, process, port, metrics_port, http_port)
    try:
        deadline = time.monotonic() + 60
        while not running.started():
            assert process.poll() is None, running.log[-3000:]
            assert time.monotonic() < deadline, f"the workers did not start: {running.log[-3000:]}"
            time.sleep(0.1)
        yield running
    finally:
        running.kill_everything()


def client(pool: Pool, api_key: str | None = None) -> BrokerClient:
    return BrokerClient(pool.target, api_key=api_key, timeout=10, options=FRESH_CONNECTION)


def test_two_workers_share_the_port_the_keys_and_the_redis_state(pool: Pool, tmp_path: Path) -> None:
    # Two workers, children of the pool's process, as its log said.
    assert children_of(pool.process.pid) == set(pool.worker_pids.values())
    assert len(set(pool.worker_pids.values())) == 2
    for number, pid in pool.worker_pids.items():
        assert re.search(rf'"worker":"{number}/2".*"pid":{pid}|"pid":{pid}.*"worker":"{number}/2"', pool.log)

    # The HTTP door is shared as the gRPC port is: every new connection gets the one issuer.
    for _ in range(8):
        with httpx.Client() as http:
            metadata = http.get(f"http://127.0.0.1:{pool.http_port}/.well-known/oauth-authorization-server").json()
        assert metadata["issuer"] == ISSUER

    # The demo was registered once, by the parent, before the workers started.
    demo = tmp_path / "demo"
    assert pool.log.count("demo: registered client") == 1
    key = load_pem_private_key((demo / "client-key.pem").read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    api_key = (demo / "api-key").read_text().strip()
    signer = ProofSigner()
    with client(pool) as anonymous:
        issued = anonymous.issue(
            client_id="demo-client",
            client_assertion=make_client_assertion(key, "demo-client", ISSUER),
            audience=AUDIENCE,
            scopes=["tools:call"],
            dpop_jkt=signer.jkt,
        )

    def validate(proof: str) -> Any:
        with client(pool, api_key) as server:  # a new channel, a new connection
            return server.validate(
                issued.access_token, audience=AUDIENCE, dpop_proof=proof, http_method="POST", http_uri=AUDIENCE
            )

    # New connections land on both workers, and both accept the token one of them issued
    # (the parent's keys). A connection picks a worker by its address hash: a few dozen
    # reach both unless the kernel does not spread them at all.
    served_by: set[int] = set()
    deadline = time.monotonic() + 30  # the second worker may still be starting its gRPC server
    while served_by != {1, 2} and time.monotonic() < deadline:
        answer, worker = pool.which_worker(partial(validate, signer.sign("POST", AUDIENCE, issued.access_token)), "OK")
        assert answer.valid, answer
        served_by.add(worker)
    assert served_by == {1, 2}

    # A proof used on one worker is REPLAYED on the other: the replay records are in Redis.
    crossed = False
    for _ in range(30):
        proof = signer.sign("POST", AUDIENCE, issued.access_token)
        first, first_worker = pool.which_worker(partial(validate, proof), "OK")
        assert first.valid, first
        again, replay_worker = pool.which_worker(partial(validate, proof), "REPLAYED")
        assert again.reason is Reason.REPLAYED, again
        if replay_worker != first_worker:
            crossed = True
            break
    assert crossed, "no replay reached the other worker"

    # SIGTERM stops every worker within the grace period; the pool exits 0.
    asked = time.monotonic()
    pool.process.send_signal(signal.SIGTERM)
    assert pool.process.wait(timeout=GRACE_SECONDS + 10) == 0, pool.log[-3000:]
    elapsed = time.monotonic() - asked
    assert elapsed < GRACE_SECONDS + 3, f"the workers took {elapsed:.1f} s to stop"
    assert not any(alive(pid) for pid in pool.worker_pids.values())
    for number, pid in pool.worker_pids.items():
        assert f"worker {number}/2 (pid {pid}) stopped" in pool.log
    # Both workers appended to one audit file, a whole line at a time.
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "issue" for e in audit) == 1


def test_a_worker_that_dies_stops_the_others_and_fails_the_pool(pool: Pool) -> None:
    os.kill(pool.worker_pids[2], signal.SIGKILL)
    assert pool.process.wait(timeout=GRACE_SECONDS + 15) == 1
    assert f"Error: worker 2/2 (pid {pool.worker_pids[2]}) was killed by SIGKILL: stopped the other workers" in (
        pool.log
    )
    assert not alive(pool.worker_pids[1])


def test_workers_stop_when_their_parent_is_killed(pool: Pool) -> None:
    pool.process.kill()  # no chance to forward anything: the lifeline ends
    pool.process.wait()
    for pid in pool.worker_pids.values():
        wait_until(partial(lambda pid: not alive(pid), pid), GRACE_SECONDS + 10, f"worker {pid} outlived its parent")
