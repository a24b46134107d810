"""Sessions that continue by key and end when idle (issue 10, "Sessions"), on every store:
MemoryStore, RedisStore on one Redis and on a three-master Redis Cluster (real
redis-server processes). Time is the stores' `now` argument (and the broker's clock), so
idle windows pass without sleeping."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from tokenbroker import Broker, IssueRequest, Keyring, LimitPolicy, MemoryStore, Reason, SessionLimit
from tokenbroker.errors import InvalidArgumentError, SessionLimitExceededError, SessionNotFoundError
from tokenbroker.models import IssuedToken, Session
from tokenbroker.store import SessionOpen, Store, TokenCheck
from tokenbroker.store.redis import RedisStore

from support.brokers import FakeClock
from support.redis_servers import RedisCluster, RedisServer

# Ahead of real time, as in the Redis store tests: replay records and epochs run on Redis's clock.
NOW = int(time.time()) + 600
AUD = "https://mcp.example.com/mcp"
OTHER_AUD = "https://other.example.com/mcp"
ISSUER = "https://broker.example"


@pytest.fixture(params=["memory", "redis", "cluster"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """Each test runs on each store; the Redis ones get a fresh prefix (the cluster is shared)."""
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        url, cluster = server.url, False
    else:
        nodes: RedisCluster = request.getfixturevalue("redis_cluster")
        url, cluster = nodes.url, True
    redis_store = RedisStore.from_url(url, cluster=cluster, prefix=f"t{uuid.uuid4().hex[:10]}")
    yield redis_store
    redis_store.close()


def opening(
    continuation: str | None = "key-1",
    *,
    client_id: str = "client-1",
    audience: str = AUD,
    session_id: str | None = None,
    ttl: int = 3600,
    limit: SessionLimit | None = None,
    ip: str = "",
    idle: int | None = None,
    token_ttl: int = 0,
    now: int = NOW,
) -> SessionOpen:
    return SessionOpen(
        client_id=client_id,
        audience=audience,
        session_id=session_id,
        ttl_seconds=ttl,
        limit=limit or SessionLimit(2, LimitPolicy.REJECT),
        client_ip=ip,
        now=now,
        continuation=continuation,
        idle_seconds=idle,
        token_ttl_seconds=token_ttl,
    )


def check(store: Store, session: Session, now: int, jti: str = "jti-1") -> Reason:
    return store.check_token(
        TokenCheck(
            client_id=session.client_id,
            session_id=session.session_id,
            audience=session.audience,
            jti=jti,
            issued_at=int(time.time()),  # after the store's state epoch
            client_ip="",
            replay=(),
            now=now,
        )
    )


def listed(store: Store, now: int, client_id: str = "client-1") -> list[tuple[str, int]]:
    return [(s.session_id, s.expires_at) for s in store.sessions(client_id, now=now)]


# -- continuing by key --------------------------------------------------------------------------


def test_the_same_continuation_continues_its_session(store: Store) -> None:
    first = store.open_session(opening(ip="192.0.2.1"))
    again = store.open_session(opening(ip="192.0.2.2", now=NOW + 5))
    assert again.session_id == first.session_id
    assert (again.created_at, again.last_seen_at, again.last_ip) == (NOW, NOW + 5, "192.0.2.2")
    [seen] = store.sessions("client-1", now=NOW + 6)
    assert (seen.session_id, seen.last_seen_at, seen.last_ip) == (first.session_id, NOW + 5, "192.0.2.2")


def test_a_different_continuation_opens_another_session(store: Store) -> None:
    first = store.open_session(opening("key-1"))
    other = store.open_session(opening("key-2"))
    assert other.session_id != first.session_id
    assert {s for s, _ in listed(store, NOW + 1)} == {first.session_id, other.session_id}
    assert store.open_session(opening("key-1")).session_id == first.session_id
    assert store.open_session(opening("key-2")).session_id == other.session_id


def test_no_continuation_opens_a_new_session_each_time(store: Store) -> None:
    first = store.open_session(opening(None))
    assert store.open_session(opening(None)).session_id != first.session_id
    with pytest.raises(SessionLimitExceededError):
        store.open_session(opening(None))


def test_a_hundred_opens_with_one_continuation_never_reach_the_limit(store: Store) -> None:
    limit = SessionLimit(2, LimitPolicy.REJECT)
    ids = {store.open_session(opening(limit=limit, now=NOW + i)).session_id for i in range(100)}
    assert len(ids) == 1
    assert [s for s, _ in listed(store, NOW + 100)] == list(ids)
    store.open_session(opening("key-2", limit=limit, now=NOW + 100))  # the second place is still free


def test_the_continuation_is_the_clients_own(store: Store) -> None:
    mine = store.open_session(opening(client_id="client-1"))
    theirs = store.open_session(opening(client_id="client-2"))
    assert theirs.session_id != mine.session_id
    assert store.open_session(opening(client_id="client-1")).session_id == mine.session_id


def test_the_continuation_of_another_audience_opens_a_session_for_this_one(store: Store) -> None:
    first = store.open_session(opening(audience=AUD))
    other = store.open_session(opening(audience=OTHER_AUD))
    assert other.session_id != first.session_id
    assert other.audience == OTHER_AUD
    assert store.open_session(opening(audience=OTHER_AUD)).session_id == other.session_id


def test_a_session_id_comes_before_the_continuation(store: Store) -> None:
    named = store.open_session(opening("key-1"))
    by_id = store.open_session(opening(None))
    assert store.open_session(opening("key-1", session_id=by_id.session_id)).session_id == by_id.session_id
    assert store.open_session(opening("key-1")).session_id == named.session_id
    with pytest.raises(SessionNotFoundError):
        store.open_session(opening("key-1", session_id="no-such-session"))


def test_a_revoked_session_is_not_continued(store: Store) -> None:
    first = store.open_session(opening())
    assert store.revoke_session(first.session_id, now=NOW + 1) == 1
    second = store.open_session(opening(now=NOW + 2))
    assert second.session_id != first.session_id
    assert check(store, first, NOW + 3) is Reason.SESSION_REVOKED
    assert check(store, second, NOW + 3) is Reason.OK
    assert store.open_session(opening(now=NOW + 4)).session_id == second.session_id


def test_a_revoked_client_continues_nothing(store: Store) -> None:
    first = store.open_session(opening())
    assert store.revoke_client("client-1", now=NOW + 1) == 1
    second = store.open_session(opening(now=NOW + 2))
    assert second.session_id != first.session_id
    assert check(store, first, NOW + 3) is Reason.CLIENT_REVOKED


def test_an_evicted_session_is_not_continued(store: Store) -> None:
    limit = SessionLimit(1, LimitPolicy.EVICT_OLDEST)
    first = store.open_session(opening("key-1", limit=limit))
    second = store.open_session(opening("key-2", limit=limit, now=NOW + 1))
    third = store.open_session(opening("key-1", limit=limit, now=NOW + 2))
    assert len({first.session_id, second.session_id, third.session_id}) == 3
    assert listed(store, NOW + 3) == [(third.session_id, NOW + 3602)]
    assert check(store, second, NOW + 3) is Reason.SESSION_REVOKED


def test_an_expired_session_is_not_continued(store: Store) -> None:
    first = store.open_session(opening(ttl=60, limit=SessionLimit(1)))
    second = store.open_session(opening(ttl=60, limit=SessionLimit(1), now=NOW + 60))
    assert second.session_id != first.session_id


def test_concurrent_opens_with_one_continuation_open_one_session(store: Store) -> None:
    store.sessions("client-1", now=NOW)  # connections are open
    found: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(20)

    def open_one() -> None:
        start.wait()
        try:
            found.append(store.open_session(opening(limit=SessionLimit(2))).session_id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert errors == []
    assert len(found) == 20
    assert len(set(found)) == 1
    assert [s for s, _ in listed(store, NOW + 1)] == found[:1]


async def test_concurrent_async_opens_with_one_continuation_open_one_session(store: Store) -> None:
    found = await asyncio.gather(*(store.aopen_session(opening(limit=SessionLimit(2))) for _ in range(20)))
    assert len({s.session_id for s in found}) == 1
    assert len(await store.asessions("client-1", now=NOW + 1)) == 1
    if isinstance(store, RedisStore):
        await store.aclose()


def test_bad_openings_are_the_callers_error(store: Store) -> None:
    for bad in (opening(""), opening(idle=0), opening(idle=-5), opening(token_ttl=-1), opening(ttl=0)):
        with pytest.raises(InvalidArgumentError):
            store.open_session(bad)


# -- ending when idle ---------------------------------------------------------------------------


def test_an_idle_session_ends_and_frees_its_place(store: Store) -> None:
    limit = SessionLimit(1, LimitPolicy.REJECT)
    first = store.open_session(opening(idle=60, limit=limit))
    assert first.expires_at == NOW + 60
    assert check(store, first, NOW + 59, jti="a") is Reason.OK
    # that check moved the expiry to NOW + 119; nothing happens after it
    assert listed(store, NOW + 118) == [(first.session_id, NOW + 119)]
    assert listed(store, NOW + 119) == []
    assert check(store, first, NOW + 119, jti="b") is Reason.SESSION_UNKNOWN  # as an expired session
    second = store.open_session(opening(idle=60, limit=limit, now=NOW + 119))  # under the limit of 1
    assert second.session_id != first.session_id
    assert check(store, first, NOW + 120, jti="c") is Reason.SESSION_UNKNOWN
    assert store.open_session(opening(idle=60, limit=limit, now=NOW + 121)).session_id == second.session_id


def test_an_idle_session_stops_counting_for_a_client_without_continuations(store: Store) -> None:
    limit = SessionLimit(2, LimitPolicy.REJECT)
    store.open_session(opening(None, idle=30, limit=limit))
    store.open_session(opening(None, idle=30, limit=limit))
    with pytest.raises(SessionLimitExceededError):
        store.open_session(opening(None, idle=30, limit=limit, now=NOW + 29))
    store.open_session(opening(None, idle=30, limit=limit, now=NOW + 30))
    assert len(listed(store, NOW + 30)) == 1


def test_validations_keep_a_session_alive_past_its_idle_window(store: Store) -> None:
    first = store.open_session(opening(idle=60))
    for i, at in enumerate(range(NOW + 50, NOW + 500, 50)):
        assert check(store, first, at, jti=f"j{i}") is Reason.OK
    # the last check, at NOW + 450, holds it until NOW + 510: it is continued, not replaced
    assert listed(store, NOW + 500) == [(first.session_id, NOW + 510)]
    assert store.open_session(opening(idle=60, now=NOW + 505)).session_id == first.session_id


def test_continuing_keeps_a_session_alive_past_its_idle_window(store: Store) -> None:
    first = store.open_session(opening(idle=60))
    for at in range(NOW + 55, NOW + 400, 55):
        assert store.open_session(opening(idle=60, now=at)).session_id == first.session_id
    assert store.sessions("client-1", now=NOW + 400)[0].expires_at == NOW + 385 + 60


def test_a_validation_writes_the_expiry_only_when_it_moves_a_tenth_of_the_window(store: Store) -> None:
    first = store.open_session(opening(idle=100))
    assert check(store, first, NOW + 9, jti="a") is Reason.OK
    assert listed(store, NOW + 9) == [(first.session_id, NOW + 100)]  # would move 9 < 10: not written
    assert check(store, first, NOW + 10, jti="b") is Reason.OK
    assert listed(store, NOW + 10) == [(first.session_id, NOW + 110)]
    assert check(store, first, NOW + 95, jti="c") is Reason.OK  # the expiry stays >= 0.9 idle ahead
    assert listed(store, NOW + 95) == [(first.session_id, NOW + 195)]


def test_the_sliding_expiry_never_passes_the_hard_end(store: Store) -> None:
    first = store.open_session(opening(idle=60, ttl=100, token_ttl=300))
    assert first.expires_at == NOW + 100  # the token's lifetime, within the hard end
    for i, at in enumerate(range(NOW + 10, NOW + 100, 10)):
        assert check(store, first, at, jti=f"j{i}") is Reason.OK
        assert store.open_session(opening(idle=60, ttl=100, token_ttl=300, now=at)).expires_at == NOW + 100
        assert listed(store, at) == [(first.session_id, NOW + 100)]
    assert check(store, first, NOW + 100, jti="end") is Reason.SESSION_UNKNOWN
    assert store.open_session(opening(idle=60, ttl=100, now=NOW + 100)).session_id != first.session_id


def test_opening_holds_an_idle_session_for_the_token_it_issues(store: Store) -> None:
    first = store.open_session(opening(idle=60, token_ttl=300))
    assert first.expires_at == NOW + 300
    # a later, shorter hold never brings the expiry back
    assert store.open_session(opening(idle=60, token_ttl=30, now=NOW + 10)).expires_at == NOW + 300
    assert store.open_session(opening(idle=60, token_ttl=30, now=NOW + 290)).expires_at == NOW + 350
    assert listed(store, NOW + 291) == [(first.session_id, NOW + 350)]


def test_a_session_keeps_the_idle_seconds_it_opened_with(store: Store) -> None:
    first = store.open_session(opening(None, idle=60))
    assert store.open_session(opening(None, session_id=first.session_id, now=NOW + 30)).expires_at == NOW + 90
    never = store.open_session(opening(None))
    assert never.expires_at == NOW + 3600
    assert store.open_session(opening(None, session_id=never.session_id, idle=60, now=NOW + 1)).expires_at == (
        NOW + 3600
    )
    assert check(store, never, NOW + 2000) is Reason.OK


# -- bounded records ----------------------------------------------------------------------------


def test_memory_continuations_leave_with_their_sessions() -> None:
    store = MemoryStore()
    limit = SessionLimit(2, LimitPolicy.EVICT_OLDEST)
    for i in range(200):
        store.open_session(opening(f"key-{i}", limit=limit, idle=10, now=NOW + i))
    assert store.sizes().continuations == 2  # evicted sessions took theirs along
    store.revoke_session(store.sessions("client-1", now=NOW + 200)[0].session_id, now=NOW + 200)
    assert store.sizes().continuations == 1
    store.sessions("client-1", now=NOW + 300)  # idle: ended
    assert store.sizes().continuations == 0
    assert store.sizes().live_sessions == 0


def test_redis_continuations_stay_bounded_by_the_limit(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url)
    limit = SessionLimit(2, LimitPolicy.EVICT_OLDEST)
    key = store.client_key("client-1", "continuations")
    for i in range(200):
        store.open_session(opening(f"key-{i}", limit=limit, now=NOW + i))
        assert store.client.hlen(key) <= 2 * limit.max_sessions + 16
    [*_, last] = store.sessions("client-1", now=NOW + 200)
    assert store.open_session(opening("key-199", limit=limit, now=NOW + 200)).session_id == last.session_id
    store.close()


def test_redis_continuation_of_a_vanished_session_opens_a_new_one(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url)
    first = store.open_session(opening())
    store.client.delete(store.session_key("client-1", first.session_id))  # still in the live set
    second = store.open_session(opening(now=NOW + 1))
    assert second.session_id != first.session_id
    assert store.open_session(opening(now=NOW + 2)).session_id == second.session_id
    assert check(store, second, NOW + 3) is Reason.OK
    store.close()


def test_redis_keys_follow_the_sliding_expiry(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url)
    first = store.open_session(opening(idle=600, ttl=1000))
    session_key = store.session_key("client-1", first.session_id)
    assert 595 <= store.client.ttl(session_key) <= 600
    assert check(store, first, NOW + 500) is Reason.OK  # slides to the hard end, NOW + 1000
    assert 495 <= store.client.ttl(session_key) <= 500
    for key in (store.sessions_key("client-1"), store.client_key("client-1", "continuations")):
        assert 995 <= store.client.ttl(key) <= 1000, key  # until the hard end: no slide outlives them
    store.close()


# -- the broker ---------------------------------------------------------------------------------


@pytest.fixture
def broker(store: Store) -> tuple[Broker, FakeClock]:
    clock = FakeClock(float(NOW))
    return Broker(Keyring.generate(), issuer=ISSUER, store=store, session_limit=SessionLimit(1), clock=clock), clock


def issue(b: Broker, ttl: int) -> IssuedToken:
    """What the HTTP door does: no session id, a continuation, an idle window."""
    return b.issue(client_id="agent", audience=AUD, ttl_seconds=ttl, continuation="agent|aud|jkt", idle_seconds=60)


def test_broker_continues_by_key_and_ends_idle_sessions(broker: tuple[Broker, FakeClock]) -> None:
    b, clock = broker
    first = issue(b, 30)
    assert issue(b, 30).session_id == first.session_id  # under a limit of one
    clock.advance(61)
    later = issue(b, 30)
    assert later.session_id != first.session_id
    assert [s.session_id for s in b.sessions("agent")] == [later.session_id]


def test_broker_holds_the_session_for_its_token_and_validations_keep_it(broker: tuple[Broker, FakeClock]) -> None:
    b, clock = broker
    first = issue(b, 300)
    assert first.expires_at == NOW + 300  # capped by the hard end, not by the idle window
    assert b.sessions("agent")[0].expires_at == NOW + 300  # held for the token it issued
    clock.advance(250)
    assert b.validate(first.access_token, audience=AUD).valid  # slides the session to NOW + 310
    clock.advance(55)  # the token has expired, its session has not
    assert issue(b, 300).session_id == first.session_id


def test_broker_session_of_an_unused_token_ends_after_the_token(broker: tuple[Broker, FakeClock]) -> None:
    b, clock = broker
    first = issue(b, 300)
    clock.advance(299)
    assert issue(b, 300).session_id == first.session_id
    clock.advance(300)
    assert issue(b, 300).session_id != first.session_id


def test_broker_token_lifetime_is_capped_by_the_hard_end(store: Store) -> None:
    clock = FakeClock(float(NOW))
    b = Broker(Keyring.generate(), issuer=ISSUER, store=store, session_ttl_seconds=100, clock=clock)
    token = issue(b, 300)
    assert token.expires_at == NOW + 100
    clock.advance(100)
    assert issue(b, 300).session_id != token.session_id


async def test_async_broker_continues_by_key(broker: tuple[Broker, FakeClock]) -> None:
    b, _ = broker
    first = await b.aissue(client_id="agent", audience=AUD, continuation="k", idle_seconds=60)
    request = IssueRequest(client_id="agent", audience=AUD)  # the request-object door
    again = await b.aissue_request(request, continuation="k", idle_seconds=60)
    assert again.session_id == first.session_id
    with pytest.raises(SessionLimitExceededError):  # no continuation: a new session, over the limit of one
        b.issue_request(request)
    if isinstance(b.store, RedisStore):
        await b.store.aclose()
