"""The servicer only translates; the metrics and audit interceptors record what it did.

Served alone, `TokenBrokerServicer` answers every RPC as it does behind `build_server`.
Behind it, the audit lines and metrics are those the servicer used to write itself, and
an audit line is still written the moment its decision is made (so a log that cannot be
written fails the call before an admin action is carried out)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from tokenbroker import Broker, Keyring, MemoryStore
from tokenbroker.audit import AuditLog
from tokenbroker.metrics import Metrics
from tokenbroker.service import build_server
from tokenbroker.service.audit_interceptor import AuditInterceptor
from tokenbroker.service.decisions import DecidingContext, Decision, decide
from tokenbroker.service.metrics_interceptor import MetricsInterceptor
from tokenbroker.service.servicer import SERVICE_NAME, TokenBrokerServicer
from tokenbroker.v1 import broker_pb2 as pb
from tokenbroker.v1 import broker_pb2_grpc

from support.grpc_servers import (
    ADMIN_API_KEY,
    API_KEY,
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    RecordingAudit,
    RecordingMetrics,
    SecretAuthenticator,
    default_registry,
)

TIMEOUT = 10
API_KEY_MD = (("authorization", f"ApiKey {API_KEY}"),)
ADMIN_MD = (("authorization", f"ApiKey {ADMIN_API_KEY}"),)


def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def issue_request(**fields: Any) -> pb.IssueTokenRequest:
    return pb.IssueTokenRequest(
        **({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "audience": AUDIENCE} | fields)
    )


@pytest.fixture
def bare_stub() -> Iterator[Any]:
    """A stub of a grpc server serving the servicer alone: no interceptor at all."""
    registry = default_registry()
    broker = Broker(Keyring.generate(), issuer="https://broker.test", store=MemoryStore())
    servicer = TokenBrokerServicer(broker, registry=registry, authenticator=SecretAuthenticator(registry))
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    broker_pb2_grpc.add_TokenBrokerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield broker_pb2_grpc.TokenBrokerStub(channel)
    finally:
        server.stop(1).wait()
        servicer.close()


def test_the_servicer_alone_only_translates(bare_stub: Any) -> None:
    stub = bare_stub
    issued = stub.IssueToken(issue_request(), timeout=TIMEOUT)
    answer = stub.ValidateToken(
        pb.ValidateTokenRequest(token=issued.access_token, audience=AUDIENCE), timeout=TIMEOUT, metadata=API_KEY_MD
    )
    assert (answer.valid, answer.reason, answer.jti) == (True, pb.REASON_OK, issued.jti)
    refused = status_of(lambda: stub.IssueToken(issue_request(client_secret="wrong"), timeout=TIMEOUT))
    assert refused == (grpc.StatusCode.UNAUTHENTICATED, f"client {CLIENT_ID!r} presented a wrong secret")
    revoke = pb.RevokeSessionRequest(session_id=issued.session_id)
    code, details = status_of(lambda: stub.RevokeSession(revoke, timeout=TIMEOUT, metadata=API_KEY_MD))
    assert (code, details) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "server 'server-a' is not an admin and may not revoke session",
    )
    assert stub.RevokeSession(revoke, timeout=TIMEOUT, metadata=ADMIN_MD).revoked == 1
    again = pb.ValidateTokenRequest(token=issued.access_token, audience=AUDIENCE)
    batch = pb.ValidateTokenBatchRequest(requests=[again])
    (revoked,) = stub.ValidateTokenBatch(batch, timeout=TIMEOUT, metadata=API_KEY_MD).responses
    assert revoked.reason == pb.REASON_SESSION_REVOKED
    streamed = list(stub.ValidateTokenStream(iter(batch.requests), timeout=TIMEOUT, metadata=API_KEY_MD))
    assert [a.reason for a in streamed] == [pb.REASON_SESSION_REVOKED]
    code, _ = status_of(lambda: list(stub.ValidateTokenStream(iter(batch.requests), timeout=TIMEOUT)))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert json.loads(stub.GetJwks(pb.GetJwksRequest(), timeout=TIMEOUT).jwks_json)["keys"]


def test_behind_build_server_the_audit_lines_and_metrics_are_written() -> None:
    registry = default_registry()
    lines, metrics = io.StringIO(), Metrics()
    server = build_server(
        Broker(Keyring.generate(), issuer="https://broker.test", store=MemoryStore()),
        registry=registry,
        authenticator=SecretAuthenticator(registry),
        audit=AuditLog(lines, clock=lambda: 0.0),
        metrics=metrics,
        listen="127.0.0.1:0",
        max_workers=4,
    )
    with server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = broker_pb2_grpc.TokenBrokerStub(channel)
        issued = stub.IssueToken(issue_request(client_ip="10.1.2.3"), timeout=TIMEOUT, metadata=API_KEY_MD)
        status_of(lambda: stub.IssueToken(issue_request(client_id="nobody"), timeout=TIMEOUT))
        revoke = pb.RevokeSessionRequest(session_id=issued.session_id)
        status_of(lambda: stub.RevokeSession(revoke, timeout=TIMEOUT, metadata=API_KEY_MD))
        stub.RevokeSession(revoke, timeout=TIMEOUT, metadata=ADMIN_MD)
        request = pb.ValidateTokenRequest(token=issued.access_token, audience=AUDIENCE)
        stub.ValidateToken(request, timeout=TIMEOUT, metadata=API_KEY_MD)
        batch = pb.ValidateTokenBatchRequest(requests=[request, pb.ValidateTokenRequest(token="x", audience=AUDIENCE)])
        stub.ValidateTokenBatch(batch, timeout=TIMEOUT, metadata=API_KEY_MD)
        list(stub.ValidateTokenStream(iter(batch.requests), timeout=TIMEOUT, metadata=API_KEY_MD))
    chained = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert [line["seq"] for line in chained] == list(range(1, len(chained) + 1))  # the stream's own chain
    written = [{k: v for k, v in line.items() if k not in ("seq", "prev")} for line in chained]
    common = {"time": "1970-01-01T00:00:00.000Z"}
    assert written == [
        common
        | {
            "event": "issue",
            "client": CLIENT_ID,
            "audience": AUDIENCE,
            "decision": "grant",
            "rule": "client.approved",
            "source_ip": "10.1.2.3",
            "relayed_by": "server-a",
            "peer_ip": "127.0.0.1",
            "door": "grpc",
            "auth_method": "client_secret",
            "session": issued.session_id,
            "jti": issued.jti,
            "binding": "bearer",
            "scope": " ".join(issued.scopes),
            "expires_at": issued.expires_at,
        },
        common
        | {
            "event": "issue",
            "client": "nobody",
            "audience": AUDIENCE,
            "decision": "refuse",
            "rule": "client.unknown",
            "source_ip": "127.0.0.1",
            "reason": "client 'nobody' is not registered",
        },
        common
        | {
            "event": "revoke_session",
            "client": "",
            "audience": "",
            "decision": "refuse",
            "rule": "caller.not_admin",
            "source_ip": "127.0.0.1",
            "caller": "server-a",
            "session": issued.session_id,
        },
        common
        | {
            "event": "revoke_session",
            "client": "",
            "audience": "",
            "decision": "grant",
            "rule": "caller.admin",
            "source_ip": "127.0.0.1",
            "caller": "admin",
            "session": issued.session_id,
        },
    ]

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("tokenbroker_issuance_decisions_total", decision="grant", rule="client.approved") == 1
    assert sample("tokenbroker_issuance_decisions_total", decision="refuse", rule="client.unknown") == 1
    assert sample("tokenbroker_rpc_requests_total", method="IssueToken", code="OK") == 1
    assert sample("tokenbroker_rpc_requests_total", method="IssueToken", code="PERMISSION_DENIED") == 1
    assert sample("tokenbroker_rpc_requests_total", method="RevokeSession", code="PERMISSION_DENIED") == 1
    assert sample("tokenbroker_rpc_requests_total", method="RevokeSession", code="OK") == 1
    for method in ("ValidateToken", "ValidateTokenBatch", "ValidateTokenStream"):
        assert sample("tokenbroker_rpc_requests_total", method=method, code="OK") == 1
        assert sample("tokenbroker_rpc_duration_seconds_count", method=method) == 1
    # One revoked-session answer each from ValidateToken, the batch and the stream.
    assert sample("tokenbroker_validations_total", reason="SESSION_REVOKED") == 3
    assert sample("tokenbroker_validations_total", reason="MALFORMED") == 2


class BrokenAudit:
    """An audit log whose disk is full."""

    def record(self, **event: Any) -> None:
        raise OSError("no space left on device")


def test_an_audit_line_that_cannot_be_written_fails_the_call_before_the_admin_action() -> None:
    registry = default_registry()
    broker = Broker(Keyring.generate(), issuer="https://broker.test", store=MemoryStore())
    issued = broker.issue(client_id=CLIENT_ID, audience=AUDIENCE)
    metrics = RecordingMetrics()
    server = build_server(
        broker,
        registry=registry,
        authenticator=SecretAuthenticator(registry),
        audit=BrokenAudit(),
        metrics=metrics,
        listen="127.0.0.1:0",
        max_workers=4,
    )
    internal = (grpc.StatusCode.INTERNAL, "internal error: see the broker's log")
    with server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = broker_pb2_grpc.TokenBrokerStub(channel)
        revoke = pb.RevokeSessionRequest(session_id=issued.session_id)
        assert status_of(lambda: stub.RevokeSession(revoke, timeout=TIMEOUT, metadata=ADMIN_MD)) == internal
        assert status_of(lambda: stub.IssueToken(issue_request(), timeout=TIMEOUT)) == internal
    assert broker.validate(issued.access_token, audience=AUDIENCE).valid  # not revoked
    assert metrics.rpcs == [("RevokeSession", "INTERNAL"), ("IssueToken", "INTERNAL")]
    assert metrics.issuances == []  # the decision counts once its line is written


# -- the interceptors, without a server ------------------------------------------------------


class FakeContext:
    """As grpc's context: `abort` keeps the code and raises."""

    def __init__(self) -> None:
        self.status: Any = None

    def abort(self, code: Any, details: str) -> None:
        self.status = code
        raise Exception(details)  # as grpc does

    def code(self) -> Any:
        return self.status


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def method_path(name: str) -> str:
    return f"/{SERVICE_NAME}/{name}"


