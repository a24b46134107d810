"""Prometheus metrics: requests per RPC and status code, validations per reason, issuance
decisions per rule, and RPC latency with sub-millisecond buckets (a cached validation
takes tens of microseconds; the default buckets start at 5 ms and would hide it)."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)


class Metrics:
    """The broker's metrics in their own `CollectorRegistry` (a fresh one by default, so
    several brokers or tests in one process do not collide)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "tokenbroker_rpc_requests",
            "gRPC requests handled, by method and status code",
            ("method", "code"),
            registry=self.registry,
        )
        self.validations = Counter(
            "tokenbroker_validations",
            "Token validations, by reason (OK for a valid token)",
            ("reason",),
            registry=self.registry,
        )
        self.issuances = Counter(
            "tokenbroker_issuance_decisions",
            "Token issuance decisions, by decision and policy rule",
            ("decision", "rule"),
            registry=self.registry,
        )
        self.audit_suppressed_lines = Counter(
            "tokenbroker_audit_suppressed",
            "Audit lines of unauthenticated refusals not written: over the audit_refusals_per_second rate",
            registry=self.registry,
        )
        self.admission_refusals = Counter(
            "tokenbroker_admission_refusals",
            "Calls refused or dropped before reaching the service, by call class and reason",
            ("call_class", "reason"),
            registry=self.registry,
        )
        self.detections = Counter(
            "tokenbroker_detections",
            "Detection findings (tokenbroker.detection), by signal and the action taken",
            ("signal", "action"),
            registry=self.registry,
        )
        self.events_dropped = Counter(
            "tokenbroker_events_dropped",
            "Events a sink did not get (queue: the delivery queue was full; log, audit, redis, webhook: that "
            "sink failed or gave up; follower: a slow reader of WatchEvents lost it)",
            ("sink",),
            registry=self.registry,
        )
        self.latency = Histogram(
            "tokenbroker_rpc_duration_seconds",
            "gRPC handling time, by method",
            ("method",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._http: tuple[Any, threading.Thread] | None = None
        # `labels()` costs microseconds per call on the validation path; the label sets are
        # few and fixed (methods, status codes, reasons), so their children are kept.
        self._children: dict[tuple[int | str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key: tuple[int | str, ...] = (id(metric), *labels)  # the metrics live as long as this object
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def rpc(self, method: str, code: str, seconds: float) -> None:
        """One handled RPC: `code` is the gRPC status name ("OK", "UNAUTHENTICATED", ...)."""
        self._child(self.requests, method, code).inc()
        self._child(self.latency, method).observe(seconds)

    def validation(self, reason: str) -> None:
        """One validation answer, by reason name ("OK", "EXPIRED", "REPLAYED", ...)."""
        self._child(self.validations, reason).inc()

    def issuance(self, decision: str, rule: str) -> None:
        """One issuance decision ("grant"/"refuse") and the rule that made it."""
        self.issuances.labels(decision, rule).inc()

    def detection(self, signal: str, action: str) -> None:
        self._child(self.detections, signal, action).inc()

    def event_dropped(self, sink: str) -> None:
        """An event that did not reach `sink` (see `tokenbroker_events_dropped`'s help)."""
        self._child(self.events_dropped, sink).inc()

    def audit_suppressed(self, count: int = 1) -> None:
        """`count` audit lines of unauthenticated refusals were dropped by the audit rate limit."""
        self.audit_suppressed_lines.inc(count)

    def admission_refused(self, call_class: str, reason: str) -> None:
        """A call refused or dropped by admission control: `call_class` ("caller",
        "anonymous", "health", ..., "any" for grpc's own bound), `reason` ("bound",
        "per_source", "message_timeout", "unauthenticated", "server_bound")."""
        self._child(self.admission_refusals, call_class, reason).inc()

    def watch_redis_clock(self, store: Any) -> None:
        """Exposes `store.observed_clock_skew` (Redis time - broker time, seconds, from the
        store's last script reply; NaN before any) as `tokenbroker_redis_clock_skew_seconds`."""
        gauge = Gauge(
            "tokenbroker_redis_clock_skew_seconds",
            "Redis clock minus this broker's clock in the last Redis script reply (bound: max_clock_skew_seconds)",
            registry=self.registry,
        )

        def skew() -> float:
            value = store.observed_clock_skew
            return float("nan") if value is None else float(value)

        gauge.set_function(skew)

    def start_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serves /metrics on `host:port` from a daemon thread; returns the bound port
        (useful with port 0)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_address[1])

    def stop_http(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None

    def render(self) -> bytes:
        """The exposition text, as /metrics serves it."""
        return generate_latest(self.registry)


__all__ = ["LATENCY_BUCKETS", "Metrics"]
