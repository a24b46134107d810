"""Where events go (issue 12, "Events and actions"): the log and audit lines, the bounded
Redis stream every replica reads, `WatchEvents`, `tokenbroker events [--follow]
[--client ID]`, the counters, and the webhook with bounded retries. Never a token or a
secret in any of them; never a blocked caller of `Events.emit`.

Real processes where the issue asks for them: `tokenbroker serve` brokers (alone, and two
sharing a redis-server), the CLI as a subprocess, an HTTP server for the webhook."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import structlog

from tokenbroker import events as events_module
from tokenbroker.audit import AuditLog
from tokenbroker.audit_chain import verify
from tokenbroker.client import BrokerClient
from tokenbroker.config import ConfigError, Settings
from tokenbroker.errors import PermissionDeniedError, RateLimitedError, StoreUnavailableError, TokenBrokerError
from tokenbroker.events import EVENTS_LOST, Event, Events
from tokenbroker.events_redis import RedisEventStream
from tokenbroker.events_sinks import AuditSink
from tokenbroker.events_webhook import WebhookSink, origin_of
from tokenbroker.metrics import Metrics
from tokenbroker.registry import Binding
from tokenbroker.registry_file import generate_secret
from tokenbroker_bench.servers import free_port

from support.broker_process import BrokerProcess
from support.oauth import AUDIENCE_A, SCOPES, OAuthDeployment
from support.redis_servers import RedisServer

CLI = [sys.executable, "-c", "from tokenbroker.cli import main; main()"]
EVENT_FIELDS = {"event", "signal", "severity", "client_id", "session_id", "source_ip", "action", "evidence", "time"}
JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Recorder:
    """A sink that keeps what it gets; `gate`, when cleared, holds the delivery thread."""

    name = "recorder"

    def __init__(self) -> None:
        self.got: list[Event] = []
        self.gate = threading.Event()
        self.gate.set()

    def deliver(self, event: Event) -> None:
        self.gate.wait(10)
        self.got.append(event)

    def close(self) -> None:
        return None


class Failing:
    name = "broken"

    def deliver(self, event: Event) -> None:
        raise ConnectionError("collector down")

    def close(self) -> None:
        return None


class Drops:
    """Counts `on_dropped` calls by where."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, where: str) -> None:
        with self._lock:
            self.counts[where] = self.counts.get(where, 0) + 1


# -- Events: cheap emit, one delivery thread, sinks ---------------------------------------


def test_an_event_reaches_the_log_and_the_audit_file_scrubbed_and_chained(tmp_path: Path) -> None:
    audit_file = tmp_path / "audit.jsonl"
    audit = AuditLog(audit_file, refusal_burst=1, refusal_rate=0.0)
    events = Events(sinks=[AuditSink(audit)])
    try:
        # a refusal suppressed by the rate limit before the event: summarised, not lost
        audit.record(event="issue", client_id="x", audience="a", decision="refuse", rule="r", authenticated=False)
        audit.record(event="issue", client_id="x", audience="a", decision="refuse", rule="r", authenticated=False)
        events.emit(
            "client_pending",
            client_id="agent",
            action="deny",
            session_id="s1",
            source_ip="10.0.0.7",
            evidence={"client_secret": "tbs_secret", "seen": f"Bearer {JWT}", "domain": "agent.example"},
        )
        assert wait_until(lambda: audit_file.exists() and "client_pending" in audit_file.read_text())
        audit.record(event="revoke_client", client_id="agent", audience="", decision="grant", rule="caller.admin")
    finally:
        events.close()
        audit.close()
    text = audit_file.read_text()
    assert "tbs_secret" not in text
    assert JWT not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["event"] for line in lines] == ["issue", "audit_suppressed", "client_pending", "revoke_client"]
    line = lines[2]
    assert {k: line[k] for k in ("signal", "severity", "client_id", "session_id", "source_ip", "action")} == {
        "signal": "governance",
        "severity": "warning",
        "client_id": "agent",
        "session_id": "s1",
        "source_ip": "10.0.0.7",
        "action": "deny",
    }
    assert line["evidence"] == {"client_secret": "[redacted]", "seen": "Bearer [redacted]", "domain": "agent.example"}
    assert line["time"].endswith("Z")
    assert "T" in line["time"]
    assert verify(audit_file).lines == 4  # the event line is one link of the chain


