"""`WrapOnceInterceptor`: the base of the interceptors that observe the broker's calls
(`tokenbroker.service.metrics_interceptor`, `tokenbroker.service.audit_interceptor`). It
replaces the handlers of one service with wrapped ones, each built once.

Why once: grpc calls `intercept_service` on every call, and hands it the same registered
handler every time. Building the wrapper there would allocate on every call of the hot
path (a unary ValidateToken takes about 200 us in all), and would defeat
`AdmissionInterceptor`, which keeps its own wrapper of whatever the next interceptor
returns only while that is the same object. So each method's wrapper is kept, with the
handler it wraps, and rebuilt only when grpc hands out another handler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc  # type: ignore[import-untyped,unused-ignore]

# More than any service registers: a bound, should a generic handler serve any name.
_MAX_CACHED_HANDLERS = 256

# grpc's handler constructor and behaviour attribute, by (request_streaming, response_streaming).
_SHAPES: dict[tuple[bool, bool], tuple[Callable[..., Any], str]] = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def behavior_of(handler: Any) -> Any:
    """The function a method handler runs: `(request or request iterator, context)`."""
    return getattr(handler, _SHAPES[handler.request_streaming, handler.response_streaming][1])


def with_behavior(handler: Any, behavior: Any) -> Any:
    """A method handler of the same shape and serializers as `handler` that runs `behavior`."""
    make, _ = _SHAPES[handler.request_streaming, handler.response_streaming]
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class WrapOnceInterceptor(grpc.ServerInterceptor):  # type: ignore[misc,unused-ignore]
    """Hands grpc `wrap(name, handler)` for the methods of `service` (`name` without the
    service: "ValidateToken"), built on a method's first call and kept; other services'
    handlers pass untouched."""

    def __init__(self, service: str) -> None:
        self._prefix = f"/{service}/"
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def wrap(self, name: str, handler: Any) -> Any:
        """The handler to serve `name` with instead of `handler` (itself, to leave it)."""
        raise NotImplementedError

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        # Two threads may both build one: either wrapper serves, and the last one is kept.
        wrapped = self.wrap(method[len(self._prefix) :], handler) if method.startswith(self._prefix) else handler
        if method in self._wrapped or len(self._wrapped) < _MAX_CACHED_HANDLERS:
            self._wrapped[method] = (handler, wrapped)
        return wrapped


__all__ = ["WrapOnceInterceptor", "behavior_of", "with_behavior"]