def answers(context: Any, closed: list[bool]) -> Iterator[pb.ValidateTokenResponse]:
    try:
        yield pb.ValidateTokenResponse(valid=True, reason=pb.REASON_OK)
        yield pb.ValidateTokenResponse(valid=False, reason=pb.REASON_EXPIRED)
    finally:
        closed.append(True)


def test_a_stream_the_caller_leaves_is_counted_cancelled_and_closed() -> None:
    metrics, closed = RecordingMetrics(), list[bool]()
    handler = grpc.stream_stream_rpc_method_handler(lambda requests, context: answers(context, closed))
    stream_method = Details(method_path("ValidateTokenStream"))
    wrapped = MetricsInterceptor(metrics).intercept_service(lambda _: handler, stream_method)
    stream = wrapped.stream_stream(iter(()), FakeContext())
    assert next(stream).reason == pb.REASON_OK
    stream.close()  # what dropping the stream does when grpc stops iterating it
    assert (metrics.rpcs, metrics.reasons, closed) == ([("ValidateTokenStream", "CANCELLED")], ["OK"], [True])


def test_an_aborted_call_is_counted_with_the_status_it_aborted_with() -> None:
    metrics = RecordingMetrics()

    def refuse(request: Any, context: Any) -> Any:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    handler = grpc.unary_unary_rpc_method_handler(refuse)
    wrapped = MetricsInterceptor(metrics).intercept_service(lambda _: handler, Details(method_path("ValidateToken")))
    with pytest.raises(Exception, match="no"):
        wrapped.unary_unary(pb.ValidateTokenRequest(), FakeContext())
    assert (metrics.rpcs, metrics.reasons) == ([("ValidateToken", "PERMISSION_DENIED")], [])


