"""Chaos under load: two real `tokenbroker serve` processes share a real Redis (or Redis
Cluster) under steady mixed traffic of IssueToken, ValidateToken with DPoP, replayed
proofs, RevokeSession, OAuth `/token` and replayed assertions, while one fault is
injected. Every answer is judged (tests/support/chaos.py): no valid=true for a revoked
session, a replayed proof or assertion, a token issued before a state loss, or while the
store is unreachable; every answer a decision or UNAVAILABLE within the bound; recovery
without restarting a broker; threads and memory back where they were.

`make test` runs every fault with short phases; `make chaos` runs them longer
(TOKENBROKER_CHAOS_SCALE) and writes the README's table (TOKENBROKER_CHAOS_REPORT)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.chaos import (
    ANSWER_BOUND_SECONDS,
    CLIENTS,
    ChaosDeployment,
    Measured,
    Traffic,
    client_slot_owner,
    measure,
    report,
    running,
)
from support.redis_servers import RedisCluster, RedisServer
from support.tcp_proxy import TcpProxy

SCALE = float(os.environ.get("TOKENBROKER_CHAOS_SCALE", "1"))
REPORT = os.environ.get("TOKENBROKER_CHAOS_REPORT")
# Threads a broker may have after a fault beyond what it had before (grpc's pools are
# fixed; redis-py's connection pools are bounded), and memory it may have grown by.
THREAD_SLACK = 8
RSS_SLACK_MIB = 64

Factory = Callable[[dict[str, str]], ChaosDeployment]  # a deployment with two brokers on this store

pytestmark = pytest.mark.timeout(240 + int(120 * SCALE))


def phase(seconds: float) -> float:
    return seconds * SCALE


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    server = RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "everysec")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def deployment_factory(tmp_path: Path) -> Iterator[Factory]:
    made: list[ChaosDeployment] = []

    def make(store_env: dict[str, str]) -> ChaosDeployment:
        d = ChaosDeployment(tmp_path / f"d{len(made)}", store_env)
        made.append(d)
        d.start_brokers(2)
        return d

    yield make
    for d in made:
        codes = d.stop()
        assert all(code == 0 for code in codes), f"a broker did not stop cleanly: {codes}"


def judge(traffic: Traffic, name: str, injected: float, healed: float, *, expect_unavailable: bool) -> Measured:
    """The fault's figures, and the rules every fault must keep."""
    measured = measure(traffic, name, injected, healed)
    report(REPORT, measured)
    assert not measured.violations, "\n".join(measured.violations[:20])
    assert measured.answers >= 100, f"only {measured.answers} answers: the load did not run"
    # Every rule this fault can test was tested, and held: a revoked session's token, a
    # replayed proof and a replayed assertion were refused; after a state loss, a token
    # from before it; during an outage, a call wholly inside it.
    expected = {"revoked", "replay", "assertion_replay"}
    expected |= {"state_loss"} if traffic.losses else set()
    expected |= {"fail_closed"} if traffic.down else set()
    untested = {rule for rule in expected if not measured.rules_held.get(rule)}
    assert not untested, f"rules never put to the test: {sorted(untested)} (held: {measured.rules_held})"
    if expect_unavailable:
        assert measured.unavailable > 0, "the fault was never seen: nothing answered UNAVAILABLE"
    assert measured.recovery_seconds < float("inf"), "a kind of call never succeeded again after the fault"
    assert measured.max_unavailable_latency <= ANSWER_BOUND_SECONDS
    assert measured.threads_after <= measured.threads_before + THREAD_SLACK, (
        f"threads piled up: {measured.threads_before} before, {measured.threads_after} after"
    )
    assert measured.rss_after_mib <= measured.rss_before_mib + RSS_SLACK_MIB, (
        f"memory piled up: {measured.rss_before_mib:.0f} MiB before, {measured.rss_after_mib:.0f} MiB after"
    )
    return measured


