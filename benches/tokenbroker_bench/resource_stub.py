"""The protected resource of the token endpoint bench's SDK-style loop: what an MCP server
behind tokenbroker shows a client that has no token yet, and nothing else.

    python -m tokenbroker_bench.resource_stub --port P --resource URL --issuer URL

- `GET <resource path>` without `Authorization: Bearer ...`: 401 with
  `WWW-Authenticate: Bearer resource_metadata="..."` (what starts the SDK's discovery);
  with one: 200 (the token is not validated here: the loop measures getting tokens);
- the RFC 9728 metadata at its well-known paths, served by tokenbroker's own
  `ProtectedResourceMetadata` (its `authorization_servers` is the broker's issuer);
- `GET /healthz`: 200.

h11 and the asyncio loop, like the broker it is compared with."""

from __future__ import annotations

import argparse
from urllib.parse import urlsplit

import uvicorn
from starlette.types import Receive, Scope, Send

from tokenbroker.mcp.resource_metadata import ProtectedResourceMetadata
from tokenbroker_bench.servers import HOST

SCOPE = "tools:call"


class ResourceStub:
    """The ASGI app (module doc)."""

    def __init__(self, resource: str, issuer: str) -> None:
        self.metadata = ProtectedResourceMetadata(resource, issuer, scopes_supported=[SCOPE], require_dpop=False)
        self.path = urlsplit(resource).path
        self.challenge = f'Bearer resource_metadata="{self.metadata.url}", scope="{SCOPE}"'.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path in self.metadata.paths:
            await self.metadata(scope, receive, send)
            return
        if path == "/healthz":
            await _answer(send, 200, b'{"status":"serving"}')
            return
        if path != self.path:
            await _answer(send, 404, b'{"error":"not_found"}')
            return
        authorization = dict(scope["headers"]).get(b"authorization", b"")
        if authorization[:7].lower() == b"bearer " and len(authorization) > 7:
            await _answer(send, 200, b'{"ok":true}')
            return
        await _answer(send, 401, b'{"error":"invalid_token"}', [(b"www-authenticate", self.challenge)])


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    start = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--resource", required=True, help="the resource URI (the tokens' audience)")
    parser.add_argument("--issuer", required=True, help="the broker's issuer (public_url)")
    args = parser.parse_args(argv)
    app = ResourceStub(args.resource, args.issuer)
    config = uvicorn.Config(
        app,
        host=HOST,
        port=args.port,
        http="h11",
        loop="asyncio",
        lifespan="off",
        log_level="warning",
        access_log=False,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