def test_emit_never_blocks_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    slow, drops = Recorder(), Drops()
    slow.gate.clear()  # the delivery thread is stuck in this sink
    events = Events(sinks=[slow], queue_max=5, on_dropped=drops)
    try:
        started = time.perf_counter()
        for n in range(50):
            events.emit("key_expired", client_id=f"c{n}", action="deny")
        assert time.perf_counter() - started < 0.5  # nobody waited for the stuck sink
        assert len(events.recent()) == 50  # the ring keeps them all
        dropped = drops.counts.get("queue", 0)
        assert 50 - 5 - 1 <= dropped <= 50 - 5  # queue_max queued, perhaps one in the sink's hands
        slow.gate.set()
        assert wait_until(lambda: len(slow.got) == 50 - dropped)
    finally:
        events.close()


def test_a_failing_sink_is_counted_and_the_others_still_get_the_event(tmp_path: Path) -> None:
    recorder, drops = Recorder(), Drops()
    events = Events(sinks=[Failing(), recorder], on_dropped=drops)
    try:
        for _ in range(3):
            events.emit("approval_expired", client_id="c", action="deny")
        assert wait_until(lambda: len(recorder.got) == 3)
        assert drops.counts == {"broken": 3}
    finally:
        events.close()


def test_the_delivery_thread_ends_when_idle_and_at_close(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "IDLE_SECONDS", 0.2)

    def started_by(emit: Callable[[], object]) -> threading.Thread:
        before = set(threading.enumerate())
        emit()
        [thread] = [t for t in threading.enumerate() if t not in before and t.name == "tb-events"]
        return thread

    recorder = Recorder()
    events = Events(sinks=[recorder])
    first = started_by(lambda: events.emit("key_expired", client_id="c", action="deny"))
    first.join(3)
    assert not first.is_alive()  # idle: gone
    second = started_by(lambda: events.emit("key_expired", client_id="c", action="deny"))  # started again
    recorder.gate.clear()
    events.emit("key_expired", client_id="c", action="deny")
    threading.Timer(0.2, recorder.gate.set).start()
    events.close()  # waits for what is queued
    assert len(recorder.got) == 3
    assert not second.is_alive()
    events.emit("key_expired", client_id="c", action="deny")  # after close: kept (and logged), not delivered
    assert len(events.recent()) == 4
    assert len(recorder.got) == 3


def test_governance_events_and_drops_are_prometheus_counters() -> None:
    metrics = Metrics()
    stuck = Recorder()
    stuck.gate.clear()
    events = Events(sinks=[stuck], queue_max=1, on_dropped=metrics.event_dropped, count=metrics.detection)
    try:
        for _ in range(4):
            events.emit("client_pending", client_id="c", action="deny")
        text = metrics.render().decode()
        assert 'tokenbroker_detections_total{action="deny",signal="governance"} 4.0' in text
        assert 'tokenbroker_events_dropped_total{sink="queue"}' in text
    finally:
        stuck.gate.set()
        events.close()


# -- followers in memory ------------------------------------------------------------------


def collect(stream: Iterator[Event], into: list[Event]) -> threading.Thread:
    def run() -> None:
        for event in stream:
            into.append(event)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_following_gives_the_kept_events_then_new_ones_of_one_client() -> None:
    events = Events()
    stop = threading.Event()
    try:
        events.emit("client_pending", client_id="a", action="deny")
        events.emit("client_pending", client_id="b", action="deny")
        assert [e.client_id for e in events.watch()] == ["a", "b"]  # not following: what is kept
        assert [e.client_id for e in events.watch("b")] == ["b"]
        seen: list[Event] = []
        thread = collect(events.watch("a", follow=True, active=lambda: not stop.is_set()), seen)
        assert wait_until(lambda: len(seen) == 1)
        events.emit("key_expired", client_id="b", action="deny")
        events.emit("key_expired", client_id="a", action="deny")
        assert wait_until(lambda: len(seen) == 2, timeout=2)
        assert [(e.event, e.client_id) for e in seen] == [("client_pending", "a"), ("key_expired", "a")]
    finally:
        stop.set()
    thread.join(3)
    assert not thread.is_alive()  # `active()` false: the follow ends within a second


