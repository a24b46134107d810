"""Detection in the Redis store (`check_token.lua`), what is Redis's own: every new key under
the client's hash tag, TTLs on every one, bounded sizes, one round trip per validation, a
steady request that writes only its session's HSET, a Redis Cluster, and the same answers
and findings as the memory store over a long random run. (The signals themselves, for
both stores: tests/test_detection_signals.py.)"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from tokenbroker.detection.observe import Observe, networks_of, resource_digest
from tokenbroker.detection.signals import BREADTH_HISTORY_MAX, SIGNAL_BITS, Signal, Thresholds
from tokenbroker.models import Session, SessionLimit
from tokenbroker.reason import Reason
from tokenbroker.store import MemoryStore, SessionOpen, TokenCheck
from tokenbroker.store.redis import RedisStore, tag
from tokenbroker.store.redis_calls import Eval

from support.redis_servers import RedisCluster, RedisServer

AUD = "https://mcp.example.com/mcp"
NOW = int(time.time()) + 600  # the broker's clock in these tests (detection runs on it)
DAY = 86400
ODD_CLIENT_IDS = ["a}b{c", "{a}", "", "%7B", "tb:{x}:nets", "ü{}:x"]


def observe(
    ip: str = "203.0.113.7",
    resource: str | None = "tool-a",
    *,
    inline: int = 0,
    revoke: int = 0,
    outside: bool = False,
    thresholds: Thresholds | None = None,
) -> Observe:
    network, wide = networks_of(ip) if ip else ("", "")
    return Observe(network, wide, resource_digest(resource), inline, revoke, outside, thresholds or Thresholds(), [])


def open_session(store: Any, client_id: str = "client-1", now: int = NOW, ttl: int = 3600) -> Session:
    opening = SessionOpen(client_id, AUD, None, ttl, SessionLimit(max_sessions=100), "203.0.113.7", now)
    return store.open_session(opening)  # type: ignore[no-any-return]


def check(
    session: Session,
    seen: Observe | None,
    now: int,
    *,
    replay: tuple[tuple[str, int], ...] = (),
    jti: str = "jti-1",
) -> TokenCheck:
    issued_at = int(time.time())  # after the store's epoch
    return TokenCheck(session.client_id, session.session_id, AUD, jti, issued_at, "203.0.113.7", replay, now, seen)


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    found = RedisStore.from_url(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    yield found
    found.close()


def raw(store: RedisStore) -> Any:
    """The store's redis-py client, untyped (it decodes replies to text)."""
    return store.client


def commandstats(client: Any) -> dict[str, int]:
    """Calls per command, those run inside scripts included."""
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0) and k not in ("info",)}


# -- keys ---------------------------------------------------------------------------


@pytest.mark.parametrize("client_id", ODD_CLIENT_IDS)
def test_an_observed_check_keeps_every_key_in_the_clients_slot(client_id: str) -> None:
    offline = RedisStore(redis.Redis(host="127.0.0.1", port=1))
    session = Session("s}{1", client_id, AUD, NOW, NOW + 60, NOW, "")
    (call,) = offline._check_calls(check(session, observe(), NOW))
    assert isinstance(call, Eval)
    assert call.script == "check_token"
    keys = call.keys
    assert len(keys) == 10  # the 6 of a plain check and the 4 of detection
    client_slot = key_slot(f"{{{tag(client_id)}}}".encode())
    # (The jti key has its own slot, the epoch is one key on one Redis: test_redis_store.)
    client_keys = [k for k in keys if ":jti:" not in k and not k.endswith(":epoch")]
    assert len(client_keys) == 8
    assert {key_slot(k.encode()) for k in client_keys} == {client_slot}
    for key in (offline.networks_key(client_id), offline.watch_key(client_id)):
        assert key in keys
        assert key.startswith(f"tb:{{{tag(client_id)}}}:")
    assert offline.resources_key(client_id, "s}{1") in keys


def test_a_check_without_observe_sends_what_it_sent_before() -> None:
    offline = RedisStore(redis.Redis(host="127.0.0.1", port=1))
    session = Session("s1", "c", AUD, NOW, NOW + 60, NOW, "")
    (plain,) = offline._check_calls(check(session, None, NOW))
    (watched,) = offline._check_calls(check(session, observe(), NOW))
    assert isinstance(plain, Eval)
    assert isinstance(watched, Eval)
    assert (len(plain.keys), len(plain.args)) == (6, 9)
    assert (watched.keys[:6], watched.args[:9]) == (plain.keys, plain.args)
    assert len(watched.args) == 9 + 9


