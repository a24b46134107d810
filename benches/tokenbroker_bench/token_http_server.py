"""The HTTP door alone, under uvicorn with a chosen HTTP implementation and event loop, so
the token endpoint bench can compare stacks on the same app in the same run:

    python -m tokenbroker_bench.token_http_server --http h11|httptools --loop asyncio|uvloop [--socket nodelay|proto0]

Settings come from TOKENBROKER_* variables, as for `tokenbroker serve` (`http_listen` is
the address bound, `public_url` the issuer). The app is what `serve` runs,
`build_http_app(build_components(settings))`, with the uvicorn bounds of
`tokenbroker.http.server`; only `http=` and `loop=` differ, and there is no gRPC server
beside it. SIGTERM stops it (uvicorn's own handlers).

`--socket`: `proto0` binds as `serve` did before this bench found the stall: a socket made
with protocol 0, on whose connections asyncio never sets TCP_NODELAY (its `_set_nodelay`
wants `proto == IPPROTO_TCP`), so an answer written in two parts waits for the client's
delayed ACK (about 40 ms on Linux); uvloop sets TCP_NODELAY itself. `nodelay` (the
default) binds with `tokenbroker.http.server.bind`, as `serve` does now (`IPPROTO_TCP`)."""

from __future__ import annotations

import argparse
import socket

import uvicorn

from tokenbroker.app import build_components
from tokenbroker.config import Settings
from tokenbroker.http.app import build_http_app
from tokenbroker.http.server import bind, uvicorn_config
from tokenbroker.logs import configure_logging


def bind_proto0(listen: str) -> socket.socket:
    """The listening socket as `serve` made it before the fix: protocol 0 (module doc)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, 0)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--http", choices=("h11", "httptools"), required=True, help="uvicorn's HTTP implementation")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="uvicorn's event loop")
    parser.add_argument("--socket", choices=("nodelay", "proto0"), default="nodelay", help="how to bind (module doc)")
    args = parser.parse_args(argv)
    settings = Settings.load()
    configure_logging(settings.log_level, json=settings.log_json)
    if not settings.http_listen:
        parser.error("set TOKENBROKER_HTTP_LISTEN (host:port) for the HTTP door")
    sock = bind_proto0(settings.http_listen) if args.socket == "proto0" else bind(settings.http_listen)
    app = build_http_app(build_components(settings))
    config = uvicorn_config(app, http=args.http, loop=args.loop)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
