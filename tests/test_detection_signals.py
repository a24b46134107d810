"""Detection signals inside the stores (issue 12, "Tell the thief from the client"): what
`check_token` finds when a validation carries an `Observe`, what each action does, and
that a refused request leaves no trace. Every store test runs on MemoryStore and on a
RedisStore against a real redis-server (same semantics, exactly: see
`tokenbroker.detection.memory_watch`). Time is the checks' `now`: no sleeping."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tokenbroker import LimitPolicy, MemoryStore, Reason, SessionLimit
from tokenbroker.detection import SIGNAL_BITS, Observe, Signal, Thresholds, networks_of, resource_digest
from tokenbroker.detection.memory_watch import ClientWatch, SessionWatch, breadth_p95, observe
from tokenbroker.detection.observe import Finding, hour_of
from tokenbroker.detection.signals import BREADTH_BUCKETS, BREADTH_HISTORY_MAX, Action
from tokenbroker.errors import InvalidArgumentError
from tokenbroker.models import Session
from tokenbroker.store import ReplayRecord, SessionOpen, Store, TokenCheck
from tokenbroker.store.redis import RedisStore

from support.redis_servers import RedisServer

# Ahead of real time, as in the other store tests: Redis keeps replay records on its clock.
NOW = int(time.time()) + 600
AUD = "https://mcp.example.com/mcp"
WEEK = 7 * 86400
LIMIT = SessionLimit(1000, LimitPolicy.REJECT)
DAY = 86400

# Networks: A, A2, A3, A4 share a /16 (adjacent); FAR is another /16.
A, A2, A3, A4 = "10.1.1.5", "10.1.2.5", "10.1.3.5", "10.1.4.5"
FAR = "203.0.113.9"


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis_store = RedisStore.from_url(server.url, prefix=f"t{uuid.uuid4().hex[:10]}")
    yield redis_store
    redis_store.close()


def bits(*signals: Signal) -> int:
    return sum(SIGNAL_BITS[s] for s in signals)


def net(ip: str) -> str:
    return networks_of(ip)[0]


@dataclass
class Watched:
    """One client of the store under test, validated with one set of thresholds."""

    store: Store
    thresholds: Thresholds = field(default_factory=Thresholds)
    client_id: str = "client-1"

    def open(self, now: int = NOW) -> Session:
        return self.store.open_session(SessionOpen(self.client_id, AUD, None, WEEK, LIMIT, "", now))

    def check(
        self,
        session: Session,
        now: int,
        ip: str = "",
        resource: str = "",
        *,
        deny: int = 0,
        revoke: int = 0,
        outside: bool = False,
        replay: tuple[ReplayRecord, ...] = (),
        jti: str = "jti-1",
    ) -> tuple[Reason, list[Finding]]:
        """An observed validation: `deny` and `revoke` are the bits of the signals with that action."""
        network, wide = networks_of(ip)
        found: list[Finding] = []
        seen = Observe(network, wide, resource_digest(resource), deny | revoke, revoke, outside, self.thresholds, found)
        check = TokenCheck(self.client_id, session.session_id, AUD, jti, int(time.time()), ip, replay, now, seen)
        return self.store.check_token(check), found

    def plain(self, session: Session, now: int, ip: str = "", replay: tuple[ReplayRecord, ...] = ()) -> Reason:
        """A validation nobody observes (observe None)."""
        check = TokenCheck(self.client_id, session.session_id, AUD, "jti-1", int(time.time()), ip, replay, now, None)
        return self.store.check_token(check)

    def history(self, sessions: int, resources: int, now: int = NOW) -> None:
        """`sessions` past sessions that each touched `resources` distinct resources."""
        for _ in range(sessions):
            session = self.open(now)
            for r in range(resources):
                assert self.check(session, now + 100, A, f"tools/call old-{r}") == (Reason.OK, [])


def signals(found: list[Finding]) -> list[Signal]:
    return [signal for signal, _ in found]


# -- the common request, and what is not observed ---------------------------------------------


def test_the_same_session_network_and_resource_find_nothing(store: Store) -> None:
    watched = Watched(store, Thresholds(learning_seconds=10))
    session = watched.open()
    for i in range(20):
        assert watched.check(session, NOW + 20 + i, A, "tools/call add") == (Reason.OK, [])
    assert watched.check(session, NOW + 4000, A, "tools/call add") == (Reason.OK, [])  # a new hour
    assert watched.check(session, NOW + 4001, A, "tools/call add") == (Reason.OK, [])


def test_observe_none_watches_nothing(store: Store) -> None:
    watched = Watched(store, Thresholds(burst_requests=1))
    session = watched.open()
    for i in range(3):  # not counted in the burst, and no origin
        assert watched.plain(session, NOW + i, FAR if i % 2 else A) is Reason.OK
    assert store.usage_hours(watched.client_id) == [0] * 24
    assert watched.check(session, NOW + 3, A) == (Reason.OK, [])  # the first observed request of the burst
    reason, found = watched.check(session, NOW + 4, FAR)  # the origin is the observed A
    assert reason is Reason.OK
    assert signals(found) == [Signal.CONCURRENT_ORIGINS, Signal.BURST_AFTER_AUTH]


def test_a_refused_check_is_not_observed(store: Store) -> None:
    watched = Watched(store)
    session = watched.open()
    assert store.revoke_token("jti-revoked", until=NOW + 3600, now=NOW) == 1
    assert watched.check(session, NOW, A, outside=True, jti="jti-revoked") == (Reason.TOKEN_REVOKED, [])
    replay = (("rec-1", NOW + 3600),)
    assert watched.check(session, NOW, A, replay=replay) == (Reason.OK, [])
    assert watched.check(session, NOW + 1, A, outside=True, replay=replay, jti="jti-2") == (Reason.REPLAYED, [])
    assert store.usage_hours(watched.client_id)[hour_of(NOW)] == 1  # the one allowed observation


# -- new_network -----------------------------------------------------------------------------


def test_new_network_is_quiet_while_the_client_learns(store: Store) -> None:
    watched = Watched(store, Thresholds(learning_seconds=100))
    session = watched.open()
    assert watched.check(session, NOW, A) == (Reason.OK, [])  # the first observation: learning starts
    assert watched.check(session, NOW + 99, A2) == (Reason.OK, [])  # learned, quietly
    reason, found = watched.check(session, NOW + 100, A3)
    assert reason is Reason.OK
    assert found == [(Signal.NEW_NETWORK, {"network": net(A3), "known_networks": 2})]
    assert watched.check(session, NOW + 101, A3) == (Reason.OK, [])  # allowed: now known
    assert watched.check(session, NOW + 102, A2) == (Reason.OK, [])


def test_learning_starts_with_the_first_observation_with_a_network(store: Store) -> None:
    watched = Watched(store, Thresholds(learning_seconds=100))
    session = watched.open()
    assert watched.check(session, NOW) == (Reason.OK, [])  # no address: not the start of learning
    assert watched.check(session, NOW + 500, A) == (Reason.OK, [])
    assert watched.check(session, NOW + 599, A2) == (Reason.OK, [])
    assert signals(watched.check(session, NOW + 600, A3)[1]) == [Signal.NEW_NETWORK]


def test_a_denied_new_network_stays_unknown(store: Store) -> None:
    watched = Watched(store, Thresholds(learning_seconds=10))
    session = watched.open()
    assert watched.check(session, NOW, A) == (Reason.OK, [])
    finding = (Signal.NEW_NETWORK, {"network": net(A2), "known_networks": 1})
    deny = bits(Signal.NEW_NETWORK)
    assert watched.check(session, NOW + 20, A2, deny=deny) == (Reason.ANOMALY, [finding])
    assert watched.check(session, NOW + 21, A2, deny=deny) == (Reason.ANOMALY, [finding])  # not learned
    assert watched.check(session, NOW + 22, A, deny=deny) == (Reason.OK, [])
    assert watched.check(session, NOW + 23, A2) == (Reason.OK, [finding])  # alert: allowed, so learned
    assert watched.check(session, NOW + 24, A2, deny=deny) == (Reason.OK, [])


@pytest.mark.parametrize(("seen_again", "evicted"), [(3599, A), (3600, A2)])
def test_network_history_keeps_the_most_recently_seen(store: Store, seen_again: int, evicted: str) -> None:
    """A's last seen is refreshed only an hour or more after it was written: at 3599 it is
    still the oldest, and goes when a fourth network comes."""
    watched = Watched(store, Thresholds(learning_seconds=10, network_history_max=3))
    session = watched.open()
    for i, ip in enumerate((A, A2, A3)):
        assert watched.check(session, NOW + i, ip) == (Reason.OK, [])
    assert watched.check(session, NOW + seen_again, A) == (Reason.OK, [])
    found = watched.check(session, NOW + 3601, A4)[1]
    assert found == [(Signal.NEW_NETWORK, {"network": net(A4), "known_networks": 3})]
    kept = [ip for ip in (A, A2, A3) if ip != evicted]
    for i, ip in enumerate(kept):
        assert watched.check(session, NOW + 3602 + i, ip) == (Reason.OK, [])
    found = watched.check(session, NOW + 3700, evicted)[1]
    assert found == [(Signal.NEW_NETWORK, {"network": net(evicted), "known_networks": 3})]


def test_network_history_forgets_networks_older_than_its_days(store: Store) -> None:
    watched = Watched(store, Thresholds(learning_seconds=200, network_history_days=1))
    session = watched.open()
    assert watched.check(session, NOW, A) == (Reason.OK, [])
    assert watched.check(session, NOW + 100, A2) == (Reason.OK, [])
    found = watched.check(session, NOW + DAY + 50, A)[1]  # A is a day and 50 s old: forgotten
    assert found == [(Signal.NEW_NETWORK, {"network": net(A), "known_networks": 1})]
    # A3 is learned when A2 is exactly a day old: A2 is not older than the history, so kept.
    found = watched.check(session, NOW + DAY + 100, A3)[1]
    assert found == [(Signal.NEW_NETWORK, {"network": net(A3), "known_networks": 2})]
    assert watched.check(session, NOW + DAY + 100, A2) == (Reason.OK, [])


# -- concurrent_origins ----------------------------------------------------------------------


def test_concurrent_origins_fires_while_learning_and_follows_the_origin(store: Store) -> None:
    watched = Watched(store)  # a day of learning: new_network is quiet throughout
    session = watched.open()
    assert watched.check(session, NOW, A) == (Reason.OK, [])
    finding = {"network": net(FAR), "other_network": net(A), "seconds_apart": 30}
    assert watched.check(session, NOW + 30, FAR) == (Reason.OK, [(Signal.CONCURRENT_ORIGINS, finding)])
    assert watched.check(session, NOW + 31, FAR) == (Reason.OK, [])  # the origin moved to FAR
    finding = {"network": net(A), "other_network": net(FAR), "seconds_apart": 9}
    assert watched.check(session, NOW + 40, A) == (Reason.OK, [(Signal.CONCURRENT_ORIGINS, finding)])


def test_concurrent_origins_is_per_session(store: Store) -> None:
    watched = Watched(store)
    first, second = watched.open(), watched.open()
    assert watched.check(first, NOW, A) == (Reason.OK, [])
    assert watched.check(second, NOW + 1, FAR) == (Reason.OK, [])


@pytest.mark.parametrize(
    ("origin", "other"),
    [(A, A2), ("2001:db8:1::1", "2001:db8:2::1"), ("::ffff:10.1.1.5", "10.1.2.9")],
    ids=["ipv4-/16", "ipv6-/32", "ipv4-mapped"],
)
def test_adjacent_networks_are_not_concurrent(store: Store, origin: str, other: str) -> None:
    watched = Watched(store)
    session = watched.open()
    assert watched.check(session, NOW, origin) == (Reason.OK, [])
    assert watched.check(session, NOW + 1, other) == (Reason.OK, [])
    assert watched.check(session, NOW + 2, origin) == (Reason.OK, [])


def test_non_adjacent_ipv6_networks_are_concurrent(store: Store) -> None:
    watched = Watched(store)
    session = watched.open()
    assert watched.check(session, NOW, "2001:db8:1::1") == (Reason.OK, [])
    found = watched.check(session, NOW + 1, "2001:db9::1")[1]
    assert found == [
        (
            Signal.CONCURRENT_ORIGINS,
            {"network": "2001:db9::/48", "other_network": "2001:db8:1::/48", "seconds_apart": 1},
        )
    ]


@pytest.mark.parametrize(("apart", "fires"), [(299, True), (300, False)])
def test_concurrent_origins_window(store: Store, apart: int, fires: bool) -> None:
    watched = Watched(store, Thresholds(concurrent_window_seconds=300))
    session = watched.open()
    assert watched.check(session, NOW, A) == (Reason.OK, [])
    assert watched.check(session, NOW + 200, A) == (Reason.OK, [])  # the origin is seen again
    found = watched.check(session, NOW + 200 + apart, FAR)[1]
    assert signals(found) == ([Signal.CONCURRENT_ORIGINS] if fires else [])


def test_denied_concurrent_origins_keep_the_origin(store: Store) -> None:
    watched = Watched(store)
    session = watched.open()
    deny = bits(Signal.CONCURRENT_ORIGINS)
    assert watched.check(session, NOW, A, deny=deny) == (Reason.OK, [])
    for apart in (10, 11):
        finding = {"network": net(FAR), "other_network": net(A), "seconds_apart": apart}
        assert watched.check(session, NOW + apart, FAR, deny=deny) == (
            Reason.ANOMALY,
            [(Signal.CONCURRENT_ORIGINS, finding)],
        )
    assert watched.check(session, NOW + 12, A, deny=deny) == (Reason.OK, [])


def test_a_request_without_an_address_keeps_the_origin(store: Store) -> None:
    watched = Watched(store)
    session = watched.open()
    assert watched.check(session, NOW, A) == (Reason.OK, [])
    assert watched.check(session, NOW + 1, "") == (Reason.OK, [])
    assert watched.check(session, NOW + 2, "not-an-address") == (Reason.OK, [])
    assert signals(watched.check(session, NOW + 3, FAR)[1]) == [Signal.CONCURRENT_ORIGINS]


# -- resource_breadth ------------------------------------------------------------------------


def breadth_thresholds(**overrides: int) -> Thresholds:
    values = {"breadth_min_sessions": 10, "breadth_min_resources": 3, "learning_seconds": 10**6}
    values.update(overrides)
    return Thresholds(**values)


def test_resource_breadth_fires_above_the_clients_p95(store: Store) -> None:
    watched = Watched(store, breadth_thresholds())
    watched.history(10, 2)
    session = watched.open(NOW + 1000)
    for r in range(2):
        assert watched.check(session, NOW + 1000, A, f"tools/call new-{r}") == (Reason.OK, [])
    # 11 sessions (this one counts): ten with 2 resources, this one with 2: p95 is 2.
    found = watched.check(session, NOW + 1001, A, "tools/call new-2")[1]
    assert found == [(Signal.RESOURCE_BREADTH, {"distinct_resources": 3, "p95": 2, "sessions": 11})]
    # This session grew to 3 (alert: counted), so the p95 is 3 now.
    found = watched.check(session, NOW + 1002, A, "tools/call new-3")[1]
    assert found == [(Signal.RESOURCE_BREADTH, {"distinct_resources": 4, "p95": 3, "sessions": 11})]
    assert watched.check(session, NOW + 1003, A, "tools/call new-0") == (Reason.OK, [])  # already touched


def test_resource_breadth_needs_breadth_min_sessions(store: Store) -> None:
    watched = Watched(store, breadth_thresholds())
    watched.history(8, 1)  # with this session: 9 sessions, one short
    session = watched.open(NOW + 1000)
    for r in range(6):
        assert watched.check(session, NOW + 1000, A, f"tools/call new-{r}") == (Reason.OK, [])


def test_resource_breadth_never_fires_below_breadth_min_resources(store: Store) -> None:
    watched = Watched(store, breadth_thresholds())
    watched.history(20, 1)
    session = watched.open(NOW + 1000)
    for r in range(2):  # 2 is above the p95 of 1, but not above breadth_min_resources - 1
        assert watched.check(session, NOW + 1000, A, f"tools/call new-{r}") == (Reason.OK, [])
    found = watched.check(session, NOW + 1001, A, "tools/call new-2")[1]
    assert found == [(Signal.RESOURCE_BREADTH, {"distinct_resources": 3, "p95": 1, "sessions": 21})]


def test_denied_resources_are_not_counted(store: Store) -> None:
    watched = Watched(store, breadth_thresholds())
    watched.history(10, 2)
    session = watched.open(NOW + 1000)
    deny = bits(Signal.RESOURCE_BREADTH)
    for r in range(2):
        assert watched.check(session, NOW + 1000, A, f"tools/call new-{r}", deny=deny) == (Reason.OK, [])
    finding = (Signal.RESOURCE_BREADTH, {"distinct_resources": 3, "p95": 2, "sessions": 11})
    for resource in ("tools/call new-2", "tools/call new-2", "tools/call new-3"):
        assert watched.check(session, NOW + 1001, A, resource, deny=deny) == (Reason.ANOMALY, [finding])
    assert watched.check(session, NOW + 1002, A, "tools/call new-1", deny=deny) == (Reason.OK, [])
    assert watched.check(session, NOW + 1003, A, deny=deny) == (Reason.OK, [])  # nothing named


def test_a_p95_in_the_last_bucket_never_fires(store: Store) -> None:
    watched = Watched(store, breadth_thresholds())
    watched.history(10, BREADTH_BUCKETS)
    session = watched.open(NOW + 1000)
    for r in range(BREADTH_BUCKETS + 4):  # past the burst window
        assert watched.check(session, NOW + 1100, A, f"tools/call new-{r}") == (Reason.OK, [])


def test_a_sessions_resources_are_bounded(store: Store) -> None:
    watched = Watched(store, breadth_thresholds(breadth_min_resources=2, session_resources_max=2))
    watched.history(10, 1)
    session = watched.open(NOW + 1000)
    assert watched.check(session, NOW + 1000, A, "tools/call new-0") == (Reason.OK, [])
    found = watched.check(session, NOW + 1001, A, "tools/call new-1")[1]
    assert found == [(Signal.RESOURCE_BREADTH, {"distinct_resources": 2, "p95": 1, "sessions": 11})]
    for r in range(2, 5):  # the set is full: new resources are neither added nor counted
        assert watched.check(session, NOW + 1002, A, f"tools/call new-{r}") == (Reason.OK, [])


# -- burst_after_auth ------------------------------------------------------------------------


def test_burst_after_auth_fires_on_every_request_beyond_the_limit(store: Store) -> None:
    watched = Watched(store, Thresholds(burst_window_seconds=10, burst_requests=3))
    session = watched.open()
    for i in range(3):
        assert watched.check(session, NOW + i, A) == (Reason.OK, [])
    assert watched.check(session, NOW + 3, A) == (
        Reason.OK,
        [(Signal.BURST_AFTER_AUTH, {"requests": 4, "seconds_since_open": 3})],
    )
    assert watched.check(session, NOW + 9, A) == (
        Reason.OK,
        [(Signal.BURST_AFTER_AUTH, {"requests": 5, "seconds_since_open": 9})],
    )
    assert watched.check(session, NOW + 10, A) == (Reason.OK, [])  # the window is over


def test_denied_burst_requests_are_not_counted(store: Store) -> None:
    watched = Watched(store, Thresholds(burst_window_seconds=10, burst_requests=3))
    session = watched.open()
    deny = bits(Signal.BURST_AFTER_AUTH)
    for i in range(3):
        assert watched.check(session, NOW + i, A, deny=deny) == (Reason.OK, [])
    for i in (3, 4):
        assert watched.check(session, NOW + i, A, deny=deny) == (
            Reason.ANOMALY,
            [(Signal.BURST_AFTER_AUTH, {"requests": 4, "seconds_since_open": i})],
        )
    assert watched.check(session, NOW + 10, A, deny=deny) == (Reason.OK, [])
    other = watched.open(NOW + 5)  # per session: a new one has its own window
    assert watched.check(other, NOW + 5, A, deny=deny) == (Reason.OK, [])


# -- outside_usage_window --------------------------------------------------------------------


def test_outside_usage_window_fires_on_every_such_request(store: Store) -> None:
    watched = Watched(store)
    session = watched.open()
    for i in range(3):
        assert watched.check(session, NOW + i, A, outside=True) == (
            Reason.OK,
            [(Signal.OUTSIDE_USAGE_WINDOW, {"hour": hour_of(NOW + i)})],
        )
    assert watched.check(session, NOW + 3, A) == (Reason.OK, [])


# -- actions ---------------------------------------------------------------------------------

# Each scenario provokes one signal with the request it returns: (thresholds, setup).
Scenario = Callable[[Watched], tuple[Session, int, str, str, bool]]


def provoke_new_network(watched: Watched) -> tuple[Session, int, str, str, bool]:
    session = watched.open()
    assert watched.check(session, NOW, A) == (Reason.OK, [])
    return session, NOW + 20, A2, "", False


def provoke_concurrent_origins(watched: Watched) -> tuple[Session, int, str, str, bool]:
    session = watched.open()
    assert watched.check(session, NOW, A) == (Reason.OK, [])
    return session, NOW + 20, FAR, "", False


def provoke_resource_breadth(watched: Watched) -> tuple[Session, int, str, str, bool]:
    watched.history(10, 1)
    session = watched.open(NOW + 1000)
    assert watched.check(session, NOW + 1000, A, "tools/call new-0") == (Reason.OK, [])
    return session, NOW + 1020, A, "tools/call new-1", False


def provoke_outside_usage_window(watched: Watched) -> tuple[Session, int, str, str, bool]:
    session = watched.open()
    return session, NOW + 20, A, "", True


def provoke_burst_after_auth(watched: Watched) -> tuple[Session, int, str, str, bool]:
    session = watched.open()
    assert watched.check(session, NOW, A) == (Reason.OK, [])
    return session, NOW + 1, A, "", False


SCENARIOS: dict[Signal, tuple[Thresholds, Scenario]] = {
    Signal.NEW_NETWORK: (Thresholds(learning_seconds=10), provoke_new_network),
    Signal.CONCURRENT_ORIGINS: (Thresholds(), provoke_concurrent_origins),
    Signal.RESOURCE_BREADTH: (breadth_thresholds(breadth_min_resources=2), provoke_resource_breadth),
    Signal.OUTSIDE_USAGE_WINDOW: (Thresholds(), provoke_outside_usage_window),
    Signal.BURST_AFTER_AUTH: (Thresholds(burst_window_seconds=10, burst_requests=1), provoke_burst_after_auth),
}
EVIDENCE_KEYS = {
    Signal.NEW_NETWORK: {"network", "known_networks"},
    Signal.CONCURRENT_ORIGINS: {"network", "other_network", "seconds_apart"},
    Signal.RESOURCE_BREADTH: {"distinct_resources", "p95", "sessions"},
    Signal.OUTSIDE_USAGE_WINDOW: {"hour"},
    Signal.BURST_AFTER_AUTH: {"requests", "seconds_since_open"},
}


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("signal", list(Signal))
def test_every_signal_takes_every_action(store: Store, signal: Signal, action: Action) -> None:
    thresholds, provoke = SCENARIOS[signal]
    watched = Watched(store, thresholds)
    session, now, ip, resource, outside = provoke(watched)
    deny = bits(signal) if action is Action.DENY else 0
    revoke = bits(signal) if action is Action.REVOKE_SESSION else 0
    reason, found = watched.check(session, now, ip, resource, deny=deny, revoke=revoke, outside=outside)
    assert signals(found) == [signal]
    assert reason is (Reason.OK if action is Action.ALERT else Reason.ANOMALY)
    later = watched.plain(session, now + 1, ip)
    assert later is (Reason.SESSION_REVOKED if action is Action.REVOKE_SESSION else Reason.OK)
    if action is Action.REVOKE_SESSION:
        assert watched.check(session, now + 2, ip) == (Reason.SESSION_REVOKED, [])
        assert session.session_id not in {s.session_id for s in store.sessions(watched.client_id, now=now + 2)}


@pytest.mark.parametrize("signal", list(Signal))
def test_evidence_is_small_json_and_names_no_secret(store: Store, signal: Signal) -> None:
    thresholds, provoke = SCENARIOS[signal]
    watched = Watched(store, thresholds)
    session, now, ip, resource, outside = provoke(watched)
    [(found, evidence)] = watched.check(session, now, ip, resource, outside=outside, jti="jti-secret-1")[1]
    assert found == signal
    assert set(evidence) == EVIDENCE_KEYS[signal]
    assert all(isinstance(v, str | int) and not isinstance(v, bool) for v in evidence.values())
    text = json.dumps(evidence)
    assert json.loads(text) == evidence
    for secret in (session.session_id, "jti-secret", "tools/call"):
        assert secret not in text
    assert len(text) < 200


def test_the_strongest_action_wins_and_every_finding_is_reported(store: Store) -> None:
    watched = Watched(store, Thresholds(burst_window_seconds=10, burst_requests=1))
    session = watched.open()
    assert watched.check(session, NOW, A) == (Reason.OK, [])
    both = [Signal.OUTSIDE_USAGE_WINDOW, Signal.BURST_AFTER_AUTH]  # in Signal order
    reason, found = watched.check(session, NOW + 1, A, outside=True, deny=bits(Signal.BURST_AFTER_AUTH))
    assert (reason, signals(found)) == (Reason.ANOMALY, both)
    reason, found = watched.check(
        session,
        NOW + 2,
        A,
        outside=True,
        deny=bits(Signal.OUTSIDE_USAGE_WINDOW),
        revoke=bits(Signal.BURST_AFTER_AUTH),
    )
    assert (reason, signals(found)) == (Reason.ANOMALY, both)
    assert watched.plain(session, NOW + 3) is Reason.SESSION_REVOKED


def test_revoking_one_session_leaves_the_others(store: Store) -> None:
    watched = Watched(store)
    kept, revoked = watched.open(), watched.open()
    assert watched.check(revoked, NOW, A, outside=True, revoke=bits(Signal.OUTSIDE_USAGE_WINDOW))[0] is Reason.ANOMALY
    assert watched.plain(revoked, NOW + 1) is Reason.SESSION_REVOKED
    assert watched.check(kept, NOW + 1, A) == (Reason.OK, [])
    assert [s.session_id for s in store.sessions(watched.client_id, now=NOW + 1)] == [kept.session_id]


def test_a_denied_request_writes_nothing(store: Store) -> None:
    watched = Watched(store)
    session = watched.open()
    deny = bits(Signal.OUTSIDE_USAGE_WINDOW)
    replay = (("proof-1", NOW + 3600),)
    reason, found = watched.check(session, NOW + 5, A, "tools/call add", deny=deny, outside=True, replay=replay)
    assert (reason, signals(found)) == (Reason.ANOMALY, [Signal.OUTSIDE_USAGE_WINDOW])
    [seen] = store.sessions(watched.client_id, now=NOW + 6)
    assert (seen.last_seen_at, seen.last_ip) == (NOW, "")  # as opened
    assert store.usage_hours(watched.client_id) == [0] * 24
    # The replay record was not recorded: the same proof is new once allowed, and only then.
    assert watched.check(session, NOW + 7, A, "tools/call add", deny=deny, replay=replay) == (Reason.OK, [])
    assert watched.check(session, NOW + 8, A, deny=deny, replay=replay) == (Reason.REPLAYED, [])
    [seen] = store.sessions(watched.client_id, now=NOW + 9)
    assert (seen.last_seen_at, seen.last_ip) == (NOW + 7, A)


def test_a_denied_request_leaves_the_origin_and_the_burst(store: Store) -> None:
    """Deny on one signal: the other watches are not advanced by the refused request."""
    watched = Watched(store, Thresholds(burst_window_seconds=10, burst_requests=2))
    session = watched.open()
    deny = bits(Signal.OUTSIDE_USAGE_WINDOW)
    assert watched.check(session, NOW, A) == (Reason.OK, [])
    assert watched.check(session, NOW + 1, FAR, outside=True, deny=deny)[0] is Reason.ANOMALY
    # FAR did not become the origin, and the burst count is still 1.
    assert watched.check(session, NOW + 2, A) == (Reason.OK, [])
    assert signals(watched.check(session, NOW + 3, A)[1]) == [Signal.BURST_AFTER_AUTH]


# -- usage hours -----------------------------------------------------------------------------


def test_usage_hours_count_sessions_per_hour(store: Store) -> None:
    watched = Watched(store)
    start = NOW - NOW % 3600 + 3600  # the start of an hour
    hour = hour_of(start)
    first, second = watched.open(start), watched.open(start)
    assert watched.check(first, start + 1, A)[0] is Reason.OK
    assert watched.check(first, start + 2, A)[0] is Reason.OK  # the same hour: counted once
    assert watched.check(second, start + 3, A)[0] is Reason.OK
    assert watched.check(first, start + 3600, A)[0] is Reason.OK  # the next hour
    deny = bits(Signal.OUTSIDE_USAGE_WINDOW)
    assert watched.check(second, start + 7200, A, outside=True, deny=deny)[0] is Reason.ANOMALY  # not counted
    expected = [0] * 24
    expected[hour], expected[(hour + 1) % 24] = 2, 1
    assert store.usage_hours(watched.client_id) == expected
    assert asyncio.run(store.ausage_hours(watched.client_id)) == expected
    assert store.usage_hours("client-never-seen") == [0] * 24


# -- memory store only: its bounds and its decision function ----------------------------------


def test_the_memory_store_watches_a_bounded_number_of_clients() -> None:
    store = MemoryStore(max_watched_clients=2)
    start = NOW - NOW % 3600 + 3600
    watched = {cid: Watched(store, client_id=cid) for cid in ("c1", "c2", "c3")}
    sessions = {cid: w.open(start) for cid, w in watched.items()}
    assert watched["c1"].check(sessions["c1"], start, A)[0] is Reason.OK
    assert watched["c2"].check(sessions["c2"], start, A)[0] is Reason.OK
    assert watched["c1"].check(sessions["c1"], start + 3600, A)[0] is Reason.OK  # a new hour: c1 used again
    assert watched["c3"].check(sessions["c3"], start + 3600, A)[0] is Reason.OK  # c2 goes
    assert store.sizes().watched_clients == 2
    assert store.usage_hours("c2") == [0] * 24
    assert sum(store.usage_hours("c1")) == 2
    assert sum(store.usage_hours("c3")) == 1
    with pytest.raises(InvalidArgumentError, match="max_watched_clients"):
        MemoryStore(max_watched_clients=0)


def test_a_dropped_clients_session_brings_its_watch_back() -> None:
    store = MemoryStore(max_watched_clients=1)
    start = NOW - NOW % 3600 + 3600
    one, two = Watched(store, client_id="c1"), Watched(store, client_id="c2")
    session = one.open(start)
    assert one.check(session, start, A)[0] is Reason.OK
    assert two.check(two.open(start), start, A)[0] is Reason.OK  # c1 dropped
    assert store.usage_hours("c1") == [0] * 24
    assert one.check(session, start + 3600, A)[0] is Reason.OK  # c1's live session re-attaches
    assert sum(store.usage_hours("c1")) == 2
    assert store.sizes().watched_clients == 1


def plain_observe(thresholds: Thresholds, resource: str) -> Observe:
    return Observe("", "", resource, 0, 0, False, thresholds, [])


def test_the_breadth_histogram_halves_past_its_history() -> None:
    client = ClientWatch()
    client.buckets[1] = client.total = BREADTH_HISTORY_MAX
    thresholds = Thresholds()
    session = SessionWatch(client)
    assert observe(client, session, plain_observe(thresholds, "r1"), NOW + 100, NOW) is None
    assert (client.buckets[1], client.total) == ((BREADTH_HISTORY_MAX + 1) // 2, (BREADTH_HISTORY_MAX + 1) // 2)
    # A session whose bucket was halved away is counted anew as it grows.
    client.buckets[1] = 0
    client.total = sum(client.buckets)
    before = client.total
    assert observe(client, session, plain_observe(thresholds, "r2"), NOW + 101, NOW) is None
    assert (client.buckets[2], client.total) == (1, before + 1)
    assert sum(client.buckets) == client.total


def test_a_session_in_the_last_bucket_stays_there() -> None:
    client, thresholds = ClientWatch(), Thresholds(breadth_min_sessions=10**6)
    session = SessionWatch(client)
    for r in range(BREADTH_BUCKETS + 3):
        assert observe(client, session, plain_observe(thresholds, f"r{r}"), NOW + 100, NOW) is None
    assert (client.total, client.buckets[BREADTH_BUCKETS], sum(client.buckets)) == (1, 1, 1)


@pytest.mark.parametrize(
    ("counts", "p95"),
    [({2: 10, 1: 1}, 2), ({1: 95, 5: 5}, 1), ({1: 94, 5: 6}, 5), ({3: 1}, 3), ({64: 3}, BREADTH_BUCKETS)],
)
def test_breadth_p95(counts: dict[int, int], p95: int) -> None:
    buckets = [0] * (BREADTH_BUCKETS + 1)
    for k, n in counts.items():
        buckets[k] = n
    assert breadth_p95(buckets, sum(counts.values())) == p95
