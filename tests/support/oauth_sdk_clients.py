"""The MCP SDK's own OAuth clients, unmodified, for end-to-end tests against tokenbroker's
HTTP door: the providers of `mcp.client.auth.extensions.client_credentials`, an in-memory
`TokenStorage`, a recorder of every HTTP exchange the SDK's HTTP client makes (discovery
and token requests included) and an MCP session over streamable HTTP.

Version-tolerant: mcp 2.x (`Client`, httpx2) and 1.x (`ClientSession`, httpx). Nothing here
changes what the SDK sends; it only watches."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from mcp.client.auth.extensions.client_credentials import (
    ClientCredentialsOAuthProvider,
    PrivateKeyJWTOAuthProvider,
    SignedJWTParameters,
)
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

try:  # mcp 2.x: the SDK's HTTP client is httpx2
    import httpx2 as sdk_http
    from mcp import Client

    MCP_MAJOR = 2
except ImportError:  # mcp 1.x: httpx
    import httpx as sdk_http  # type: ignore[no-redef]
    from mcp import ClientSession

    MCP_MAJOR = 1


class MemoryTokenStorage:
    """The SDK's `TokenStorage` in memory: what a client keeps between requests."""

    def __init__(self, tokens: OAuthToken | None = None) -> None:
        self.tokens = tokens
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


@dataclass(frozen=True)
class Exchange:
    """One HTTP request the SDK's client sent and the status it got."""

    method: str
    url: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    def form(self) -> dict[str, str]:
        """The request's form fields (a token request's body)."""
        return dict(parse_qsl(self.body.decode()))


class Exchanges:
    """Every HTTP exchange of one SDK client, in order (event hooks see the requests the
    auth flow makes as well as the MCP requests)."""

    def __init__(self) -> None:
        self._pending: list[Any] = []
        self.done: list[Exchange] = []

    async def _on_request(self, request: Any) -> None:
        self._pending.append(request)

    async def _on_response(self, response: Any) -> None:
        request = response.request
        body = request.content if hasattr(request, "content") else b""
        self.done.append(
            Exchange(
                method=request.method,
                url=str(request.url),
                path=request.url.path,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=bytes(body),
                status=response.status_code,
            )
        )

    def hooks(self) -> dict[str, Any]:
        return {"request": [self._on_request], "response": [self._on_response]}

    def steps(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of each exchange."""
        return [(e.method, e.path, e.status) for e in self.done]

    def to(self, path: str) -> list[Exchange]:
        return [e for e in self.done if e.path == path]


def private_key_jwt_provider(
    server_url: str,
    storage: MemoryTokenStorage,
    *,
    client_id: str,
    private_key_pem: str,
    algorithm: str,
    issuer: str | None = None,
) -> Any:
    """`PrivateKeyJWTOAuthProvider` signing its own assertions (`SignedJWTParameters`), as
    the SDK's documentation writes it; `issuer` None: given only the MCP server's URL."""
    signer = SignedJWTParameters(
        issuer=client_id, subject=client_id, signing_key=private_key_pem, signing_algorithm=algorithm
    )
    return PrivateKeyJWTOAuthProvider(
        server_url=server_url,
        storage=storage,
        client_id=client_id,
        assertion_provider=signer.create_assertion_provider(),
        issuer=issuer,
    )


def client_secret_provider(
    server_url: str,
    storage: MemoryTokenStorage,
    *,
    client_id: str,
    client_secret: str,
    issuer: str | None = None,
) -> Any:
    """`ClientCredentialsOAuthProvider` with `client_secret_basic` (its default)."""
    return ClientCredentialsOAuthProvider(
        server_url=server_url,
        storage=storage,
        client_id=client_id,
        client_secret=client_secret,
        token_endpoint_auth_method="client_secret_basic",
        issuer=issuer,
    )


@asynccontextmanager
async def connect(url: str, auth: Any, exchanges: Exchanges) -> AsyncIterator[Any]:
    """An MCP session (`list_tools`, `call_tool`) over streamable HTTP to `url`, with the
    SDK's HTTP client authenticated by `auth` and watched by `exchanges`."""
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            sdk_http.AsyncClient(auth=auth, timeout=sdk_http.Timeout(30.0), event_hooks=exchanges.hooks())
        )
        if MCP_MAJOR == 2:
            yield await stack.enter_async_context(Client(streamable_http_client(url, http_client=client)))
            return
        streams = await stack.enter_async_context(streamable_http_client(url, http_client=client))
        session = await stack.enter_async_context(ClientSession(streams[0], streams[1]))
        await session.initialize()
        yield session


def tool_result(result: Any) -> Any:
    """A tool call's value: its structured content, or its text content as JSON."""
    if getattr(result, "is_error", None) or getattr(result, "isError", None):
        raise RuntimeError(f"tool failed: {result.content}")
    structured = getattr(result, "structured_content", None) or getattr(result, "structuredContent", None)
    if structured is not None:
        return structured.get("result", structured) if isinstance(structured, dict) else structured
    return json.loads(result.content[0].text)


__all__ = [
    "MCP_MAJOR",
    "Exchange",
    "Exchanges",
    "MemoryTokenStorage",
    "client_secret_provider",
    "connect",
    "private_key_jwt_provider",
    "tool_result",
]
