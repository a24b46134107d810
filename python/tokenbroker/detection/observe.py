"""`Observe`: what the broker hands the store with a validation so the store can watch it
(see `signals` for what is watched), and the network prefixes it is built from."""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from typing import Any, NamedTuple

from tokenbroker.detection.signals import Signal, Thresholds

# (signal, evidence): what a store found, appended to `Observe.found`.
Finding = tuple[Signal, dict[str, Any]]


class Observe(NamedTuple):
    """One validation to watch. Built positionally on the hot path (see `TokenCheck`).

    `network` and `wide` are the request address's /24 and /16 (IPv6: /48 and /32), ""
    when the address is unknown: then no network signal can fire. `resource` is a digest
    of what the request touches ("": nothing named). `inline` has the bit
    (`SIGNAL_BITS`) of each signal whose action is deny or revoke_session, `revoke` of
    those whose action is revoke_session: the store decides them before it answers.
    `outside_window` is the broker's finding for `outside_usage_window` (the claim is
    in the token, not in the store). The store appends what it found to `found` (the
    broker reports it afterwards, off the hot path)."""

    network: str
    wide: str
    resource: str
    inline: int
    revoke: int
    outside_window: bool
    thresholds: Thresholds
    found: list[Finding]


@functools.lru_cache(maxsize=8192)
def networks_of(client_ip: str) -> tuple[str, str]:
    """(network, wide) of an address: IPv4 /24 and /16 ("203.0.113.0/24", "203.0.0.0/16"),
    IPv6 /48 and /32; an IPv4-mapped IPv6 address is its IPv4 address. ("", "") for
    anything that is not an address (a relayed value is never trusted to be one).
    Cached (bounded): a busy client keeps coming from the same few addresses."""
    try:
        address = ipaddress.ip_address(client_ip.strip("[]").split("%", 1)[0])
    except ValueError:
        return "", ""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    narrow, broad = (24, 16) if address.version == 4 else (48, 32)
    return (
        str(ipaddress.ip_network(f"{address}/{narrow}", strict=False)),
        str(ipaddress.ip_network(f"{address}/{broad}", strict=False)),
    )


# Resources up to this many characters have their digest cached (a session keeps coming
# back to the same few tools and URIs); a longer one is hashed each time, so the cache's
# memory stays bounded (at most _DIGESTS_CACHED entries of this size) whatever is sent.
_DIGEST_CACHED_CHARS = 256
_DIGESTS_CACHED = 8192


def resource_digest(resource: str | None) -> str:
    """A short stable digest of a resource name (16 hex characters): what the stores keep
    per session, so a long URI costs no more than a short one. "" for none."""
    if not resource:
        return ""
    if len(resource) <= _DIGEST_CACHED_CHARS:
        return _cached_digest(resource)
    return _digest(resource)


def _digest(resource: str) -> str:
    return hashlib.blake2b(resource.encode("utf-8", "replace"), digest_size=8).hexdigest()


_cached_digest = functools.lru_cache(maxsize=_DIGESTS_CACHED)(_digest)


def hour_of(now: int) -> int:
    """The UTC hour (0-23) of a Unix time."""
    return (now // 3600) % 24


def in_window(window: int, now: int) -> bool:
    """Whether `now` falls in the usage window `window` (an hour mask: bit h = UTC hour h)."""
    return bool((window >> hour_of(now)) & 1)
