"""Metrics: counters by RPC, code and reason; sub-millisecond latency buckets; /metrics."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry

from tokenbroker.metrics import Metrics


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_rpc_is_counted_by_method_and_code() -> None:
    metrics = Metrics()
    metrics.rpc("ValidateToken", "OK", 0.00004)
    metrics.rpc("ValidateToken", "OK", 0.0003)
    metrics.rpc("IssueToken", "UNAUTHENTICATED", 0.002)
    assert sample(metrics, "tokenbroker_rpc_requests_total", {"method": "ValidateToken", "code": "OK"}) == 2
    assert sample(metrics, "tokenbroker_rpc_requests_total", {"method": "IssueToken", "code": "UNAUTHENTICATED"}) == 1


def test_latency_has_sub_millisecond_buckets() -> None:
    metrics = Metrics()
    metrics.rpc("ValidateToken", "OK", 0.00004)
    metrics.rpc("ValidateToken", "OK", 0.0003)
    bucket = "tokenbroker_rpc_duration_seconds_bucket"
    assert sample(metrics, bucket, {"method": "ValidateToken", "le": "5e-05"}) == 1
    assert sample(metrics, bucket, {"method": "ValidateToken", "le": "0.0005"}) == 2
    assert sample(metrics, bucket, {"method": "ValidateToken", "le": "0.0001"}) == 1


def test_validations_are_counted_by_reason() -> None:
    metrics = Metrics()
    metrics.validation("OK")
    metrics.validation("REPLAYED")
    metrics.validation("REPLAYED")
    assert sample(metrics, "tokenbroker_validations_total", {"reason": "REPLAYED"}) == 2
    assert sample(metrics, "tokenbroker_validations_total", {"reason": "OK"}) == 1


def test_issuance_decisions_are_counted_by_rule() -> None:
    metrics = Metrics()
    metrics.issuance("refuse", "client.pending")
    assert (
        sample(metrics, "tokenbroker_issuance_decisions_total", {"decision": "refuse", "rule": "client.pending"}) == 1
    )


def test_two_instances_do_not_collide_and_a_registry_can_be_given() -> None:
    registry = CollectorRegistry()
    Metrics(registry).validation("OK")
    Metrics().validation("OK")
    assert registry.get_sample_value("tokenbroker_validations_total", {"reason": "OK"}) == 1


def test_metrics_are_served_over_http() -> None:
    metrics = Metrics()
    metrics.validation("EXPIRED")
    port = metrics.start_http(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        metrics.stop_http()
    assert 'tokenbroker_validations_total{reason="EXPIRED"} 1.0' in body