def test_a_slow_follower_is_bounded_loses_the_oldest_and_is_told() -> None:
    drops = Drops()
    events = Events(follower_backlog=3, on_dropped=drops)
    follow = events.watch(follow=True)
    events.emit("first", client_id="c", action="alert")
    assert next(follow).event == "first"  # the follower is open: it takes nothing for a while
    for n in range(10):
        events.emit(f"e{n}", client_id="c", action="alert")
    notice = next(follow)
    assert notice.event == EVENTS_LOST
    assert notice.evidence["lost"] == 7
    assert [next(follow).event for _ in range(3)] == ["e7", "e8", "e9"]
    assert drops.counts == {"follower": 7}
    follow.close()
    events.close()


def test_followers_are_bounded_in_number() -> None:
    events = Events(max_followers=2)
    open_ones = [events.watch(follow=True) for _ in range(2)]
    for follower in open_ones:
        events.emit("x", client_id="c", action="alert")
        next(follower)
    with pytest.raises(RateLimitedError, match="already follow"):
        next(events.watch(follow=True))
    open_ones[0].close()
    third = events.watch(follow=True)
    assert next(third).event == "x"  # a slot was freed
    third.close()
    open_ones[1].close()


# -- the Redis stream -----------------------------------------------------------------------


def test_two_brokers_sharing_redis_see_each_others_events_and_the_stream_is_bounded(
    redis_server: RedisServer,
) -> None:
    a_stream = RedisEventStream.from_url(redis_server.url, max_len=50)
    b_stream = RedisEventStream.from_url(redis_server.url, max_len=50)
    broker_a = Events(sinks=[a_stream], source=a_stream)
    broker_b = Events(sinks=[b_stream], source=b_stream)
    stop = threading.Event()
    try:
        broker_a.emit("client_pending", client_id="kept", action="deny", evidence={"api_key": "tbk_x"})
        assert wait_until(lambda: any(e.client_id == "kept" for e in broker_b.watch()))
        seen: list[Event] = []
        follower = collect(broker_b.watch("agent", follow=True, active=lambda: not stop.is_set()), seen)
        time.sleep(0.3)  # B is blocked in XREAD now
        emitted = time.monotonic()
        broker_a.emit("key_expired", client_id="agent", action="deny", source_ip="10.1.2.3")
        assert wait_until(lambda: len(seen) == 1, timeout=2), "B did not see A's event within 2 s"
        assert time.monotonic() - emitted < 2
        assert (seen[0].event, seen[0].source_ip) == ("key_expired", "10.1.2.3")
        [kept] = broker_b.watch("kept")
        assert kept.evidence == {"api_key": "[redacted]"}

        for n in range(600):
            broker_a.emit("burst", client_id=f"c{n}", action="alert")
        assert wait_until(lambda: any(e.client_id == "c599" for e in broker_b.watch("c599")))
        stop.set()
        follower.join(3)
        assert not follower.is_alive()  # the follow ends within a read's block (1 s) of `active()` false
        length = a_stream.length()
        assert length < 600
        assert length <= 50 + 150
    finally:
        stop.set()
        broker_a.close()
        broker_b.close()


def test_a_redis_outage_drops_and_counts_events_and_watching_fails_closed() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    stream = RedisEventStream.from_url(dead)
    drops, recorder = Drops(), Recorder()
    events = Events(sinks=[stream, recorder], source=stream, on_dropped=drops)
    try:
        started = time.perf_counter()
        events.emit("key_expired", client_id="c", action="deny")
        assert time.perf_counter() - started < 0.05  # the emitter never waits for Redis
        assert wait_until(lambda: drops.counts.get("redis") == 1 and len(recorder.got) == 1)
        with pytest.raises(StoreUnavailableError, match="events stream"):
            list(events.watch())
    finally:
        events.close()


