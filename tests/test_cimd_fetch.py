"""The CIMD fetcher's SSRF guards, bounds, cache and rate limits (tokenbroker.cimd.fetch).

No test can send a packet off the machine: every fetch of a name goes through an injected
resolver, and every connection either goes through an injected connector (which fails
the test when asked for an address nobody routed, and otherwise connects to the local
test server on 127.0.0.1) or is to a 127.0.0.1 literal with `allow_loopback`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tokenbroker.cimd import CimdFetcher, CimdFetchError, parse_cimd_url
from tokenbroker.cimd.fetch import tcp_connector
from tokenbroker.errors import InvalidArgumentError

from support.https_servers import HttpsServer, Reply, TestCa, make_test_ca

PUBLIC = "93.184.216.34"  # a public address: only ever handed to the injected connector
PUBLIC6 = "2606:2800:220:1:248:1893:25c8:1946"
URL = "https://cimd.test/client.json"
START = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Resolver:
    """Answers chosen addresses for chosen names and records every lookup."""

    def __init__(self, answers: Mapping[str, Sequence[str]]) -> None:
        self.answers = dict(answers)
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]


class Connector:
    """Records every connection attempt; connects only addresses routed to a local port,
    and fails the test for any other (AssertionError is not an OSError, so the fetcher
    does not swallow it)."""

    def __init__(self, routes: dict[str, int] | None = None, *, refuse: bool = False) -> None:
        self.routes = dict(routes or {})
        self.refuse = refuse
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.calls.append((address, port))
        if self.refuse:
            raise ConnectionRefusedError(111, "Connection refused")
        if address not in self.routes:
            raise AssertionError(f"the fetcher tried to connect to {address}:{port}")
        return await asyncio.open_connection("127.0.0.1", self.routes[address])


async def loopback_only(address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert address in ("127.0.0.1", "::1"), f"the fetcher tried to connect to {address}:{port}"
    return await tcp_connector("127.0.0.1", port)


def document(url: str, **members: Any) -> dict[str, Any]:
    return {"client_id": url, "client_name": "test agent", "token_endpoint_auth_method": "private_key_jwt", **members}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return make_test_ca(tmp_path_factory.mktemp("cimd-ca"))


@pytest.fixture
def origin(ca: TestCa) -> Iterator[HttpsServer]:
    cert, key = ca.issue(dns_names=("localhost", "cimd.test", "alias.test"), ips=("127.0.0.1",))
    with HttpsServer(cert, key) as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock()


def loopback_fetcher(ca: TestCa, clock: Clock, **options: Any) -> CimdFetcher:
    options.setdefault("resolver", Resolver({"localhost": ["127.0.0.1"]}))
    options.setdefault("connector", loopback_only)
    return CimdFetcher(ca_file=ca.ca_file, allow_loopback=True, clock=clock, **options)


def routed_fetcher(
    ca: TestCa, clock: Clock, origin: HttpsServer, answers: Mapping[str, Sequence[str]], **options: Any
) -> tuple[CimdFetcher, Resolver, Connector]:
    """A fetcher whose resolver answers `answers` and whose connector sends the public
    addresses among them to the local origin."""
    resolver = Resolver(answers)
    routes = {a: origin.port for addresses in answers.values() for a in addresses if a in (PUBLIC, PUBLIC6)}
    connector = Connector(routes)
    fetcher = CimdFetcher(ca_file=ca.ca_file, resolver=resolver, connector=connector, clock=clock, **options)
    return fetcher, resolver, connector


async def refused(fetcher: CimdFetcher, url: str) -> CimdFetchError:
    with pytest.raises(CimdFetchError) as caught:
        await fetcher.fetch(url)
    return caught.value


# --- the address guard: nothing is connected for a refused address ------------------------

BLOCKED = [
    ["10.0.0.1"],
    ["192.168.1.1"],
    ["172.16.0.1"],
    ["169.254.169.254"],
    ["169.254.170.2"],
    ["100.64.0.1"],
    ["100.100.100.200"],
    ["168.63.129.16"],
    ["127.0.0.1"],
    ["127.8.9.1"],
    ["::1"],
    ["fe80::1"],
    ["fe80::1%eth0"],
    ["fd00:ec2::254"],
    ["fc00::1"],
    ["::ffff:10.0.0.1"],
    ["::ffff:127.0.0.1"],
    ["::ffff:169.254.169.254"],
    ["64:ff9b::a00:1"],  # NAT64 of 10.0.0.1
    ["2002:a00:1::1"],  # 6to4 of 10.0.0.1
    ["2001:0:4136:e378:8000:63bf:f5ff:fffe"],  # Teredo, client 10.0.0.1
    ["0.0.0.0"],  # noqa: S104 (an address the resolver answers, nothing binds to it)
    ["::"],
    ["224.0.0.251"],
    ["ff02::1"],
    ["240.0.0.1"],
    ["255.255.255.255"],
    ["192.0.2.1"],
    ["198.18.0.1"],
    [PUBLIC, "10.0.0.1"],
    ["10.0.0.1", PUBLIC],
    [PUBLIC6, "fd00::1"],
    ["not-an-address"],
]


@pytest.mark.parametrize("addresses", BLOCKED, ids=lambda a: "+".join(a))
async def test_refuses_a_host_that_resolves_to_any_refused_address(ca, clock, addresses) -> None:
    resolver, connector = Resolver({"cimd.test": addresses}), Connector()
    fetcher = CimdFetcher(ca_file=ca.ca_file, resolver=resolver, connector=connector, clock=clock)
    error = await refused(fetcher, URL)
    assert error.reason == "blocked_address"
    assert connector.calls == []
    assert resolver.calls == [("cimd.test", 443)]
    for address in addresses:  # the message names the rule, never the network's addresses
        assert address not in str(error)


NOT_LOOPBACK = [["10.0.0.1"], ["169.254.169.254"], ["fd00:ec2::254"], ["127.0.0.1", "10.0.0.1"], ["::ffff:10.0.0.1"]]


@pytest.mark.parametrize("addresses", NOT_LOOPBACK, ids=lambda a: "+".join(a))
async def test_allow_loopback_allows_loopback_only(ca, clock, addresses) -> None:
    resolver, connector = Resolver({"cimd.test": addresses}), Connector()
    fetcher = CimdFetcher(ca_file=ca.ca_file, allow_loopback=True, resolver=resolver, connector=connector, clock=clock)
    assert (await refused(fetcher, URL)).reason == "blocked_address"
    assert connector.calls == []


@pytest.mark.parametrize(
    "url",
    [
        "https://10.0.0.1/client.json",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/client.json",
        "https://[0:0:0:0:0:0:0:1]/client.json",
        "https://[::ffff:10.0.0.1]/client.json",
        "https://[fd00:ec2::254]/latest/meta-data/",
        "https://0.0.0.0/client.json",
    ],
)
async def test_refuses_an_address_literal_without_resolving_it(ca, clock, url) -> None:
    resolver, connector = Resolver({}), Connector()
    fetcher = CimdFetcher(ca_file=ca.ca_file, resolver=resolver, connector=connector, clock=clock)
    assert (await refused(fetcher, url)).reason == "blocked_address"
    assert resolver.calls == []
    assert connector.calls == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://cimd.test/client.json", "not_https"),
        ("ftp://cimd.test/client.json", "not_https"),
        ("cimd.test/client.json", "not_https"),
        ("HTTPS://cimd.test/client.json", "bad_url"),
        ("https://user:hunter2@cimd.test/client.json", "bad_url"),
        ("https://user@cimd.test/client.json", "bad_url"),
        ("https://cimd.test/client.json#me", "bad_url"),
        ("https://cimd.test", "bad_url"),
        ("https://cimd.test?id=1", "bad_url"),
        ("https://cimd.test/a/../client.json", "bad_url"),
        ("https://cimd.test/./client.json", "bad_url"),
        ("https://cimd.test/a/%2e%2E/client.json", "bad_url"),
        ("https://cimd.test/a\\client.json", "bad_url"),
        ("https://cimd.test/a client.json", "bad_url"),
        ("https://cimd.test/%zz", "bad_url"),
        ("https://cimd.test:0/client.json", "bad_url"),
        ("https://cimd.test:65536/client.json", "bad_url"),
        ("https://cimd.test:/client.json", "bad_url"),
        ("https://cimd.test:0443/client.json", "bad_url"),
        ("https://cimd.test:https/client.json", "bad_url"),
        ("https://CIMD.test/client.json", "bad_url"),
        ("https://cimd.test./client.json", "bad_url"),
        ("https://-cimd.test/client.json", "bad_url"),
        ("https://cimd.123/client.json", "bad_url"),
        ("https://2130706433/client.json", "bad_url"),
        ("https://127.1/client.json", "bad_url"),
        ("https://0x7f000001/client.json", "bad_url"),
        ("https://0177.0.0.1/client.json", "bad_url"),
        ("https://b\u00fccher.test/client.json", "bad_url"),
        ("https:///client.json", "bad_url"),
        ("https://[::1/client.json", "bad_url"),
        ("https://[fe80::1%25eth0]/client.json", "bad_url"),
        ("https://" + "a" * 2050 + ".test/client.json", "bad_url"),
        ("", "bad_url"),
    ],
)
async def test_refuses_unusable_urls_before_any_lookup(ca, clock, url, reason) -> None:
    resolver, connector = Resolver({}), Connector()
    fetcher = CimdFetcher(ca_file=ca.ca_file, resolver=resolver, connector=connector, clock=clock)
    error = await refused(fetcher, url)
    assert error.reason == reason
    assert resolver.calls == []
    assert connector.calls == []
    assert "hunter2" not in str(error)


def test_accepted_url_forms() -> None:
    parsed = parse_cimd_url("https://cimd.test:8443/a/b.json?v=1")
    assert (parsed.host, parsed.port, parsed.target, parsed.host_header) == (
        "cimd.test",
        8443,
        "/a/b.json?v=1",
        "cimd.test:8443",
    )
    assert not parsed.ip_literal
    v6 = parse_cimd_url("https://[2606:2800:220:1::1]/client.json")
    assert (v6.host, v6.port, v6.ip_literal, v6.host_header) == (
        "2606:2800:220:1::1",
        443,
        True,
        "[2606:2800:220:1::1]",
    )
    assert parse_cimd_url("https://cimd.test:443/c@x.json").port == 443


# --- loopback, the pinned connection, TLS ------------------------------------------------


async def test_loopback_is_refused_without_the_allowance(ca, clock, origin) -> None:
    origin.replies["/client.json"] = Reply.json(document(origin.url("/client.json")))
    fetcher = CimdFetcher(ca_file=ca.ca_file, clock=clock, connector=loopback_only)
    assert (await refused(fetcher, origin.url("/client.json"))).reason == "blocked_address"
    by_name = CimdFetcher(
        ca_file=ca.ca_file, clock=clock, resolver=Resolver({"localhost": ["127.0.0.1", "::1"]}), connector=loopback_only
    )
    assert (await refused(by_name, origin.url("/client.json", host="localhost"))).reason == "blocked_address"
    assert origin.requests == []


async def test_loopback_is_fetched_with_the_allowance(ca, clock, origin) -> None:
    url = origin.url("/client.json")
    origin.replies["/client.json"] = Reply.json(document(url))
    fetcher = CimdFetcher(ca_file=ca.ca_file, allow_loopback=True, clock=clock)  # the real connector
    fetched = await fetcher.fetch(url)
    assert fetched.document == document(url)
    assert fetched.fingerprint == hashlib.sha256(json.dumps(document(url)).encode()).hexdigest()
    assert fetched.body == json.dumps(document(url)).encode()
    assert (fetched.fetched_at, fetched.from_cache, fetched.stale) == (START, False, False)
    seen = origin.requests[-1]
    assert (seen.method, seen.target, seen.host) == ("GET", "/client.json", f"127.0.0.1:{origin.port}")
    assert seen.headers["accept-encoding"] == "identity"


async def test_loopback_by_name_verifies_the_certificate_for_the_name(ca, clock, origin) -> None:
    url = origin.url("/client.json", host="localhost")
    origin.replies["/client.json"] = Reply.json(document(url))
    fetched = await loopback_fetcher(ca, clock).fetch(url)
    assert fetched.document["client_id"] == url
    assert origin.sni_names[-1] == "localhost"


async def test_connects_to_the_checked_address_and_verifies_the_name(ca, clock, origin) -> None:
    origin.replies["/client.json"] = Reply.json(document(URL))
    fetcher, resolver, connector = routed_fetcher(ca, clock, origin, {"cimd.test": [PUBLIC]})
    fetched = await fetcher.fetch(URL)
    assert fetched.document == document(URL)
    assert resolver.calls == [("cimd.test", 443)]  # resolved once
    assert connector.calls == [(PUBLIC, 443)]  # connected to the address that was checked
    assert origin.sni_names[-1] == "cimd.test"  # TLS for the name, not the address
    assert origin.requests[-1].host == "cimd.test"


async def test_a_changed_dns_answer_is_never_used_for_the_connection(ca, clock, origin) -> None:
    """DNS rebinding: the name resolves once per fetch, and the connection goes where
    that one answer (checked) said; a later answer pointing inside is refused before any
    connection, and the approved client keeps its last good document meanwhile."""
    origin.replies["/client.json"] = Reply.json(document(URL), cache_control="max-age=60")
    fetcher, resolver, connector = routed_fetcher(ca, clock, origin, {"cimd.test": [PUBLIC]})
    await fetcher.fetch(URL, approved=True)
    resolver.answers["cimd.test"] = ["10.0.0.1"]
    clock.advance(61)
    again = await fetcher.fetch(URL, approved=True)
    assert (again.stale, again.failure) == (True, "blocked_address")
    assert connector.calls == [(PUBLIC, 443)]
    assert resolver.calls == [("cimd.test", 443), ("cimd.test", 443)]


async def test_public_ipv6_address_is_fetched(ca, clock, origin) -> None:
    origin.replies["/client.json"] = Reply.json(document(URL))
    fetcher, _, connector = routed_fetcher(ca, clock, origin, {"cimd.test": [PUBLIC6]})
    assert (await fetcher.fetch(URL)).document == document(URL)
    assert connector.calls == [(PUBLIC6, 443)]


async def test_a_certificate_for_another_name_is_refused(ca, clock, origin) -> None:
    origin.replies["/client.json"] = Reply.json(document("https://other.test/client.json"))
    fetcher, _, connector = routed_fetcher(ca, clock, origin, {"other.test": [PUBLIC]})
    error = await refused(fetcher, "https://other.test/client.json")
    assert error.reason == "tls"
    assert connector.calls == [(PUBLIC, 443)]
    assert origin.requests == []  # nothing was asked over the unverified connection


async def test_a_certificate_from_an_unknown_ca_is_refused(ca, clock, origin) -> None:
    url = origin.url("/client.json")
    origin.replies["/client.json"] = Reply.json(document(url))
    fetcher = CimdFetcher(allow_loopback=True, clock=clock, connector=loopback_only)  # system CAs only
    error = await refused(fetcher, url)
    assert error.reason == "tls"
    assert "certificate" in str(error)
    assert origin.requests == []


async def test_another_ca_is_not_trusted_for_the_test_ca(ca, clock, tmp_path: Path) -> None:
    stranger = make_test_ca(tmp_path / "stranger", "stranger CA")
    cert, key = stranger.issue()
    with HttpsServer(cert, key) as server:
        url = server.url("/client.json")
        server.replies["/client.json"] = Reply.json(document(url))
        assert (await refused(loopback_fetcher(ca, clock), url)).reason == "tls"
        assert (await loopback_fetcher(stranger, clock).fetch(url)).document == document(url)


# --- what the answer may be -----------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_refused_and_not_followed(ca, clock, origin, status) -> None:
    url = origin.url("/client.json")
    origin.replies["/client.json"] = Reply(status=status, headers=(("Location", origin.url("/elsewhere.json")),))
    origin.replies["/elsewhere.json"] = Reply.json(document(url))
    error = await refused(loopback_fetcher(ca, clock), url)
    assert error.reason == "redirect"
    assert origin.count("/elsewhere.json") == 0


def _body_of(size: int) -> bytes:
    prefix, suffix = b'{"client_id":"', b'"}'
    return prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_oversized_document_is_refused(ca, clock, origin, chunked) -> None:
    origin.replies["/big.json"] = Reply(body=_body_of(5 * 1024 + 1), chunked=chunked)
    origin.replies["/fits.json"] = Reply(body=_body_of(5 * 1024), chunked=chunked)
    fetcher = loopback_fetcher(ca, clock)
    assert (await refused(fetcher, origin.url("/big.json"))).reason == "too_large"
    assert len((await fetcher.fetch(origin.url("/fits.json"))).body) == 5 * 1024


async def test_a_slow_origin_is_refused_at_the_timeout(ca, clock, origin) -> None:
    origin.replies["/slow.json"] = Reply.json(document("x"), delay=3.0)
    origin.replies["/trickle.json"] = Reply.json(document("x"), trickle=0.05)  # ~5 s for the body
    fetcher = loopback_fetcher(ca, clock, timeout=0.5)
    for target in ("/slow.json", "/trickle.json"):
        started = time.monotonic()
        error = await refused(fetcher, origin.url(target))
        assert error.reason == "timeout"
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("status", [204, 404, 500, 503])
async def test_an_answer_other_than_200_is_refused(ca, clock, origin, status) -> None:
    origin.replies["/client.json"] = Reply(status=status, body=b"{}")
    error = await refused(loopback_fetcher(ca, clock), origin.url("/client.json"))
    assert error.reason == "bad_status"
    assert str(status) in str(error)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply(body=b"{}", headers=(("Content-Type", "text/html"),)), "not_json"),
        (Reply(body=b"{}", headers=()), "not_json"),
        (Reply(body=b"{}", headers=(("Content-Type", "application/json; charset=latin-1"),)), "not_json"),
        (Reply(body=b"{}", headers=(("Content-Type", "application/json"), ("Content-Type", "text/plain"))), "not_json"),
        (Reply(body=b"not json"), "not_json"),
        (Reply(body=b"[1, 2]"), "not_json"),
        (Reply(body=b'{"client_id": "a", "client_id": "b"}'), "not_json"),
        (Reply(body=b'{"n": NaN}'), "not_json"),
        (Reply(body=b"\xef\xbb\xbf{}"), "not_json"),
        (Reply(body=b'{"a": "\xff"}'), "not_json"),
        (
            Reply(body=b"{}", headers=(("Content-Type", "application/json"), ("Content-Encoding", "gzip"))),
            "bad_response",
        ),
        (Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n{}"), "bad_response"),
        (Reply(raw=b"hello there\r\n\r\n"), "bad_response"),
        (
            Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{}"),
            "bad_response",
        ),
    ],
    ids=[
        "text-html",
        "no-content-type",
        "latin-1",
        "two-content-types",
        "not-json",
        "array",
        "duplicate-member",
        "nan",
        "bom",
        "not-utf8",
        "gzip",
        "bad-content-length",
        "not-http",
        "cut-short",
    ],
)
async def test_an_answer_that_is_not_a_json_document_is_refused(ca, clock, origin, reply, reason) -> None:
    origin.replies["/client.json"] = reply
    assert (await refused(loopback_fetcher(ca, clock), origin.url("/client.json"))).reason == reason


async def test_vendor_json_media_types_are_accepted(ca, clock, origin) -> None:
    origin.replies["/jwks.json"] = Reply.json({"keys": []}, content_type="application/jwk-set+json; charset=UTF-8")
    assert (await loopback_fetcher(ca, clock).fetch(origin.url("/jwks.json"))).document == {"keys": []}


# --- the cache and the last good document ------------------------------------------------


async def test_the_cache_honours_max_age(ca, clock, origin) -> None:
    url = origin.url("/client.json")
    origin.replies["/client.json"] = Reply.json(document(url), cache_control="public, max-age=60")
    fetcher = loopback_fetcher(ca, clock)
    first = await fetcher.fetch(url)
    assert first.fresh_until == START + 60
    clock.advance(59)
    cached = await fetcher.fetch(url)
    assert (cached.from_cache, origin.count("/client.json")) == (True, 1)
    assert cached.document == first.document
    assert cached.document is not first.document
    clock.advance(2)
    assert (await fetcher.fetch(url)).from_cache is False
    assert origin.count("/client.json") == 2


async def test_the_cache_keeps_a_document_at_most_24_hours(ca, clock, origin) -> None:
    url = origin.url("/client.json")
    origin.replies["/client.json"] = Reply.json(document(url), cache_control="max-age=999999999999999999999")
    fetcher = loopback_fetcher(ca, clock)
    assert (await fetcher.fetch(url)).fresh_until == START + 24 * 3600
    clock.advance(24 * 3600 - 1)
    assert (await fetcher.fetch(url)).from_cache is True
    clock.advance(2)
    assert (await fetcher.fetch(url)).from_cache is False
    assert origin.count("/client.json") == 2


async def test_age_shortens_the_lifetime(ca, clock, origin) -> None:
    origin.replies["/client.json"] = Reply.json({}, cache_control="max-age=60", headers=(("Age", "50"),))
    assert (await loopback_fetcher(ca, clock).fetch(origin.url("/client.json"))).fresh_until == START + 10


@pytest.mark.parametrize(
    "cache_control", [None, "no-store", "no-cache", "max-age=60, no-cache", "max-age=60, max-age=70", "max-age=soon"]
)
async def test_documents_without_a_usable_max_age_are_not_reused(ca, clock, origin, cache_control) -> None:
    origin.replies["/client.json"] = Reply.json({}, cache_control=cache_control)
    fetcher = loopback_fetcher(ca, clock)
    await fetcher.fetch(origin.url("/client.json"))
    assert (await fetcher.fetch(origin.url("/client.json"))).from_cache is False
    assert origin.count("/client.json") == 2


@pytest.mark.parametrize("cache_control", ["max-age=60", "no-store"])
async def test_the_last_good_document_answers_while_the_origin_fails(ca, clock, origin, cache_control) -> None:
    url = origin.url("/client.json")
    origin.replies["/client.json"] = Reply.json(document(url), cache_control=cache_control)
    fetcher = loopback_fetcher(ca, clock)
    good = await fetcher.fetch(url)
    origin.replies["/client.json"] = Reply(status=500, body=b"{}")
    clock.advance(120)
    stale = await fetcher.fetch(url)
    assert (stale.stale, stale.failure, stale.from_cache) == (True, "bad_status", True)
    assert (stale.document, stale.fingerprint, stale.fetched_at) == (good.document, good.fingerprint, START)
    assert stale.usable_until == START + 24 * 3600
    clock.advance(24 * 3600)  # past the cap: no document older than 24 h is served
    assert (await refused(fetcher, url)).reason == "bad_status"


async def test_refresh_skips_the_fresh_copy_but_keeps_the_last_good_one(ca, clock, origin) -> None:
    url = origin.url("/client.json")
    origin.replies["/client.json"] = Reply.json(document(url, v=1), cache_control="max-age=3600")
    fetcher = loopback_fetcher(ca, clock)
    await fetcher.fetch(url)
    origin.replies["/client.json"] = Reply.json(document(url, v=2), cache_control="max-age=3600")
    assert (await fetcher.fetch(url)).document["v"] == 1
    assert (await fetcher.fetch(url, refresh=True)).document["v"] == 2
    origin.replies["/client.json"] = Reply(status=500, body=b"{}")
    stale = await fetcher.fetch(url, refresh=True)
    assert (stale.stale, stale.failure, stale.document["v"]) == (True, "bad_status", 2)


async def test_a_refused_answer_does_not_replace_the_last_good_document(ca, clock, origin) -> None:
    url = origin.url("/client.json")
    origin.replies["/client.json"] = Reply.json(document(url))
    fetcher = loopback_fetcher(ca, clock, timeout=0.5)
    good = await fetcher.fetch(url)
    for reply, reason in [
        (Reply(body=b"not json"), "not_json"),
        (Reply(status=302, headers=(("Location", "https://10.0.0.1/"),)), "redirect"),
        (Reply(body=_body_of(6000)), "too_large"),
        (Reply.json({}, delay=3.0), "timeout"),
    ]:
        origin.replies["/client.json"] = reply
        stale = await fetcher.fetch(url)
        assert (stale.stale, stale.failure, stale.fingerprint) == (True, reason, good.fingerprint)


async def test_a_failing_fetch_without_a_last_good_document_raises(ca, clock, origin) -> None:
    origin.replies["/client.json"] = Reply(status=500, body=b"{}")
    fetcher = loopback_fetcher(ca, clock)
    for _ in range(2):
        assert (await refused(fetcher, origin.url("/client.json"))).reason == "bad_status"


async def test_unknown_urls_cannot_evict_an_approved_clients_last_good_document(ca, clock, origin) -> None:
    fetcher = loopback_fetcher(ca, clock, cache_max_entries=2)
    for target in ("/approved.json", "/u1.json", "/u2.json", "/u3.json"):
        origin.replies[target] = Reply.json({"id": target}, cache_control="no-store")
    await fetcher.fetch(origin.url("/approved.json"), approved=True)
    for target in ("/u1.json", "/u2.json", "/u3.json"):
        await fetcher.fetch(origin.url(target))
    for target in ("/approved.json", "/u1.json", "/u3.json"):
        origin.replies[target] = Reply(status=503, body=b"{}")
    assert (await fetcher.fetch(origin.url("/approved.json"), approved=True)).stale is True
    assert (await fetcher.fetch(origin.url("/u3.json"))).stale is True  # still within the 2 kept
    assert (await refused(fetcher, origin.url("/u1.json"))).reason == "bad_status"  # evicted


async def test_approving_later_moves_the_document_out_of_reach_of_unknown_urls(ca, clock, origin) -> None:
    fetcher = loopback_fetcher(ca, clock, cache_max_entries=1)
    origin.replies["/client.json"] = Reply.json({}, cache_control="max-age=60")
    origin.replies["/other.json"] = Reply.json({}, cache_control="max-age=60")
    await fetcher.fetch(origin.url("/client.json"))
    assert (await fetcher.fetch(origin.url("/client.json"), approved=True)).from_cache is True  # promoted
    await fetcher.fetch(origin.url("/other.json"))
    clock.advance(61)
    origin.replies["/client.json"] = Reply(status=500, body=b"{}")
    assert (await fetcher.fetch(origin.url("/client.json"), approved=True)).stale is True


# --- rate limits and sharing -----------------------------------------------------------------


async def test_fetches_per_host_are_rate_limited(ca, clock, origin) -> None:
    for target in ("/a.json", "/b.json", "/c.json"):
        origin.replies[target] = Reply.json({}, cache_control="no-store")
    fetcher = loopback_fetcher(ca, clock, per_host_rate=1.0, per_host_burst=2)
    await fetcher.fetch(origin.url("/a.json"))
    await fetcher.fetch(origin.url("/b.json"))
    error = await refused(fetcher, origin.url("/c.json"))
    assert error.reason == "rate_limited"
    assert origin.count("/c.json") == 0
    clock.advance(1.0)
    assert (await fetcher.fetch(origin.url("/c.json"))).from_cache is False


async def test_a_rate_limited_refetch_answers_the_last_good_document(ca, clock, origin) -> None:
    origin.replies["/a.json"] = Reply.json({}, cache_control="no-store")
    fetcher = loopback_fetcher(ca, clock, per_host_rate=0.0, per_host_burst=1)
    await fetcher.fetch(origin.url("/a.json"))
    again = await fetcher.fetch(origin.url("/a.json"))
    assert (again.stale, again.failure) == (True, "rate_limited")
    assert origin.count("/a.json") == 1


async def test_made_up_urls_cannot_use_up_an_approved_documents_refetches(ca, clock, origin) -> None:
    # Else an attacker spends the host's allowance on junk URLs, the approved client's
    # document cannot be refetched, and a key its owner removed keeps working on the last
    # good copy for up to a day.
    for target in ("/victim.json", "/junk-1.json", "/junk-2.json"):
        origin.replies[target] = Reply.json({}, cache_control="no-store")
    fetcher = loopback_fetcher(ca, clock, per_host_rate=0.0, per_host_burst=1)
    await fetcher.fetch(origin.url("/victim.json"), approved=True)
    await fetcher.fetch(origin.url("/junk-1.json"))
    assert (await refused(fetcher, origin.url("/junk-2.json"))).reason == "rate_limited"
    again = await fetcher.fetch(origin.url("/victim.json"), approved=True)
    assert (again.stale, again.failure) == (True, "rate_limited")  # its own allowance: one, used above
    assert origin.count("/victim.json") == 1
    fresh = loopback_fetcher(ca, clock, per_host_rate=0.0, per_host_burst=1)
    await fresh.fetch(origin.url("/junk-1.json"))  # the junk's allowance is spent ...
    refetched = await fresh.fetch(origin.url("/victim.json"), approved=True)  # ... not the approved one's
    assert (refetched.stale, refetched.from_cache) == (False, False)


async def test_names_sharing_an_address_share_its_rate_limit(ca, clock, origin) -> None:
    origin.replies["/client.json"] = Reply.json({}, cache_control="no-store")
    answers = {"cimd.test": [PUBLIC], "alias.test": [PUBLIC]}
    fetcher, _, connector = routed_fetcher(ca, clock, origin, answers, per_host_rate=0.0, per_host_burst=1)
    await fetcher.fetch("https://cimd.test/client.json")
    assert (await refused(fetcher, "https://alias.test/client.json")).reason == "rate_limited"
    assert connector.calls == [(PUBLIC, 443)]


async def test_slow_made_up_documents_cannot_hold_an_approved_refetch(ca, clock, origin) -> None:
    origin.replies["/slow.json"] = Reply.json({}, delay=0.5)
    origin.replies["/approved.json"] = Reply.json({})
    fetcher = loopback_fetcher(ca, clock, max_concurrent=1)
    slow = asyncio.create_task(fetcher.fetch(origin.url("/slow.json")))
    await asyncio.sleep(0.2)
    approved = await fetcher.fetch(origin.url("/approved.json"), approved=True)
    assert (approved.stale, approved.from_cache) == (False, False)
    assert (await slow).from_cache is False


async def test_at_most_max_concurrent_fetches_run(ca, clock, origin) -> None:
    origin.replies["/slow.json"] = Reply.json({}, delay=0.5)
    origin.replies["/other.json"] = Reply.json({})
    fetcher = loopback_fetcher(ca, clock, max_concurrent=1)
    slow = asyncio.create_task(fetcher.fetch(origin.url("/slow.json")))
    await asyncio.sleep(0.2)
    assert (await refused(fetcher, origin.url("/other.json"))).reason == "rate_limited"
    assert (await slow).from_cache is False


async def test_concurrent_fetches_of_one_url_share_one_request(ca, clock, origin) -> None:
    url = origin.url("/client.json")
    origin.replies["/client.json"] = Reply.json(document(url), delay=0.3)
    fetcher = loopback_fetcher(ca, clock)
    results = await asyncio.gather(*(fetcher.fetch(url) for _ in range(5)))
    assert origin.count("/client.json") == 1
    assert all(result.document == document(url) for result in results)
    results[0].document["client_id"] = "changed"  # each caller has its own copy
    assert results[1].document["client_id"] == url


def test_fetch_sync(ca, clock, origin) -> None:
    url = origin.url("/client.json")
    origin.replies["/client.json"] = Reply.json(document(url), cache_control="max-age=60")
    fetcher = loopback_fetcher(ca, clock)
    assert fetcher.fetch_sync(url).document == document(url)
    assert fetcher.fetch_sync(url).from_cache is True
    assert origin.count("/client.json") == 1
    with pytest.raises(CimdFetchError) as caught:
        fetcher.fetch_sync("http://cimd.test/client.json")
    assert caught.value.reason == "not_https"


# --- resolver and connector failures, settings -----------------------------------------------


async def test_a_name_that_does_not_resolve_is_refused(ca, clock) -> None:
    many = [f"93.184.{i // 250}.{i % 250}" for i in range(65)]
    cases: list[dict[str, list[str]]] = [{}, {"cimd.test": []}, {"cimd.test": many}]
    for answers in cases:
        connector = Connector()
        fetcher = CimdFetcher(ca_file=ca.ca_file, resolver=Resolver(answers), connector=connector, clock=clock)
        assert (await refused(fetcher, URL)).reason == "resolve_failed"
        assert connector.calls == []


async def test_connection_attempts_are_few_and_failures_are_reported(ca, clock) -> None:
    addresses = ["93.184.216.34", "93.184.216.35", "93.184.216.36", "93.184.216.37", "93.184.216.38"]
    connector = Connector(refuse=True)
    fetcher = CimdFetcher(
        ca_file=ca.ca_file, resolver=Resolver({"cimd.test": addresses}), connector=connector, clock=clock
    )
    error = await refused(fetcher, URL)
    assert error.reason == "connect_failed"
    assert connector.calls == [(address, 443) for address in addresses[:3]]


def test_unusable_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="cimd_ca_file"):
        CimdFetcher(ca_file=tmp_path / "missing.pem")
    for options in ({"max_bytes": 0}, {"timeout": 0}, {"cache_max_entries": 0}, {"per_host_burst": 0}):
        with pytest.raises(InvalidArgumentError):
            CimdFetcher(**options)  # type: ignore[arg-type]
