"""`BrokerAuth`: the MCP client's side, an `httpx.Auth`.

It gets a token from the broker with the client's private-key assertion (RFC 7523), bound
to its DPoP key, refreshes it before expiry in the same broker session, and signs a fresh
DPoP proof (new `jti`, `htm`, `htu`, `iat`, `ath`) for every request:

    auth = BrokerAuth(BrokerClient("127.0.0.1:50051"), client_id="agent", private_key=pem,
                      issuer="http://127.0.0.1:50051", audience="http://127.0.0.1:8000/mcp",
                      scopes=["tools:call"])
    httpx.AsyncClient(auth=auth)

or over HTTP, from the token endpoint of `tokenbroker serve` (OAuth client credentials,
see `tokenbroker.mcp.token_endpoint`):

    auth = BrokerAuth.from_token_endpoint("http://127.0.0.1:8080", client_id="agent",
                                          private_key=pem, resource="http://127.0.0.1:8000/mcp",
                                          scopes=["tools:call"])

Server-provided DPoP nonces (RFC 9449 section 9) are answered: when the MCP server answers
401 `error="use_dpop_nonce"` with a `DPoP-Nonce` header, the request is signed again with
that nonce and sent once more, and the last nonce each server (origin) gave is put in the
next proofs for it.

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
from tokenbroker.mcp.nonce_memory import NonceMemory, challenge_asks_for_nonce, offered_nonce
from tokenbroker.mcp.token_endpoint import TokenEndpoint
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

    `broker`: a `BrokerClient` (anything with `issue` and `aissue`), or a
    `TokenEndpoint` (see `from_token_endpoint`).
    `client_id`, `private_key`: the client's registered identity (a key object or PEM).
    `issuer`: the broker's issuer, the audience of the client assertion (with a
    `TokenEndpoint`: not given, the endpoint knows it).
    `audience`: the MCP server's resource URI; `scopes`: what to ask for.
    `signer`: the DPoP key (default: a new one, held in memory only).
    `ttl_seconds`: token lifetime to ask for (default: the broker's).
    `refresh_margin`: seconds before expiry to get the next token (at most half the
    token's lifetime). Refreshes continue the same broker session; when the session is
    gone (revoked or expired) the refresh raises `SessionNotFoundError`: opening a new
    session is the caller's decision, never a silent one.

    Over a token endpoint, the authorization server continues the session of the same DPoP
    key (`session_id` is the one of the latest token), `ttl_seconds` is not sent (the
    server's lifetime applies), and an answer with `token_type` `Bearer` is refused
    (`TokenEndpointError`): every token request carries a proof, so an unbound token would be
    a downgrade. (A gRPC issuer's Bearer token, for a client whose `binding` is `bearer`, is
    sent as `Authorization: Bearer` without a proof.)

    A response is returned as it is: a 401 is not retried, but for a nonce challenge
    (once, re-signed with the server's nonce). Sync flows call `issue`, async flows await
    `aissue` (the event loop is never blocked on the broker)."""

    requires_request_body = False
    requires_response_body = False

    def __init__(
        self,
        broker: TokenIssuer | TokenEndpoint,
        *,
        client_id: str,
        private_key: PrivateKey | bytes | str,
        issuer: str | None = None,
        audience: str,
        scopes: Iterable[str] = (),
        signer: ProofSigner | None = None,
        ttl_seconds: int | None = None,
        refresh_margin: float = 30.0,
        kid: str | None = None,
    ) -> None:
        if isinstance(scopes, str):
            scopes = scopes.split()
        if isinstance(broker, TokenEndpoint):
            if issuer is not None:
                raise ValueError("leave issuer unset with a TokenEndpoint: the endpoint knows the assertions' audience")
            if ttl_seconds is not None:
                raise ValueError("ttl_seconds cannot be asked of a token endpoint: leave it unset")
        elif not issuer:
            raise ValueError("issuer (the broker's issuer, the client assertions' audience) is required")
        self.broker = broker
        self.client_id = client_id
        self.issuer = issuer if issuer is not None else ""
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
        self._nonces = NonceMemory()

    @classmethod
    def from_token_endpoint(
        cls,
        token_endpoint_or_issuer: str,
        *,
        client_id: str,
        private_key: PrivateKey | bytes | str,
        resource: str,
        scopes: Iterable[str] = (),
        http_client: httpx.AsyncClient | httpx.Client | None = None,
        signer: ProofSigner | None = None,
        refresh_margin: float = 30.0,
        kid: str | None = None,
    ) -> BrokerAuth:
        """A `BrokerAuth` that gets its tokens from an OAuth token endpoint over HTTP
        (`tokenbroker serve`'s `{public_url}/token`), DPoP-bound to `signer`'s key and
        answering the endpoint's nonce challenges.

        `token_endpoint_or_issuer`: the endpoint's URL when its path ends in `/token`
        (assertions are addressed to it), else the issuer (`public_url`), whose RFC 8414
        metadata names the endpoint (assertions are addressed to the issuer).
        `resource`: the MCP server's URI (the audience). `http_client`: for the token
        requests only (see `TokenEndpoint`)."""
        endpoint = (
            TokenEndpoint(token_endpoint_or_issuer, http_client=http_client)
            if token_endpoint_or_issuer.rstrip("/").endswith("/token")
            else TokenEndpoint.discover(token_endpoint_or_issuer, http_client=http_client)
        )
        return cls(
            endpoint,
            client_id=client_id,
            private_key=private_key,
            audience=resource,
            scopes=scopes,
            signer=signer,
            refresh_margin=refresh_margin,
            kid=kid,
        )

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

    def _assertion(self, audience: str | None = None) -> str:
        return make_client_assertion(self._key, self.client_id, audience or self.issuer, kid=self._kid)

    def _keep(self, issued: IssuedToken) -> IssuedToken:
        now = time.time()
        lifetime = max(issued.expires_at - now, 0.0)
        self._issued = issued
        self._refresh_at = issued.expires_at - min(self.refresh_margin, lifetime / 2)
        return issued

    def _current(self) -> IssuedToken | None:
        if self._issued is not None and time.time() < self._refresh_at:
            return self._issued
        return None

    def token(self) -> str:
        """The current access token, from the broker when missing or about to expire."""
        return self._obtain().access_token

    async def atoken(self) -> str:
        """The asyncio twin of `token`."""
        return (await self._aobtain()).access_token

    def _obtain(self) -> IssuedToken:
        with self._lock:
            current = self._current()
            if current is not None:
                return current
            if isinstance(self.broker, TokenEndpoint):
                return self._keep(
                    self.broker.request_token(
                        client_id=self.client_id,
                        assertion=self._assertion,
                        resource=self.audience,
                        scopes=self.scopes,
                        signer=self.signer,
                    )
                )
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

    async def _aobtain(self) -> IssuedToken:
        current = self._current()
        if current is not None:
            return current
        async with self._async_lock():
            current = self._current()
            if current is not None:
                return current
            if isinstance(self.broker, TokenEndpoint):
                return self._keep(
                    await self.broker.arequest_token(
                        client_id=self.client_id,
                        assertion=self._assertion,
                        resource=self.audience,
                        scopes=self.scopes,
                        signer=self.signer,
                    )
                )
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

    @staticmethod
    def _origin(url: httpx.URL) -> str:
        return f"{url.scheme}://{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"

    def _sign(self, request: httpx.Request, issued: IssuedToken) -> None:
        token = issued.access_token
        if issued.token_type.lower() == "bearer":  # issued unbound: no proof would be checked
            request.headers["Authorization"] = f"Bearer {token}"
            request.headers.pop("DPoP", None)
            return
        htu = str(request.url.copy_with(query=None, fragment=None))
        nonce = self._nonces.get(self._origin(request.url))
        request.headers["Authorization"] = f"DPoP {token}"
        request.headers["DPoP"] = self.signer.sign(request.method, htu, token, nonce=nonce)

    def _asked_for_nonce(self, request: httpx.Request, response: httpx.Response, issued: IssuedToken) -> bool:
        """Remembers the nonce `response` offers; True when it is a nonce challenge (RFC
        9449 section 9) for a DPoP request, to be answered with a proof carrying it."""
        nonce = offered_nonce(response.headers)
        if nonce is None:
            return False
        self._nonces.remember(self._origin(request.url), nonce)
        return (
            response.status_code == 401
            and issued.token_type.lower() != "bearer"
            and challenge_asks_for_nonce(response.headers.get("WWW-Authenticate"))
        )

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        issued = self._obtain()
        self._sign(request, issued)
        response = yield request
        if self._asked_for_nonce(request, response, issued):
            self._sign(request, issued)  # a fresh proof, with the nonce
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        issued = await self._aobtain()
        self._sign(request, issued)
        response = yield request
        if self._asked_for_nonce(request, response, issued):
            self._sign(request, issued)  # a fresh proof, with the nonce
            yield request

    def __repr__(self) -> str:
        return f"BrokerAuth(client_id={self.client_id!r}, audience={self.audience!r}, jkt={self.signer.jkt!r})"
