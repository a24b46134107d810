"""The memory store's detection state, and the decision for one observed validation.

`MemoryStore.check_token` calls `observe` under its lock once every check of a validation
passed (see `signals` for what each signal watches): the findings are computed from the
state as it was, and the state is updated only when the request is allowed, so a denied
request leaves no trace (its network stays unknown, its resource uncounted, and it is
denied again). Per client a `ClientWatch` (known networks, first observation, breadth
histogram, usage hours), per session a `SessionWatch` (origin, distinct resources, burst
count) held by the session's record, so it goes when the session goes.

The common request (same session, same network as its last allowed request, a resource
it already touched, past the burst window, in the same hour) is a handful of attribute
and dict reads and one attribute write: `observe` tests that case first.

Semantics shared with the Redis store (`check_token.lua`), exactly:
- findings are appended in `Signal` order: new_network, concurrent_origins,
  resource_breadth, outside_usage_window, burst_after_auth;
- a network is forgotten when `now - last_seen > network_history_days * 86400`; a known
  network's last seen is refreshed when `now - last_seen >= 3600`; over
  `network_history_max` the network with the lowest (last seen, name) goes;
- learning: no `first_observed` yet, or `now < first_observed + learning_seconds`;
- concurrent: `now - origin_at < concurrent_window_seconds` and the /16 (/32) differ;
  `origin_at` is the time of the session's last allowed request that had a network;
- burst: requests with `now < opened_at + burst_window_seconds` are counted;
- p95: the smallest k with `100 * cumulative(k) >= 95 * total` (integers);
- usage hours: the hour is `now // 3600`; `hours[that % 24] += 1` when it differs from
  the session's last observed hour (the first observation counts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from tokenbroker.detection.observe import Finding, Observe, hour_of
from tokenbroker.detection.signals import BREADTH_BUCKETS, BREADTH_HISTORY_MAX, SIGNAL_BITS, Action, Signal

HOUR: Final = 3600
_DAY: Final = 86400
_NEVER: Final = -(1 << 62)  # a last-seen no `now` is within an hour of


def _buckets() -> list[int]:
    return [0] * (BREADTH_BUCKETS + 1)


def _hours() -> list[int]:
    return [0] * 24


@dataclass(slots=True, eq=False)
class ClientWatch:
    """What one client usually does: where from, how broadly, at which hours."""

    networks: dict[str, int] = field(default_factory=dict)  # network -> last seen (at most network_history_max)
    first_observed: int | None = None  # the first allowed observation with a network: learning starts
    # buckets[k]: sessions that touched k distinct resources (k = 1..BREADTH_BUCKETS, the
    # last "that many or more"; index 0 unused); total = sum(buckets).
    buckets: list[int] = field(default_factory=_buckets)
    total: int = 0
    hours: list[int] = field(default_factory=_hours)  # hours[h]: sessions observed in UTC hour h


@dataclass(slots=True, eq=False)
class SessionWatch:
    """What one session did so far. `client` is its client's watch, held here so the common
    request needs no lookup in the clients' table."""

    client: ClientWatch
    origin: str = ""  # the network of the last allowed request that had one ("": none yet)
    origin_wide: str = ""  # its /16 (IPv6 /32): adjacency
    origin_at: int = 0
    # Distinct resource digests, at most session_resources_max: once full, a new resource
    # is neither added nor counted (breadth stops growing: the bound wins over the signal;
    # under deny a session never gets there past the threshold, every new one is refused).
    resources: set[str] = field(default_factory=set)
    burst: int = 0  # allowed requests within the burst window of the session's opening
    hour: int = -1  # now // 3600 of the last allowed observation (-1: never observed)


class ClientWatches:
    """The clients' watches, at most `max_clients`, least recently used dropped first.

    Clients are observed only through valid tokens, so they are registered clients; but a
    registry with metadata-document clients grows with whoever presents a document, and a
    watch costs about 1-2 KiB (up to ~10 KiB with a full network history): the bound keeps
    memory fixed whatever the registry does. A dropped client starts learning again.
    "Used" is touched when a session is first observed and when its hour changes (not on
    every request: the common request never touches this table)."""

    def __init__(self, max_clients: int) -> None:
        if max_clients < 1:
            raise ValueError("max_clients must be positive")
        self._max = max_clients
        self._clients: dict[str, ClientWatch] = {}  # insertion order = least recently used first

    def __len__(self) -> int:
        return len(self._clients)

    def attach(self, client_id: str, watch: SessionWatch | None) -> SessionWatch:
        """The session's watch (a new one for `None`), bound to the client's current watch,
        the client marked most recently used. A session whose client was dropped meanwhile
        brings its old watch back (or joins the newer one)."""
        clients = self._clients
        client = clients.pop(client_id, None)
        if client is None:
            client = watch.client if watch is not None else ClientWatch()
        clients[client_id] = client
        if len(clients) > self._max:
            del clients[next(iter(clients))]
        if watch is None:
            return SessionWatch(client)
        watch.client = client
        return watch

    def usage_hours(self, client_id: str) -> list[int]:
        """The client's 24 usage-hour counters (zeros for a client not watched)."""
        client = self._clients.get(client_id)
        return list(client.hours) if client is not None else _hours()


