"""RedisStore against real redis-server processes: one Redis and a three-master Redis
Cluster. The same semantics as MemoryStore, fail-closed, one round trip per batch."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from tokenbroker import Broker, Keyring, LimitPolicy, ProofSigner, Reason, SessionLimit
from tokenbroker.errors import (
    InvalidArgumentError,
    SessionLimitExceededError,
    SessionNotFoundError,
    StoreUnavailableError,
)
from tokenbroker.models import Session
from tokenbroker.store import SessionOpen, Store, TokenCheck
from tokenbroker.store.base import Remembered
from tokenbroker.store.redis import RedisStore, tag

from support.redis_servers import RedisCluster, RedisServer

# Near Redis's clock (replay records and epochs run on it), ahead so records outlive the run.
NOW = int(time.time()) + 600
AUD = "https://mcp.example.com/mcp"
ISSUER = "https://broker.example"
ODD_CLIENT_IDS = ["a}b{c", "{a}", "a", "", "{", "}", "%7B", "tb:{x}:sessions", "ü{}:x", "{}"]


@dataclass
class Backend:
    """Where the stores of one test point: one Redis or the cluster, under a fresh prefix."""

    url: str
    cluster: bool
    servers: list[RedisServer]
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    made: list[RedisStore] = field(default_factory=list)

    def store(self) -> RedisStore:
        """A new RedisStore (a new replica) on the same data."""
        store = RedisStore.from_url(self.url, cluster=self.cluster, prefix=self.prefix)
        self.made.append(store)
        return store

    def reads(self) -> int:
        """Read events the server(s) processed: a pipeline is one, N separate calls are N."""
        return sum(int(s.info("stats")["total_reads_processed"]) for s in self.servers)


@pytest.fixture(params=["single", "cluster"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "single":
        server: RedisServer = request.getfixturevalue("redis_server")
        found = Backend(server.url, False, [server])
    else:
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        found = Backend(cluster.url, True, list(cluster.nodes))
    yield found
    for store in found.made:
        store.close()


@pytest.fixture
def single(redis_server: RedisServer) -> Iterator[Backend]:
    found = Backend(redis_server.url, False, [redis_server])
    yield found
    for store in found.made:
        store.close()


@pytest.fixture
def store(backend: Backend) -> RedisStore:
    return backend.store()


@pytest.fixture
async def astore(backend: Backend) -> AsyncIterator[RedisStore]:
    store = backend.store()
    yield store
    await store.aclose()


def open_session(
    store: RedisStore,
    client_id: str = "client-1",
    *,
    audience: str = AUD,
    session_id: str | None = None,
    ttl: int = 3600,
    limit: SessionLimit | None = None,
    ip: str = "10.0.0.1",
    now: int = NOW,
) -> Session:
    return store.open_session(
        SessionOpen(
            client_id=client_id,
            audience=audience,
            session_id=session_id,
            ttl_seconds=ttl,
            limit=limit or SessionLimit(),
            client_ip=ip,
            now=now,
        )
    )


def token_check(
    session: Session,
    *,
    client_id: str | None = None,
    audience: str | None = None,
    jti: str = "jti-1",
    ip: str = "",
    replay: tuple[tuple[str, int], ...] = (),
    now: int = NOW + 1,
    issued_at: int | None = None,
) -> TokenCheck:
    return TokenCheck(
        client_id=session.client_id if client_id is None else client_id,
        session_id=session.session_id,
        audience=session.audience if audience is None else audience,
        jti=jti,
        issued_at=int(time.time()) if issued_at is None else issued_at,  # after the store's epoch
        client_ip=ip,
        replay=replay,
        now=now,
    )


def check(store: RedisStore, session: Session, **kwargs: Any) -> Reason:
    return store.check_token(token_check(session, **kwargs))


def replay_key(n: int) -> str:
    return f"{n:064x}"


# -- the Store contract ---------------------------------------------------------------


def test_redis_store_implements_the_store_protocol(store: RedisStore) -> None:
    assert isinstance(store, Store)


def test_ping_answers_true(store: RedisStore) -> None:
    assert store.ping() is True


# -- sessions ---------------------------------------------------------------------------


def test_new_session_is_live_listed_and_checks_ok(store: RedisStore) -> None:
    session = open_session(store)
    assert (session.created_at, session.expires_at, session.last_ip) == (NOW, NOW + 3600, "10.0.0.1")
    assert store.sessions("client-1", now=NOW + 1) == [session]
    assert check(store, session) is Reason.OK


def test_continuing_a_session_keeps_its_id_and_records_the_new_ip(store: RedisStore) -> None:
    first = open_session(store)
    again = open_session(store, session_id=first.session_id, ip="10.0.0.2", now=NOW + 5)
    assert (again.session_id, again.created_at, again.expires_at) == (first.session_id, NOW, NOW + 3600)
    assert (again.last_seen_at, again.last_ip) == (NOW + 5, "10.0.0.2")
    assert store.sessions("client-1", now=NOW + 6) == [again]


def test_continuing_another_clients_session_is_not_found(store: RedisStore) -> None:
    session = open_session(store, "client-1")
    with pytest.raises(SessionNotFoundError):
        open_session(store, "client-2", session_id=session.session_id)


def test_continuing_an_unknown_session_is_not_found(store: RedisStore) -> None:
    with pytest.raises(SessionNotFoundError):
        open_session(store, session_id="no-such-session")


def test_continuing_a_session_for_another_audience_is_invalid(store: RedisStore) -> None:
    session = open_session(store)
    with pytest.raises(InvalidArgumentError):
        open_session(store, audience="https://other.example.com/mcp", session_id=session.session_id)


def test_session_limit_rejects_one_session_too_many(store: RedisStore) -> None:
    limit = SessionLimit(2, LimitPolicy.REJECT)
    kept = [open_session(store, limit=limit), open_session(store, limit=limit)]
    with pytest.raises(SessionLimitExceededError):
        open_session(store, limit=limit)
    assert store.sessions("client-1", now=NOW) == kept


def test_session_limit_evicts_the_oldest_session(store: RedisStore) -> None:
    limit = SessionLimit(2, LimitPolicy.EVICT_OLDEST)
    oldest = open_session(store, limit=limit, now=NOW)
    middle = open_session(store, limit=limit, now=NOW)  # same second: opening order decides
    newest = open_session(store, limit=limit, now=NOW + 1)
    assert [s.session_id for s in store.sessions("client-1", now=NOW + 2)] == [middle.session_id, newest.session_id]
    assert check(store, oldest, now=NOW + 2) is Reason.SESSION_REVOKED
    assert check(store, middle, now=NOW + 2) is Reason.OK


def test_session_limit_counts_each_client_alone(store: RedisStore) -> None:
    limit = SessionLimit(1, LimitPolicy.REJECT)
    open_session(store, "client-1", limit=limit)
    open_session(store, "client-2", limit=limit)


def test_expired_session_is_unknown_and_frees_its_place(store: RedisStore) -> None:
    limit = SessionLimit(1, LimitPolicy.REJECT)
    session = open_session(store, ttl=60, limit=limit)
    assert check(store, session, now=NOW + 60) is Reason.SESSION_UNKNOWN
    assert store.sessions("client-1", now=NOW + 60) == []
    with pytest.raises(SessionNotFoundError):
        open_session(store, session_id=session.session_id, now=NOW + 60)
    open_session(store, ttl=60, limit=limit, now=NOW + 60)


def test_session_keys_expire_with_the_session(store: RedisStore) -> None:
    session = open_session(store, ttl=60)
    for key in (
        store.session_key("client-1", session.session_id),
        store.sessions_key("client-1"),
        store.session_index_key(session.session_id),
    ):
        assert 55 <= store.client.ttl(key) <= 60, key


def test_check_records_last_seen_and_origin(store: RedisStore) -> None:
    session = open_session(store)
    assert check(store, session, ip="192.0.2.7", now=NOW + 9) is Reason.OK
    [seen] = store.sessions("client-1", now=NOW + 10)
    assert (seen.last_seen_at, seen.last_ip) == (NOW + 9, "192.0.2.7")


def test_check_for_another_client_or_audience_is_session_unknown(store: RedisStore) -> None:
    session = open_session(store)
    assert check(store, session, client_id="client-2") is Reason.SESSION_UNKNOWN
    assert check(store, session, audience="https://other.example.com/mcp") is Reason.SESSION_UNKNOWN


# -- revocation ---------------------------------------------------------------------------


def test_revoked_session_fails_the_next_check(store: RedisStore) -> None:
    session = open_session(store)
    other = open_session(store)
    assert store.revoke_session(session.session_id, now=NOW + 1) == 1
    assert check(store, session, now=NOW + 2) is Reason.SESSION_REVOKED
    assert check(store, other, now=NOW + 2) is Reason.OK
    assert store.revoke_session(session.session_id, now=NOW + 2) == 0
    assert [s.session_id for s in store.sessions("client-1", now=NOW + 2)] == [other.session_id]


def test_revoking_an_unknown_session_counts_zero(store: RedisStore) -> None:
    assert store.revoke_session("no-such-session", now=NOW) == 0


def test_revoked_client_fails_the_next_check_of_every_session(store: RedisStore) -> None:
    sessions = [open_session(store), open_session(store)]
    bystander = open_session(store, "client-2")
    assert store.revoke_client("client-1", now=NOW + 1) == 2
    assert [check(store, s, now=NOW + 2) for s in sessions] == [Reason.CLIENT_REVOKED] * 2
    assert check(store, bystander, now=NOW + 2) is Reason.OK
    assert store.sessions("client-1", now=NOW + 2) == []
    assert store.revoke_client("client-1", now=NOW + 2) == 0


def test_revoked_client_may_open_a_new_session(store: RedisStore) -> None:
    open_session(store)
    store.revoke_client("client-1", now=NOW + 1)
    fresh = open_session(store, limit=SessionLimit(1), now=NOW + 2)
    assert check(store, fresh, now=NOW + 3) is Reason.OK


def test_revoked_token_fails_the_next_check(store: RedisStore) -> None:
    session = open_session(store)
    assert store.revoke_token("jti-1", until=NOW + 3605, now=NOW + 1) == 1
    assert check(store, session, jti="jti-1", now=NOW + 2) is Reason.TOKEN_REVOKED
    assert check(store, session, jti="jti-2", now=NOW + 2) is Reason.OK
    assert store.revoke_token("jti-1", until=NOW + 3605, now=NOW + 2) == 0
    skew = store.max_clock_skew_seconds  # the record outlives the token on every replica's clock
    assert 3600 + skew <= store.client.ttl(store.revoked_token_key("jti-1")) <= 3604 + skew


def test_session_reason_comes_before_token_revocation(store: RedisStore) -> None:
    session = open_session(store)
    store.revoke_token("jti-1", until=NOW + 600, now=NOW)
    store.revoke_session(session.session_id, now=NOW)
    assert check(store, session, jti="jti-1") is Reason.SESSION_REVOKED


# -- replay records and remember() ----------------------------------------------------------


def test_replay_record_is_accepted_once_then_replayed(store: RedisStore) -> None:
    session = open_session(store)
    record = ((replay_key(1), NOW + 61),)
    assert check(store, session, replay=record, now=NOW + 1) is Reason.OK
    assert check(store, session, replay=record, now=NOW + 2) is Reason.REPLAYED
    expires = store.client.zscore(store.records_key("client-1"), f"p:{replay_key(1)}")
    assert expires == NOW + 61 + store.max_clock_skew_seconds


def test_replay_check_sets_nothing_when_one_record_is_already_there(store: RedisStore) -> None:
    session = open_session(store)
    assert check(store, session, replay=((replay_key(1), NOW + 60),)) is Reason.OK
    both = ((replay_key(2), NOW + 60), (replay_key(1), NOW + 60))
    assert check(store, session, replay=both) is Reason.REPLAYED
    assert check(store, session, replay=((replay_key(2), NOW + 60),)) is Reason.OK


def test_replay_record_is_shared_by_every_session_of_the_client(store: RedisStore) -> None:
    record = ((replay_key(3), NOW + 60),)
    assert check(store, open_session(store), replay=record) is Reason.OK
    assert check(store, open_session(store), replay=record) is Reason.REPLAYED


def test_remember_is_true_once_then_false_until_it_expires(store: RedisStore) -> None:
    iat = int(time.time())
    assert store.remember("assertion-jti", client_id="c", issued_at=iat, until=NOW + 30, now=NOW) is Remembered.NEW
    assert store.remember("assertion-jti", client_id="c", issued_at=iat, until=NOW + 30, now=NOW + 1) is Remembered.SEEN
    expires = store.client.zscore(store.records_key("c"), "a:assertion-jti")
    assert expires == NOW + 30 + store.max_clock_skew_seconds


# -- asyncio twins ------------------------------------------------------------------------


async def test_async_twins_follow_the_same_rules(astore: RedisStore) -> None:
    limit = SessionLimit(1, LimitPolicy.REJECT)
    session = await astore.aopen_session(
        SessionOpen(client_id="c", audience=AUD, session_id=None, ttl_seconds=60, limit=limit, client_ip="", now=NOW)
    )
    with pytest.raises(SessionLimitExceededError):
        await astore.aopen_session(
            SessionOpen(
                client_id="c", audience=AUD, session_id=None, ttl_seconds=60, limit=limit, client_ip="", now=NOW
            )
        )
    record = ((replay_key(4), NOW + 60),)
    assert await astore.acheck_token(token_check(session, replay=record)) is Reason.OK
    assert await astore.acheck_token(token_check(session, replay=record)) is Reason.REPLAYED
    iat = int(time.time())
    assert await astore.aremember("k", client_id="c", issued_at=iat, until=NOW + 10, now=NOW) is Remembered.NEW
    assert await astore.aremember("k", client_id="c", issued_at=iat, until=NOW + 10, now=NOW) is Remembered.SEEN
    assert [s.session_id for s in await astore.asessions("c", now=NOW + 1)] == [session.session_id]
    assert await astore.arevoke_token("jti-1", until=NOW + 60, now=NOW) == 1
    assert await astore.acheck_token(token_check(session, jti="jti-1")) is Reason.TOKEN_REVOKED
    assert await astore.arevoke_session(session.session_id, now=NOW + 1) == 1
    assert await astore.acheck_token(token_check(session, jti="jti-2")) is Reason.SESSION_REVOKED
    assert await astore.arevoke_client("c", now=NOW + 1) == 0
    assert await astore.aping() is True


async def test_store_without_an_async_client_runs_async_calls_in_a_thread(redis_server: RedisServer) -> None:
    store = RedisStore(redis.Redis.from_url(redis_server.url))
    session = await store.aopen_session(
        SessionOpen(
            client_id="c", audience=AUD, session_id=None, ttl_seconds=60, limit=SessionLimit(), client_ip="", now=NOW
        )
    )
    assert await store.acheck_token(token_check(session)) is Reason.OK
    assert await store.arevoke_client("c", now=NOW + 1) == 1
    assert await store.acheck_token(token_check(session, now=NOW + 2)) is Reason.CLIENT_REVOKED
    store.close()


# -- batches and coalescing ---------------------------------------------------------------


def mixed_requests(store: RedisStore, count: int, salt: int = 0) -> tuple[list[TokenCheck], list[Reason]]:
    """`count` validations with four different answers, and the answers expected."""
    live = open_session(store)
    revoked = open_session(store)
    store.revoke_session(revoked.session_id, now=NOW)
    used = replay_key(salt * 100_000)
    assert check(store, live, replay=((used, NOW + 60),)) is Reason.OK
    requests, expected = [], []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            requests.append(token_check(live, jti=f"j{i}", replay=((replay_key(salt * 100_000 + i + 1), NOW + 60),)))
            expected.append(Reason.OK)
        elif kind == 1:
            requests.append(token_check(revoked, jti=f"j{i}"))
            expected.append(Reason.SESSION_REVOKED)
        elif kind == 2:
            requests.append(token_check(live, client_id="client-2", jti=f"j{i}"))
            expected.append(Reason.SESSION_UNKNOWN)
        else:
            requests.append(token_check(live, jti=f"j{i}", replay=((used, NOW + 60),)))
            expected.append(Reason.REPLAYED)
    return requests, expected


def test_check_tokens_answers_each_request_in_order(store: RedisStore) -> None:
    requests, expected = mixed_requests(store, 12)
    assert store.check_tokens(requests) == expected


def test_check_tokens_of_many_requests_is_one_round_trip(backend: Backend) -> None:
    store = backend.store()
    warm_up, _ = mixed_requests(store, 32, salt=1)
    store.check_tokens(warm_up)  # connections to every node are open
    requests, expected = mixed_requests(store, 32)
    before = backend.reads()
    assert store.check_tokens(requests) == expected
    # Per server: one read event for the pipeline (a few if TCP splits it, more on a loaded
    # machine: 5 was seen once) and one for INFO; 32 separate checks cost >= 32 (the control).
    assert backend.reads() - before <= 8 * len(backend.servers)


def test_separate_checks_cost_one_round_trip_each(single: Backend) -> None:
    """The control for the test above: the measure does count round trips."""
    store = single.store()
    requests, _ = mixed_requests(store, 32)
    before = single.reads()
    for request in requests:
        store.check_token(request)
    assert single.reads() - before >= 32


async def test_acheck_tokens_answers_each_request_in_order(astore: RedisStore) -> None:
    requests, expected = mixed_requests(astore, 12)
    assert await astore.acheck_tokens(requests) == expected


def test_check_tokens_rejects_a_malformed_request(store: RedisStore) -> None:
    """A check that is not a `TokenCheck` (a mapping, as batches were once written, or a
    bare tuple of the right values) is refused before anything is sent."""
    with pytest.raises(InvalidArgumentError):
        store.check_tokens([{"client_id": "c"}])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError):
        store.check_tokens([tuple(token_check(open_session(store)))])  # type: ignore[list-item]


async def test_concurrent_acheck_token_calls_share_one_pipeline_and_get_their_own_answers(
    backend: Backend,
) -> None:
    store = backend.store()
    warm_up, _ = mixed_requests(store, 40, salt=1)
    await store.acheck_tokens(warm_up)  # connections to every node are open
    requests, expected = mixed_requests(store, 40)
    before = backend.reads()
    answers = await asyncio.gather(*(store.acheck_token(r) for r in requests))
    assert answers == expected
    assert backend.reads() - before <= 4 * len(backend.servers)
    await store.aclose()


async def test_calls_made_while_a_pipeline_is_in_flight_go_in_the_next_one(astore: RedisStore) -> None:
    requests, expected = mixed_requests(astore, 8)
    first = asyncio.ensure_future(astore.acheck_token(requests[0]))
    await asyncio.sleep(0)  # the first pipeline is now in flight
    rest = await asyncio.gather(*(astore.acheck_token(r) for r in requests[1:]))
    assert [await first, *rest] == expected


async def test_cancelled_caller_does_not_disturb_the_others(astore: RedisStore) -> None:
    requests, expected = mixed_requests(astore, 8)
    tasks = [asyncio.ensure_future(astore.acheck_token(r)) for r in requests]
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != 1] == [e for i, e in enumerate(expected) if i != 1]


async def test_coalescer_refuses_callers_beyond_its_queue_bound(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, max_pending_checks=3)
    requests, expected = mixed_requests(store, 5)
    results = await asyncio.gather(*(store.acheck_token(r) for r in requests), return_exceptions=True)
    assert results[:3] == expected[:3]
    assert all(isinstance(r, StoreUnavailableError) for r in results[3:])
    assert await store.acheck_token(requests[3]) is expected[3]  # the queue drained
    await store.aclose()
    store.close()


async def test_large_coalesced_load_is_split_into_bounded_pipelines(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, max_batch=7)
    requests, expected = mixed_requests(store, 40)
    assert await asyncio.gather(*(store.acheck_token(r) for r in requests)) == expected
    await store.aclose()
    store.close()


# -- NOSCRIPT, failure and recovery (one Redis) -----------------------------------------


def test_scripts_are_reloaded_after_script_flush(single: Backend) -> None:
    store = single.store()
    session = open_session(store)
    store.client.script_flush()
    assert check(store, session) is Reason.OK  # a pipeline
    store.client.script_flush()
    assert store.revoke_token("jti-1", until=NOW + 60, now=NOW) == 1  # one script call
    store.client.script_flush()
    assert open_session(store).session_id  # index and script in one pipeline
    store.client.script_flush()
    assert store.check_tokens([token_check(session, jti="jti-1")]) == [Reason.TOKEN_REVOKED]


async def test_async_scripts_are_reloaded_after_script_flush(single: Backend) -> None:
    store = single.store()
    session = open_session(store)
    store.client.script_flush()
    assert await store.acheck_token(token_check(session)) is Reason.OK
    store.client.script_flush()
    assert await store.arevoke_token("jti-1", until=NOW + 60, now=NOW) == 1
    await store.aclose()


def every_call(store: RedisStore, session: Session) -> dict[str, Callable[[], object]]:
    return {
        "open_session": lambda: open_session(store),
        "continue_session": lambda: open_session(store, session_id=session.session_id),
        "check_token": lambda: check(store, session),
        "check_tokens": lambda: store.check_tokens([token_check(session)] * 3),
        "remember": lambda: store.remember("k", client_id="client-1", issued_at=NOW, until=NOW + 10, now=NOW),
        "revoke_session": lambda: store.revoke_session(session.session_id, now=NOW),
        "revoke_client": lambda: store.revoke_client("client-1", now=NOW),
        "revoke_token": lambda: store.revoke_token("jti-1", until=NOW + 60, now=NOW),
        "sessions": lambda: store.sessions("client-1", now=NOW),
        "ping": store.ping,
    }


def test_every_call_fails_closed_within_a_second_when_redis_is_killed(
    redis_server: RedisServer, single: Backend
) -> None:
    store = single.store()
    session = open_session(store)
    redis_server.kill()
    for name, call in every_call(store, session).items():
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as raised:
            call()
        assert time.monotonic() - started < 1.0, name
        assert "jti" not in str(raised.value)


def test_every_call_fails_closed_within_a_second_when_redis_hangs(redis_server: RedisServer, single: Backend) -> None:
    store = single.store()
    session = open_session(store)
    calls = every_call(store, session)
    redis_server.pause()
    try:
        for name in ("check_token", "open_session", "ping"):
            call = calls[name]
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                call()
            assert time.monotonic() - started < 1.5, name
    finally:
        redis_server.resume()


def test_store_unavailable_error_names_the_operation_not_the_token(redis_server: RedisServer, single: Backend) -> None:
    store = single.store()
    session = open_session(store)
    redis_server.kill()
    with pytest.raises(StoreUnavailableError, match="check_token") as raised:
        check(store, session, jti="secret-looking-jti")
    assert "secret-looking-jti" not in str(raised.value)


async def test_async_calls_fail_closed_when_redis_is_killed(redis_server: RedisServer, single: Backend) -> None:
    store = single.store()
    session = open_session(store)
    redis_server.kill()
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        await store.acheck_token(token_check(session))
    with pytest.raises(StoreUnavailableError):
        await store.aopen_session(
            SessionOpen(
                client_id="c",
                audience=AUD,
                session_id=None,
                ttl_seconds=60,
                limit=SessionLimit(),
                client_ip="",
                now=NOW,
            )
        )
    with pytest.raises(StoreUnavailableError):
        await store.aping()
    assert time.monotonic() - started < 2.0
    await store.aclose()


async def test_each_coalesced_caller_gets_its_own_error_when_redis_is_down(
    redis_server: RedisServer, single: Backend
) -> None:
    store = single.store()
    session = open_session(store)
    redis_server.kill()
    results = await asyncio.gather(
        *(store.acheck_token(token_check(session, jti=f"j{i}")) for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, StoreUnavailableError) for r in results)
    assert len({id(r) for r in results}) == 5
    await store.aclose()


def test_same_store_works_again_after_redis_restarts(redis_server: RedisServer, single: Backend) -> None:
    store = single.store()
    open_session(store)
    redis_server.kill()
    with pytest.raises(StoreUnavailableError):
        store.ping()
    redis_server.restart()  # empty, and without our scripts: NOSCRIPT on first use
    assert store.ping() is True
    session = open_session(store)
    assert check(store, session) is Reason.OK
    assert store.revoke_token("jti-1", until=NOW + 60, now=NOW) == 1


async def test_same_async_store_works_again_after_redis_restarts(redis_server: RedisServer, single: Backend) -> None:
    store = single.store()
    session = open_session(store)
    assert await store.acheck_token(token_check(session)) is Reason.OK
    redis_server.kill()
    with pytest.raises(StoreUnavailableError):
        await store.acheck_token(token_check(session))
    redis_server.restart()
    session = open_session(store)
    assert await store.acheck_token(token_check(session)) is Reason.OK
    await store.aclose()


def test_from_url_fails_closed_when_no_cluster_answers() -> None:
    with pytest.raises(StoreUnavailableError):
        RedisStore.from_url("redis://127.0.0.1:1/0", cluster=True)


# -- keys and cluster slots -------------------------------------------------------------------


def offline_store() -> RedisStore:
    """A store whose client never connects: for looking at the calls it would make."""
    return RedisStore(redis.Redis(host="127.0.0.1", port=1))


def script_calls(store: RedisStore, client_id: str, session_id: str, jti: str) -> list[Any]:
    """Every script call (name, KEYS) the store makes for one client, driving the
    operations with made-up replies so each takes its longest path."""
    calls: list[Any] = []

    def drive(op: Any, replies: list[list[Any]]) -> None:
        batch = next(op)
        for reply in replies:
            calls.extend(c for c in batch if hasattr(c, "script"))
            try:
                batch = op.send(reply)
            except StopIteration:
                return
        calls.extend(c for c in batch if hasattr(c, "script"))

    limit = SessionLimit(2, LimitPolicy.EVICT_OLDEST)
    drive(store._open_op(SessionOpen(client_id, AUD, None, 60, limit, "", NOW)), [[True, ["OK"]]])
    drive(store._open_op(SessionOpen(client_id, AUD, session_id, 60, limit, "", NOW)), [[["OK", NOW, NOW + 60, ""]]])
    continued = SessionOpen(client_id, AUD, None, 60, limit, "", NOW, continuation="k", idle_seconds=30)
    drive(store._open_op(continued), [[True, ["CONTINUE", session_id]], [["OK", NOW, NOW + 60, ""], 1]])
    replay = ((replay_key(1), NOW + 60), (replay_key(2), NOW + 60))
    request = token_check(Session(session_id, client_id, AUD, NOW, NOW + 60, NOW), jti=jti, replay=replay)
    drive(store._checks_op([request]), [[["OK", NOW], ["OK", NOW]]])
    drive(store._remember_op("assertion", client_id, NOW, NOW + 60, NOW), [[["NEW", NOW]]])
    drive(store._revoke_session_op(session_id, NOW), [[client_id], [1]])
    drive(store._revoke_client_op(client_id, NOW), [[["OK", 2]]])
    drive(store._revoke_token_op(jti, NOW + 60, NOW), [[1]])
    return calls


@given(client_id=st.text(), session_id=st.text(min_size=1), jti=st.text(min_size=1))
def test_every_script_keeps_its_keys_in_one_slot(client_id: str, session_id: str, jti: str) -> None:
    store = offline_store()
    store._cluster = True  # the cluster's key layout (epochs per slot, revoked jtis beside)
    calls = script_calls(store, client_id, session_id, jti)
    assert {c.script for c in calls} == {
        "open_session",
        "continue_session",
        "check_token",
        "check_jti",
        "remember",
        "revoke_session",
        "revoke_client",
        "revoke_token",
    }
    client_slot = key_slot(store.sessions_key(client_id).encode())
    jti_slot = key_slot(store.revoked_token_key(jti).encode())
    for call in calls:
        slots = {key_slot(k.encode()) for k in call.keys}
        assert slots == ({jti_slot} if call.script in ("revoke_token", "check_jti") else {client_slot}), call.script


@given(st.text(), st.text())
def test_client_tags_never_collide_and_hold_no_braces(a: str, b: str) -> None:
    assert tag(a)
    assert "{" not in tag(a)
    assert "}" not in tag(a)
    if a != b:
        assert tag(a) != tag(b)


@pytest.mark.parametrize("client_id", ODD_CLIENT_IDS)
def test_odd_client_ids_keep_their_keys_in_their_own_slot(client_id: str) -> None:
    store = offline_store()
    key = store.sessions_key(client_id)
    assert key_slot(key.encode()) == key_slot(f"{{{tag(client_id)}}}".encode())
    assert key_slot(store.session_key(client_id, "s}{x").encode()) == key_slot(key.encode())


def test_client_ids_that_look_alike_get_different_keys() -> None:
    store = offline_store()
    keys = {store.sessions_key(c) for c in ODD_CLIENT_IDS}
    assert len(keys) == len(ODD_CLIENT_IDS)


@pytest.mark.parametrize("client_id", ODD_CLIENT_IDS)
def test_odd_client_ids_work_end_to_end(store: RedisStore, client_id: str) -> None:
    limit = SessionLimit(1, LimitPolicy.REJECT)
    session = open_session(store, client_id, limit=limit)
    with pytest.raises(SessionLimitExceededError):
        open_session(store, client_id, limit=limit)
    assert check(store, session, replay=((replay_key(1), NOW + 60),)) is Reason.OK
    assert [s.session_id for s in store.sessions(client_id, now=NOW + 1)] == [session.session_id]
    assert store.revoke_client(client_id, now=NOW + 1) == 1
    assert check(store, session, now=NOW + 2) is Reason.CLIENT_REVOKED


def test_brace_client_does_not_share_sessions_with_the_plain_one(store: RedisStore) -> None:
    limit = SessionLimit(1, LimitPolicy.REJECT)
    plain = open_session(store, "a", limit=limit)
    braced = open_session(store, "{a}", limit=limit)
    assert store.sessions("a", now=NOW + 1) == [plain]
    assert store.sessions("{a}", now=NOW + 1) == [braced]


def test_prefix_with_a_brace_is_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        RedisStore(redis.Redis(host="127.0.0.1", port=1), prefix="t{b}")


# -- the broker on Redis, two replicas ----------------------------------------------------------


def two_replicas(backend: Backend) -> tuple[Broker, Broker]:
    keyring = Keyring.generate()
    return (
        Broker(keyring, issuer=ISSUER, store=backend.store()),
        Broker(keyring, issuer=ISSUER, store=backend.store()),
    )


def test_broker_issues_and_validates_through_redis(backend: Backend) -> None:
    broker, _ = two_replicas(backend)
    signer = ProofSigner()
    token = broker.issue(client_id="agent-7", audience=AUD, scopes=["tools:call"], dpop_jkt=signer.jkt)
    proof = signer.sign("POST", AUD, token.access_token)
    answer = broker.validate(token.access_token, audience=AUD, dpop_proof=proof, http_method="POST", http_uri=AUD)
    assert answer.valid, answer.detail
    assert answer.session_id == token.session_id
    assert [s.session_id for s in broker.sessions("agent-7")] == [token.session_id]


def test_replayed_proof_is_rejected_across_replicas(backend: Backend) -> None:
    first, second = two_replicas(backend)
    signer = ProofSigner()
    token = first.issue(client_id="agent-7", audience=AUD, dpop_jkt=signer.jkt)
    proof = signer.sign("POST", AUD, token.access_token)
    request = {"audience": AUD, "dpop_proof": proof, "http_method": "POST", "http_uri": AUD}
    assert first.validate(token.access_token, **request).valid
    replayed = second.validate(token.access_token, **request)
    assert (replayed.valid, replayed.reason) == (False, Reason.REPLAYED)


def test_revocation_on_one_replica_applies_on_the_other_at_once(backend: Backend) -> None:
    first, second = two_replicas(backend)
    signer = ProofSigner()
    token = first.issue(client_id="agent-7", audience=AUD, dpop_jkt=signer.jkt)

    def validate(broker: Broker) -> Any:
        proof = signer.sign("POST", AUD, token.access_token)
        return broker.validate(token.access_token, audience=AUD, dpop_proof=proof, http_method="POST", http_uri=AUD)

    assert validate(second).valid
    assert first.revoke_token(token.jti) == 1
    assert validate(second).reason is Reason.TOKEN_REVOKED
    assert first.revoke_session(token.session_id) == 1
    assert validate(second).reason is Reason.SESSION_REVOKED


def test_session_issued_by_one_replica_continues_on_the_other(backend: Backend) -> None:
    first, second = two_replicas(backend)
    token = first.issue(client_id="agent-7", audience=AUD)
    again = second.issue(client_id="agent-7", audience=AUD, session_id=token.session_id)
    assert again.session_id == token.session_id


async def test_async_broker_validates_through_redis(backend: Backend) -> None:
    store = backend.store()
    broker = Broker(Keyring.generate(), issuer=ISSUER, store=store)
    signer = ProofSigner()
    token = await broker.aissue(client_id="agent-7", audience=AUD, dpop_jkt=signer.jkt)
    proof = signer.sign("POST", AUD, token.access_token)
    request = {"audience": AUD, "dpop_proof": proof, "http_method": "POST", "http_uri": AUD}
    assert (await broker.avalidate(token.access_token, **request)).valid
    assert (await broker.avalidate(token.access_token, **request)).reason is Reason.REPLAYED
    await store.aclose()


def test_broker_validate_raises_instead_of_answering_when_redis_is_down(
    redis_server: RedisServer, single: Backend
) -> None:
    broker, _ = two_replicas(single)
    signer = ProofSigner()
    token = broker.issue(client_id="agent-7", audience=AUD, dpop_jkt=signer.jkt)
    redis_server.kill()
    proof = signer.sign("POST", AUD, token.access_token)
    with pytest.raises(StoreUnavailableError):
        broker.validate(token.access_token, audience=AUD, dpop_proof=proof, http_method="POST", http_uri=AUD)
    with pytest.raises(StoreUnavailableError):
        broker.issue(client_id="agent-7", audience=AUD)


def test_concurrent_check_token_calls_from_threads_share_pipelines_and_get_their_own_answers(
    backend: Backend,
) -> None:
    import threading

    store = backend.store()
    store.check_tokens(mixed_requests(store, 40, salt=1)[0])  # connections are open
    requests, expected = mixed_requests(store, 64)
    answers: list[Any] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def call(i: int) -> None:
        start.wait()
        answers[i] = store.check_token(requests[i])

    before = store._thread_coalescer.pipelines
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert answers == expected
    assert store._thread_coalescer.pipelines - before < len(requests)


def test_each_thread_gets_its_own_error_when_redis_is_down(redis_server: RedisServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = RedisStore.from_url(redis_server.url)
    requests, _ = mixed_requests(store, 8)
    redis_server.kill()
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda r: _outcome(lambda: store.check_token(r)), requests))
    assert all(isinstance(o, StoreUnavailableError) for o in outcomes)
    assert len({id(o) for o in outcomes}) == len(outcomes)
    store.close()


def _outcome(call: Any) -> Any:
    try:
        return call()
    except StoreUnavailableError as exc:
        return exc
