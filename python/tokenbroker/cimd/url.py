"""What makes an `https://` URL acceptable as a CIMD client id (or a `jwks_uri`).

draft-ietf-oauth-client-id-metadata-document: the URL has the https scheme and a path, no
single- or double-dot path segments, no fragment, no user name or password; a port and a
query are allowed. On top of that, the host is refused in every spelling that URL parsers
and resolvers read differently: hosts outside plain letters, digits and hyphens, a trailing
dot, upper case (two spellings would name one client twice), and IPv4 addresses written as
anything but four decimal numbers (`2130706433`, `127.1`, `0x7f.1` all reach 127.0.0.1
through `getaddrinfo`). The rules are checked on the string as sent, before any lookup."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import unquote

from tokenbroker.cimd.errors import CimdFetchError

MAX_URL_LENGTH = 2048
# RFC 3986 unreserved and reserved characters and '%': anything else (spaces, backslashes,
# non-ASCII, control characters) is refused rather than guessed at.
_URL_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[1-9][0-9]{0,4}")


@dataclass(frozen=True)
class CimdUrl:
    """A checked URL: where to connect and what to ask for."""

    url: str
    host: str  # lower case; an IPv6 literal without its brackets
    port: int
    target: str  # the request target: path, and "?query" when there is one
    host_header: str  # the authority as written in the URL (the HTTP Host header)
    ip_literal: bool  # the host is an IP address (nothing to resolve)


def _refuse(message: str, host: str | None = None) -> CimdFetchError:
    return CimdFetchError("bad_url", message, host=host)


def parse_cimd_url(url: str, *, what: str = "client_id") -> CimdUrl:
    """The parts of `url` when it is an acceptable CIMD URL, else raises `CimdFetchError`
    (`not_https` or `bad_url`). `what` names the URL in messages ("client_id", "jwks_uri")."""
    if not isinstance(url, str) or not url:
        raise _refuse(f"the {what} must be an https:// URL string")
    if len(url) > MAX_URL_LENGTH:
        raise _refuse(f"the {what} URL is longer than {MAX_URL_LENGTH} characters")
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() != "https":
        raise CimdFetchError("not_https", f"the {what} must be an https:// URL (documents are fetched over TLS only)")
    if scheme != "https":
        raise _refuse(f"the {what} URL must spell its scheme in lower case: https://")
    if not _URL_CHARACTERS.fullmatch(url):
        raise _refuse(
            f"the {what} URL holds characters a URL may not (spaces, backslashes, non-ASCII): percent-encode "
            "them, and write internationalized host names in their xn-- form"
        )
    if _PERCENT.search(url):
        raise _refuse(f"the {what} URL has a '%' that is not followed by two hex digits")
    if "#" in rest:
        raise _refuse(f"the {what} URL must not have a fragment ('#...')")
    authority_end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path_and_query = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        raise _refuse(f"the {what} URL must not carry a user name or password ('...@')")
    host, port = _split_authority(authority, what)
    path, _, query = path_and_query.partition("?")
    if not path.startswith("/"):
        raise _refuse(f"the {what} URL must have a path (https://{host}/client.json, not https://{host})", host)
    for segment in path.split("/"):
        if unquote(segment) in (".", ".."):
            raise _refuse(f"the {what} URL must not have '.' or '..' path segments (also percent-encoded)", host)
    target = path + ("?" + query if "?" in path_and_query else "")
    ip_literal = _is_ip(host)
    return CimdUrl(url=url, host=host, port=port, target=target, host_header=authority, ip_literal=ip_literal)


def _split_authority(authority: str, what: str) -> tuple[str, int]:
    """(host, port) from `host[:port]` or `[v6][:port]`, or raises."""
    if authority.startswith("["):
        literal, bracket, after = authority[1:].partition("]")
        if not bracket:
            raise _refuse(f"the {what} URL has an IPv6 address without its closing ']'")
        if "%" in literal:
            raise _refuse(f"the {what} URL has an IPv6 zone id ('%'): scoped addresses are refused")
        try:
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise _refuse(f"the {what} URL has an unusable IPv6 address in brackets") from None
        port_part = after
    else:
        host, _, port_text = authority.partition(":")
        port_part = ":" + port_text if ":" in authority else ""
        _check_host_name(host, what)
    if not port_part:
        return host, 443
    if not port_part.startswith(":") or not _PORT.fullmatch(port_part[1:]) or int(port_part[1:]) > 65535:
        raise _refuse(f"the {what} URL has an unusable port: write a number from 1 to 65535, or none for 443", host)
    return host, int(port_part[1:])


def _check_host_name(host: str, what: str) -> None:
    if not host:
        raise _refuse(f"the {what} URL has no host")
    if host.endswith("."):
        raise _refuse(f"the {what} URL's host must not end with a dot", host.rstrip(".")[:253])
    if host != host.lower():
        raise _refuse(f"the {what} URL's host must be in lower case: {host.lower()[:253]}", host.lower()[:253])
    if _is_ipv4_spelling(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _refuse(f"the {what} URL names an IPv4 address in a non-standard form: write a.b.c.d") from None
        return
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise _refuse(
            f"the {what} URL's host is not a DNS name (letters, digits and hyphens in dot-separated labels)",
            host[:253],
        )
    if labels[-1].isdigit():
        raise _refuse(f"the {what} URL's host ends in a numeric label, which resolvers read as an address")


def _is_ipv4_spelling(host: str) -> bool:
    """True when a resolver would read `host` as an IPv4 address (inet_aton's forms)."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