def test_each_handler_is_wrapped_once_and_other_services_are_left_alone() -> None:
    interceptors = (MetricsInterceptor(RecordingMetrics()), AuditInterceptor(RecordingAudit()))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: None)
    for interceptor in interceptors:
        first = interceptor.intercept_service(lambda _: handler, Details(method_path("IssueToken")))
        assert first is not handler
        assert interceptor.intercept_service(lambda _: handler, Details(method_path("IssueToken"))) is first
        health = Details("/grpc.health.v1.Health/Check")
        assert interceptor.intercept_service(lambda _: handler, health) is handler
        assert interceptor.intercept_service(lambda _: None, Details(method_path("Nope"))) is None
    validate = Details(method_path("ValidateToken"))
    assert interceptors[1].intercept_service(lambda _: handler, validate) is handler  # it decides nothing


def test_a_decision_goes_to_the_context_that_takes_it_and_nowhere_else() -> None:
    decision = Decision("revoke_token", "", "", "grant", "caller.admin", "10.0.0.1", {"caller": "admin", "jti": "j"})
    decide(FakeContext(), decision)  # a plain context: nobody records it
    taken: list[Decision] = []
    context = DecidingContext(FakeContext(), taken.append)
    decide(context, decision)
    assert taken == [decision]
    assert context.code() is None  # the rest is the grpc context's
