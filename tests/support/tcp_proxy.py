"""A TCP proxy for fault injection between a broker and Redis, on a free 127.0.0.1 port.

Plain helper (no pytest): `TcpProxy(upstream_port).start()`, then one fault at a time:

- `delay(seconds)`: every chunk waits `seconds` before it is passed on, in both directions
  (a slow network: a round trip costs twice that);
- `reset()`: every open connection is closed with a TCP RST (SO_LINGER 0), and so is every
  new one until `heal()` (a path that answers RST: a restarting load balancer, a firewall);
- `blackhole()`: bytes vanish: open connections stay open and forward nothing, new ones
  are accepted and forward nothing (a partition: the peer neither answers nor refuses);
- `heal()`: back to passing bytes at once. `stop()` closes everything.

Why in the tests and not `tc netem`: netem needs root and a network namespace of its own
per test, and cannot reset one TCP connection; a proxy in user space does all three faults
on loopback and is part of the test that uses it. A thread per direction per connection:
a broker holds a few dozen Redis connections, not thousands."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

from tokenbroker_bench.servers import free_port

HOST = "127.0.0.1"
Pair = tuple[socket.socket, "socket.socket | None"]
PASS, DELAY, RESET, BLACKHOLE = "pass", "delay", "reset", "blackhole"


def _abort(sock: socket.socket) -> None:
    """Closes with RST instead of FIN: SO_LINGER on, zero seconds."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    def __init__(self, upstream_port: int, *, upstream_host: str = HOST, port: int | None = None):
        self.upstream = (upstream_host, upstream_port)
        self.port = port or free_port()
        self.mode = PASS
        self.seconds = 0.0
        self.accepted = 0
        self._listener: socket.socket | None = None
        self._pairs: set[Pair] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(128)
        listener.settimeout(0.2)
        self._listener = listener
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()
        return self

    def delay(self, seconds: float) -> None:
        self.seconds, self.mode = seconds, DELAY

    def reset(self) -> None:
        self.mode = RESET
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
        for downstream, upstream in pairs:
            _abort(downstream)
            if upstream is not None:
                _abort(upstream)

    def blackhole(self) -> None:
        self.mode = BLACKHOLE

    def heal(self) -> None:
        self.mode = PASS

    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def stop(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()
        self.reset()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.mode == RESET:
                _abort(downstream)
                continue
            threading.Thread(target=self._connect, args=(downstream,), daemon=True).start()

    def _connect(self, downstream: socket.socket) -> None:
        upstream: socket.socket | None = None
        if self.mode != BLACKHOLE:  # a blackhole accepts, then never reaches Redis
            try:
                upstream = socket.create_connection(self.upstream, timeout=2)
                upstream.settimeout(None)
            except OSError:
                _abort(downstream)  # Redis is down: the broker sees a refused connection
                return
        pair = (downstream, upstream)
        with self._lock:
            self._pairs.add(pair)
        if upstream is None:
            self._drain(downstream, pair)
            return
        threading.Thread(target=self._pump, args=(upstream, downstream, pair), daemon=True).start()
        self._pump(downstream, upstream, pair)

    def _drain(self, source: socket.socket, pair: Pair) -> None:
        """A connection opened during a blackhole: reads and drops until it closes."""
        with contextlib.suppress(OSError):
            while source.recv(65536):
                pass
        self._close(pair)

    def _pump(self, source: socket.socket, sink: socket.socket, pair: Pair) -> None:
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                if self.mode == DELAY:
                    time.sleep(self.seconds)
                if self.mode == BLACKHOLE:
                    continue  # dropped: neither side hears of it
                sink.sendall(chunk)
        except OSError:
            pass
        self._close(pair)

    def _close(self, pair: Pair) -> None:
        with self._lock:
            known = pair in self._pairs
            self._pairs.discard(pair)
        if known:
            for sock in pair:
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()


__all__ = ["TcpProxy"]
