"""`HealthStatus`: the `grpc.health.v1.Health` servicer of the broker.

Written here rather than taken from `grpc_health.v1.health.HealthServicer` because that one
deadlocks: it sends to Watch streams while holding its lock, a send completes only on the
server's polling thread, and the polling thread takes the same lock when a Watch closes
(seen as a `serve` that never exits on SIGTERM after a Watch was cancelled). Here nothing
is sent with the lock held. Same behaviour otherwise: Check answers a service's status or
NOT_FOUND, Watch sends the status at once and on every change (SERVICE_UNKNOWN for an
unknown service), `enter_graceful_shutdown` sets every service NOT_SERVING and ignores
later changes. The overall ("") status is also `overall`, read without any lock (the
admission interceptor answers Checks from it on the polling thread when their share of
threads is full)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc  # type: ignore[import-untyped,unused-ignore]
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped,unused-ignore]

OVERALL = ""
_Send = Callable[[Any], Any]


class HealthStatus(health_pb2_grpc.HealthServicer):  # type: ignore[misc,unused-ignore]
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, int] = {OVERALL: health_pb2.HealthCheckResponse.SERVING}
        self._watchers: dict[str, set[_Send]] = {}
        self._shutting_down = False
        self.overall: int = health_pb2.HealthCheckResponse.SERVING

    def Check(self, request: Any, context: Any) -> Any:
        with self._lock:
            status = self._status.get(request.service)
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(self, request: Any, context: Any, send_response_callback: _Send) -> None:
        service = request.service
        with self._lock:
            status = self._status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            self._watchers.setdefault(service, set()).add(send_response_callback)
        context.add_callback(lambda: self._forget(service, send_response_callback))
        send_response_callback(health_pb2.HealthCheckResponse(status=status))

    def _forget(self, service: str, send: _Send) -> None:
        with self._lock:
            watchers = self._watchers.get(service)
            if watchers is not None:
                watchers.discard(send)
                if not watchers:
                    del self._watchers[service]
        send(None)  # ends the stream

    def set(self, service: str, status: int) -> None:
        with self._lock:
            if self._shutting_down:
                return
            self._set_locked(service, status)
            watchers = list(self._watchers.get(service, ()))
        for send in watchers:
            send(health_pb2.HealthCheckResponse(status=status))

    def _set_locked(self, service: str, status: int) -> None:
        self._status[service] = status
        if service == OVERALL:
            self.overall = status

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good (load balancers stop sending)."""
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        with self._lock:
            if self._shutting_down:
                return
            self._shutting_down = True
            for service in self._status:
                self._set_locked(service, not_serving)
            watchers = [(s, list(w)) for s, w in self._watchers.items() if s in self._status]
        for _, sends in watchers:
            for send in sends:
                send(health_pb2.HealthCheckResponse(status=not_serving))


# The sync server runs Watch without holding a worker thread (grpc's experimental flag).
HealthStatus.Watch.experimental_non_blocking = True  # type: ignore[attr-defined]

__all__ = ["OVERALL", "HealthStatus"]
