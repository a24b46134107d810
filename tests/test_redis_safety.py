"""The Redis store does not lose security state silently (issue #8 items 2, 3, 4, 8), against
real redis-server processes: state loss (epochs), eviction policy, out of memory, replicas
(WAIT), clock skew between replicas, per-client record quotas, contended session opens."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from test_e2e_service import deploy
from test_e2e_service import issue as e2e_issue

from tokenbroker import Broker, Keyring, LimitPolicy, ProofSigner, Reason, SessionLimit
from tokenbroker.errors import SessionLimitExceededError, SessionNotFoundError, StoreUnavailableError
from tokenbroker.metrics import Metrics
from tokenbroker.models import Session
from tokenbroker.store.base import Remembered, SessionOpen, TokenCheck
from tokenbroker.store.redis import RedisStore

from support.redis_servers import HOST, RedisCluster, RedisServer, _command

AUD = "https://mcp.example.com/mcp"
ISSUER = "https://broker.example"


def make_store(url: str, *, cluster: bool = False, prefix: str = "", **options: Any) -> RedisStore:
    prefix = prefix or f"s{uuid.uuid4().hex[:10]}"
    return RedisStore.from_url(url, cluster=cluster, prefix=prefix, **options)


def now() -> int:
    return int(time.time())


def open_session(store: RedisStore, client_id: str = "c1", limit: SessionLimit | None = None) -> Session:
    return store.open_session(
        SessionOpen(
            client_id=client_id,
            audience=AUD,
            session_id=None,
            ttl_seconds=600,
            limit=limit or SessionLimit(),
            client_ip="",
            now=now(),
        )
    )


def check(
    store: RedisStore,
    session: Session,
    *,
    jti: str = "jti-1",
    issued_at: int | None = None,
    replay: tuple[tuple[str, int], ...] = (),
    at: int | None = None,
) -> Reason:
    return store.check_token(
        TokenCheck(
            client_id=session.client_id,
            session_id=session.session_id,
            audience=AUD,
            jti=jti,
            issued_at=now() if issued_at is None else issued_at,
            client_ip="",
            replay=replay,
            now=now() if at is None else at,
        )
    )


def remember(store: RedisStore, key: str, *, client_id: str = "c1", issued_at: int | None = None) -> Remembered:
    t = now()
    return store.remember(
        key, client_id=client_id, issued_at=t if issued_at is None else issued_at, until=t + 60, now=t
    )


def epoch_start(store: RedisStore, key: str) -> int:
    return int(str(store.client.get(store.epoch_key(key))).split()[0])


def next_second() -> None:
    """Sleeps into the next second: epochs and `iat` have one-second resolution."""
    time.sleep(1.05 - time.time() % 1)


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    made = make_store(redis_server.url)
    yield made
    made.close()


# -- item 2: state loss ---------------------------------------------------------------------


def test_used_assertion_is_refused_as_stale_after_flushall(store: RedisStore) -> None:
    issued = now()
    assert remember(store, "assertion-1", issued_at=issued) is Remembered.NEW
    next_second()
    store.client.flushall()
    assert remember(store, "assertion-1", issued_at=issued) is Remembered.STALE


def test_used_assertion_is_refused_as_stale_after_a_restart_without_persistence(
    redis_server: RedisServer, store: RedisStore
) -> None:
    issued = now()
    assert remember(store, "assertion-1", issued_at=issued) is Remembered.NEW
    next_second()
    redis_server.restart()
    assert remember(store, "assertion-1", issued_at=issued) is Remembered.STALE
    assert remember(store, "assertion-2") is Remembered.NEW  # issued after the loss: accepted


def test_revocation_lost_by_a_snapshot_restore_refuses_the_token(tmp_path: Path) -> None:
    # A crash after the last RDB snapshot: Redis comes back with the session not revoked.
    server = RedisServer(directory=tmp_path / "redis").start()
    try:
        store = make_store(server.url)
        session = open_session(store)
        issued = now()
        assert check(store, session, issued_at=issued) is Reason.OK
        _command(server.port, "SAVE", timeout=5.0)
        assert store.revoke_session(session.session_id, now=now()) == 1
        assert check(store, session, issued_at=issued) is Reason.SESSION_REVOKED
        next_second()
        server.kill()  # SIGKILL: the revocation was never saved
        server.extra_args = ("--dbfilename", "dump.rdb")
        server.start()
        assert store.client.hget(store.session_key("c1", session.session_id), "revoked") is None  # restored stale
        assert check(store, session, issued_at=issued) is Reason.SESSION_UNKNOWN
        assert store.epoch_guard is not None
        assert store.epoch_guard.restamped >= 1
        assert check(store, session) is Reason.OK  # a token issued after the restart is accepted
        store.close()
    finally:
        server.stop()


def test_replay_record_lost_by_a_failover_refuses_what_was_issued_before(tmp_path: Path) -> None:
    # The replica is promoted; the master's last writes never reached it.
    master = RedisServer(directory=tmp_path / "master").start()
    replica = RedisServer(directory=tmp_path / "replica", extra_args=("--replicaof", HOST, str(master.port))).start()
    try:
        prefix = f"s{uuid.uuid4().hex[:10]}"
        before = make_store(master.url, prefix=prefix)
        issued = now()
        assert remember(before, "assertion-1", issued_at=issued) is Remembered.NEW
        deadline = time.monotonic() + 10
        while replica.info("replication").get("master_link_status") != "up" or not _command(
            replica.port, "EXISTS", before.epoch_key(before.records_key("c1"))
        ).startswith(b":1"):
            assert time.monotonic() < deadline, "the replica never caught up"
            time.sleep(0.05)
        _command(replica.port, "REPLICAOF", "NO", "ONE")
        _command(replica.port, "DEL", before.records_key("c1"))  # the write the replica missed
        next_second()
        after = make_store(replica.url, prefix=prefix)
        assert remember(after, "assertion-1", issued_at=issued) is Remembered.STALE
        assert remember(after, "assertion-2") is Remembered.NEW
        before.close()
        after.close()
    finally:
        replica.stop()
        master.stop()


def test_restarted_redis_with_its_state_intact_keeps_the_epoch_on_the_same_process(store: RedisStore) -> None:
    issued = now()
    next_second()
    store.client.connection_pool.disconnect()  # type: ignore[union-attr]  # standalone: a Redis; new connections
    assert remember(store, "assertion-1", issued_at=issued) is Remembered.NEW
    assert store.epoch_guard is not None
    assert store.epoch_guard.restamped == 0


def test_token_issued_before_a_lost_epoch_is_refused_and_records_nothing(store: RedisStore) -> None:
    session = open_session(store)
    issued = now()
    next_second()
    store.client.delete(store.epoch_key(store.records_key("c1")))  # a failover that lost the epoch
    record = (("proof-1", now() + 60),)
    assert check(store, session, issued_at=issued, replay=record) is Reason.SESSION_UNKNOWN
    assert store.client.zcard(store.records_key("c1")) == 0
    assert check(store, session, replay=record) is Reason.OK  # issued after the new epoch


def test_fresh_store_accepts_what_is_issued_after_it_started(redis_server: RedisServer) -> None:
    store = make_store(redis_server.url)
    assert epoch_start(store, store.records_key("c1")) <= now()
    session = open_session(store)
    assert check(store, session, replay=(("proof-1", now() + 60),)) is Reason.OK
    assert remember(store, "assertion-1") is Remembered.NEW
    store.close()


def test_restarted_broker_keeps_the_existing_epoch(redis_server: RedisServer, store: RedisStore) -> None:
    issued = now()
    next_second()
    again = RedisStore.from_url(redis_server.url, prefix=store.prefix)
    assert again.prepare() == 0  # SET NX: nothing created, nothing issued earlier refused
    assert remember(again, "assertion-1", issued_at=issued) is Remembered.NEW
    again.close()


def test_cluster_revocation_lost_with_its_masters_state_refuses_the_token(redis_cluster: RedisCluster) -> None:
    store = make_store(redis_cluster.url, cluster=True)
    try:
        session = open_session(store, "c1")
        # A cluster store's client is a RedisCluster: it has get_node_from_key.
        client_node = store.client.get_node_from_key(store.sessions_key("c1")).port  # type: ignore[union-attr]
        jti = next(
            j
            for j in (f"jti-{i}" for i in range(1000))
            if store.client.get_node_from_key(store.revoked_token_key(j)).port != client_node  # type: ignore[union-attr]
        )
        issued = epoch_start(store, store.sessions_key("c1"))
        assert store.revoke_token(jti, until=now() + 600, now=now()) == 1
        assert check(store, session, jti=jti, issued_at=issued) is Reason.TOKEN_REVOKED
        next_second()
        jti_node = store.client.get_node_from_key(store.revoked_token_key(jti)).port  # type: ignore[union-attr]
        _command(jti_node, "FLUSHALL")  # that master alone loses its state
        assert check(store, session, jti=jti, issued_at=issued) is Reason.SESSION_UNKNOWN
        assert check(store, session, jti=jti) is Reason.OK  # a token issued after the loss
    finally:
        store.close()


def test_cluster_master_that_lost_its_state_refuses_its_clients_stale_assertions(
    redis_cluster: RedisCluster,
) -> None:
    store = make_store(redis_cluster.url, cluster=True)
    try:
        # A cluster store's client is a RedisCluster: it has get_node_from_key.
        ports = {c: store.client.get_node_from_key(store.records_key(c)).port for c in (f"c{i}" for i in range(50))}  # type: ignore[union-attr]
        lost = next(iter(ports.values()))
        victim = next(c for c, p in ports.items() if p == lost)
        bystander = next(c for c, p in ports.items() if p != lost)
        issued = now()
        assert remember(store, "a", client_id=victim, issued_at=issued) is Remembered.NEW
        assert remember(store, "a", client_id=bystander, issued_at=issued) is Remembered.NEW
        next_second()
        _command(lost, "FLUSHALL")
        assert remember(store, "a", client_id=victim, issued_at=issued) is Remembered.STALE
        assert remember(store, "a", client_id=bystander, issued_at=issued) is Remembered.SEEN
    finally:
        store.close()


# -- item 3: eviction ------------------------------------------------------------------------


def evicting_server(*extra: str) -> RedisServer:
    return RedisServer(extra_args=("--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru", *extra)).start()


def test_evicting_redis_is_refused_with_the_setting_and_the_fix_named() -> None:
    server = evicting_server()
    try:
        store = make_store(server.url)
        with pytest.raises(StoreUnavailableError) as raised:
            remember(store, "assertion-1")
        message = str(raised.value)
        assert "maxmemory-policy 'volatile-lru'" in message
        assert "CONFIG SET maxmemory-policy noeviction" in message
        assert "redis_allow_unsafe_eviction" in message
        with pytest.raises(StoreUnavailableError, match="maxmemory-policy"):
            store.revoke_token("jti-1", until=now() + 60, now=now())
        store.close()
    finally:
        server.stop()


def test_unsafe_eviction_override_lets_the_store_serve() -> None:
    server = evicting_server()
    try:
        store = make_store(server.url, allow_unsafe_eviction=True)
        assert remember(store, "assertion-1") is Remembered.NEW
        store.close()
    finally:
        server.stop()


def test_eviction_policy_is_checked_again_when_redis_comes_back(redis_server: RedisServer) -> None:
    store = make_store(redis_server.url)
    assert remember(store, "assertion-1") is Remembered.NEW
    redis_server.extra_args = ("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    redis_server.restart()
    with pytest.raises(StoreUnavailableError, match="maxmemory-policy 'allkeys-lru'"):
        remember(store, "assertion-2")
    _command(redis_server.port, "CONFIG", "SET", "maxmemory-policy", "noeviction")
    assert remember(store, "assertion-3") is Remembered.NEW  # the next connection is checked again
    store.close()


def test_redis_without_config_needs_the_policy_stated() -> None:
    server = RedisServer(extra_args=("--rename-command", "CONFIG", "")).start()
    try:
        refused = make_store(server.url)
        with pytest.raises(StoreUnavailableError, match="redis_maxmemory_policy"):
            remember(refused, "assertion-1")
        refused.close()
        stated = make_store(server.url, declared_maxmemory_policy="noeviction")
        assert remember(stated, "assertion-1") is Remembered.NEW
        stated.close()
    finally:
        server.stop()


def test_every_cluster_master_is_checked(redis_cluster: RedisCluster) -> None:
    last = redis_cluster.nodes[-1].port
    _command(last, "CONFIG", "SET", "maxmemory-policy", "allkeys-random")
    try:
        with pytest.raises(StoreUnavailableError, match="allkeys-random"):
            make_store(redis_cluster.url, cluster=True).prepare()
    finally:
        _command(last, "CONFIG", "SET", "maxmemory-policy", "noeviction")


def test_out_of_memory_redis_fails_closed_and_records_nothing(store: RedisStore) -> None:
    session = open_session(store)
    _command(store_port(store), "CONFIG", "SET", "maxmemory", "1")
    try:
        with pytest.raises(StoreUnavailableError, match="out of memory"):
            check(store, session, replay=(("proof-1", now() + 60),))
        with pytest.raises(StoreUnavailableError, match="out of memory"):
            remember(store, "assertion-1")
    finally:
        _command(store_port(store), "CONFIG", "SET", "maxmemory", "0")
    assert store.client.zcard(store.records_key("c1")) == 0


def store_port(store: RedisStore) -> int:
    return int(store.client.connection_pool.connection_kwargs["port"])  # type: ignore[union-attr]  # a standalone store


# -- item 3: replicas --------------------------------------------------------------------------


@pytest.fixture
def replica(redis_server: RedisServer) -> Iterator[RedisServer]:
    server = RedisServer(extra_args=("--replicaof", HOST, str(redis_server.port))).start()
    deadline = time.monotonic() + 10
    while server.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica did not sync"
        time.sleep(0.05)
    yield server
    server.stop()


def test_writes_wait_for_a_replica_and_are_on_it_when_acknowledged(
    redis_server: RedisServer, replica: RedisServer
) -> None:
    store = make_store(redis_server.url, min_replicas=1, replica_timeout_ms=2000)
    session = open_session(store)
    assert check(store, session, replay=(("proof-1", now() + 60),)) is Reason.OK
    key = store.records_key("c1")
    # No polling: WAIT returned only after the replica had the record.
    assert _command(replica.port, "ZSCORE", key, "p:proof-1", timeout=2.0).startswith(b"$")
    assert store.revoke_token("jti-1", until=now() + 60, now=now()) == 1
    assert _command(replica.port, "EXISTS", store.revoked_token_key("jti-1"), timeout=2.0) == b":1\r\n"
    store.close()


def test_writes_fail_closed_when_too_few_replicas_acknowledge(redis_server: RedisServer) -> None:
    store = make_store(redis_server.url, prepare=False, min_replicas=1, replica_timeout_ms=50)
    with pytest.raises(StoreUnavailableError, match="redis_min_replicas"):
        store.prepare()
    with pytest.raises(StoreUnavailableError, match="0 of 1 replicas"):
        remember(store, "assertion-1")
    with pytest.raises(StoreUnavailableError, match="redis_min_replicas"):
        store.revoke_token("jti-1", until=now() + 60, now=now())
    store.close()


def test_validation_fails_closed_when_the_replica_is_gone(redis_server: RedisServer, replica: RedisServer) -> None:
    store = make_store(redis_server.url, min_replicas=1, replica_timeout_ms=100)
    session = open_session(store)
    replica.kill()
    with pytest.raises(StoreUnavailableError, match="redis_min_replicas"):
        check(store, session, replay=(("proof-1", now() + 60),))
    store.close()


# -- item 8: clock skew ------------------------------------------------------------------------


def test_slow_broker_refuses_a_proof_after_the_fast_replicas_record_would_have_expired(
    redis_server: RedisServer,
) -> None:
    # A proof is accepted until iat + max_age + leeway on the checking broker's clock and its
    # record was kept until iat + max_age + 2 * leeway + 1 on the fast broker's clock. The
    # broker 8 s behind accepts it until 8 s later than that: the record must still be there.
    keyring = Keyring.generate()
    window: dict[str, Any] = {"dpop_max_age_seconds": 2, "leeway_seconds": 1}
    fast_store = make_store(redis_server.url, max_clock_skew_seconds=10)
    slow_store = make_store(redis_server.url, prefix=fast_store.prefix, max_clock_skew_seconds=10)
    fast = Broker(keyring, issuer=ISSUER, store=fast_store, **window)
    slow = Broker(keyring, issuer=ISSUER, store=slow_store, clock=lambda: time.time() - 8, **window)
    signer = ProofSigner()
    token = fast.issue(client_id="agent", audience=AUD, dpop_jkt=signer.jkt)
    iat = now()
    request = {"audience": AUD, "http_method": "POST", "http_uri": AUD}
    proof = signer.sign("POST", AUD, token.access_token, iat=iat)
    assert fast.validate(token.access_token, dpop_proof=proof, **request).valid
    time.sleep(max(0.0, iat + 7.1 - time.time()))  # the slow broker's clock reads iat - 1
    fresh = signer.sign("POST", AUD, token.access_token, iat=iat)  # same window, new jti: control
    assert slow.validate(token.access_token, dpop_proof=fresh, **request).valid
    replayed = slow.validate(token.access_token, dpop_proof=proof, **request)
    assert (replayed.valid, replayed.reason) == (False, Reason.REPLAYED)


def test_observed_clock_skew_is_exposed_as_a_gauge(store: RedisStore) -> None:
    metrics = Metrics()
    metrics.watch_redis_clock(store)
    assert "tokenbroker_redis_clock_skew_seconds NaN" in metrics.render().decode()
    session = open_session(store)
    check(store, session, at=now() - 8)  # this broker's clock runs 8 s behind Redis's
    line = next(x for x in metrics.render().decode().splitlines() if x.startswith("tokenbroker_redis_clock_skew"))
    assert 7 <= float(line.split()[1]) <= 9
    assert not math.isnan(float(line.split()[1]))


# -- item 4: per-client bounds ------------------------------------------------------------------


def test_client_over_its_record_quota_is_refused_and_its_neighbours_are_not(redis_server: RedisServer) -> None:
    store = make_store(redis_server.url, max_records_per_client=3)
    noisy, quiet = open_session(store, "noisy"), open_session(store, "quiet")
    for i in range(3):
        assert check(store, noisy, replay=((f"proof-{i}", now() + 60),)) is Reason.OK
    assert check(store, noisy, replay=(("proof-3", now() + 60),)) is Reason.REPLAY_CACHE_FULL
    assert remember(store, "assertion-1", client_id="noisy") is Remembered.FULL
    assert check(store, quiet, replay=(("proof-0", now() + 60),)) is Reason.OK
    assert remember(store, "assertion-1", client_id="quiet") is Remembered.NEW
    assert store.client.zcard(store.records_key("noisy")) == 3
    store.close()


def test_expired_records_leave_the_quota(redis_server: RedisServer) -> None:
    store = make_store(redis_server.url, max_records_per_client=1, max_clock_skew_seconds=0)
    session = open_session(store)
    assert check(store, session, replay=(("proof-0", now() + 1),)) is Reason.OK
    time.sleep(max(0.0, now() + 1.05 - time.time()))
    next_second()
    assert check(store, session, replay=(("proof-1", now() + 60),)) is Reason.OK
    store.close()


def test_revoked_token_records_nothing(store: RedisStore) -> None:
    session = open_session(store)
    store.revoke_token("jti-1", until=now() + 60, now=now())
    assert check(store, session, jti="jti-1", replay=(("proof-1", now() + 60),)) is Reason.TOKEN_REVOKED
    assert store.client.zcard(store.records_key("c1")) == 0
    assert check(store, session, jti="jti-2", replay=(("proof-1", now() + 60),)) is Reason.OK


def test_refused_session_records_nothing(store: RedisStore) -> None:
    session = open_session(store)
    store.revoke_session(session.session_id, now=now())
    assert check(store, session, replay=(("proof-1", now() + 60),)) is Reason.SESSION_REVOKED
    assert store.client.zcard(store.records_key("c1")) == 0


# -- item 4: contended session opens --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["single", "cluster"])
@pytest.mark.parametrize("policy", [LimitPolicy.EVICT_OLDEST, LimitPolicy.REJECT])
def test_contended_session_opens_succeed_or_meet_the_limit_never_an_outage(
    request: pytest.FixtureRequest, kind: str, policy: LimitPolicy
) -> None:
    if kind == "single":
        store = make_store(request.getfixturevalue("redis_server").url)
    else:
        store = make_store(request.getfixturevalue("redis_cluster").url, cluster=True)
    limit = SessionLimit(3, policy)
    start = threading.Barrier(24)

    def one(_: int) -> str:
        start.wait()
        try:
            open_session(store, "busy", limit)
            return "ok"
        except SessionLimitExceededError:
            return "limit"
        except StoreUnavailableError as exc:
            return f"unavailable: {exc}"

    with ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(one, range(24)))
    if policy is LimitPolicy.EVICT_OLDEST:
        assert outcomes == ["ok"] * 24
    else:
        assert sorted(outcomes) == ["limit"] * 21 + ["ok"] * 3
    assert len(store.sessions("busy", now=now())) == 3
    store.close()


def test_evicted_session_is_revoked_and_the_newest_stay_live(store: RedisStore) -> None:
    limit = SessionLimit(2, LimitPolicy.EVICT_OLDEST)
    sessions = [open_session(store, limit=limit) for _ in range(3)]
    assert [check(store, s) for s in sessions] == [Reason.SESSION_REVOKED, Reason.OK, Reason.OK]


def client_keys(store: RedisStore, client_id: str) -> tuple[int, int, int]:
    """(the client's session hashes, all its keys, session index keys) in Redis."""
    tagged = [str(k) for k in store.client.scan_iter(match=store.client_key(client_id, "*"), count=1000)]
    hashes = [k for k in tagged if k.startswith(store.client_key(client_id, "session:"))]
    indexes = list(store.client.scan_iter(match=f"{store.prefix}:sid:*", count=1000))
    return len(hashes), len(tagged), len(indexes)


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_evicting_opens_leave_a_client_keys_bounded_by_its_session_limit(
    request: pytest.FixtureRequest, kind: str
) -> None:
    if kind == "single":
        store = make_store(request.getfixturevalue("redis_server").url)
    else:
        store = make_store(request.getfixturevalue("redis_cluster").url, cluster=True)
    limit = SessionLimit(3, LimitPolicy.EVICT_OLDEST)
    for _ in range(2000):
        open_session(store, "noisy", limit)
    hashes, tagged, indexes = client_keys(store, "noisy")
    # Live sessions plus the last max_sessions evicted ones; the sets and the counter.
    assert hashes <= 2 * limit.max_sessions
    assert indexes <= 2 * limit.max_sessions
    assert tagged <= hashes + 4
    store.close()


def test_a_purged_evicted_session_is_refused_everywhere(store: RedisStore) -> None:
    limit = SessionLimit(1, LimitPolicy.EVICT_OLDEST)
    purged, evicted, live = (open_session(store, limit=limit) for _ in range(3))
    assert client_keys(store, "c1")[0] == 2  # the purged session's hash is gone
    assert [check(store, s) for s in (purged, evicted, live)] == [
        Reason.SESSION_UNKNOWN,
        Reason.SESSION_REVOKED,
        Reason.OK,
    ]
    with pytest.raises(SessionNotFoundError):
        store.open_session(
            SessionOpen(
                client_id="c1",
                audience=AUD,
                session_id=purged.session_id,
                ttl_seconds=600,
                limit=limit,
                client_ip="",
                now=now(),
            )
        )
    assert store.revoke_session(purged.session_id, now=now()) == 0


def test_evicted_sessions_a_failed_purge_left_are_purged_by_the_next_open(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = SessionLimit(2, LimitPolicy.EVICT_OLDEST)
    with monkeypatch.context() as patched:  # the purge round trip never happens
        patched.setattr(store, "_purge_calls", lambda *_: [])
        for _ in range(12):
            open_session(store, limit=limit)
        assert client_keys(store, "c1")[0] == 12
    open_session(store, limit=limit)
    hashes, _, indexes = client_keys(store, "c1")
    assert (hashes, indexes) == (2 * limit.max_sessions, 2 * limit.max_sessions)


def test_client_revocation_covers_sessions_opened_before_it_only(store: RedisStore) -> None:
    before = [open_session(store), open_session(store)]
    assert store.revoke_client("c1", now=now()) == 2
    after = open_session(store)
    assert [check(store, s) for s in before] == [Reason.CLIENT_REVOKED] * 2
    assert check(store, after) is Reason.OK


def test_replay_record_outlives_its_window_on_redis_clock_for_a_slower_replica(redis_server: RedisServer) -> None:
    fast = make_store(redis_server.url, max_clock_skew_seconds=10)
    slow = make_store(redis_server.url, prefix=fast.prefix, max_clock_skew_seconds=10)
    session = open_session(fast)
    t = now()
    record = (("proof-1", t + 1),)  # the fast replica would forget it after t + 1
    assert check(fast, session, replay=record, at=t) is Reason.OK
    time.sleep(max(0.0, t + 2.1 - time.time()))
    assert check(slow, session, replay=record, at=now() - 8) is Reason.REPLAYED
    fast.close()
    slow.close()


# -- end to end: `tokenbroker serve` processes ------------------------------------------------


def test_serve_refuses_a_redis_that_comes_back_evicting_with_unavailable_naming_the_fix(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    deployment = deploy(tmp_path, {"TOKENBROKER_REDIS_URL": redis_server.url})
    process = deployment.broker()
    try:
        signer = ProofSigner()
        assert e2e_issue(deployment, process, signer).access_token
        redis_server.extra_args = ("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
        redis_server.restart()
        with pytest.raises(StoreUnavailableError, match="maxmemory-policy") as raised:
            e2e_issue(deployment, process, signer)
        assert "CONFIG SET maxmemory-policy noeviction" in str(raised.value)
    finally:
        assert process.stop() == 0, process.log.read_text()[-2000:]


@pytest.mark.parametrize("kind", ["single", "cluster"])
def test_24_parallel_issue_token_calls_with_evict_oldest_never_get_unavailable(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    if kind == "single":
        env = {"TOKENBROKER_REDIS_URL": request.getfixturevalue("redis_server").url}
    else:
        env = {
            "TOKENBROKER_REDIS_URL": request.getfixturevalue("redis_cluster").url,
            "TOKENBROKER_REDIS_CLUSTER": "true",
        }
    deployment = deploy(tmp_path, env)
    process = deployment.broker()
    try:
        start = threading.Barrier(24)

        def one(_: int) -> str:
            start.wait()
            try:
                token_type: str = e2e_issue(
                    deployment, process, ProofSigner(), client_id="evicting", assertion_for="evicting"
                ).token_type
                return token_type
            except (StoreUnavailableError, SessionLimitExceededError) as exc:
                return type(exc).__name__

        with ThreadPoolExecutor(24) as pool:
            outcomes = list(pool.map(one, range(24)))
        assert outcomes == ["DPoP"] * 24
    finally:
        assert process.stop() == 0, process.log.read_text()[-2000:]
