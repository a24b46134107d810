"""The impersonation signals (OWASP T40), their actions, and the thresholds both stores use.

A stolen credential is used by someone who behaves unlike the client it was issued to:
from another network, reading more, at other hours. Every validation that passed the
engine and the store's own checks is *observed* by the store, in the same atomic step
(the memory store under its lock, the Redis store inside `check_token.lua`: no extra
round trip), so a signal whose action is `deny` or `revoke_session` is decided before the
answer leaves. Signals, with what each watches (the thresholds are `Thresholds` fields):

- `new_network`: the request's network (its /24 for IPv4, /48 for IPv6) is not among the
  client's networks of the last `network_history_days` (bounded: `network_history_max`
  per client, least recently seen dropped). Quiet while the client is learning: for
  `learning_seconds` after the client was first observed. Networks are learned from
  allowed requests only (a denied one is not remembered, so it stays denied).
- `concurrent_origins`: the same session is used from two non-adjacent networks (their
  /16, IPv6 /32, differ) less than `concurrent_window_seconds` apart. Never quiet while
  learning. The session's origin is the network of its last allowed request. Under
  `deny` the newcomer is refused and the origin keeps the session: a thief who uses the
  token while the client has been idle for the window becomes the origin, and the client
  is the one refused (new_network, denied too, stops a thief from an unknown network).
  `revoke_session` ends the session for both sides, whoever came first.
- `resource_breadth`: the session has touched more distinct resources than the client's
  historical 95th percentile of distinct resources per session (once the client has at
  least `breadth_min_sessions` sessions in its distribution, and never below
  `breadth_min_resources`). Per session a bounded set of resource digests (at most
  `session_resources_max`); per client a histogram of sessions by distinct resources
  (buckets 1..`BREADTH_BUCKETS`, the last one "that many or more"), halved when it holds
  more than `BREADTH_HISTORY_MAX` sessions so old behaviour fades.
- `burst_after_auth`: more than `burst_requests` requests within `burst_window_seconds`
  of the session's opening.
- `outside_usage_window`: the token carries the client's usage window (claim
  `usage_window`, an hour mask: bit h = UTC hour h) and the request's hour is not in it.
  Decided by the broker from the claim; the store only applies its action.

Actions: `alert` (default: the request is answered as if nothing was seen, an event is
emitted), `deny` (the answer is `Reason.ANOMALY`; nothing of the request is recorded:
no network learned, no resource counted), `revoke_session` (the session is revoked at
once, this answer is `Reason.ANOMALY`, later ones `SESSION_REVOKED`). When several
signals fire, the strongest action applies."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields


class Signal(enum.StrEnum):
    NEW_NETWORK = "new_network"
    CONCURRENT_ORIGINS = "concurrent_origins"
    RESOURCE_BREADTH = "resource_breadth"
    OUTSIDE_USAGE_WINDOW = "outside_usage_window"
    BURST_AFTER_AUTH = "burst_after_auth"


class Action(enum.StrEnum):
    ALERT = "alert"
    DENY = "deny"
    REVOKE_SESSION = "revoke_session"


# One bit per signal, in the order above: how the broker tells the store which signals
# it must decide inline (deny or revoke_session) without a dict per validation.
SIGNAL_BITS: dict[Signal, int] = {s: 1 << i for i, s in enumerate(Signal)}
BIT_SIGNALS: tuple[Signal, ...] = tuple(Signal)

SEVERITY: dict[Signal, str] = {
    Signal.NEW_NETWORK: "warning",
    Signal.CONCURRENT_ORIGINS: "critical",
    Signal.RESOURCE_BREADTH: "warning",
    Signal.OUTSIDE_USAGE_WINDOW: "warning",
    Signal.BURST_AFTER_AUTH: "warning",
}

# The breadth histogram's buckets: 1..BREADTH_BUCKETS distinct resources per session (the
# last: that many or more); a p95 in the last bucket never fires (too broad to judge).
BREADTH_BUCKETS = 64
BREADTH_HISTORY_MAX = 4096


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Every threshold and window, with its default (settings `detection_*`)."""

    network_history_days: int = 30
    network_history_max: int = 64
    learning_seconds: int = 24 * 3600
    concurrent_window_seconds: int = 300
    breadth_min_sessions: int = 10
    breadth_min_resources: int = 8
    session_resources_max: int = 256
    burst_window_seconds: int = 10
    burst_requests: int = 60

    def __post_init__(self) -> None:
        for item in fields(self):
            name = item.name
            value = getattr(self, name)
            least = 0 if name == "learning_seconds" else 1  # no learning period at all is a choice
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"detection threshold {name} must be an integer >= {least}, not {value!r}")
