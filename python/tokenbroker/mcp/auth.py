"""`BrokerAuth`: the MCP client's side, an `httpx.Auth`.

It gets a token from the broker with the client's private-key assertion (RFC 7523), bound
to its DPoP key, refreshes it before expiry in the same broker session, and signs a fresh
DPoP proof (new `jti`, `htm`, `htu`, `iat`, `ath`) for every request:

    auth = BrokerAuth(BrokerClient("127.0.0.1:50051"), client_id="agent", private_key=pem,
                      issuer="http://127.0.0.1:50051", audience="http://127.0.0.1:8000/mcp",
                      scopes=["tools:call"])
    httpx.AsyncClient(auth=auth)

It is an `httpx.Auth` and, when `httpx2` (the HTTP client of mcp 2.x) is installed, an
`httpx2.Auth` too, so the same object plugs into either SDK's streamable HTTP client."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Generator, Iterable
from typing import TYPE_CHECKING, Protocol

import httpx

from tokenbroker._core import ProofSigner
from tokenbroker.client_assertion import PrivateKey, load_private_key, make_client_assertion
from tokenbroker.models import IssuedToken

if TYPE_CHECKING:

    class _Httpx2Auth:  # httpx2.Auth at run time, when installed
        pass

else:
    try:
        from httpx2 import Auth as _Httpx2Auth
    except ImportError:  # mcp 1.x: httpx only

        class _Httpx2Auth:
            pass


class TokenIssuer(Protocol):
    """What issues tokens to a client: a `tokenbroker.client.BrokerClient`."""

    def issue(
        self,
        *,
        client_id: str,
        audience: str,
        scopes: Iterable[str] = (),
        ttl_seconds: int | None = None,
        session_id: str | None = None,
        dpop_jkt: str | None = None,
        client_assertion: str | None = None,
    ) -> IssuedToken: ...

    async def aissue(
        self,
        *,
        client_id: str,
        audience: str,
        scopes: Iterable[str] = (),
        ttl_seconds: int | None = None,
        session_id: str | None = None,
        dpop_jkt: str | None = None,
        client_assertion: str | None = None,
    ) -> IssuedToken: ...


class BrokerAuth(httpx.Auth, _Httpx2Auth):
    """Sends `Authorization: DPoP <token>` and a fresh `DPoP: <proof>` on every request.

    `broker`: a `BrokerClient` (anything with `issue` and `aissue`).
    `client_id`, `private_key`: the client's registered identity (a key object or PEM).
    `issuer`: the broker's issuer, the audience of the client assertion.
    `audience`: the MCP server's resource URI; `scopes`: what to ask for.
    `signer`: the DPoP key (default: a new one, held in memory only).
    `ttl_seconds`: token lifetime to ask for (default: the broker's).
    `refresh_margin`: seconds before expiry to get the next token (at most half the
    token's lifetime). Refreshes continue the same broker session; when the session is
    gone (revoked or expired) the refresh raises `SessionNotFoundError`: opening a new
    session is the caller's decision, never a silent one.

    A response is returned as it is: a 401 is not retried. Sync flows call `issue`, async
    flows await `aissue` (the event loop is never blocked on the broker)."""

    requires_request_body = False
    requires_response_body = False

    def __init__(
        self,
        broker: TokenIssuer,
        *,
        client_id: str,
        private_key: PrivateKey | bytes | str,
        issuer: str,
        audience: str,
        scopes: Iterable[str] = (),
        signer: ProofSigner | None = None,
        ttl_seconds: int | None = None,
        refresh_margin: float = 30.0,
        kid: str | None = None,
    ) -> None:
        if isinstance(scopes, str):
            scopes = scopes.split()
        self.broker = broker
        self.client_id = client_id
        self.issuer = issuer
        self.audience = audience
        self.scopes = tuple(scopes)
        self.signer = signer if signer is not None else ProofSigner()
        self.ttl_seconds = ttl_seconds
        self.refresh_margin = refresh_margin
        self._key = load_private_key(private_key)
        self._kid = kid
        self._issued: IssuedToken | None = None
        self._refresh_at = 0.0
        self._lock = threading.Lock()
        self._alock: asyncio.Lock | None = None
        self._alock_loop: asyncio.AbstractEventLoop | None = None

    # -- the token ----------------------------------------------------------------------

    @property
    def session_id(self) -> str | None:
        """The broker session this client's tokens belong to (None before the first)."""
        return self._issued.session_id if self._issued is not None else None

    @property
    def token_expires_at(self) -> int | None:
        return self._issued.expires_at if self._issued is not None else None

    def drop_token(self) -> None:
        """Forgets the current token but not the session: the next request gets a new token
        in the same session (e.g. after a 401 for a revoked token)."""
        self._refresh_at = 0.0

    def _assertion(self) -> str:
        return make_client_assertion(self._key, self.client_id, self.issuer, kid=self._kid)

    def _keep(self, issued: IssuedToken) -> str:
        now = time.time()
        lifetime = max(issued.expires_at - now, 0.0)
        self._issued = issued
        self._refresh_at = issued.expires_at - min(self.refresh_margin, lifetime / 2)
        return issued.access_token

    def _current(self) -> str | None:
        if self._issued is not None and time.time() < self._refresh_at:
            return self._issued.access_token
        return None

    def token(self) -> str:
        """The current access token, from the broker when missing or about to expire."""
        with self._lock:
            current = self._current()
            if current is not None:
                return current
            issued = self.broker.issue(
                client_id=self.client_id,
                client_assertion=self._assertion(),
                audience=self.audience,
                scopes=self.scopes,
                ttl_seconds=self.ttl_seconds,
                session_id=self.session_id,
                dpop_jkt=self.signer.jkt,
            )
            return self._keep(issued)

    async def atoken(self) -> str:
        """The asyncio twin of `token`."""
        current = self._current()
        if current is not None:
            return current
        async with self._async_lock():
            current = self._current()
            if current is not None:
                return current
            issued = await self.broker.aissue(
                client_id=self.client_id,
                client_assertion=self._assertion(),
                audience=self.audience,
                scopes=self.scopes,
                ttl_seconds=self.ttl_seconds,
                session_id=self.session_id,
                dpop_jkt=self.signer.jkt,
            )
            return self._keep(issued)

    def _async_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._alock is None or self._alock_loop is not loop:  # an asyncio.Lock belongs to one loop
            self._alock, self._alock_loop = asyncio.Lock(), loop
        return self._alock

    # -- the request --------------------------------------------------------------------

    def _sign(self, request: httpx.Request, token: str) -> None:
        htu = str(request.url.copy_with(query=None, fragment=None))
        request.headers["Authorization"] = f"DPoP {token}"
        request.headers["DPoP"] = self.signer.sign(request.method, htu, token)

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self._sign(request, self.token())
        yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        self._sign(request, await self.atoken())
        yield request

    def __repr__(self) -> str:
        return f"BrokerAuth(client_id={self.client_id!r}, audience={self.audience!r}, jkt={self.signer.jkt!r})"