# -- the webhook ----------------------------------------------------------------------------


class Collector:
    """A real HTTP server on 127.0.0.1 answering `statuses` in turn (then the last one)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                collector.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                n = len(collector.requests) - 1
                status = collector.statuses[min(n, len(collector.statuses) - 1)]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0SECRETPATH?token=q"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector_factory() -> Iterator[Callable[[list[int]], Collector]]:
    made: list[Collector] = []

    def make(statuses: list[int]) -> Collector:
        made.append(Collector(statuses))
        return made[-1]

    yield make
    for collector in made:
        collector.stop()


def test_the_webhook_retries_with_backoff_and_delivers_once(
    collector_factory: Callable[[list[int]], Collector],
) -> None:
    collector = collector_factory([500, 500, 200])
    drops = Drops()
    url = collector.url.replace("http://", "http://hook:p%40ss@")
    webhook = WebhookSink(url, retries=3, on_dropped=drops)
    events = Events(sinks=[webhook], on_dropped=drops)
    try:
        started = time.monotonic()
        events.emit("client_pending", client_id="agent", action="deny", evidence={"domain": "a.example"})
        assert wait_until(lambda: len(collector.requests) == 3)
        assert time.monotonic() - started >= 0.2 + 0.4  # the backoff between attempts
        time.sleep(0.5)
        assert len(collector.requests) == 3
        assert drops.counts == {}
        headers, body = collector.requests[-1]
        assert headers["content-type"] == "application/json"
        assert headers["authorization"] == "Basic aG9vazpwQHNz"  # hook:p@ss, from the URL
        assert body["event"] == "client_pending"
        assert body["evidence"] == {"domain": "a.example"}
        assert set(body) == EVENT_FIELDS
    finally:
        events.close()


def test_a_webhook_that_always_fails_gets_bounded_attempts_then_the_event_is_dropped(
    collector_factory: Callable[[list[int]], Collector],
) -> None:
    failing = collector_factory([503])
    refusing = collector_factory([400])
    drops = Drops()
    events = Events(
        sinks=[WebhookSink(failing.url, retries=2, on_dropped=drops), WebhookSink(refusing.url, on_dropped=drops)],
        on_dropped=drops,
    )
    with structlog.testing.capture_logs() as logged:
        try:
            events.emit("key_expired", client_id="c", action="deny")
            assert wait_until(lambda: drops.counts.get("webhook") == 2)
            time.sleep(0.5)
            assert len(failing.requests) == 3  # one attempt and two retries, no more
            assert len(refusing.requests) == 1  # a 4xx is not retried
        finally:
            events.close()
    failures = [entry for entry in logged if "not delivered to the webhook" in entry["event"]]
    assert {entry["why"] for entry in failures} == {"HTTP 503", "HTTP 400"}
    assert {entry["webhook"] for entry in failures} == {origin_of(failing.url), origin_of(refusing.url)}
    assert "T0SECRETPATH" not in repr(logged)
    assert "token=q" not in repr(logged)


def test_a_webhook_that_hangs_never_holds_up_the_other_sinks() -> None:
    hung = socket.socket()  # the kernel accepts the connection; nobody ever answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    recorder, drops = Recorder(), Drops()
    url = f"http://127.0.0.1:{hung.getsockname()[1]}/hook"
    webhook = WebhookSink(url, retries=0, timeout=0.5, queue_max=2, close_seconds=0.2, on_dropped=drops)
    events = Events(sinks=[webhook, recorder], on_dropped=drops)
    try:
        for _ in range(5):
            events.emit("key_expired", client_id="c", action="deny")
        assert wait_until(lambda: len(recorder.got) == 5, timeout=1)
        assert drops.counts.get("webhook", 0) >= 2  # its own queue is bounded: the rest dropped, counted
    finally:
        events.close()
        hung.close()
    assert drops.counts["webhook"] == 5  # nothing reached it; close did not wait for ever


def test_webhook_settings_are_validated_and_never_shown() -> None:
    settings = Settings.load(events_webhook_url="https://user:s3cr3tpw@alerts.example/hook/SECRET?k=v")
    assert (settings.events_webhook_retries, settings.events_stream_max, settings.events_keep) == (3, 10_000, 10_000)
    shown = repr(settings)
    assert "alerts.example" in shown
    assert "SECRET" not in shown
    assert "s3cr3tpw" not in shown
    assert "k=v" not in shown
    for bad in ("ftp://alerts.example/SECRET", "alerts.example/SECRET", "https://alerts.example/SECRET#x"):
        with pytest.raises(ConfigError, match="events_webhook_url") as raised:
            Settings.load(events_webhook_url=bad)
        assert "SECRET" not in str(raised.value)
    with pytest.raises(ConfigError, match="events_webhook_retries"):
        Settings.load(events_webhook_retries=11)
    assert origin_of("https://u:p@[::1]:8443/x?y") == "https://[::1]:8443"


# -- a real broker: WatchEvents and `tokenbroker events` ----------------------------------


class Deployment:
    """A registry with an admin server, a non-admin one and a client whose approval has
    expired: each token request it makes is refused and emits `approval_expired`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.oauth = OAuthDeployment(workdir)
        self.admin_key, self.plain_key = generate_secret("server_api_key"), generate_secret("server_api_key")
        self.oauth.add_server("admin", (AUDIENCE_A,), self.admin_key, admin=True)
        self.oauth.add_server("plain", (AUDIENCE_A,), self.plain_key)
        self.secrets: dict[str, str] = {}
        now = int(time.time())
        for client_id in ("expired-a", "expired-b"):
            self.secrets[client_id] = generate_secret()
            self.oauth.add_secret_client(
                client_id,
                self.secrets[client_id],
                binding=Binding.BEARER,
                approved_at=now - 3600,
                approved_until=now - 60,
            )
        self.admin_key_file = workdir / "admin-key"
        self.admin_key_file.write_text(self.admin_key + "\n")
        self.plain_key_file = workdir / "plain-key"
        self.plain_key_file.write_text(self.plain_key + "\n")

    def broker(self, **settings: str) -> BrokerProcess:
        return self.oauth.broker(**settings)

    def refuse(self, broker: BrokerProcess, client_id: str) -> None:
        """A token request of an expired client: refused, one `approval_expired` event."""
        with BrokerClient(broker.target) as client, pytest.raises(PermissionDeniedError, match="approval expired"):
            client.issue(
                client_id=client_id, audience=AUDIENCE_A, scopes=list(SCOPES), client_secret=self.secrets[client_id]
            )


