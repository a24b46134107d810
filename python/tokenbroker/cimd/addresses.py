"""Which addresses a document fetch may connect to: public unicast ones only.

Anyone can make the broker fetch a URL (a token request with an `https://` client id is
enough), so the fetch is a request the attacker aims. Refused: loopback (unless
`cimd_allow_loopback`, for tests and local development), private (RFC 1918, fc00::/7),
link-local (169.254/16, fe80::/10), shared CGNAT space (100.64/10), the cloud metadata
services (169.254.169.254, fd00:ec2::254, 100.100.100.200, Azure's 168.63.129.16, ...),
unspecified, multicast, reserved and documentation ranges, and anything else
`ipaddress` does not call global. An IPv6 address that carries an IPv4 address (mapped
`::ffff:a.b.c.d`, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo) is judged by the IPv4
address it reaches too."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean instance metadata
        "169.254.170.2",  # AWS ECS task metadata and credentials
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure WireServer (a public address, reachable from every Azure VM)
        "192.0.0.192",  # Oracle Cloud (classic)
    )
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches through a translation mechanism, if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # (server, client): the client is where packets go
    if any(address in network for network in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _refusal_of(address: IPAddress, allow_loopback: bool) -> str | None:
    if address in _METADATA:
        return "a cloud metadata service address"
    if address.is_loopback:
        return None if allow_loopback else "a loopback address (cimd_allow_loopback allows it, for tests only)"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_link_local:
        return "a link-local address"
    if address in _CGNAT:
        return "a shared (CGNAT) address"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "an address that is not public"
    return None


def address_refusal(address: str, *, allow_loopback: bool = False) -> str | None:
    """None when a fetch may connect to `address`, else what kind of address it is (for
    the error message; the address itself is left out of messages on purpose)."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return "not an IP address"
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.scope_id is not None:
            return "a scoped (link-local) address"
        embedded = _embedded_ipv4(parsed)
        if embedded is not None:
            if parsed.ipv4_mapped is not None:
                # ::ffff:a.b.c.d is the IPv4 address itself, seen through an IPv6 socket.
                return _refusal_of(embedded, allow_loopback)
            return _refusal_of(embedded, False) or _refusal_of(parsed, False)
    return _refusal_of(parsed, allow_loopback)


def rate_key(address: str) -> str:
    """The key an address is rate limited under: itself for IPv4, its /64 for IPv6 (one
    site gets a /64, so counting single IPv6 addresses would count nothing)."""
    parsed = ipaddress.ip_address(address)
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(parsed) >> 64 << 64, 64)))
    return str(parsed)