def observe(client: ClientWatch, session: SessionWatch, request: Observe, now: int, opened_at: int) -> Action | None:
    """Watches one validation of `session` (opened at `opened_at`): appends its findings to
    `request.found` and returns the strongest action (None: nothing found). The state is
    updated only when that is None or alert; deny and revoke_session leave it as it was."""
    network, resource, th = request.network, request.resource, request.thresholds
    burst_open = now < opened_at + th.burst_window_seconds
    if (
        network == session.origin
        and not burst_open
        and not request.outside_window
        and now // HOUR == session.hour
        and (not resource or resource in session.resources)
        and (not network or now - client.networks.get(network, _NEVER) < HOUR)
    ):
        session.origin_at = now  # the origin is seen again (with no network: no origin, harmless)
        return None
    return _observe_slowly(client, session, request, now, opened_at, burst_open)


def _observe_slowly(
    client: ClientWatch, session: SessionWatch, request: Observe, now: int, opened_at: int, burst_open: bool
) -> Action | None:
    network, resource, th = request.network, request.resource, request.thresholds
    nets, history = client.networks, th.network_history_days * _DAY
    found: list[Finding] = []
    seen = nets.get(network) if network else None
    known = seen is not None and now - seen <= history
    first = client.first_observed
    if network:
        if not known and first is not None and now >= first + th.learning_seconds:
            count = sum(1 for last in nets.values() if now - last <= history)
            found.append((Signal.NEW_NETWORK, {"network": network, "known_networks": count}))
        origin = session.origin
        apart = now - session.origin_at
        if origin and request.wide != session.origin_wide and apart < th.concurrent_window_seconds:
            found.append(
                (Signal.CONCURRENT_ORIGINS, {"network": network, "other_network": origin, "seconds_apart": apart})
            )
    resources = session.resources
    distinct = len(resources) + 1  # the session's count if this request adds its resource
    adds = bool(resource) and resource not in resources and distinct <= th.session_resources_max
    if adds and distinct >= th.breadth_min_resources and client.total >= th.breadth_min_sessions:
        p95 = breadth_p95(client.buckets, client.total)
        if distinct > p95 and p95 < BREADTH_BUCKETS:
            found.append(
                (Signal.RESOURCE_BREADTH, {"distinct_resources": distinct, "p95": p95, "sessions": client.total})
            )
    if request.outside_window:
        found.append((Signal.OUTSIDE_USAGE_WINDOW, {"hour": hour_of(now)}))
    requests = session.burst + 1
    if burst_open and requests > th.burst_requests:
        found.append((Signal.BURST_AFTER_AUTH, {"requests": requests, "seconds_since_open": now - opened_at}))
    action = None
    if found:
        request.found.extend(found)
        action = strongest(found, request.inline, request.revoke)
        if action is not Action.ALERT:
            return action  # refused: nothing of it is remembered
    if network:
        if not known:
            _learn(nets, network, now, history, th.network_history_max)
        elif seen is not None and now - seen >= HOUR:  # at most once an hour:
            nets[network] = now  # a busy client does not rewrite its last seen every request
        if first is None:
            client.first_observed = now
        session.origin, session.origin_wide, session.origin_at = network, request.wide, now
    if adds:
        resources.add(resource)
        _grow(client, distinct)
    if burst_open:
        session.burst = requests
    hour = now // HOUR
    if hour != session.hour:
        session.hour = hour
        client.hours[hour % 24] += 1
    return action


def strongest(found: list[Finding], inline: int, revoke: int) -> Action:
    """The strongest action of the findings: a bit in `revoke` is revoke_session, in
    `inline` deny, else alert."""
    deny = False
    for signal, _ in found:
        bit = SIGNAL_BITS[signal]
        if revoke & bit:
            return Action.REVOKE_SESSION
        deny = deny or bool(inline & bit)
    return Action.DENY if deny else Action.ALERT


def breadth_p95(buckets: list[int], total: int) -> int:
    """The smallest k whose cumulative count reaches 95% of `total` (in integers, so both
    stores agree). `total` is the buckets' sum, so the last bucket always reaches it."""
    need, cumulative = 95 * total, 0
    for k in range(1, BREADTH_BUCKETS + 1):
        cumulative += buckets[k]
        if 100 * cumulative >= need:
            return k
    return BREADTH_BUCKETS


def _grow(client: ClientWatch, distinct: int) -> None:
    """A session now touches `distinct` resources: it moves from bucket distinct-1 to
    distinct (enters bucket 1 at its first). A session already in the last bucket stays.
    After halving, bucket distinct-1 may have lost it: then it is counted anew."""
    if distinct > BREADTH_BUCKETS:
        return
    buckets = client.buckets
    if distinct > 1 and buckets[distinct - 1] > 0:
        buckets[distinct - 1] -= 1
    else:
        client.total += 1
    buckets[distinct] += 1
    if client.total > BREADTH_HISTORY_MAX:  # old behaviour fades: halve every bucket
        client.buckets = buckets = [b // 2 for b in buckets]
        client.total = sum(buckets)


def _learn(nets: dict[str, int], network: str, now: int, history: int, most: int) -> None:
    """Adds (or revives) `network`, forgetting networks past the history, then the least
    recently seen over the bound (ties: the smallest name, as a Redis sorted set ranks)."""
    for name in [name for name, last in nets.items() if now - last > history]:
        del nets[name]
    nets[network] = now
    while len(nets) > most:
        del nets[min(nets.items(), key=_seen_then_name)[0]]


def _seen_then_name(item: tuple[str, int]) -> tuple[int, str]:
    return item[1], item[0]