def settle(traffic: Traffic, healed: float) -> None:
    """Runs the traffic on until every kind of call succeeded after the fault (or 30 s),
    then a little longer, so recovery is measured and the after-samples exist."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kinds = {a.kind for a in traffic.answers if a.outcome == "ok" and a.sent >= healed}
        if {"issue", "validate", "token"} <= kinds:
            break
        time.sleep(0.1)
    traffic.run_for(phase(3))


def test_redis_killed_and_restarted_empty(redis_server: RedisServer, deployment_factory: Factory) -> None:
    d = deployment_factory({"TOKENBROKER_REDIS_URL": redis_server.url})
    with running(Traffic(d)) as traffic:
        traffic.run_for(phase(3))
        injected = time.monotonic()
        redis_server.kill()
        traffic.state_lost()
        traffic.store_down()  # from when it is gone (the kill returned) to before it is back
        traffic.run_for(phase(2))
        traffic.store_up()
        redis_server.start()
        healed = time.monotonic()
        settle(traffic, healed)
    judge(
        traffic,
        f"Redis SIGKILL, restarted empty {phase(2):g} s later (no persistence)",
        injected,
        healed,
        expect_unavailable=True,
    )


def test_redis_killed_and_restarted_from_its_aof(aof_redis: RedisServer, deployment_factory: Factory) -> None:
    d = deployment_factory({"TOKENBROKER_REDIS_URL": aof_redis.url})
    with running(Traffic(d)) as traffic:
        traffic.run_for(phase(3))
        injected = time.monotonic()
        aof_redis.kill()
        # An AOF written every second may lack the last second: the broker restamps the
        # epoch of a Redis that restarted, so everything issued before is refused once.
        traffic.state_lost()
        traffic.store_down()
        traffic.run_for(phase(2))
        traffic.store_up()
        aof_redis.start()
        healed = time.monotonic()
        settle(traffic, healed)
    assert (aof_redis.directory / "appendonlydir").exists(), "the AOF was not written"
    judge(
        traffic,
        f"Redis SIGKILL, restarted {phase(2):g} s later from its AOF (everysec)",
        injected,
        healed,
        expect_unavailable=True,
    )


def test_redis_stopped_for_five_seconds(redis_server: RedisServer, deployment_factory: Factory) -> None:
    d = deployment_factory({"TOKENBROKER_REDIS_URL": redis_server.url})
    with running(Traffic(d)) as traffic:
        traffic.run_for(phase(3))
        injected = time.monotonic()
        redis_server.pause()
        traffic.store_down()
        try:
            traffic.run_for(5)  # the fault itself is 5 s at every scale
        finally:
            traffic.store_up()
            redis_server.resume()
        healed = time.monotonic()
        settle(traffic, healed)
    judge(traffic, "Redis SIGSTOP for 5 s", injected, healed, expect_unavailable=True)


@pytest.fixture
def proxied(redis_server: RedisServer, deployment_factory: Factory) -> Iterator[tuple[TcpProxy, ChaosDeployment]]:
    proxy = TcpProxy(redis_server.port).start()
    try:
        yield proxy, deployment_factory({"TOKENBROKER_REDIS_URL": proxy.url})
    finally:
        proxy.stop()


def test_latency_beyond_the_redis_timeout(proxied: tuple[TcpProxy, ChaosDeployment]) -> None:
    proxy, d = proxied
    with running(Traffic(d)) as traffic:
        traffic.run_for(phase(3))
        injected = time.monotonic()
        proxy.delay(0.4)  # 0.8 s a round trip: over the 0.5 s timeout, late replies arrive
        traffic.run_for(phase(3))
        proxy.heal()
        healed = time.monotonic()
        settle(traffic, healed)
    judge(
        traffic, f"Network latency 0.4 s each way for {phase(3):g} s (proxy)", injected, healed, expect_unavailable=True
    )


def test_connections_reset(proxied: tuple[TcpProxy, ChaosDeployment]) -> None:
    proxy, d = proxied
    with running(Traffic(d)) as traffic:
        traffic.run_for(phase(3))
        injected = time.monotonic()
        proxy.reset()  # every open connection gets an RST, and every new one for 2 s
        traffic.store_down()
        traffic.run_for(phase(2))
        traffic.store_up()
        proxy.heal()
        healed = time.monotonic()
        settle(traffic, healed)
    judge(
        traffic,
        f"Connections reset (RST), new ones too for {phase(2):g} s (proxy)",
        injected,
        healed,
        expect_unavailable=True,
    )


def test_blackhole(proxied: tuple[TcpProxy, ChaosDeployment]) -> None:
    proxy, d = proxied
    with running(Traffic(d)) as traffic:
        traffic.run_for(phase(3))
        injected = time.monotonic()
        proxy.blackhole()
        traffic.store_down()
        traffic.run_for(phase(3))
        traffic.store_up()
        proxy.heal()
        healed = time.monotonic()
        settle(traffic, healed)
    judge(traffic, f"Blackhole for {phase(3):g} s: bytes vanish (proxy)", injected, healed, expect_unavailable=True)


def test_broker_killed_mid_traffic(redis_server: RedisServer, deployment_factory: Factory) -> None:
    d = deployment_factory({"TOKENBROKER_REDIS_URL": redis_server.url})
    with running(Traffic(d)) as traffic:
        traffic.run_for(phase(3))
        injected = time.monotonic()
        victim = d.brokers[0]
        assert victim.process is not None
        victim.process.kill()
        victim.process.wait()
        traffic.run_for(phase(2))
        d.restart_broker(0)
        healed = time.monotonic()
        settle(traffic, healed)
    served = [a for a in traffic.answers if a.broker == 1 and injected <= a.sent < healed and a.outcome == "ok"]
    assert served, "the other broker did not serve while the first was down"
    judge(traffic, f"One broker SIGKILLed, restarted {phase(2):g} s later", injected, healed, expect_unavailable=True)


def cluster_env(cluster: RedisCluster, **extra: str) -> dict[str, str]:
    return {"TOKENBROKER_REDIS_URL": cluster.url, "TOKENBROKER_REDIS_CLUSTER": "true", **extra}


@pytest.fixture
def replicated_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster(size=3, replicas=1, node_timeout_ms=1000).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def victim_master(cluster: RedisCluster) -> tuple[RedisServer, frozenset[str]]:
    """A master that serves some chaos clients' sessions, and those clients."""
    owners = client_slot_owner(cluster.masters()[0].port)
    for master in cluster.masters():
        clients = frozenset(c for c, owner in owners.items() if owner.endswith(f":{master.port}"))
        if clients and master is not cluster.nodes[0]:  # nodes[0] is the brokers' seed node
            return master, clients
    raise AssertionError(f"no master other than the seed serves a client: {owners}")