def events_cli(target: str, key_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TOKENBROKER_API_KEY"}
    command = [*CLI, "events", "--target", target, "--api-key-file", str(key_file), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, BrokerProcess]]:
    deployment = Deployment(tmp_path_factory.mktemp("events"))
    broker = deployment.broker()
    try:
        yield deployment, broker
    finally:
        broker.stop()


def test_tokenbroker_events_prints_the_kept_events_as_json_lines_and_filters(
    served: tuple[Deployment, BrokerProcess],
) -> None:
    deployment, broker = served
    deployment.refuse(broker, "expired-a")
    deployment.refuse(broker, "expired-b")
    result = events_cli(broker.target, deployment.admin_key_file)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    mine = [line for line in lines if line["event"] == "approval_expired"]
    assert [line["client_id"] for line in mine][-2:] == ["expired-a", "expired-b"]
    line = mine[-1]
    assert set(line) == EVENT_FIELDS
    assert isinstance(line["evidence"], dict)
    assert "approved_until" in line["evidence"]
    assert line["action"] == "deny"
    assert line["time"].endswith("Z")
    for secret in deployment.secrets.values():
        assert secret not in result.stdout

    only_a = events_cli(broker.target, deployment.admin_key_file, "--client", "expired-a")
    assert only_a.returncode == 0, only_a.stderr
    assert {json.loads(line)["client_id"] for line in only_a.stdout.splitlines()} == {"expired-a"}

    # ... and the same events are audit lines, the chain intact.
    audit = deployment.oauth.audit_file
    assert wait_until(lambda: '"approval_expired"' in audit.read_text())
    assert verify(audit).lines > 0
    [watched] = [json.loads(x) for x in audit.read_text().splitlines() if '"watch_events"' in x][:1]
    assert (watched["decision"], watched["caller"]) == ("grant", "admin")  # WatchEvents is an audited admin call


