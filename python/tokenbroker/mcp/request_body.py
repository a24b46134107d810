"""`ReplayableBody`: reads the start of an ASGI request body before the app does, so
`BrokerAuthMiddleware` can name what the request touches when it validates, and hands the
app the very same messages afterwards.

Memory is bounded: reading stops as soon as more than `limit` bytes have arrived (the body
is then too large to be parsed; its remaining messages are never read here), and each
message kept is dropped once the app has received it again. The app sees the identical
sequence of `http.request` messages (same bodies, same `more_body` flags), an
`http.disconnect` included, then whatever the server's `receive` gives next."""

from __future__ import annotations

from collections import deque

from starlette.types import Message, Receive


class ReplayableBody:
    """Wraps an ASGI `receive`: `read()` takes up to `limit` + 1 bytes from it, `receive`
    replays what `read()` took, then carries on from the server's."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._kept: deque[Message] = deque()
        self._read = False

    async def read(self) -> bytes | None:
        """The whole body when it is at most `limit` bytes and arrived before any
        disconnect; None otherwise (and on a second call: the body is read once)."""
        if self._read:
            return None
        self._read = True
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            self._kept.append(message)
            if message.get("type") != "http.request":
                return None  # http.disconnect: no whole body to name
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._limit:
                return None  # too large to parse: stop reading, the app gets the rest
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def receive(self) -> Message:
        """The app's `receive`: the messages `read()` took, in order, then the server's."""
        if self._kept:
            return self._kept.popleft()
        return await self._receive()
