"""Stalled gRPC calls from a chosen loopback source address, over an HTTP/2 connection
driven by the `h2` library: grpc's Python client cannot bind a source address. Each call
sends its HEADERS and never a DATA frame (the request message), which is what a caller
stalling the server does. The server's frames are read to keep the connection alive (h2
acknowledges SETTINGS and PING) and to see which calls ended."""

from __future__ import annotations

import contextlib
import socket
import threading

import h2.config
import h2.connection
import h2.events
import h2.exceptions


class RawStalls:
    """One HTTP/2 connection from `source` (e.g. "127.0.0.2") to 127.0.0.1:`port`.
    `open(method, n)` starts n calls that never send their request; `open_count()` is how
    many the server has not ended yet. `close()` drops the connection."""

    def __init__(self, port: int, source: str, host: str = "127.0.0.1") -> None:
        self._authority = f"{host}:{port}"
        self._sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
        self._sock.settimeout(None)
        self._lock = threading.Lock()
        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self._open: set[int] = set()
        self.opened = 0
        self.closed = False
        with self._lock:
            self._conn.initiate_connection()
            self._flush()
        self._reader = threading.Thread(target=self._read, name=f"raw-h2-{source}", daemon=True)
        self._reader.start()

    def _flush(self) -> None:
        """Sends what h2 has queued (with the lock held)."""
        data = self._conn.data_to_send()
        if data:
            self._sock.sendall(data)

    def open(self, method: str, count: int) -> None:
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", self._authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        with self._lock:
            for _ in range(count):
                stream = self._conn.get_next_available_stream_id()
                self._conn.send_headers(stream, headers)  # no end_stream: the message never comes
                self._open.add(stream)
            self.opened += count
            self._flush()

    def open_count(self) -> int:
        with self._lock:
            return 0 if self.closed else len(self._open)

    def _read(self) -> None:
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
                with self._lock:
                    for event in self._conn.receive_data(data):
                        if isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                            self._open.discard(event.stream_id)
                        elif isinstance(event, h2.events.ConnectionTerminated):
                            raise ConnectionError("GOAWAY")
                    self._flush()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        with self._lock:
            self.closed = True

    def close(self) -> None:
        with self._lock:
            self.closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.join(timeout=5)
