"""Running the HTTP door beside the gRPC server: uvicorn, on the event loop of
`tokenbroker serve`, in the same process and on the same broker.

Why in-process: the embedded store is in-process state (sessions, replay records), so a
token endpoint in another process could not share it; and with Redis, one process per
replica keeps one configuration, one key file and one audit log. The gRPC server runs on
its own threads, the HTTP door on the serve loop, which did nothing but wait for signals.
What was measured to choose the HTTP stack is in the README (Performance, "Token endpoint")."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Generator
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from tokenbroker.config import Settings
from tokenbroker.http.connections import guarded_protocol
from tokenbroker.http.overload import Shedding, shedding_protocol

# Bounds on what one client can make the HTTP server hold (uvicorn's own bounds).
MAX_CONNECTIONS = 1024
KEEP_ALIVE_SECONDS = 5
# Requests served at once; more are shed with 503 (tokenbroker.http.overload): the setting's default.
DEFAULT_MAX_INFLIGHT: int = Settings.model_fields["http_max_inflight"].default


class _EmbeddedServer(uvicorn.Server):
    """uvicorn, without its signal handlers: `serve` owns SIGTERM and SIGINT and stops
    both servers in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(listen: str, *, reuse_port: bool = False) -> socket.socket:
    """A listening socket on "host:port" ("[::1]:8080" for IPv6; port 0: a free one);
    `reuse_port` shares the port with the other workers of `serve --workers`. Raises
    OSError when it cannot be bound."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY on accepted connections only when
    # the listening socket says it is TCP. Without it every answer (written in two parts by
    # uvicorn) waited ~40 ms for the client's delayed ACK (measured: 23 grants/s for one
    # client instead of ~1,000; benches/token_endpoint.py).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def uvicorn_config(app: ASGIApp, *, http: Any, loop: str = "asyncio") -> uvicorn.Config:
    """uvicorn's configuration for the HTTP door: its bounds, no access log, no lifespan,
    no proxy headers (`trusted_proxies` decides whose X-Forwarded-For counts); `http` and
    `loop` are what the token endpoint bench compares."""
    return uvicorn.Config(
        app,
        http=http,
        loop=loop,
        log_config=None,
        access_log=False,
        lifespan="off",
        limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        server_header=False,
        proxy_headers=False,
    )


class HttpServer:
    """The HTTP door on a bound socket: `start()` inside a running loop, `stop()` to end.
    At most `max_inflight` requests are served at once; more get 503 at once, and
    `on_shed()` is called for each (tokenbroker.http.overload)."""

    def __init__(
        self,
        app: ASGIApp,
        sock: socket.socket,
        *,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        on_shed: Callable[[], None] | None = None,
    ):
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self.shedding = Shedding(max_inflight, on_shed=on_shed)
        # httptools, by measurement (benches/token_endpoint.py, same app and run): it took
        # 0.79x the server CPU per grant of h11; uvloop added nothing. Named, so that what
        # parses requests does not change with what else is installed.
        protocol = shedding_protocol(guarded_protocol(), self.shedding)  # httptools, with connection bounds
        config = uvicorn_config(app, http=protocol)
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sock.close()


__all__ = ["HttpServer", "bind", "uvicorn_config"]
