"""The HTTP door's bounds on connections (tokenbroker.http.connections), against a real
uvicorn server on loopback: idle connections, trickled headers and one address's share."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tokenbroker.http import connections
from tokenbroker.http.server import HttpServer, bind


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HttpServer]:
    monkeypatch.setattr(connections, "IDLE_SECONDS", 0.5)
    monkeypatch.setattr(connections, "HEADERS_SECONDS", 0.5)
    monkeypatch.setattr(connections, "MAX_PER_SOURCE", 3)
    http = HttpServer(Starlette(routes=[Route("/", _hello)]), bind("127.0.0.1:0"))
    await http.start()
    try:
        yield http
    finally:
        await http.stop()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closed `sock` (EOF) within `seconds`."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def _closed(sock: socket.socket, seconds: float) -> bool:
    return await asyncio.to_thread(_closed_within, sock, seconds)


async def test_a_connection_that_sends_nothing_is_closed(server: HttpServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        started = time.monotonic()
        assert await _closed(idle, 5)
        assert time.monotonic() - started < 3


async def test_headers_sent_a_byte_at_a_time_do_not_hold_the_connection(server: HttpServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\n")
        closed = False
        for _ in range(20):  # a header line every 0.1 s, never the blank line
            await asyncio.sleep(0.1)
            try:
                slow.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
                break
        assert closed or await _closed(slow, 2)


async def test_one_address_holds_at_most_its_share(server: HttpServer) -> None:
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as extra:
            assert await _closed(extra, 0.4)  # closed at once, long before the idle deadline
    finally:
        for sock in held:
            sock.close()
    await asyncio.sleep(0.1)  # the server notices the closes
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"http://127.0.0.1:{server.port}/")
    assert (answer.status_code, answer.text) == (200, "hello")


async def test_a_request_on_time_is_answered_and_kept_alive(server: HttpServer) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            answer = await client.get(f"http://127.0.0.1:{server.port}/")
            assert answer.text == "hello"