def wait_promoted(cluster: RedisCluster, replica: RedisServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while cluster.role(replica) != "master":
        assert time.monotonic() < deadline, "the replica was not promoted"
        time.sleep(0.05)
    cluster.wait_ok(timeout)


def test_cluster_master_killed_and_its_replica_promoted(
    replicated_cluster: RedisCluster, deployment_factory: Factory
) -> None:
    d = deployment_factory(cluster_env(replicated_cluster))
    master, clients = victim_master(replicated_cluster)
    replica = replicated_cluster.replica_of(master)
    with running(Traffic(d)) as traffic:
        traffic.run_for(phase(3))
        injected = time.monotonic()
        master.kill()
        # The promoted replica is another Redis process: the epochs of its slots are
        # restamped, so what those clients held before is refused once.
        traffic.state_lost(clients)
        wait_promoted(replicated_cluster, replica)
        healed = time.monotonic()
        settle(traffic, healed)
    untouched = set(CLIENTS) - clients
    assert untouched, "every client was on the killed master: nothing shows the others kept serving"
    judge(traffic, "Redis Cluster master SIGKILLed, replica promoted", injected, healed, expect_unavailable=True)


@pytest.mark.parametrize("min_replicas", [0, 1])
def test_cluster_failover_to_a_lagging_replica(
    replicated_cluster: RedisCluster, deployment_factory: Factory, min_replicas: int
) -> None:
    """The replica stops taking the replication stream (SIGSTOP) for a while, then its
    master dies and it is promoted without the last writes. Without `redis_min_replicas`
    those writes were acknowledged (and are lost: the epoch restamp refuses what they
    guarded); with it they were refused at once (UNAVAILABLE), so nothing acknowledged
    is lost. Either way, no answer breaks a rule."""
    d = deployment_factory(cluster_env(replicated_cluster, TOKENBROKER_REDIS_MIN_REPLICAS=str(min_replicas)))
    master, clients = victim_master(replicated_cluster)
    replica = replicated_cluster.replica_of(master)
    with running(Traffic(d)) as traffic:
        traffic.run_for(phase(3))
        lag_started = time.monotonic()
        replica.pause()
        traffic.run_for(phase(2))
        injected = time.monotonic()
        master.kill()
        traffic.state_lost(clients)  # the replica has nothing after lag_started, and is restamped
        replica.resume()
        wait_promoted(replicated_cluster, replica)
        # The promoted master has no replica: with redis_min_replicas its writes fail until
        # one attaches. The old master comes back (as its supervisor would restart it) and
        # rejoins as the new master's replica.
        master.start()
        replicated_cluster.wait_ok()
        healed = time.monotonic()
        settle(traffic, healed)
    lagging = [a for a in traffic.answers if lag_started <= a.sent and a.done < injected]
    acknowledged = [a for a in lagging if a.kind in ("issue", "revoke", "token") and a.outcome == "ok"]
    name = f"Cluster failover to a replica {phase(2):g} s behind, redis_min_replicas={min_replicas}"
    measured = judge(traffic, name, lag_started, healed, expect_unavailable=True)
    if min_replicas:
        # Writes for the lagging master's clients cannot be acknowledged: only other
        # masters' clients may have had a write acknowledged during the lag.
        on_victim = [a for a in acknowledged if a.client in clients]
        assert not on_victim
    assert measured.answers > 0