def test_every_detection_key_has_a_ttl(store: RedisStore) -> None:
    th = Thresholds(network_history_days=2)
    session = open_session(store, ttl=3600)
    assert store.check_token(check(session, observe(thresholds=th), NOW + 1)) is Reason.OK
    client = raw(store)
    assert 2 * DAY - 5 <= client.ttl(store.networks_key("client-1")) <= 2 * DAY
    assert 2 * DAY - 5 <= client.ttl(store.watch_key("client-1")) <= 2 * DAY
    # The resource set lives until the session's hard end, not past it.
    assert 3590 <= client.ttl(store.resources_key("client-1", session.session_id)) <= 3599
    prefix = f"{store.prefix}:{{{tag('client-1')}}}:"
    keys = list(client.scan_iter(match=f"{store.prefix}:*"))
    assert all(k.startswith(prefix) or ":sid:" in k or ":epoch" in k for k in keys), keys
    assert all(client.ttl(k) > 0 for k in keys if ":epoch" not in k), keys


def test_a_check_without_observe_writes_no_detection_state(store: RedisStore) -> None:
    session = open_session(store)
    assert store.check_token(check(session, None, NOW + 1)) is Reason.OK
    client = raw(store)
    assert not client.exists(store.networks_key("client-1"), store.watch_key("client-1"))
    assert not client.exists(store.resources_key("client-1", session.session_id))
    assert client.hmget(store.session_key("client-1", session.session_id), "o", "oa", "bc", "lh") == [None] * 4


# -- bounds -------------------------------------------------------------------------


def test_the_networks_of_a_client_are_bounded_and_age_out(store: RedisStore) -> None:
    th = Thresholds(network_history_max=3, network_history_days=1, learning_seconds=10**6)
    session = open_session(store, ttl=10 * DAY)
    nets = store.networks_key("client-1")
    for i in range(6):
        assert store.check_token(check(session, observe(f"10.{i}.0.1", thresholds=th), NOW + i)) is Reason.OK
    assert raw(store).zcard(nets) == 3
    assert raw(store).zrange(nets, 0, -1) == ["10.3.0.0/24", "10.4.0.0/24", "10.5.0.0/24"]
    # A day and more later the old ones go when the next network is learned.
    assert store.check_token(check(session, observe("10.9.0.1", thresholds=th), NOW + DAY + 10)) is Reason.OK
    assert raw(store).zrange(nets, 0, -1) == ["10.9.0.0/24"]


def test_a_sessions_resources_are_bounded(store: RedisStore) -> None:
    th = Thresholds(session_resources_max=4)
    session = open_session(store)
    for i in range(10):
        assert store.check_token(check(session, observe(resource=f"r{i}", thresholds=th), NOW + 20 + i)) is Reason.OK
    # Repeats of one not kept (the set was full) still add nothing, nor does a known one.
    for i, resource in enumerate(["r9", "r9", "r0", "r9"]):
        assert store.check_token(check(session, observe(resource=resource, thresholds=th), NOW + 40 + i)) is Reason.OK
    assert raw(store).scard(store.resources_key("client-1", session.session_id)) == 4
    watch = raw(store).hgetall(store.watch_key("client-1"))
    assert {k: v for k, v in watch.items() if k.startswith("b") or k == "n"} == {
        "b1": "0",
        "b2": "0",
        "b3": "0",
        "b4": "1",
        "n": "1",
    }


