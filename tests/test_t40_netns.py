"""Issue 12's acceptance with real processes on real networks (parts 2 and 5 of the T40
story; parts 1, 3, 4 are test_t40_story.py).

Three network namespaces (tests/support/netns.py): the server's, host a's (10.71.0.2, the
legitimate client) and host b's (10.72.0.2, the thief), each host joined to the server by
its own veth pair, the hosts in different /16s. In the server namespace run a real
`tokenbroker serve` (memory store, gRPC and the HTTP token endpoint) and the example MCP
server (examples/protected_server.py: BrokerAuthMiddleware validating every request over
gRPC, Bearer accepted), listening on both veths. Host a gets a Bearer token from the token
endpoint and calls tools with the MCP SDK at 5 calls a second; host b gets a copy of that
token (a file: stolen) and calls tools too. `tokenbroker events --follow` runs in the
server namespace, as an operator watching.

- alert (the default): within a second of the thief's first request, `concurrent_origins`
  and `new_network` from 10.72.0.2 are printed by `tokenbroker events`; both sides work.
- `clients update --on-signal concurrent_origins=deny`: the thief's requests get 401
  invalid_token (the validation answered ANOMALY), the client's keep working.
- `--on-signal concurrent_origins=revoke_session`: the thief's next request revokes the
  session; the client's next requests fail too (SESSION_REVOKED).

Learning: `detection_learning_hours` 0, so `new_network` is not quiet for the thief.
Everything is bounded in time; the namespaces go whatever happens."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tokenbroker import Keyring
from tokenbroker.registry import Binding, ClientRecord, ClientStatus, ServerRecord
from tokenbroker.registry_file import FileRegistry, generate_secret, hash_secret

from support.netns import HOST_A, HOST_B, SERVER_A, SERVER_B, NamespacedProcess, Namespaces, NetnsError

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
CLIENT = "laptop-agent"
GRPC_PORT, HTTP_PORT, MCP_PORT = 50051, 8080, 8000  # inside the server namespace: nothing else there
PUBLIC_URL = f"http://{SERVER_A}:{HTTP_PORT}"
AUDIENCE = f"http://{SERVER_A}:{MCP_PORT}/mcp"  # the MCP server's resource URI, on either veth
URL_A, URL_B = AUDIENCE, f"http://{SERVER_B}:{MCP_PORT}/mcp"
TARGET = f"127.0.0.1:{GRPC_PORT}"  # the broker, from inside the server namespace
# Every address of the server namespace, which has only its loopback and the two veths.
EVERY_ADDRESS = "0.0.0.0"  # noqa: S104
# A client record's new actions reach detection within: the registry's stat (once a
# second) plus detection's policy cache (2 s), with margin.
POLICY_LAG_SECONDS = 3.5
EVENT_SECONDS = 1.0  # the acceptance: events readable within a second of the thief's first request
WHOLE_TEST_SECONDS = 60.0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from tokenbroker.cli import main; main()", *args]


def agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "support.netns_agent", *args]


def read_lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def wait_until(what: str, check: Callable[[], bool], timeout: float, *, logs: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s\n{logs()}")
        time.sleep(0.05)


@dataclass
class Follower:
    """`tokenbroker events --follow --client CLIENT` in the server namespace: every line it
    prints, with the moment the test read it."""

    process: NamespacedProcess
    seen: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Follower:
        self.process.start()
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        stream = self.process.process.stdout if self.process.process is not None else None
        assert stream is not None
        for line in stream:
            at = time.time()
            with self.lock:
                self.seen.append((at, json.loads(line)))

    def first(
        self, signal: str, source_ip: str, action: str, after: float = 0.0
    ) -> tuple[float, dict[str, Any]] | None:
        with self.lock:
            for at, event in self.seen:
                if (event["signal"], event["source_ip"], event["action"]) == (
                    signal,
                    source_ip,
                    action,
                ) and at >= after:
                    return at, event
        return None


@dataclass
class Stack:
    """The namespaces and what runs in them (see module doc)."""

    ns: Namespaces
    workdir: Path
    env: dict[str, str]
    processes: list[NamespacedProcess] = field(default_factory=list)

    def path(self, name: str) -> Path:
        return self.workdir / name

    def spawn(self, namespace: str, argv: list[str], name: str, **options: Any) -> NamespacedProcess:
        process = NamespacedProcess(
            self.ns, namespace, argv, self.path(f"{name}.log"), env=self.env, cwd=self.workdir, **options
        )
        self.processes.append(process)
        return process.start()

    def run(self, namespace: str | None, argv: list[str], timeout: float = 20.0) -> str:
        """A command to its end (in `namespace`, or here); its stdout. Fails the test on a
        non-zero exit."""
        command = self.ns.command(namespace, argv) if namespace else argv
        done = subprocess.run(
            command, env={**os.environ, **self.env}, cwd=self.workdir, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"{argv[3:]} exited {done.returncode}: {done.stderr[-2000:]}"
        return done.stdout

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.tail(2500)}" for p in self.processes)

    def client(self, namespace: str, url: str, name: str, *obtain: str) -> NamespacedProcess:
        """An MCP client process (tests/support/netns_agent.py) writing `name`.jsonl."""
        return self.spawn(
            namespace,
            agent(
                "client",
                *("--url", url, "--token-file", str(self.path(f"{name}.token"))),
                *("--results", str(self.path(f"{name}.jsonl")), "--stop-file", str(self.path(f"{name}.stop"))),
                *("--rate", "5", "--max-seconds", "50", *obtain),
            ),
            name,
        )

    def stop_client(self, name: str, process: NamespacedProcess) -> None:
        self.path(f"{name}.stop").touch()
        if process.process is not None:
            try:
                process.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.stop()
        assert process.process is not None
        assert process.process.returncode == 0, process.tail()

    def calls(self, name: str, since: float = 0.0) -> list[dict[str, Any]]:
        return [r for r in read_lines(self.path(f"{name}.jsonl")) if r["kind"] == "call" and r["t0"] >= since]

    def started(self, name: str) -> float | None:
        starts = [r["t"] for r in read_lines(self.path(f"{name}.jsonl")) if r["kind"] == "start"]
        return starts[0] if starts else None


def deploy(workdir: Path) -> dict[str, str]:
    """Keys, the registry (the client: Bearer, with a secret; the MCP server; an admin for
    `tokenbroker events`) and the broker's settings."""
    Keyring.generate().save(workdir / "keys.json")
    secret, server_key, admin_key = (
        generate_secret(),
        generate_secret("server_api_key"),
        generate_secret("server_api_key"),
    )
    (workdir / "client.secret").write_text(secret)
    (workdir / "server.key").write_text(server_key)
    (workdir / "admin.key").write_text(admin_key)
    registry = FileRegistry(workdir / "registry.toml")
    registry.add_client(
        ClientRecord(
            CLIENT,
            status=ClientStatus.APPROVED,
            secret_hash=hash_secret(secret),
            binding=Binding.BEARER,
            allowed_audiences=(AUDIENCE,),
            allowed_scopes=("tools:call",),
        )
    )
    registry.add_server(ServerRecord("mcp-tools", audiences=(AUDIENCE,), api_key_hash=hash_secret(server_key)))
    registry.add_server(ServerRecord("ops", admin=True, api_key_hash=hash_secret(admin_key)))
    return {
        "TOKENBROKER_LISTEN": f"{EVERY_ADDRESS}:{GRPC_PORT}",
        "TOKENBROKER_HTTP_LISTEN": f"{EVERY_ADDRESS}:{HTTP_PORT}",
        "TOKENBROKER_PUBLIC_URL": PUBLIC_URL,
        "TOKENBROKER_KEY_FILE": str(workdir / "keys.json"),
        "TOKENBROKER_REGISTRY_FILE": str(workdir / "registry.toml"),
        "TOKENBROKER_AUDIT_FILE": str(workdir / "audit.jsonl"),
        "TOKENBROKER_GRACE_SECONDS": "1",
        "TOKENBROKER_DETECTION_LEARNING_HOURS": "0",
        "PYTHONPATH": str(TESTS),  # support.netns_agent
    }


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    for name in list(os.environ):
        if name.startswith("TOKENBROKER_"):  # the developer's settings never reach these brokers
            monkeypatch.delenv(name)
    try:
        ns = Namespaces().create()
    except NetnsError as exc:
        pytest.fail(f"network namespaces cannot be created on this machine (this test needs root and iproute2): {exc}")
    made = Stack(ns, tmp_path, {})
    try:
        made.env = deploy(tmp_path)
        made.spawn(ns.server, cli("serve"), "broker")
        made.spawn(
            ns.server,
            [
                sys.executable,
                str(ROOT / "examples" / "protected_server.py"),
                *("--broker", TARGET, "--api-key-file", str(tmp_path / "server.key")),
                *("--audience", AUDIENCE, "--issuer", PUBLIC_URL, "--host", EVERY_ADDRESS, "--port", str(MCP_PORT)),
                "--no-require-dpop",
            ],
            "mcp-server",
        )
        metadata = f"http://{SERVER_A}:{MCP_PORT}/.well-known/oauth-protected-resource/mcp"
        try:
            made.run(ns.server, agent("probe", "--grpc", TARGET, "--http", metadata, "--timeout", "20"), timeout=30)
        except AssertionError:
            pytest.fail(f"the broker and the MCP server did not start:\n{made.logs()}")
        yield made
    finally:
        for process in reversed(made.processes):
            process.stop()
        ns.delete()


