"""`CimdFetcher`: fetches Client ID Metadata Documents (and `jwks_uri` key sets) so that a
`client_id` chosen by anyone cannot make the broker reach anything it should not.

The order of one fetch, and why:
1. The URL is checked as a string (`url.py`): https, a path, no user information, no
   fragment, one spelling per host.
2. A fresh cached copy is answered at once (`cache.py`), with no traffic.
3. The per-host rate limit is charged (before any lookup, so a flood of made-up URLs
   costs their hosts at most `per_host_burst` fetches, then `per_host_rate` a second), and
   at most `max_concurrent` fetches run at once. Fetches of one URL at the same time share
   one request.
4. The host is resolved ONCE, with the injected resolver; every address it gave must be
   public (`addresses.py`), or the fetch is refused before any connection.
5. The connection goes to a checked address (never to the name again, so a DNS answer
   that changes between the check and the connection, DNS rebinding, changes nothing),
   each address also rate limited; TLS is then started for the host NAME (SNI and the
   certificate checked for it, against the system CAs plus `ca_file`).
6. One GET (`wire.py`): no redirects followed (3xx is refused), only 200
   `application/json`, at most `max_bytes` (refused beyond, not truncated), no
   compression. Steps 4 to 6 share one total `timeout`.
7. The body must be a strict JSON object (`jsonbody.py`); it is kept as the URL's last
   good document, reused while `Cache-Control` allows (at most `max_cache_seconds`).

When a refetch fails, the last good document is answered if it was fetched less than
`max_cache_seconds` ago, marked `stale=True` with the failure's reason (see `cache.py`):
a failing fetch never locks out an approved client while its cached document is valid.
The caller decides what a stale answer means for a client that is not approved yet."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog

from tokenbroker.cimd import wire
from tokenbroker.cimd.addresses import address_refusal, rate_key
from tokenbroker.cimd.cache import CachedBody, FetchedDocument, LastGoodCache, freshness_seconds
from tokenbroker.cimd.errors import CimdFetchError
from tokenbroker.cimd.jsonbody import parse_json_object
from tokenbroker.cimd.url import CimdUrl, parse_cimd_url
from tokenbroker.errors import InvalidArgumentError
from tokenbroker.ratelimit import KeyedBuckets

log = structlog.get_logger("tokenbroker.cimd")

# (host, port) -> the addresses the host resolves to (strings, IPv4 or IPv6).
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
# (address, port) -> a plain TCP stream to that address; the fetcher starts TLS on it.
Connector = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

MAX_DOCUMENT_BYTES = 5 * 1024
MAX_CACHE_SECONDS = 24 * 3600
# More addresses than this for one name is not a web host; each is checked, the first few
# are tried in order.
MAX_ADDRESSES = 64
MAX_CONNECT_ATTEMPTS = 3


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the operating system's resolver (`loop.getaddrinfo`)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


async def tcp_connector(address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to `address` as given (AI_NUMERICHOST: nothing is resolved)."""
    return await asyncio.open_connection(address, port, flags=socket.AI_NUMERICHOST)


def _positive(name: str, value: float, *, minimum: float = 0.0, strict: bool = True) -> None:
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise InvalidArgumentError(f"CimdFetcher needs {name} {relation} {minimum:g} (got {value!r})")


