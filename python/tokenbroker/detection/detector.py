"""`Detection`: the broker's side of watching validations. On the hot path it builds the
`Observe` a store check carries (network prefixes, the resource's digest, which signals
this client's policy decides inline, the usage-window finding); after the store has
answered it counts what was found and hands it to `Events` (whose delivery runs off the
hot path).

Actions come from the broker-wide policy (`actions`, every signal `alert` unless set)
and, per client, from `client_actions(client_id)` (a client record's overrides), cached
for `policy_ttl_seconds` so the registry is not read on every validation."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from tokenbroker.detection.observe import Observe, hour_of, in_window, networks_of, resource_digest
from tokenbroker.detection.signals import SEVERITY, SIGNAL_BITS, Action, Signal, Thresholds
from tokenbroker.events import Events

ClientActions = Callable[[str], Mapping[Signal, Action] | None]

_POLICY_CACHE_MAX = 65_536
_NO_NETWORK = ("", "")
_new_observe = tuple.__new__


def action_bits(actions: Mapping[Signal, Action]) -> tuple[int, int]:
    """(inline, revoke): the bits of the signals decided inline (deny or revoke_session) and
    of those that revoke the session."""
    inline = revoke = 0
    for signal, action in actions.items():
        bit = SIGNAL_BITS[Signal(signal)]
        if action is Action.REVOKE_SESSION:
            inline |= bit
            revoke |= bit
        elif action is Action.DENY:
            inline |= bit
    return inline, revoke


def parse_actions(value: Mapping[str, str] | None, what: str) -> dict[Signal, Action]:
    """Signal -> action from text (settings, a client record); `ValueError` naming the bad
    entry and the accepted values."""
    out: dict[Signal, Action] = {}
    for name, action in (value or {}).items():
        try:
            signal = Signal(name)
        except ValueError:
            raise ValueError(f"{what}: unknown signal {name!r} (one of {', '.join(s.value for s in Signal)})") from None
        try:
            out[signal] = Action(action)
        except ValueError:
            raise ValueError(
                f"{what}: {name}: unknown action {action!r} (one of {', '.join(a.value for a in Action)})"
            ) from None
    return out


class Detection:
    """See module doc. Thread-safe."""

    def __init__(
        self,
        *,
        thresholds: Thresholds | None = None,
        actions: Mapping[Signal, Action] | None = None,
        client_actions: ClientActions | None = None,
        events: Events | None = None,
        on_finding: Callable[[str, str], None] | None = None,
        policy_ttl_seconds: float = 2.0,
        learn_usage_window: bool = True,
        event_cooldown_seconds: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.thresholds = thresholds or Thresholds()
        self.actions: dict[Signal, Action] = {s: Action.ALERT for s in Signal}
        self.actions.update(actions or {})
        self._default_bits = action_bits(self.actions)
        self._client_actions = client_actions
        self.events = events if events is not None else Events()
        self._on_finding = on_finding
        self._policy_ttl = policy_ttl_seconds
        # Tokens of a client without a configured usage window carry one learned from its
        # usage hours (see `learned_window`).
        self.learn_usage_window = learn_usage_window
        self._monotonic = monotonic
        self._policies: OrderedDict[str, tuple[float, int, int]] = OrderedDict()
        # (client, session, signal, action) -> when its last event was emitted: a signal that
        # fires on every request of a session (a burst, a thief's every call) is one event
        # per `event_cooldown_seconds`; the counter still counts every finding.
        self._emitted: OrderedDict[tuple[str, str, str, str], float] = OrderedDict()
        self._cooldown = event_cooldown_seconds
        self._lock = threading.Lock()

    def actions_of(self, client_id: str) -> dict[Signal, Action]:
        """The client's action for every signal (its overrides over the broker's)."""
        merged = dict(self.actions)
        if self._client_actions is not None:
            merged.update(self._client_actions(client_id) or {})
        return merged

    def _bits(self, client_id: str) -> tuple[int, int]:
        if self._client_actions is None:
            return self._default_bits
        now = self._monotonic()
        cached = self._policies.get(client_id)
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        try:
            inline, revoke = action_bits(self.actions_of(client_id))
        except Exception:  # a registry that cannot answer: the broker-wide policy, not no policy
            inline, revoke = self._default_bits
        with self._lock:
            self._policies[client_id] = (now + self._policy_ttl, inline, revoke)
            self._policies.move_to_end(client_id)
            while len(self._policies) > _POLICY_CACHE_MAX:
                self._policies.popitem(last=False)
        return inline, revoke

    def observe(
        self, client_id: str, client_ip: str | None, resource: str | None, window: int | None, now: int
    ) -> Observe:
        """The `Observe` for one validation (the hot path: cached prefixes, digests and
        policy; built with `tuple.__new__`, which skips the named tuple's Python-level
        constructor: about a fifth of what detection costs a bearer validation)."""
        network, wide = networks_of(client_ip) if client_ip else _NO_NETWORK
        inline, revoke = self._default_bits if self._client_actions is None else self._bits(client_id)
        outside = window is not None and not in_window(window, now)
        digest = resource_digest(resource) if resource else ""
        return _new_observe(Observe, (network, wide, digest, inline, revoke, outside, self.thresholds, []))

    def report(
        self, client_id: str, session_id: str, client_ip: str, observe: Observe, window: int | None, now: int
    ) -> None:
        """Counts and emits what the store found (called only when it found something)."""
        inline, revoke = observe.inline, observe.revoke
        for signal, evidence in observe.found:
            bit = SIGNAL_BITS[signal]
            action = Action.REVOKE_SESSION if revoke & bit else Action.DENY if inline & bit else Action.ALERT
            if signal is Signal.OUTSIDE_USAGE_WINDOW and window is not None:
                evidence = {**evidence, "hour": hour_of(now), "usage_window": window_text(window)}
            if self._on_finding is not None:
                self._on_finding(signal.value, action.value)
            if not self._first_in_cooldown((client_id, session_id, signal.value, action.value)):
                continue
            self.events.emit(
                signal.value,
                signal=signal.value,
                client_id=client_id,
                session_id=session_id,
                source_ip=client_ip,
                action=action.value,
                severity=SEVERITY[signal],
                evidence=evidence,
            )

    def _first_in_cooldown(self, key: tuple[str, str, str, str]) -> bool:
        """Whether an event for `key` is due (none emitted within the cooldown); bounded."""
        now = self._monotonic()
        with self._lock:
            last = self._emitted.get(key)
            if last is not None and now - last < self._cooldown:
                return False
            self._emitted[key] = now
            self._emitted.move_to_end(key)
            while len(self._emitted) > _POLICY_CACHE_MAX:
                self._emitted.popitem(last=False)
        return True


def window_text(window: int) -> str:
    """An hour mask as UTC hour ranges, e.g. "08-18" or "22-24,00-06" (end exclusive)."""
    ranges: list[str] = []
    hour = 0
    while hour < 24:
        if (window >> hour) & 1:
            start = hour
            while hour < 24 and (window >> hour) & 1:
                hour += 1
            ranges.append(f"{start:02d}-{hour:02d}")
        hour += 1
    return ",".join(ranges)


def parse_window(text: str) -> int:
    """An hour mask from UTC hour ranges: "08-18" (08:00 to 18:00), "22-06" (over midnight),
    several separated by commas. `ValueError` for anything else."""
    mask = 0
    for part in text.replace(" ", "").split(","):
        start_text, sep, end_text = part.partition("-")
        if not sep or not start_text.isdigit() or not end_text.isdigit():
            raise ValueError(f"usage window {text!r}: expected UTC hour ranges like 08-18 or 22-06")
        start, end = int(start_text), int(end_text)
        if not (0 <= start <= 23 and 1 <= end <= 24) or start == end:
            raise ValueError(f"usage window {text!r}: hours are 00-23 for a start, 01-24 for an end, start != end")
        hours = range(start, end) if start < end else [*range(start, 24), *range(0, end)]
        for h in hours:
            mask |= 1 << h
    return mask


def learned_window(hours: list[int], *, min_observations: int = 50, share: float = 0.01) -> int | None:
    """A usage window learned from a client's usage hours (24 counters of session-hours): the
    hours holding at least `share` of its activity, each widened by one hour on either
    side; None until there are `min_observations` or when every hour is busy."""
    total = sum(hours)
    if total < min_observations:
        return None
    busy = [h for h in range(24) if hours[h] >= share * total]
    mask = 0
    for h in busy:
        for d in (-1, 0, 1):
            mask |= 1 << ((h + d) % 24)
    return mask if mask != (1 << 24) - 1 and mask else None


__all__ = ["Detection", "action_bits", "learned_window", "parse_actions", "parse_window", "window_text"]