def test_a_stolen_token_used_from_another_network_is_seen_denied_and_revoked(stack: Stack) -> None:
    began = time.monotonic()
    ns = stack.ns
    follower = Follower(
        NamespacedProcess(
            ns,
            ns.server,
            cli(
                "events",
                "--follow",
                "--client",
                CLIENT,
                "--target",
                TARGET,
                "--api-key-file",
                str(stack.path("admin.key")),
            ),
            stack.path("events-follow.log"),
            env=stack.env,
            cwd=stack.workdir,
            stdout=subprocess.PIPE,
        )
    )
    stack.processes.append(follower.process)
    follower.start()

    # Host a: the client gets its Bearer token and works.
    legit = stack.client(
        ns.a,
        URL_A,
        "legit",
        *("--token-url", f"{PUBLIC_URL}/token", "--client-id", CLIENT),
        *("--secret-file", str(stack.path("client.secret")), "--resource", AUDIENCE),
    )
    wait_until("the client works", lambda: sum(c["ok"] for c in stack.calls("legit")) >= 5, 15, logs=stack.logs)
    assert all(c["ok"] for c in stack.calls("legit")), stack.calls("legit")
    session_id = next(c["value"]["session_id"] for c in stack.calls("legit") if c["tool"] == "whoami")
    assert follower.seen == []  # one network so far: nothing to say

    # -- alert: host b uses a copy of the token while the client goes on ------------------
    shutil.copy(stack.path("legit.token"), stack.path("thief1.token"))
    thief = stack.client(ns.b, URL_B, "thief1")
    wait_until("the thief starts", lambda: stack.started("thief1") is not None, 10, logs=stack.logs)
    first_request = stack.started("thief1")
    assert first_request is not None
    wait_until(
        "concurrent_origins and new_network from the thief",
        lambda: all(follower.first(s, HOST_B, "alert") for s in ("concurrent_origins", "new_network")),
        5,
        logs=stack.logs,
    )
    for signal, severity in (("concurrent_origins", "critical"), ("new_network", "warning")):
        found = follower.first(signal, HOST_B, "alert")
        assert found is not None
        at, event = found
        print(f"\n{signal} from {HOST_B} read {at - first_request:.3f} s after the thief's first request")
        assert at - first_request <= EVENT_SECONDS, (signal, at - first_request)
        assert (event["client_id"], event["session_id"], event["severity"]) == (CLIENT, session_id, severity)
        assert "10.72.0.0/24" in json.dumps(event["evidence"])
    wait_until("the thief's calls", lambda: sum(c["ok"] for c in stack.calls("thief1")) >= 3, 10, logs=stack.logs)
    stolen = [c for c in stack.calls("thief1") if c["ok"] and c["tool"] == "whoami"]
    assert stolen, stack.calls("thief1")  # alert only: the thief is served, in the client's session
    assert stolen[0]["value"]["session_id"] == session_id
    stack.stop_client("thief1", thief)
    # ... and `tokenbroker events` (without --follow) prints them too.
    kept = [
        json.loads(line)
        for line in stack.run(
            ns.server,
            cli("events", "--client", CLIENT, "--target", TARGET, "--api-key-file", str(stack.path("admin.key"))),
        ).splitlines()
    ]
    assert {(e["signal"], e["source_ip"]) for e in kept} >= {("concurrent_origins", HOST_B), ("new_network", HOST_B)}

    # -- deny --------------------------------------------------------------------------------
    back = time.time()  # the client's next requests make its network the session's origin again
    wait_until("the client goes on", lambda: sum(c["ok"] for c in stack.calls("legit", back)) >= 3, 10)
    stack.run(None, cli("clients", "update", CLIENT, "--on-signal", "concurrent_origins=deny"))
    time.sleep(POLICY_LAG_SECONDS)
    shutil.copy(stack.path("legit.token"), stack.path("thief2.token"))
    denied_from = time.time()
    thief = stack.client(ns.b, URL_B, "thief2")
    wait_until("the thief is refused", lambda: len(stack.calls("thief2")) >= 3, 15, logs=stack.logs)
    legit_meanwhile = stack.calls("legit", denied_from)
    stack.stop_client("thief2", thief)
    attempts = stack.calls("thief2")
    assert not any(c["ok"] for c in attempts), attempts
    for attempt in attempts:
        assert attempt["refusals"], attempt
        assert {(r["status"], r["error"]) for r in attempt["refusals"]} == {(401, "invalid_token")}, attempt
        assert any(r["detail"].startswith("refused by detection") for r in attempt["refusals"]), attempt
    assert len(legit_meanwhile) >= 5, legit_meanwhile
    assert all(c["ok"] for c in legit_meanwhile), legit_meanwhile
    mcp_log = stack.path("mcp-server.log").read_text()
    anomalies = mcp_log.count(f"from {HOST_B}: 401 invalid_token ANOMALY")  # the gRPC answer's reason
    assert anomalies >= len(attempts), mcp_log[-3000:]
    wait_until("the deny event", lambda: follower.first("concurrent_origins", HOST_B, "deny") is not None, 5)

    # -- revoke_session ---------------------------------------------------------------------
    stack.run(None, cli("clients", "update", CLIENT, "--on-signal", "concurrent_origins=revoke_session"))
    time.sleep(POLICY_LAG_SECONDS)
    assert all(c["ok"] for c in stack.calls("legit", denied_from)), "a denied thief left the client alone"
    shutil.copy(stack.path("legit.token"), stack.path("thief3.token"))
    revoked_from = time.time()
    thief = stack.client(ns.b, URL_B, "thief3")
    wait_until(
        "the session dies for the client too",
        lambda: (
            len([c for c in stack.calls("legit", revoked_from) if not c["ok"]]) >= 2 and bool(stack.calls("thief3"))
        ),
        15,
        logs=stack.logs,
    )
    stack.stop_client("thief3", thief)
    stack.stop_client("legit", legit)
    assert not any(c["ok"] for c in stack.calls("thief3"))
    failed = [c for c in stack.calls("legit", revoked_from) if not c["ok"]]
    assert all({r["status"] for r in c["refusals"]} == {401} for c in failed), failed
    after_failure = [c for c in stack.calls("legit") if c["t0"] >= failed[0]["t1"]]
    assert not any(c["ok"] for c in after_failure), "the revoked session served the client again"
    mcp_log = stack.path("mcp-server.log").read_text()
    assert f"from {HOST_A}: 401 invalid_token SESSION_REVOKED" in mcp_log, mcp_log[-3000:]
    assert mcp_log.count(f"from {HOST_B}: 401 invalid_token ANOMALY") == anomalies + 1  # the request that revoked
    wait_until(
        "the revoke event", lambda: follower.first("concurrent_origins", HOST_B, "revoke_session") is not None, 5
    )
    elapsed = time.monotonic() - began
    print(f"T40 network story: {elapsed:.1f} s")
    assert elapsed < WHOLE_TEST_SECONDS