class CimdFetcher:
    """Fetches CIMD documents with the SSRF guards, a per-host rate limit and a bounded
    last-good cache. One instance per broker process; safe to share between asyncio tasks
    and, through `fetch_sync`, between threads.

    `ca_file` (setting `cimd_ca_file`) adds CAs to the system's; `allow_loopback` (setting
    `cimd_allow_loopback`) lets documents live on 127.0.0.1/::1, for tests only; `resolver`
    and `connector` replace the system's (tests inject both, so that no packet can leave the
    machine); `clock` gives seconds since the epoch (document lifetimes, rate limits)."""

    def __init__(
        self,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        allow_loopback: bool = False,
        resolver: Resolver | None = None,
        connector: Connector | None = None,
        clock: Callable[[], float] = time.time,
        max_bytes: int = MAX_DOCUMENT_BYTES,
        timeout: float = 5.0,
        per_host_rate: float = 1.0,
        per_host_burst: int = 10,
        max_hosts: int = 10_000,
        max_concurrent: int = 64,
        cache_max_entries: int = 10_000,
        max_cache_seconds: float = MAX_CACHE_SECONDS,
    ) -> None:
        _positive("max_bytes", max_bytes)
        _positive("timeout", timeout)
        _positive("per_host_rate", per_host_rate, strict=False)
        _positive("per_host_burst", per_host_burst, minimum=1, strict=False)
        _positive("max_hosts", max_hosts, minimum=1, strict=False)
        _positive("max_concurrent", max_concurrent, minimum=1, strict=False)
        _positive("cache_max_entries", cache_max_entries, minimum=1, strict=False)
        _positive("max_cache_seconds", max_cache_seconds, strict=False)
        self.allow_loopback = bool(allow_loopback)
        self.max_bytes = int(max_bytes)
        self.timeout = float(timeout)
        self.max_cache_seconds = float(max_cache_seconds)
        self._tls = wire.tls_context(os.fspath(ca_file) if ca_file is not None else None)
        self._resolver: Resolver = resolver or system_resolver
        self._connector: Connector = connector or tcp_connector
        self._clock = clock
        self._buckets = KeyedBuckets(rate=per_host_rate, burst=per_host_burst, max_keys=max_hosts, clock=clock)
        self._cache = LastGoodCache(max_entries=cache_max_entries)
        self._max_concurrent = int(max_concurrent)
        self._active = 0
        self._active_approved = 0
        self._inflight: dict[str, asyncio.Task[CachedBody]] = {}
        self._lock = threading.Lock()

    async def fetch(self, url: str, *, approved: bool = False, refresh: bool = False) -> FetchedDocument:
        """The document at `url`: from the cache while fresh, else fetched; when the fetch
        fails, the last good copy (`stale=True`) while it is usable, else raises
        `CimdFetchError`. `approved=True` (the caller's client is approved) keeps the URL's
        last good copy in the tier unknown URLs cannot evict. `refresh=True` skips the
        fresh copy (an operator approving a client pins what the origin serves now); the
        rate limits still apply, and a failure still answers the last good copy."""
        target = parse_cimd_url(url)
        hit = None if refresh else self._fresh_hit(url, approved)
        if hit is not None:
            return hit
        try:
            entry = await asyncio.shield(self._refetch_task(target, approved))
        except CimdFetchError as error:
            last_good = self._cache.get(url, approved=approved)
            if last_good is not None and self._clock() < last_good.usable_until:
                log.warning("cimd_refetch_failed", url=url, reason=error.reason, served="last_good")
                return last_good.open(from_cache=True, stale=True, failure=error.reason)
            raise
        if approved:
            self._cache.get(url, approved=True)  # another caller's fetch stored it: promote it
        return entry.open(from_cache=False)

    def fetch_sync(self, url: str, *, approved: bool = False, refresh: bool = False) -> FetchedDocument:
        """`fetch` for synchronous callers: answers a fresh cached copy without an event
        loop, else runs the fetch in a new one (not from a thread whose loop is running)."""
        parse_cimd_url(url)
        hit = None if refresh else self._fresh_hit(url, approved)
        if hit is not None:
            return hit
        return asyncio.run(self.fetch(url, approved=approved, refresh=True))

    def _fresh_hit(self, url: str, approved: bool) -> FetchedDocument | None:
        cached = self._cache.get(url, approved=approved)
        if cached is not None and self._clock() < cached.fresh_until:
            return cached.open(from_cache=True)
        return None

    def _refetch_task(self, target: CimdUrl, approved: bool) -> asyncio.Task[CachedBody]:
        """The running fetch of `target` in this event loop, or a new one."""
        loop = asyncio.get_running_loop()
        with self._lock:
            task = self._inflight.get(target.url)
            if task is not None and task.get_loop() is loop and not task.done():
                return task
            task = loop.create_task(self._refetch(target, approved))
            self._inflight[target.url] = task
        task.add_done_callback(functools.partial(self._forget, target.url))
        return task

    def _forget(self, url: str, task: asyncio.Task[CachedBody]) -> None:
        with self._lock:
            if self._inflight.get(url) is task:
                del self._inflight[url]
        if not task.cancelled():
            task.exception()  # retrieved here, so an error nobody awaited is not logged as lost

    async def _refetch(self, target: CimdUrl, approved: bool) -> CachedBody:
        host = target.host
        # Approved clients' refetches have slots of their own: slow origins of made-up URLs
        # holding every slot must not make an approved document stale (a removed key would
        # keep working on the last good copy).
        with self._lock:
            if approved:
                if self._active_approved >= self._max_concurrent:
                    raise CimdFetchError(
                        "rate_limited", "too many document fetches are running: try again shortly", host=host
                    )
                self._active_approved += 1
            else:
                if self._active >= self._max_concurrent:
                    raise CimdFetchError(
                        "rate_limited", "too many document fetches are running: try again shortly", host=host
                    )
                self._active += 1
        try:
            async with asyncio.timeout(self.timeout):
                answer = await self._get(target, approved)
        except TimeoutError:
            raise CimdFetchError(
                "timeout", f"fetching the document at {host} took longer than {self.timeout:g} s", host=host
            ) from None
        finally:
            with self._lock:
                if approved:
                    self._active_approved -= 1
                else:
                    self._active -= 1
        parse_json_object(answer.body, host=host)  # refused here, so it never becomes the last good copy
        now = self._clock()
        lifetime = freshness_seconds(
            answer.values("cache-control"), answer.values("age"), max_seconds=self.max_cache_seconds
        )
        entry = CachedBody(
            url=target.url,
            host=host,
            body=answer.body,
            fingerprint=hashlib.sha256(answer.body).hexdigest(),
            fetched_at=now,
            fresh_until=now + lifetime,
            usable_until=now + self.max_cache_seconds,
        )
        self._cache.put(entry, approved=approved)
        return entry

    async def _get(self, target: CimdUrl, approved: bool = False) -> wire.Answer:
        host = target.host
        # Approved clients' documents have rate limits of their own: fetches of made-up URLs
        # on the same host must not use up the allowance that refetches an approved client's
        # document (else an attacker keeps a removed key working on the last good copy).
        tier = "approved-" if approved else ""
        self._charge(f"{tier}host:{host}", host)
        addresses = [host] if target.ip_literal else await self._resolve(target)
        for address in addresses:
            refusal = address_refusal(address, allow_loopback=self.allow_loopback)
            if refusal is not None:
                raise CimdFetchError(
                    "blocked_address",
                    f"{host} is or resolves to {refusal}: documents are fetched from public addresses only",
                    host=host,
                )
        reader, writer = await self._connect(addresses, target, tier)
        try:
            await wire.start_tls(writer, self._tls, host)
            return await wire.get(
                reader,
                writer,
                host=host,
                host_header=target.host_header,
                target=target.target,
                max_bytes=self.max_bytes,
            )
        finally:
            writer.transport.abort()

    async def _resolve(self, target: CimdUrl) -> list[str]:
        host = target.host
        try:
            resolved = await self._resolver(host, target.port)
        except (OSError, UnicodeError):
            raise CimdFetchError("resolve_failed", f"{host} did not resolve", host=host) from None
        addresses = list(dict.fromkeys(str(address) for address in resolved))
        if not addresses:
            raise CimdFetchError("resolve_failed", f"{host} resolved to no address", host=host)
        if len(addresses) > MAX_ADDRESSES:
            raise CimdFetchError("resolve_failed", f"{host} resolved to more than {MAX_ADDRESSES} addresses", host=host)
        return addresses

    async def _connect(
        self, addresses: list[str], target: CimdUrl, tier: str = ""
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        failure: OSError | None = None
        for address in addresses[:MAX_CONNECT_ATTEMPTS]:
            self._charge(f"{tier}address:{rate_key(address)}", target.host)
            try:
                return await self._connector(address, target.port)
            except OSError as error:
                failure = error
        kind = failure.__class__.__name__ if failure is not None else "no address"
        raise CimdFetchError(
            "connect_failed", f"no connection to {target.host} on port {target.port} ({kind})", host=target.host
        )

    def _charge(self, key: str, host: str) -> None:
        """Spends one fetch of `key`'s rate limit, or raises `rate_limited`."""
        if not self._buckets.allowed(key):
            raise CimdFetchError(
                "rate_limited", f"too many document fetches from {host}: try again in a few seconds", host=host
            )
        self._buckets.charge(key)
