"""`trusted_proxies`: whose word about the client's address counts.

A gateway in front of an MCP server sees the client; tokenbroker sees the gateway. The
address a gateway forwards (`X-Forwarded-For`, `X-Real-IP`, Envoy's source address) is
believed only when the peer that sends it is in `trusted_proxies`; anyone else is judged
by the address it connects from. `X-Forwarded-For` is read from the right, as nginx's
`real_ip_recursive` does: the first hop that is not itself a trusted proxy is the client
(the hops to its left were written by the client and prove nothing)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

# Hops of X-Forwarded-For read at most (a longer chain: the rest is the client's own text).
MAX_HOPS = 32

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(value: str) -> _Address | None:
    """The address in "1.2.3.4", "::1", gRPC's "ipv4:1.2.3.4:5678" / "ipv6:[::1]:5678" or
    "host:port" forms; IPv4-mapped IPv6 becomes IPv4. None when it is none of them. The one
    parser of addresses: issuance (`client_auth`) reads its callers' with it too."""
    text = value.strip()
    for prefix in ("ipv4:", "ipv6:"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    text = text.split("%", 1)[0]  # zone index
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def check_proxies(values: Iterable[str]) -> list[str]:
    """The networks in canonical form ("10.0.0.0/8", "127.0.0.1/32"); raises ValueError
    naming the first that is not an address or CIDR."""
    networks = []
    for value in values:
        try:
            networks.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"trusted_proxies: {value!r} is not an address or CIDR (like 10.0.0.0/8, ::1)") from None
    return networks


class TrustedProxies:
    """The `trusted_proxies` setting, parsed once."""

    def __init__(self, networks: Iterable[str] = ()):
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in check_proxies(networks))

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: str | None) -> bool:
        parsed = parse_ip(address) if address else None
        return parsed is not None and self._trusted(parsed)

    def _trusted(self, address: _Address) -> bool:
        return any(address.version == network.version and address in network for network in self._networks)

    def client_address(self, peer: str, forwarded_for: Sequence[str] = (), real_ip: Sequence[str] = ()) -> str:
        """The client's address: `peer` unless it is a trusted proxy; then the rightmost
        hop of `X-Forwarded-For` (all its header lines, in order) that is not a trusted
        proxy, else one `X-Real-IP`, else `peer`. A hop that is not an address ends the
        walk at the last trusted hop (nothing to its left can be believed)."""
        if not self.trusts(peer):
            return peer
        hops = [hop for line in forwarded_for for hop in line.split(",")][-MAX_HOPS:]
        believed = peer
        for hop in reversed(hops):
            address = parse_ip(hop)
            if address is None:
                return believed
            believed = str(address)
            if not self._trusted(address):
                return believed
        if hops:
            return believed  # every hop a trusted proxy: the leftmost is the nearest to the client
        if len(real_ip) == 1:
            address = parse_ip(real_ip[0])
            if address is not None:
                return str(address)
        return peer


__all__ = ["MAX_HOPS", "TrustedProxies", "check_proxies", "parse_ip"]
