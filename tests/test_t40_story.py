"""Issue 12's acceptance story (OWASP T40, client impersonation), embedded: an in-process
`Broker` on an injected clock, over the memory store and over a real redis-server.

1. A legitimate client works for a simulated week: every day 09-17 UTC, several sessions,
   each touching 3-8 of its 12 tools, from one network. The false-positive rate (events
   per validation) is printed and bounded; no event is critical.
3. After that week, a session that touches far more than the client ever did fires
   `resource_breadth`.
4. Use at 03:00, outside the client's hours (the window learned from the week, and a
   configured one), fires `outside_usage_window`.
5. (embedded side) With `concurrent_origins=deny` a thief using the client's token from
   another /16 is refused with ANOMALY while the client goes on; with `revoke_session`
   the session dies for both.

Part 2 and the process side of 5 (real processes in network namespaces) are in
test_t40_netns.py."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tokenbroker import Broker, Keyring, MemoryStore, Reason, SessionLimit
from tokenbroker.detection.detector import Detection, parse_window
from tokenbroker.detection.signals import Action, Signal
from tokenbroker.errors import SessionNotFoundError
from tokenbroker.events import Event, Events
from tokenbroker.models import IssuedToken
from tokenbroker.store.base import Store

from support.brokers import AUDIENCE, ISSUER, FakeClock

CLIENT = "coding-agent"
SCOPES = ["tools:call"]
TOOLS = (
    "search_code",
    "read_file",
    "write_file",
    "list_dir",
    "run_tests",
    "git_status",
    "git_diff",
    "git_commit",
    "open_issue",
    "comment_issue",
    "fetch_url",
    "summarize",
)
# One network (documentation addresses, never contacted): the client's laptop gets one of
# a few addresses of its office /24 by DHCP.
OFFICE = [f"198.51.100.{n}" for n in range(20, 26)]
THIEF = "192.0.2.66"  # another /16 (192.0 vs 198.51)
HOUR, DAY = 3600, 86400
# The false-positive rate the week must stay under (events per validation).
MAX_FALSE_POSITIVE_RATE = 0.01


def resource(tool: str) -> str:
    """What BrokerAuthMiddleware names for a tool call (tokenbroker.mcp.jsonrpc_resource)."""
    return f"tools/call {tool}"


def week_start(now: float) -> int:
    """The next Monday 00:00 UTC at least a day after `now`: the simulated week lies in the
    future of every clock involved (Redis's epoch refuses tokens issued before it)."""
    day = int(now) // DAY + 2
    while (day + 3) % 7 != 0:  # 1970-01-01 was a Thursday: day + 3 is 0 mod 7 on Mondays
        day += 1
    return day * DAY


@dataclass
class Story:
    """One broker on an injected clock, its detection and what the client did."""

    broker: Broker
    clock: FakeClock
    events: Events
    start: int
    validations: int = 0
    sessions: int = 0
    refused: list[tuple[str, Reason]] = field(default_factory=list)
    policy: dict[Signal, Action] = field(default_factory=dict)  # the client record's actions
    # Every (signal, action) detection found, one per finding: an event is emitted for the
    # first of a session's in each cooldown minute (`Detection.event_cooldown_seconds`).
    findings: list[tuple[str, str]] = field(default_factory=list)

    def at(self, day: int, hour: int, minute: int = 0) -> None:
        target = self.start + day * DAY + hour * HOUR + minute * 60
        assert target >= self.clock.now, "the story's clock only moves forward"
        self.clock.now = float(target)

    def issue(self, session_id: str | None = None, usage_window: int | None = None, ip: str = OFFICE[0]) -> IssuedToken:
        return self.broker.issue(
            client_id=CLIENT,
            audience=AUDIENCE,
            scopes=SCOPES,
            session_id=session_id,
            client_ip=ip,
            usage_window=usage_window,
        )

    def call(self, token: IssuedToken, touched: str, ip: str) -> Reason:
        self.validations += 1
        answer = self.broker.validate(
            token.access_token, audience=AUDIENCE, client_ip=ip, resource=touched, required_scopes=SCOPES
        )
        if not answer.valid:
            self.refused.append((touched, answer.reason))
        return answer.reason

    def found(self, signal: Signal | None = None) -> list[Event]:
        return [e for e in self.events.recent(CLIENT) if signal is None or e.signal == signal.value]


def make_story(store_kind: str, request: Any) -> Iterator[Story]:
    clock = FakeClock()
    clock.now = float(week_start(clock.now))
    store: Store
    if store_kind == "redis":
        from tokenbroker import RedisStore

        store = RedisStore.from_url(request.getfixturevalue("redis_server").url)
    else:
        store = MemoryStore(clock=clock)
    events = Events(clock=clock)
    policy: dict[Signal, Action] = {}
    findings: list[tuple[str, str]] = []
    detection = Detection(
        events=events,
        client_actions=lambda client_id: policy if client_id == CLIENT else None,
        on_finding=lambda signal, action: findings.append((signal, action)),
        monotonic=clock,  # the policy cache and the event cooldown run on the story's clock too
    )
    broker = Broker(
        Keyring.generate(),
        issuer=ISSUER,
        store=store,
        clock=clock,
        detection=detection,
        session_limit=SessionLimit(max_sessions=20),
        session_ttl_seconds=2 * HOUR,
    )
    story = Story(broker, clock, events, int(clock.now), policy=policy, findings=findings)
    try:
        yield story
    finally:
        events.close()
        close = getattr(store, "close", None)
        if close is not None:
            close()


@pytest.fixture(params=["memory", "redis"])
def story(request: Any) -> Iterator[Story]:
    yield from make_story(request.param, request)


def work_session(story: Story, rng: random.Random, minutes: int, ip: str) -> None:
    """One working session: a token, refreshed in the same session before it expires, and
    a call every 30-120 s, each to one of the 3-8 tools this session needs (every one of
    them at least once)."""
    tools = rng.sample(TOOLS, rng.randint(3, 8))
    plan = tools + [rng.choice(tools) for _ in range(max(0, minutes * 60 // 75 - len(tools)))]
    token = story.issue(ip=ip)
    story.sessions += 1
    for tool in plan:
        if token.expires_at - story.clock.now < 60:
            token = story.issue(session_id=token.session_id, ip=ip)
        story.call(token, resource(tool), ip)
        story.clock.advance(rng.randint(30, 120))


def legitimate_week(story: Story, seed: int = 1) -> None:
    """Seven days of the client's usual work, 09:00 to 17:00 UTC: 5-7 sessions a day of
    20-60 minutes, from its office network."""
    rng = random.Random(seed)
    for day in range(7):
        ip = rng.choice(OFFICE)
        count = rng.randint(5, 7)
        slot = 8 * 60 // count  # minutes of the working day per session
        for n in range(count):
            story.at(day, 9, n * slot + rng.randint(0, 10))
            work_session(story, rng, min(rng.randint(20, 60), slot - 15), ip)
    assert story.clock.now < story.start + 6 * DAY + 17 * HOUR, "the week stayed inside working hours"


# -- 1. a legitimate week -----------------------------------------------------------------


def test_a_legitimate_week_has_few_false_positives_and_nothing_critical(story: Story) -> None:
    legitimate_week(story)
    events = story.found()
    rate = len(story.findings) / story.validations  # findings: every one, not only those that became events
    by_signal: dict[str, int] = {}
    for signal, _ in story.findings:
        by_signal[signal] = by_signal.get(signal, 0) + 1
    print(
        f"\nT40 legitimate week ({type(story.broker.store).__name__}): {story.sessions} sessions, "
        f"{story.validations} validations, {len(story.findings)} findings {by_signal} "
        f"({len(events)} events), false-positive rate {rate:.4%} of validations"
    )
    assert story.validations > 1000  # a real week's worth, not a handful
    assert story.refused == []  # alerts only: nothing refused
    assert [e for e in events if e.severity == "critical"] == []
    # One network all week: the network signals never fire.
    assert not [f for f in story.findings if f[0] in (Signal.NEW_NETWORK, Signal.CONCURRENT_ORIGINS)]
    assert len(events) <= len(story.findings)
    assert rate < MAX_FALSE_POSITIVE_RATE, by_signal


# -- 3. a breadth burst -------------------------------------------------------------------


def test_a_breadth_burst_after_the_week_fires_resource_breadth(story: Story) -> None:
    legitimate_week(story)
    before = len(story.found(Signal.RESOURCE_BREADTH))
    story.at(7, 10)
    token = story.issue()
    sweep = [resource(tool) for tool in TOOLS] + [f"resources/read file:///srv/secrets/{n}" for n in range(12)]
    for touched in sweep:  # the whole server, in a minute
        assert story.call(token, touched, OFFICE[0]) is Reason.OK  # alert: not refused
        story.clock.advance(2)
    fired = story.found(Signal.RESOURCE_BREADTH)[before:]
    assert fired, "a session touching 24 distinct resources after a week of 3-8 fired nothing"
    first = fired[0]
    assert first.session_id == token.session_id
    assert first.severity == "warning"
    assert first.action == "alert"
    assert first.source_ip == OFFICE[0]
    # The first one fires as soon as the session is past the client's usual breadth (at most 8).
    assert first.evidence["distinct_resources"] > first.evidence["p95"]
    assert 8 <= first.evidence["p95"] < first.evidence["distinct_resources"] <= 9
    assert not story.found(Signal.NEW_NETWORK)


# -- 4. outside the usage window ----------------------------------------------------------


def test_use_at_3am_after_the_week_fires_outside_usage_window(story: Story) -> None:
    legitimate_week(story)
    assert not story.found(Signal.OUTSIDE_USAGE_WINDOW)
    story.at(7, 3)  # the night after the week: the window learned from it says 08-18
    token = story.issue()
    assert story.call(token, resource("read_file"), OFFICE[0]) is Reason.OK  # alert: answered
    fired = story.found(Signal.OUTSIDE_USAGE_WINDOW)
    assert len(fired) == 1
    assert fired[0].evidence["hour"] == 3
    assert fired[0].evidence["usage_window"] == "08-18"  # its hours 09-17, widened by one on each side
    assert fired[0].severity == "warning"
    assert fired[0].action == "alert"
    assert fired[0].session_id == token.session_id
    # At 10:00 the next day the same client is inside its hours again.
    story.at(7, 10)
    later = story.issue()
    assert story.call(later, resource("read_file"), OFFICE[0]) is Reason.OK
    assert len(story.found(Signal.OUTSIDE_USAGE_WINDOW)) == 1


def test_a_configured_usage_window_is_enforced_with_deny(story: Story) -> None:
    window = parse_window("08-18")  # what `clients add --usage-window 08-18` records
    story.policy.update({Signal.OUTSIDE_USAGE_WINDOW: Action.DENY})
    story.at(0, 3)
    night = story.issue(usage_window=window)
    assert story.call(night, resource("read_file"), OFFICE[0]) is Reason.ANOMALY
    fired = story.found(Signal.OUTSIDE_USAGE_WINDOW)
    assert len(fired) == 1
    assert fired[0].evidence["hour"] == 3
    assert fired[0].evidence["usage_window"] == "08-18"
    assert fired[0].action == "deny"
    story.at(0, 9)
    day = story.issue(usage_window=window)
    assert story.call(day, resource("read_file"), OFFICE[0]) is Reason.OK
    assert len(story.found(Signal.OUTSIDE_USAGE_WINDOW)) == 1


# -- 5. actions: deny, then revoke_session ---------------------------------------------------


def test_a_stolen_token_is_denied_then_its_session_revoked(story: Story) -> None:
    story.at(0, 9)
    token = story.issue()
    for tool in TOOLS[:4]:
        assert story.call(token, resource(tool), OFFICE[0]) is Reason.OK
        story.clock.advance(5)

    # deny: the thief, from another /16 while the client works, gets ANOMALY; the client
    # goes on (a denied request is not remembered: the session's origin stays the client's).
    story.policy.update({Signal.CONCURRENT_ORIGINS: Action.DENY})
    for _ in range(3):
        assert story.call(token, resource("read_file"), THIEF) is Reason.ANOMALY
        story.clock.advance(1)
        assert story.call(token, resource("git_status"), OFFICE[0]) is Reason.OK
        story.clock.advance(1)
    assert story.findings == [("concurrent_origins", "deny")] * 3
    denied = story.found(Signal.CONCURRENT_ORIGINS)  # one event: the others are in its cooldown
    assert [(e.action, e.severity, e.source_ip, e.session_id) for e in denied] == [
        ("deny", "critical", THIEF, token.session_id)
    ]
    assert denied[0].evidence["network"] == "192.0.2.0/24"
    assert denied[0].evidence["other_network"] == "198.51.100.0/24"

    # revoke_session (the detection's policy cache holds the old one for two seconds)
    story.policy.update({Signal.CONCURRENT_ORIGINS: Action.REVOKE_SESSION})
    story.clock.advance(3)
    assert story.call(token, resource("read_file"), THIEF) is Reason.ANOMALY
    assert story.call(token, resource("git_status"), OFFICE[0]) is Reason.SESSION_REVOKED
    assert story.call(token, resource("read_file"), THIEF) is Reason.SESSION_REVOKED
    revoked = story.found(Signal.CONCURRENT_ORIGINS)[1:]
    assert [(e.action, e.source_ip) for e in revoked] == [("revoke_session", THIEF)]
    # A refreshed token in the dead session is refused too: the client must open a new one.
    with pytest.raises(SessionNotFoundError):
        story.issue(session_id=token.session_id)
