"""Load shedding at the HTTP door (tokenbroker.http.overload, `http_max_inflight`): over the
bound a request is answered 503 at once, with its headers and without its body being read;
under it nothing is refused; `/healthz` is never shed; a request still sending its body
does not count; the setting is validated and reaches `tokenbroker serve`. Against a real
uvicorn server (`HttpServer`) on loopback, and a real `tokenbroker serve`."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tokenbroker.config import ConfigError, Settings
from tokenbroker.http.overload import MAX_REFUSALS_PER_CONNECTION, Shedding
from tokenbroker.http.server import HttpServer, bind
from tokenbroker_bench.servers import free_port

from support.oauth import OAuthDeployment

LIMIT = 2
ANSWER_SECONDS = 1.0  # a refusal "at once": well under this, on a busy 2-core machine


class Door:
    """An HttpServer with `LIMIT` in flight, whose `/slow` answers only when released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.shed_calls = 0
        self.bodies: list[int] = []

        async def slow(request: Request) -> PlainTextResponse:
            await self.release.wait()
            return PlainTextResponse("slow")

        async def hello(request: Request) -> PlainTextResponse:
            return PlainTextResponse("hello")

        async def echo(request: Request) -> PlainTextResponse:
            body = await request.body()
            self.bodies.append(len(body))
            return PlainTextResponse(str(len(body)))

        routes = [
            Route("/", hello),
            Route("/slow", slow),
            Route("/healthz", hello),
            Route("/echo", echo, methods=["POST"]),
        ]
        self.server = HttpServer(Starlette(routes=routes), bind("127.0.0.1:0"), max_inflight=LIMIT, on_shed=self._shed)

    def _shed(self) -> None:
        self.shed_calls += 1

    @property
    def shedding(self) -> Shedding:
        return self.server.shedding

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.server.port)

    async def fill(self) -> list[asyncio.Task[tuple[int, dict[str, str], bytes]]]:
        """`LIMIT` requests to /slow, each on its connection, once they are all in flight."""
        held = [asyncio.create_task(self.get("/slow")) for _ in range(LIMIT)]
        deadline = time.monotonic() + 5
        while self.shedding.inflight < LIMIT:
            assert time.monotonic() < deadline, "the slow requests never got in flight"
            await asyncio.sleep(0.01)
        return held

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        reader, writer = await self.connect()
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: door\r\n\r\n".encode())
            return await read_answer(reader)
        finally:
            writer.close()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
    return status, headers, body


@pytest.fixture
async def door() -> AsyncIterator[Door]:
    d = Door()
    await d.server.start()
    try:
        yield d
    finally:
        d.release.set()
        await d.server.stop()


