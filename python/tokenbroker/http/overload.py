"""Load shedding at the HTTP door: a bound on the requests it has taken on at once
(`http_max_inflight`); over it, `503 temporarily_unavailable` with `Retry-After: 1` and
`Cache-Control: no-store`, written the moment the request's headers are parsed, before
anything of its body is read and before any task, routing, verification or lookup.
`/healthz` is never shed: a load balancer must keep hearing the truth, and it is cheap.

Why: the door is one asyncio event loop (in the `serve` process, beside the gRPC server).
Without a bound, every request of every open connection became a task on that loop, and the
loop served them all, taking turns: at twice the rate it can serve, the queue grew until
uvicorn's own limit (`limit_concurrency`, 1,024 connections) answered a plain-text 503 with
`Connection: close`, by then seconds late, while every admitted grant waited as long
(`benches/overload.py`, short runs on the busy 2-core build machine: at 2x, admitted p50
3.9 s and p99 4.8 s, uvicorn's 503s p99 4.8 s; with this bound, at 2x of a 1,562/s
saturation, 63 % shed, admitted p50 127 ms and p99 172 ms, 503s p99 113 ms, no errors).

What is bounded, and where: the requests the door has taken on and not yet answered,
counted from the moment a request is complete (headers and body) and its task started to
the end of its handler (a pipelined request queued behind another on its connection counts
once its task starts, so a connection holds at most one slot), whether its task is
running, waiting for the store, or still waiting for its first turn on the loop; checked
in the protocol's `on_headers_complete`, when uvicorn would create the next task. Not in
an ASGI middleware: a middleware runs only once its request's task has its first turn, so
the requests queued behind the loop are invisible to it; on the memory store a grant never
yields to the loop, so a middleware's count of requests "in the app" stays at one while
hundreds of tasks wait (measured: such a middleware never shed, uvicorn's 503s did). A
request still sending its body is not counted: it costs the loop nothing, and it is
bounded already (connections per address, the body's deadline in
`tokenbroker.http.forms`); counted, 64 slow bodies from one address (its share of
connections) would fill the bound and have every other client refused.

Why a bound on requests in flight rather than on queueing time (CoDel, Envoy's overload
manager, a loop-lag probe as `toobusy` does for Node): on an event loop a request's wait is
invisible until it is over (it waits in its socket's buffer, then as a task in the ready
queue), so a queue-time rule can shed only requests that already waited, after spending the
loop's time on them; a loop-lag probe learns of the overload a probe period late and
oscillates around its threshold. The number of requests in flight is exact and known when
the headers are parsed, and on one loop it is the queue: a request admitted behind N others
waits about N times the loop's CPU per request (about 0.8 ms for a grant on the memory
store), plus up to one turn of the loop before it is read, so a bound of N bounds an
admitted request's wait to one or two times N x 0.8 ms whatever the offered rate (the
default, 64: the 127 / 172 ms above), and a refusal costs the loop microseconds. The bound
counts requests, not CPU: cheap ones (JWKS, metadata, `/authz` of a cached token) hold
their slot for less time. With `serve --workers N` each worker has its own loop and bound.

The refusal keeps the connection open (the parser discards the unread body): closing it
would make the client reconnect, which costs the loop more than the refusal."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import httptools  # type: ignore[import-untyped,unused-ignore]
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from tokenbroker.http.errors import NO_STORE, SECURITY_HEADERS

RETRY_AFTER_SECONDS = 1
HEALTH_PATHS = ("/healthz",)
SETTING = "http_max_inflight"


class Shedding:
    """The bound and its answer: `limit` requests in flight (outside `exempt` paths);
    `on_shed()` for every request refused (the metrics). One per server: its protocols
    all run on the server's loop, so the count needs no lock."""

    def __init__(
        self, limit: int, *, exempt: Collection[str] = HEALTH_PATHS, on_shed: Callable[[], None] | None = None
    ) -> None:
        if limit < 1:
            raise ValueError(f"{SETTING} must be at least 1")
        self.limit = limit
        self.exempt = frozenset(path.encode("ascii") for path in exempt)
        self.on_shed = on_shed
        self.inflight = 0  # requests complete and not yet answered (see the module doc)
        self.shed = 0  # requests refused so far
        body = json.dumps(
            {
                "error": "temporarily_unavailable",
                "error_description": f"the broker is serving its bound of {limit} HTTP requests at once "
                f"({SETTING}): retry after {RETRY_AFTER_SECONDS} s",
            },
            separators=(",", ":"),
        ).encode("ascii")
        headers = {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "Retry-After": str(RETRY_AFTER_SECONDS),
            **NO_STORE,
            **SECURITY_HEADERS,
        }
        self.body = body
        # One object, for the protocol to recognise it (each `self._answer` is a new bound method).
        self.app: Callable[[Scope, Receive, Send], Awaitable[None]] = self._answer
        self.headers = [(name.lower().encode("ascii"), value.encode("ascii")) for name, value in headers.items()]

    def response(self, default_headers: list[tuple[bytes, bytes]], *, keep_alive: bool, head: bool = False) -> bytes:
        """The whole 503 answer, as bytes on the wire (uvicorn's `Date` header included;
        no body for a HEAD request)."""
        lines = [b"HTTP/1.1 503 Service Unavailable"]
        headers = [*default_headers, *self.headers, *([] if keep_alive else [(b"connection", b"close")])]
        lines += [name + b": " + value for name, value in headers]
        return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else self.body)

    def counted(self) -> None:
        self.shed += 1
        if self.on_shed is not None:
            self.on_shed()

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The same answer as an ASGI app (only if uvicorn ever starts it as one)."""
        self.counted()
        await send({"type": "http.response.start", "status": 503, "headers": list(self.headers)})
        await send({"type": "http.response.body", "body": self.body})


# The state of an admitted request, kept on uvicorn's cycle object (see `_Slot`).
_SLOT = "_tokenbroker_slot"
# Refusals one connection gets before it is closed: a client that pipelines requests and
# never reads its answers must not make the door buffer 503s for it without end.
MAX_REFUSALS_PER_CONNECTION = 64
_EXEMPT_METHODS = (b"GET", b"HEAD")


class _Slot:
    """An admitted request: it holds a slot of the bound while its task runs and its
    request is complete. Counted when both are true, given back when its task ends, so a
    request that never starts (queued behind another on a connection that then closed)
    never holds one, and a connection holds at most one (uvicorn runs its requests one at
    a time). Found by review: counting queued pipelined requests leaked their slots for
    good when the connection closed first."""

    __slots__ = ("complete", "counted", "done", "started")

    def __init__(self) -> None:
        self.started = self.complete = self.counted = self.done = False


def shedding_protocol(base: type[HttpToolsProtocol], shedding: Shedding) -> type[HttpToolsProtocol]:
    """`base` (uvicorn's httptools protocol or a subclass, e.g. `guarded_protocol()`) that
    refuses a request at once while `shedding.limit` requests are counted in flight."""

    def take(slot: _Slot) -> None:
        if slot.started and slot.complete and not slot.done and not slot.counted:
            slot.counted = True
            shedding.inflight += 1

    class SheddingProtocol(base):  # type: ignore[valid-type,misc]
        _admitting = False  # inside on_headers_complete, for a request to count
        _refusals = 0  # refusals this connection got
        _refusing = False  # inside _refuse: a refusal it starts is queued, not recursed into
        _next_refusal: RequestResponseCycle | None = None
        app: Any  # uvicorn's: the ASGI app it hands each request

        def on_headers_complete(self) -> None:
            path = httptools.parse_url(self.url).path
            exempt = path in shedding.exempt and self.parser.get_method() in _EXEMPT_METHODS
            before = self.cycle
            if exempt or shedding.inflight < shedding.limit:
                self._admitting = not exempt
                try:
                    super().on_headers_complete()  # starts the request's task, or queues it (pipelining)
                finally:
                    self._admitting = False
                if self.cycle is not before and not exempt and getattr(self.cycle, _SLOT, None) is None:
                    setattr(self.cycle, _SLOT, _Slot())  # a pipelined request, started later
                return
            # uvicorn builds the request's cycle as usual and hands it the app chosen here.
            app = self.app
            self.app = shedding.app
            try:
                super().on_headers_complete()
            finally:
                self.app = app

        def on_message_complete(self) -> None:
            cycle = self.cycle
            super().on_message_complete()
            slot = getattr(cycle, _SLOT, None) if cycle is not None else None
            if slot is not None:
                slot.complete = True
                take(slot)

        def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
            if app is shedding.app:
                self._refuse(cycle)
                return
            if self._admitting and cycle is self.cycle and getattr(cycle, _SLOT, None) is None:
                setattr(cycle, _SLOT, _Slot())
            slot = getattr(cycle, _SLOT, None)
            if slot is None:  # exempt
                super()._start_asgi_task(cycle, app)
                return
            slot.started = True
            take(slot)

            async def counted(scope: Scope, receive: Receive, send: Send) -> None:
                try:
                    await app(scope, receive, send)
                finally:
                    slot.done = True
                    if slot.counted:
                        slot.counted = False
                        shedding.inflight -= 1

            super()._start_asgi_task(cycle, counted)

        def _refuse(self, cycle: RequestResponseCycle) -> None:
            """No task: the answer is written now and the cycle completed, as
            `RequestResponseCycle.send` completes a response. Completing it starts the
            next pipelined request, which may be refused too: that one is taken by the
            loop here, not by recursion (hundreds of queued refusals would exhaust the
            stack). A client that does not read its answers (the transport's buffer is
            past its high-water mark) or has had MAX_REFUSALS_PER_CONNECTION is closed."""
            if self._refusing:
                self._next_refusal = cycle
                return
            self._refusing = True
            try:
                next_cycle: RequestResponseCycle | None = cycle
                while next_cycle is not None:
                    self._next_refusal = None
                    self._refuse_one(next_cycle)
                    next_cycle = self._next_refusal
            finally:
                self._refusing = False
                self._next_refusal = None

        def _refuse_one(self, cycle: RequestResponseCycle) -> None:
            shedding.counted()
            self._refusals += 1
            cycle.response_started = cycle.response_complete = True
            cycle.message_event.set()
            head = cycle.scope["method"] == "HEAD"
            answer = shedding.response(self.server_state.default_headers, keep_alive=cycle.keep_alive, head=head)
            self.transport.write(answer)
            flooding = self.flow.write_paused or self._refusals >= MAX_REFUSALS_PER_CONNECTION
            if not cycle.keep_alive or flooding:
                self.transport.close()
            cycle.on_response()

    return SheddingProtocol


__all__ = ["HEALTH_PATHS", "MAX_REFUSALS_PER_CONNECTION", "RETRY_AFTER_SECONDS", "Shedding", "shedding_protocol"]