def test_tokenbroker_events_follow_prints_a_new_event_within_two_seconds_and_ends_on_ctrl_c(
    served: tuple[Deployment, BrokerProcess],
) -> None:
    deployment, broker = served
    deployment.refuse(broker, "expired-b")  # at least one kept: its line says the stream is open
    with BrokerClient(broker.target, api_key=deployment.admin_key) as client:
        kept = len(list(client.watch_events("expired-b")))
    env = {k: v for k, v in os.environ.items() if k != "TOKENBROKER_API_KEY"}
    command = [*CLI, "events", "--follow", "--client", "expired-b", "--target", broker.target]
    follower = subprocess.Popen(
        [*command, "--api-key-file", str(deployment.admin_key_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    out = follower.stdout
    assert out is not None

    def read() -> None:
        for line in out:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: len(lines) == kept, timeout=15)  # the kept ones: the stream is open
        time.sleep(0.2)
        assert len(lines) == kept
        emitted = time.monotonic()
        deployment.refuse(broker, "expired-b")
        assert wait_until(lambda: len(lines) > kept, timeout=2), "no new event line within 2 s"
        assert time.monotonic() - emitted < 2
        assert json.loads(lines[-1])["client_id"] == "expired-b"
    finally:
        follower.send_signal(signal.SIGINT)
        code = follower.wait(timeout=10)
    assert follower.stderr is not None
    stderr = follower.stderr.read()
    assert code == 0, stderr
    assert "Traceback" not in stderr


def test_tokenbroker_events_refuses_a_non_admin_key_and_names_an_unreachable_broker(
    served: tuple[Deployment, BrokerProcess],
) -> None:
    deployment, broker = served
    refused = events_cli(broker.target, deployment.plain_key_file)
    assert refused.returncode == 1
    assert "PERMISSION_DENIED" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert refused.stdout == ""

    unreachable = events_cli(f"127.0.0.1:{free_port()}", deployment.admin_key_file)
    assert unreachable.returncode == 1
    assert "not reachable" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_watch_events_on_one_replica_shows_what_another_emitted(tmp_path: Path, redis_server: RedisServer) -> None:
    deployment = Deployment(tmp_path)
    broker_a = deployment.broker(redis_url=redis_server.url)
    broker_b = deployment.broker(redis_url=redis_server.url)
    try:
        seen: list[dict[str, Any]] = []
        client_b = BrokerClient(broker_b.target, api_key=deployment.admin_key)

        def read() -> None:
            with contextlib.suppress(TokenBrokerError):  # the channel closed under it: the test failed already
                for event in client_b.watch_events("expired-a", follow=True):
                    seen.append(event)
                    break  # closes the stream: WatchEvents on B is cancelled

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(0.5)  # B is following the stream
        emitted = time.monotonic()
        deployment.refuse(broker_a, "expired-a")
        assert wait_until(lambda: len(seen) == 1, timeout=2), "B did not show A's event within 2 s"
        assert time.monotonic() - emitted < 2
        assert (seen[0]["event"], seen[0]["client_id"]) == ("approval_expired", "expired-a")
        reader.join(5)
        assert not reader.is_alive()
        client_b.close()
        with BrokerClient(broker_a.target, api_key=deployment.admin_key) as client_a:
            kept = list(client_a.watch_events())
        assert [e["client_id"] for e in kept if e["event"] == "approval_expired"] == ["expired-a"]
    finally:
        broker_a.stop()
        broker_b.stop()