def assert_shed(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 503
    assert headers["retry-after"] == "1"
    assert headers["cache-control"] == "no-store"
    assert headers["pragma"] == "no-cache"
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert "connection" not in headers  # kept alive
    answer = json.loads(body)
    assert answer["error"] == "temporarily_unavailable"
    assert "http_max_inflight" in answer["error_description"]
    assert f"bound of {LIMIT} " in answer["error_description"]


async def test_over_the_bound_a_request_is_refused_at_once_without_its_body_being_read(door: Door) -> None:
    held = await door.fill()
    reader, writer = await door.connect()
    try:
        # The headers announce a body that is never sent: the answer cannot have waited for it.
        writer.write(b"POST /echo HTTP/1.1\r\nHost: door\r\nContent-Length: 20000\r\n\r\n")
        started = time.monotonic()
        assert_shed(*await read_answer(reader))
        assert time.monotonic() - started < ANSWER_SECONDS
        assert (door.shedding.shed, door.shed_calls) == (1, 1)
        door.release.set()
        assert [(await task)[0] for task in held] == [200] * LIMIT
        # The connection is still usable: the unread body is discarded, the next request served.
        writer.write(b"x" * 20000 + b"GET / HTTP/1.1\r\nHost: door\r\n\r\n")
        status, _, body = await read_answer(reader)
        assert (status, body) == (200, b"hello")
    finally:
        writer.close()
    assert door.bodies == []  # the refused POST never reached the app
    assert door.shedding.inflight == 0


async def test_a_head_request_over_the_bound_gets_the_headers_only(door: Door) -> None:
    held = await door.fill()
    reader, writer = await door.connect()
    try:
        writer.write(b"HEAD / HTTP/1.1\r\nHost: door\r\n\r\nGET /healthz HTTP/1.1\r\nHost: door\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 503 ")
        # No body followed the refused HEAD: the next bytes are the pipelined health answer.
        status, _, body = await read_answer(reader)
        assert (status, body) == (200, b"hello")
    finally:
        writer.close()
        door.release.set()
        await asyncio.gather(*held)


async def test_health_checks_are_never_shed(door: Door) -> None:
    held = await door.fill()
    try:
        for _ in range(3):
            status, _, body = await door.get("/healthz")
            assert (status, body) == (200, b"hello")
        assert door.shedding.shed == 0
        assert_shed(*await door.get("/"))
    finally:
        door.release.set()
        await asyncio.gather(*held)


async def test_under_the_bound_nothing_is_refused(door: Door) -> None:
    held = await door.fill()  # exactly the bound
    door.release.set()
    assert [(await task)[0] for task in held] == [200] * LIMIT
    for _round in range(20):  # and again, the bound's worth at a time: every slot was given back
        answers = await asyncio.gather(*(door.get("/") for _ in range(LIMIT)))
        assert [status for status, _, _ in answers] == [200] * LIMIT
    assert door.shedding.shed == 0
    assert door.shedding.inflight == 0


async def test_a_request_still_sending_its_body_does_not_count(door: Door) -> None:
    slow_senders = [await door.connect() for _ in range(LIMIT + 1)]
    try:
        for _, writer in slow_senders:
            writer.write(b"POST /echo HTTP/1.1\r\nHost: door\r\nContent-Length: 10\r\n\r\nabc")
        await asyncio.sleep(0.2)
        status, _, body = await door.get("/")  # more senders than the bound, and still served
        assert (status, body) == (200, b"hello")
        for reader, writer in slow_senders:
            writer.write(b"defghij")
            status, _, body = await read_answer(reader)
            assert (status, body) == (200, b"10")
    finally:
        for _, writer in slow_senders:
            writer.close()
    assert door.shedding.shed == 0
    assert door.shedding.inflight == 0


async def test_a_refused_request_gives_back_nothing_it_never_took(door: Door) -> None:
    held = await door.fill()
    for _ in range(5):
        assert_shed(*await door.get("/"))
    assert door.shedding.inflight == LIMIT
    door.release.set()
    await asyncio.gather(*held)
    assert door.shedding.inflight == 0
    assert (await door.get("/"))[0] == 200


async def test_pipelined_requests_dropped_with_their_connection_hold_no_slot(door: Door) -> None:
    """Requests queued behind a `Connection: close` one (and a connection reset with
    requests still queued) never start: they must not keep slots of the bound."""
    for _ in range(3):
        reader, writer = await door.connect()
        queued = b"GET / HTTP/1.1\r\nHost: door\r\n\r\n" * (LIMIT + 3)
        writer.write(b"GET / HTTP/1.1\r\nHost: door\r\nConnection: close\r\n\r\n" + queued)
        await reader.read()  # the first answer, then the door closes the connection
        writer.close()
    _, writer = await door.connect()
    writer.write(b"GET /slow HTTP/1.1\r\nHost: door\r\n\r\n" + b"GET / HTTP/1.1\r\nHost: door\r\n\r\n" * 5)
    await asyncio.sleep(0.2)
    writer.transport.abort()  # a reset while /slow runs and the rest are queued
    door.release.set()
    deadline = time.monotonic() + 5
    while door.shedding.inflight:
        assert time.monotonic() < deadline, f"{door.shedding.inflight} slots were never given back"
        await asyncio.sleep(0.01)
    assert (await door.get("/"))[0] == 200


async def test_many_pipelined_refusals_are_answered_without_recursion_and_then_closed(door: Door) -> None:
    held = await door.fill()
    reader, writer = await door.connect()
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: door\r\n\r\n" * 1000)
        statuses = []
        while True:
            try:
                status, _, _ = await read_answer(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            statuses.append(status)
        # One connection gets at most MAX_REFUSALS_PER_CONNECTION 503s, then it is closed.
        assert statuses
        assert set(statuses) == {503}
        assert len(statuses) <= MAX_REFUSALS_PER_CONNECTION
    finally:
        writer.close()
    door.release.set()
    await asyncio.gather(*held)
    assert door.shedding.inflight == 0
    assert (await door.get("/"))[0] == 200


# -- the setting --------------------------------------------------------------------------------


def test_the_setting_defaults_to_64_and_is_validated(no_tokenbroker_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.load().http_max_inflight == 64
    assert (HttpServer.__init__.__kwdefaults__ or {})["max_inflight"] == 64
    monkeypatch.setenv("TOKENBROKER_HTTP_MAX_INFLIGHT", "256")
    assert Settings.load().http_max_inflight == 256
    for bad in ("0", "-1", "100001", "many"):
        monkeypatch.setenv("TOKENBROKER_HTTP_MAX_INFLIGHT", bad)
        with pytest.raises(ConfigError, match=r"http_max_inflight \(TOKENBROKER_HTTP_MAX_INFLIGHT\)"):
            Settings.load()
    with pytest.raises(ValueError, match="http_max_inflight must be at least 1"):
        Shedding(0)


def metric(port: int, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


async def test_serve_sheds_over_its_setting_and_counts_it(tmp_path: Path) -> None:
    """With `http_max_inflight = 1`, a request pipelined behind one in flight is refused
    (deterministic: the first is complete and unanswered when the second's headers are
    parsed); a pipelined health check is not; the refusal is in the metrics."""
    metrics_port = free_port()
    broker = OAuthDeployment(tmp_path).broker(http_max_inflight="1", metrics_port=str(metrics_port))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", broker.http_port)
        try:
            get = b"GET /jwks HTTP/1.1\r\nHost: broker\r\n\r\n"
            health = b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n"
            writer.write(get + get + get + health)
            answers = [await read_answer(reader) for _ in range(4)]
        finally:
            writer.close()
        assert [status for status, _, _ in answers] == [200, 503, 503, 200]
        _, headers, body = answers[1]
        assert headers["retry-after"] == "1"
        assert headers["cache-control"] == "no-store"
        assert headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert json.loads(body)["error_description"].startswith("the broker is serving its bound of 1 HTTP")
        counted = 'tokenbroker_admission_refusals_total{call_class="http",reason="inflight"}'
        assert await asyncio.to_thread(metric, metrics_port, counted) == 2
    finally:
        assert broker.stop() == 0, broker.log.read_text()[-2000:]