def test_the_breadth_histogram_is_halved_over_its_maximum(store: RedisStore) -> None:
    watch = store.watch_key("client-1")
    raw(store).hset(watch, mapping={"n": BREADTH_HISTORY_MAX, "b1": BREADTH_HISTORY_MAX - 10, "b2": 10})
    session = open_session(store)
    assert store.check_token(check(session, observe(), NOW + 20)) is Reason.OK
    counts = raw(store).hmget(watch, "n", "b1", "b2")
    assert [int(c) for c in counts] == [(BREADTH_HISTORY_MAX - 9) // 2 + 5, (BREADTH_HISTORY_MAX - 9) // 2, 5]
    assert raw(store).hlen(watch) <= 2 + 64 + 24


# -- round trips and writes ------------------------------------------------------


def test_an_observed_check_is_one_round_trip_and_a_steady_one_writes_one_hset(
    store: RedisStore, redis_server: RedisServer
) -> None:
    session = open_session(store)
    seen = observe()
    now = NOW + 20  # past the burst window
    assert store.check_token(check(session, seen, now)) is Reason.OK  # learns network, resource, hour

    def reads() -> int:
        return int(redis_server.info("stats")["total_reads_processed"])

    idle = -reads() + reads()  # what reading the counter costs
    start = reads()
    for i in range(5):
        assert store.check_token(check(session, observe(), now + 1 + i)) is Reason.OK
    assert reads() - start - idle == 5  # one read event per check: one round trip each
    before = commandstats(raw(store))
    for i in range(5):
        assert store.check_token(check(session, observe(), now + 6 + i)) is Reason.OK
    changed = delta(before, commandstats(raw(store)))
    assert changed.pop("evalsha") == 5  # nothing but the script is sent
    # Inside the script: reads, and one HSET (last_seen_at with the origin's time) a check.
    assert changed.pop("hset") == 5
    writes = {"zadd", "sadd", "hincrby", "expire", "set", "del", "zrem", "zremrangebyscore", "zremrangebyrank"}
    assert not writes & changed.keys(), changed
    assert raw(store).hget(store.session_key("client-1", session.session_id), "oa") == str(now + 10)


def test_a_denied_check_writes_nothing(store: RedisStore) -> None:
    th = Thresholds(learning_seconds=1)
    session = open_session(store)
    assert store.check_token(check(session, observe(thresholds=th), NOW + 20)) is Reason.OK
    client = raw(store)
    before = commandstats(client)
    deny = observe("203.0.7.9", "other", inline=SIGNAL_BITS[Signal.NEW_NETWORK], thresholds=th)
    record = (("proof-1", int(time.time()) + 600),)
    assert store.check_token(check(session, deny, NOW + 30, replay=record)) is Reason.ANOMALY
    assert deny.found == [(Signal.NEW_NETWORK, {"network": "203.0.7.0/24", "known_networks": 1})]
    changed = delta(before, commandstats(client))
    assert changed.pop("evalsha") == 1
    assert not {"zadd", "sadd", "hincrby", "hset", "expire"} & changed.keys(), changed
    # The proof was not recorded: the same proof passes once the network is allowed.
    again = observe("203.0.7.9", "other", thresholds=th)
    assert store.check_token(check(session, again, NOW + 31, replay=record)) is Reason.OK
    assert store.check_token(check(session, again, NOW + 32, replay=record)) is Reason.REPLAYED


def test_revoke_session_inline_revokes_as_revoke_session_does(store: RedisStore) -> None:
    session = open_session(store)
    assert store.check_token(check(session, observe(), NOW + 20)) is Reason.OK
    bit = SIGNAL_BITS[Signal.OUTSIDE_USAGE_WINDOW]
    outside = observe(outside=True, inline=bit, revoke=bit)
    assert store.check_token(check(session, outside, NOW + 21)) is Reason.ANOMALY
    assert outside.found == [(Signal.OUTSIDE_USAGE_WINDOW, {"hour": (NOW + 21) // 3600 % 24})]
    assert store.check_token(check(session, observe(), NOW + 22)) is Reason.SESSION_REVOKED
    assert store.check_token(check(session, None, NOW + 22)) is Reason.SESSION_REVOKED
    assert store.sessions("client-1", now=NOW + 22) == []
    assert raw(store).zscore(store.client_key("client-1", "order"), session.session_id) is None
    assert store.revoke_session(session.session_id, now=NOW + 23) == 0  # already revoked


async def test_usage_hours_count_sessions_per_hour(store: RedisStore) -> None:
    # Two hours of life: the last check is in the next hour, up to 3,660 s after NOW (a
    # one-hour session ended before it when NOW fell in an hour's first minute).
    first, second = open_session(store, ttl=7200), open_session(store, ttl=7200)
    hour = NOW // 3600
    for s in (first, second):
        for i in range(3):
            assert store.check_token(check(s, observe(), hour * 3600 + 60 + i)) is Reason.OK
    assert store.check_token(check(first, observe(), hour * 3600 + 3600 + 60)) is Reason.OK
    expected = [0] * 24
    expected[hour % 24] = 2
    expected[(hour + 1) % 24] = 1
    assert store.usage_hours("client-1") == expected
    assert await store.ausage_hours("client-1") == expected
    assert store.usage_hours("nobody") == [0] * 24


# -- Redis Cluster -------------------------------------------------------------------


def test_detection_on_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    store = RedisStore.from_url(redis_cluster.url, cluster=True, prefix=f"t{uuid.uuid4().hex[:8]}")
    try:
        th = Thresholds(learning_seconds=1)
        for client_id in ("alpha", "beta{x}", "gamma"):
            session = open_session(store, client_id)
            assert store.check_token(check(session, observe(thresholds=th), NOW + 20)) is Reason.OK
            seen = observe("198.51.100.9", thresholds=th)
            assert store.check_token(check(session, seen, NOW + 21)) is Reason.OK
            assert [s for s, _ in seen.found] == [Signal.NEW_NETWORK, Signal.CONCURRENT_ORIGINS]
            bit = SIGNAL_BITS[Signal.CONCURRENT_ORIGINS]
            back = observe(inline=bit, revoke=bit, thresholds=th)
            assert store.check_token(check(session, back, NOW + 22)) is Reason.ANOMALY
            assert store.check_token(check(session, observe(thresholds=th), NOW + 23)) is Reason.SESSION_REVOKED
            assert sum(store.usage_hours(client_id)) == 1
        # A revoked jti (checked beside the script, in its own slot) refuses: no findings.
        session = open_session(store, "delta")
        store.revoke_token("jti-x", until=NOW + 600, now=NOW)
        seen = observe(outside=True)
        assert store.check_token(check(session, seen, NOW + 20, jti="jti-x")) is Reason.TOKEN_REVOKED
        assert seen.found == []
    finally:
        store.close()


# -- the same as the memory store ----------------------------------------------------

_IPS = ["203.0.113.7", "203.0.113.99", "203.0.7.1", "198.51.100.9", "198.51.7.7", "2001:db8:1::1", ""]
_IP_WEIGHTS = [12, 2, 2, 1, 1, 1, 1]  # mostly the usual network, so the others stand out
_RESOURCES = [None, "a", "b", "c", "d", "e", "f", "g", "h"]
_RESOURCE_WEIGHTS = [4, 8, 4, 1, 1, 1, 1, 1, 1]  # most sessions touch a and b: p95 is low
_STEPS = [0, 1, 2, 3, 5, 20, 40, 400, 3600, DAY + 7]
_STEP_WEIGHTS = [6, 6, 2, 2, 1, 1, 1, 1, 1, 1]  # bursts after opening, and hours and days


def test_the_redis_store_answers_and_finds_what_the_memory_store_does(store: RedisStore) -> None:
    """A long random run of observed validations (several sessions, networks, resources,
    actions, a clock jumping by seconds to days): every answer, every finding and the
    usage hours the same in both stores."""
    rng = random.Random(1234)
    th = Thresholds(
        network_history_days=1,
        network_history_max=3,
        learning_seconds=50,
        concurrent_window_seconds=30,
        breadth_min_sessions=2,
        breadth_min_resources=2,
        session_resources_max=5,
        burst_window_seconds=5,
        burst_requests=3,
    )
    memory = MemoryStore(clock=lambda: time.time() - 5)
    now = NOW
    sessions: list[tuple[Session, Session]] = []
    until = NOW + 600 * DAY  # replay records outlive the run on both clocks
    tally: Counter[str] = Counter()
    for step in range(1000):
        if not sessions or rng.random() < 0.08:
            sessions.append((open_session(memory, now=now, ttl=40 * DAY), open_session(store, now=now, ttl=40 * DAY)))
        now += rng.choices(_STEPS, _STEP_WEIGHTS)[0]
        in_memory, in_redis = rng.choice(sessions[-3:]) if rng.random() < 0.4 else sessions[-1]
        ip, resource = rng.choices(_IPS, _IP_WEIGHTS)[0], rng.choices(_RESOURCES, _RESOURCE_WEIGHTS)[0]
        inline = rng.getrandbits(5) if rng.random() < 0.3 else 0
        revoke = inline & rng.getrandbits(5) if rng.random() < 0.25 else 0
        outside = rng.random() < 0.05
        replay = ((f"proof-{rng.randrange(400)}", until),) if rng.random() < 0.5 else ()
        seen = [observe(ip, resource, inline=inline, revoke=revoke, outside=outside, thresholds=th) for _ in range(2)]
        answers = [
            memory.check_token(check(in_memory, seen[0], now, replay=replay)),
            store.check_token(check(in_redis, seen[1], now, replay=replay)),
        ]
        assert answers[0] is answers[1], (step, answers, seen)
        assert seen[0].found == seen[1].found, (step, seen)
        tally.update([answers[1].name, *(signal.value for signal, _ in seen[1].found)])
    assert memory.usage_hours("client-1") == store.usage_hours("client-1")
    assert sum(store.usage_hours("client-1")) > 0
    # The run went everywhere it is meant to: every signal, every kind of answer.
    assert {*Signal, "OK", "ANOMALY", "SESSION_REVOKED", "REPLAYED"} <= tally.keys(), tally
