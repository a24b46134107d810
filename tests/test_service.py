"""The gRPC service and `BrokerClient`, end to end over a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tokenbroker import Broker, Keyring, MemoryStore, ProofSigner, Reason
from tokenbroker.client import BrokerClient
from tokenbroker.errors import (
    AuthenticationError,
    PermissionDeniedError,
    SessionLimitExceededError,
    StoreUnavailableError,
)
from tokenbroker.service import TlsFiles, build_server, serve
from tokenbroker.service.servicer import SERVICE_NAME
from tokenbroker.store import TokenCheck
from tokenbroker.v1 import broker_pb2 as pb
from tokenbroker.v1 import broker_pb2_grpc

from support.grpc_servers import (
    ADMIN_API_KEY,
    API_KEY,
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    DPOP_CLIENT_ID,
    OTHER_AUDIENCE,
    RecordingAudit,
    RunningBroker,
    SecretAuthenticator,
    default_registry,
    make_pki,
    running_broker,
)

TIMEOUT = 10
API_KEY_MD = (("authorization", f"ApiKey {API_KEY}"),)
ADMIN_MD = (("authorization", f"ApiKey {ADMIN_API_KEY}"),)


class DownStore(MemoryStore):
    """A store whose backend has gone away once `down` is set."""

    down = False

    def check_token(self, check: TokenCheck) -> Reason:
        if self.down:
            raise StoreUnavailableError("store unreachable (test)")
        return super().check_token(check)


class GatedStore(MemoryStore):
    """A store whose validations wait for `release` once `gate` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def check_token(self, check: TokenCheck) -> Reason:
        if self.gate:
            self.entered.set()
            assert self.release.wait(TIMEOUT)
        return super().check_token(check)


@pytest.fixture
def broker() -> Iterator[RunningBroker]:
    with running_broker() as running:
        yield running


@pytest.fixture
def channel(broker: RunningBroker) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(broker.target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> broker_pb2_grpc.TokenBrokerStub:
    return broker_pb2_grpc.TokenBrokerStub(channel)


def issue(
    stub: Any, *, audience: str = AUDIENCE, metadata: Any = (), client_id: str = CLIENT_ID, **fields: Any
) -> pb.IssueTokenResponse:
    request = pb.IssueTokenRequest(client_id=client_id, client_secret=CLIENT_SECRET, audience=audience, **fields)
    response: pb.IssueTokenResponse = stub.IssueToken(request, timeout=TIMEOUT, metadata=metadata)
    return response


def validate(stub: Any, token: str, *, audience: str = AUDIENCE, metadata: Any = API_KEY_MD, **fields: Any) -> Any:
    request = pb.ValidateTokenRequest(token=token, audience=audience, **fields)
    return stub.ValidateToken(request, timeout=TIMEOUT, metadata=metadata)


def status_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


# -- issue and validate -----------------------------------------------------------------------


def test_issued_token_validates_over_grpc(stub: Any) -> None:
    issued = issue(stub, scopes=["tools:call"])
    answer = validate(stub, issued.access_token, required_scopes=["tools:call"], request_id="r1")
    assert issued.token_type == "Bearer"
    assert answer.valid
    assert answer.reason == pb.REASON_OK
    assert (answer.client_id, answer.session_id, answer.jti) == (CLIENT_ID, issued.session_id, issued.jti)
    assert list(answer.scopes) == ["tools:call"]
    assert answer.request_id == "r1"


def test_replayed_dpop_proof_is_answered_replayed(stub: Any) -> None:
    signer = ProofSigner()
    issued = issue(stub, client_id=DPOP_CLIENT_ID, dpop_jkt=signer.jkt)  # a bearer client may not send one
    proof = signer.sign("POST", AUDIENCE, issued.access_token)
    fields = {"dpop_proof": proof, "http_method": "POST", "http_uri": AUDIENCE}
    first, again = validate(stub, issued.access_token, **fields), validate(stub, issued.access_token, **fields)
    assert issued.token_type == "DPoP"
    assert first.valid
    assert (again.valid, again.reason) == (False, pb.REASON_REPLAYED)


def test_token_for_another_audience_is_answered_wrong_audience(stub: Any) -> None:
    issued = issue(stub, audience=AUDIENCE)
    answer = validate(stub, issued.access_token, audience=OTHER_AUDIENCE)
    assert (answer.valid, answer.reason) == (False, pb.REASON_WRONG_AUDIENCE)
    assert answer.detail
    assert "\n" not in answer.detail


def test_invalid_token_is_an_answer_not_an_error(stub: Any) -> None:
    answer = validate(stub, "not-a-token")
    assert (answer.valid, answer.reason) == (False, pb.REASON_MALFORMED)


# -- caller authentication --------------------------------------------------------------------


def test_validating_for_an_audience_the_caller_does_not_own_is_permission_denied(stub: Any) -> None:
    issued = issue(stub)
    code = status_of(lambda: validate(stub, issued.access_token, audience="https://not-mine.test/mcp"))
    assert code is grpc.StatusCode.PERMISSION_DENIED


def test_validation_without_api_key_is_unauthenticated(stub: Any) -> None:
    issued = issue(stub)
    assert status_of(lambda: validate(stub, issued.access_token, metadata=())) is grpc.StatusCode.UNAUTHENTICATED


def test_validation_with_unknown_api_key_is_unauthenticated(stub: Any) -> None:
    issued = issue(stub)
    metadata = (("authorization", "ApiKey not-registered"),)
    assert status_of(lambda: validate(stub, issued.access_token, metadata=metadata)) is grpc.StatusCode.UNAUTHENTICATED


def test_error_message_never_contains_the_api_key(stub: Any) -> None:
    metadata = (("authorization", "ApiKey secret-key-material"),)
    with pytest.raises(grpc.RpcError) as raised:
        validate(stub, "x", metadata=metadata)
    assert "secret-key-material" not in (raised.value.details() or "")


def test_validation_without_audience_is_invalid_argument(stub: Any) -> None:
    assert status_of(lambda: validate(stub, "x", audience="")) is grpc.StatusCode.INVALID_ARGUMENT


# -- issuance ---------------------------------------------------------------------------------


def test_issuance_with_wrong_secret_is_unauthenticated(stub: Any) -> None:
    request = pb.IssueTokenRequest(client_id=CLIENT_ID, client_secret="wrong", audience=AUDIENCE)
    assert status_of(lambda: stub.IssueToken(request, timeout=TIMEOUT)) is grpc.StatusCode.UNAUTHENTICATED


def test_issuance_for_a_disallowed_audience_is_permission_denied(stub: Any) -> None:
    code = status_of(lambda: issue(stub, audience="https://elsewhere.test/mcp"))
    assert code is grpc.StatusCode.PERMISSION_DENIED


def test_session_beyond_the_client_limit_is_resource_exhausted() -> None:
    with (
        running_broker(registry=default_registry(max_sessions=2)) as running,
        grpc.insecure_channel(running.target) as ch,
    ):
        stub = broker_pb2_grpc.TokenBrokerStub(ch)
        issue(stub)
        issue(stub)
        assert status_of(lambda: issue(stub)) is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_continuing_an_unknown_session_is_not_found(stub: Any) -> None:
    assert status_of(lambda: issue(stub, session_id="no-such-session")) is grpc.StatusCode.NOT_FOUND


def test_issuance_grants_and_refusals_are_audited_without_the_token(broker: RunningBroker, stub: Any) -> None:
    issued = issue(stub, client_ip="10.1.2.3", metadata=API_KEY_MD)  # a server relays the address
    status_of(lambda: issue(stub, audience="https://elsewhere.test/mcp"))
    grant, refusal = broker.audit.events
    assert (grant["event"], grant["decision"], grant["source_ip"]) == ("issue", "grant", "10.1.2.3")
    assert (grant["client_id"], grant["audience"], grant["jti"]) == (CLIENT_ID, AUDIENCE, issued.jti)
    assert (refusal["decision"], refusal["rule"]) == ("refuse", "audience.not_allowed")
    assert refusal["source_ip"] == "127.0.0.1"  # no client_ip field: the peer address
    assert issued.access_token not in repr(broker.audit.events)
    assert CLIENT_SECRET not in repr(broker.audit.events)


# -- admin --------------------------------------------------------------------------------------


def test_revocation_by_non_admin_is_permission_denied(stub: Any) -> None:
    issued = issue(stub)
    request = pb.RevokeSessionRequest(session_id=issued.session_id)
    code = status_of(lambda: stub.RevokeSession(request, timeout=TIMEOUT, metadata=API_KEY_MD))
    assert code is grpc.StatusCode.PERMISSION_DENIED


def test_admin_revokes_session_then_validation_answers_session_revoked(stub: Any) -> None:
    issued = issue(stub)
    revoked = stub.RevokeSession(
        pb.RevokeSessionRequest(session_id=issued.session_id), timeout=TIMEOUT, metadata=ADMIN_MD
    )
    answer = validate(stub, issued.access_token)
    assert revoked.revoked == 1
    assert (answer.valid, answer.reason) == (False, pb.REASON_SESSION_REVOKED)


def test_admin_lists_a_clients_sessions(stub: Any) -> None:
    issued = issue(stub, client_ip="10.0.0.9", metadata=API_KEY_MD)
    listed = stub.ListSessions(pb.ListSessionsRequest(client_id=CLIENT_ID), timeout=TIMEOUT, metadata=ADMIN_MD)
    assert [(s.session_id, s.audience, s.last_ip) for s in listed.sessions] == [
        (issued.session_id, AUDIENCE, "10.0.0.9")
    ]


def test_jwks_is_public(broker: RunningBroker, stub: Any) -> None:
    jwks = json.loads(stub.GetJwks(pb.GetJwksRequest(), timeout=TIMEOUT).jwks_json)
    assert jwks == broker.broker.jwks()


# -- stream and batch ---------------------------------------------------------------------------


def test_stream_answers_are_matched_by_request_id(stub: Any) -> None:
    good = issue(stub).access_token
    requests = [
        pb.ValidateTokenRequest(token=good if n % 2 == 0 else "garbage", audience=AUDIENCE, request_id=f"req-{n}")
        for n in range(40)
    ]
    answers = {a.request_id: a for a in stub.ValidateTokenStream(iter(requests), timeout=TIMEOUT, metadata=API_KEY_MD)}
    assert sorted(answers) == sorted(r.request_id for r in requests)
    for n in range(40):
        assert answers[f"req-{n}"].valid is (n % 2 == 0)


def test_stream_for_an_audience_the_caller_does_not_own_ends_permission_denied(stub: Any) -> None:
    requests = iter([pb.ValidateTokenRequest(token="x", audience="https://not-mine.test/mcp", request_id="1")])
    code = status_of(lambda: list(stub.ValidateTokenStream(requests, timeout=TIMEOUT, metadata=API_KEY_MD)))
    assert code is grpc.StatusCode.PERMISSION_DENIED


def test_cancelled_stream_leaves_the_server_answering(stub: Any) -> None:
    token = issue(stub).access_token
    hold = threading.Event()

    def requests() -> Iterator[pb.ValidateTokenRequest]:
        yield pb.ValidateTokenRequest(token=token, audience=AUDIENCE, request_id="only")
        hold.wait(TIMEOUT)

    stream = stub.ValidateTokenStream(requests(), timeout=TIMEOUT, metadata=API_KEY_MD)
    assert next(stream).request_id == "only"
    stream.cancel()
    hold.set()
    assert validate(stub, token).valid


def test_batch_answers_in_request_order(stub: Any) -> None:
    good = issue(stub).access_token
    tokens = [good, "garbage", good, "eyJ.x.y", good]
    request = pb.ValidateTokenBatchRequest(
        requests=[pb.ValidateTokenRequest(token=t, audience=AUDIENCE, request_id=str(n)) for n, t in enumerate(tokens)]
    )
    response = stub.ValidateTokenBatch(request, timeout=TIMEOUT, metadata=API_KEY_MD)
    assert [r.request_id for r in response.responses] == ["0", "1", "2", "3", "4"]
    assert [r.valid for r in response.responses] == [True, False, True, False, True]


# -- failure and lifecycle ----------------------------------------------------------------------


def test_store_outage_is_unavailable_never_valid() -> None:
    store = DownStore()
    with running_broker(store=store) as running, grpc.insecure_channel(running.target) as ch:
        stub = broker_pb2_grpc.TokenBrokerStub(ch)
        token = issue(stub).access_token
        store.down = True
        assert status_of(lambda: validate(stub, token)) is grpc.StatusCode.UNAVAILABLE
        batch = pb.ValidateTokenBatchRequest(requests=[pb.ValidateTokenRequest(token=token, audience=AUDIENCE)])
        code = status_of(lambda: stub.ValidateTokenBatch(batch, timeout=TIMEOUT, metadata=API_KEY_MD))
        assert code is grpc.StatusCode.UNAVAILABLE
        stream = stub.ValidateTokenStream(iter(batch.requests), timeout=TIMEOUT, metadata=API_KEY_MD)
        assert status_of(lambda: list(stream)) is grpc.StatusCode.UNAVAILABLE


def test_metrics_count_rpcs_and_validation_reasons(broker: RunningBroker, stub: Any) -> None:
    token = issue(stub).access_token
    validate(stub, token)
    validate(stub, "garbage")
    status_of(lambda: validate(stub, token, metadata=()))
    assert broker.metrics.rpcs == [
        ("IssueToken", "OK"),
        ("ValidateToken", "OK"),
        ("ValidateToken", "OK"),
        ("ValidateToken", "UNAUTHENTICATED"),
    ]
    assert broker.metrics.reasons == ["OK", "MALFORMED"]


def test_health_is_serving_after_start(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_graceful_shutdown_says_not_serving_and_lets_in_flight_request_finish() -> None:
    store = GatedStore()
    with running_broker(store=store, grace=5.0) as running, grpc.insecure_channel(running.target) as ch:
        stub = broker_pb2_grpc.TokenBrokerStub(ch)
        token = issue(stub).access_token
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        store.gate = True
        in_flight = stub.ValidateToken.future(
            pb.ValidateTokenRequest(token=token, audience=AUDIENCE), timeout=TIMEOUT, metadata=API_KEY_MD
        )
        assert store.entered.wait(TIMEOUT)
        with ThreadPoolExecutor(1) as pool:
            stopping = pool.submit(running.server.stop, 5.0)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            store.release.set()
            assert in_flight.result(TIMEOUT).valid
            stopping.result(TIMEOUT)
        assert status_of(lambda: stub.GetJwks(pb.GetJwksRequest(), timeout=1)) is grpc.StatusCode.UNAVAILABLE


async def test_serve_shuts_down_gracefully_on_sigterm() -> None:
    registry = default_registry()
    server = build_server(
        Broker(Keyring.generate(), issuer="https://broker.test"),
        registry=registry,
        authenticator=SecretAuthenticator(registry),
        audit=RecordingAudit(),
        listen="127.0.0.1:0",
    )
    serving = asyncio.create_task(serve(server, grace=1.0))
    while not server.started:  # signal handlers are installed before the server starts
        await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(serving, TIMEOUT)
    assert not server.wait_for_termination(timeout=1)  # False: terminated, not timed out


def test_reflection_lists_the_service(channel: grpc.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
    names = {s.name for s in response.list_services_response.service}
    assert {"tokenbroker.v1.TokenBroker", "grpc.health.v1.Health"} <= names


# -- TLS --------------------------------------------------------------------------------------


def test_tls_round_trip(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = TlsFiles(cert_file=pki.server_cert_file, key_file=pki.server_key_file)
    with running_broker(tls=tls) as running:
        client = BrokerClient(running.target, api_key=API_KEY, root_cert_file=pki.ca_file, timeout=TIMEOUT)
        with client:
            issued = client.issue(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, audience=AUDIENCE)
            assert client.validate(issued.access_token, audience=AUDIENCE).valid


def test_mtls_client_certificate_identifies_the_calling_server(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    registry = default_registry(server_cert_thumbprint=pki.client_thumbprint)
    tls = TlsFiles(pki.server_cert_file, pki.server_key_file, client_ca_file=pki.ca_file, require_client_cert=True)
    with running_broker(tls=tls, registry=registry) as running:
        client = BrokerClient(
            running.target,
            root_cert_file=pki.ca_file,
            cert_file=pki.client_cert_file,
            key_file=pki.client_key_file,
            timeout=TIMEOUT,
        )
        with client:
            issued = client.issue(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, audience=AUDIENCE)
            assert client.validate(issued.access_token, audience=AUDIENCE).valid
            with pytest.raises(PermissionDeniedError):  # server-mtls owns AUDIENCE only
                client.validate(issued.access_token, audience=OTHER_AUDIENCE)


def test_mtls_unregistered_client_certificate_is_unauthenticated(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = TlsFiles(pki.server_cert_file, pki.server_key_file, client_ca_file=pki.ca_file)
    with running_broker(tls=tls) as running:  # the registry knows no certificate
        client = BrokerClient(
            running.target, root_cert_file=pki.ca_file, cert_file=pki.client_cert_file, key_file=pki.client_key_file
        )
        with client, pytest.raises(AuthenticationError, match="not registered"):
            client.validate("x", audience=AUDIENCE)


def test_mtls_connection_without_client_certificate_is_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = TlsFiles(pki.server_cert_file, pki.server_key_file, client_ca_file=pki.ca_file)
    with running_broker(tls=tls) as running:
        client = BrokerClient(running.target, api_key=API_KEY, root_cert_file=pki.ca_file, timeout=TIMEOUT)
        with client, pytest.raises(StoreUnavailableError):  # the handshake fails: fail closed
            client.validate("x", audience=AUDIENCE)


# -- BrokerClient -------------------------------------------------------------------------------


def test_broker_client_sync_round_trip(broker: RunningBroker) -> None:
    signer = ProofSigner()
    with (
        BrokerClient(broker.target, api_key=API_KEY, timeout=TIMEOUT) as client,
        BrokerClient(broker.target, api_key=ADMIN_API_KEY, timeout=TIMEOUT) as admin,
    ):
        issued = client.issue(
            client_id=DPOP_CLIENT_ID,  # binding dpop: CLIENT_ID's bearer binding refuses a dpop_jkt
            client_secret=CLIENT_SECRET,
            audience=AUDIENCE,
            scopes=["tools:call"],
            dpop_jkt=signer.jkt,
        )
        proof = signer.sign("POST", AUDIENCE, issued.access_token)
        answer = client.validate(
            issued.access_token, audience=AUDIENCE, dpop_proof=proof, http_method="POST", http_uri=AUDIENCE
        )
        batch = client.validate_batch(
            [{"token": issued.access_token, "audience": AUDIENCE}, {"token": "garbage", "audience": AUDIENCE}]
        )
        sessions = admin.sessions(DPOP_CLIENT_ID)
        revoked = admin.revoke_client(DPOP_CLIENT_ID)
        after = client.validate(
            issued.access_token,
            audience=AUDIENCE,
            dpop_proof=signer.sign("POST", AUDIENCE, issued.access_token),
            http_method="POST",
            http_uri=AUDIENCE,
        )
        assert (answer.valid, answer.reason, answer.audience, answer.scopes) == (
            True,
            Reason.OK,
            AUDIENCE,
            ("tools:call",),
        )
        assert [v.reason for v in batch] == [Reason.PROOF_MISSING, Reason.MALFORMED]
        assert [(s.session_id, s.client_id) for s in sessions] == [(issued.session_id, DPOP_CLIENT_ID)]
        assert revoked == 1
        assert after.reason is Reason.CLIENT_REVOKED
        assert client.jwks() == broker.broker.jwks()


def test_broker_client_maps_status_codes_to_errors(broker: RunningBroker) -> None:
    with (
        BrokerClient(broker.target, timeout=TIMEOUT) as anonymous,
        BrokerClient(broker.target, api_key=API_KEY, timeout=TIMEOUT) as client,
    ):
        with pytest.raises(AuthenticationError):
            anonymous.validate("x", audience=AUDIENCE)
        with pytest.raises(PermissionDeniedError):
            client.revoke_token("some-jti")
        with pytest.raises(PermissionDeniedError):
            client.validate("x", audience="https://not-mine.test/mcp")


def test_broker_client_maps_session_limit_to_session_limit_exceeded() -> None:
    with running_broker(registry=default_registry(max_sessions=1)) as running, BrokerClient(running.target) as client:
        client.issue(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, audience=AUDIENCE)
        with pytest.raises(SessionLimitExceededError):
            client.issue(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, audience=AUDIENCE)


def test_broker_client_fails_closed_when_broker_is_unreachable() -> None:
    with BrokerClient("127.0.0.1:1", api_key=API_KEY, timeout=2) as client, pytest.raises(StoreUnavailableError):
        client.validate("x", audience=AUDIENCE)


async def test_broker_client_async_round_trip(broker: RunningBroker) -> None:
    async with (
        BrokerClient(broker.target, api_key=API_KEY, timeout=TIMEOUT) as client,
        BrokerClient(broker.target, api_key=ADMIN_API_KEY, timeout=TIMEOUT) as admin,
    ):
        issued = await client.aissue(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, audience=AUDIENCE, once=True)
        first = await client.avalidate(issued.access_token, audience=AUDIENCE, request_id="a")
        again = await client.avalidate(issued.access_token, audience=AUDIENCE, request_id="b")
        batch = await client.avalidate_batch([{"token": "garbage", "audience": AUDIENCE, "request_id": "c"}])
        sessions = await admin.asessions(CLIENT_ID)
        revoked = await admin.arevoke_session(issued.session_id)
        assert (first.valid, first.request_id) == (True, "a")
        assert (again.reason, again.request_id) == (Reason.REPLAYED, "b")  # a single-use token
        assert [(v.reason, v.request_id) for v in batch] == [(Reason.MALFORMED, "c")]
        assert [s.session_id for s in sessions] == [issued.session_id]
        assert revoked == 1
        assert await client.ajwks() == broker.broker.jwks()
        with pytest.raises(PermissionDeniedError):
            await client.arevoke_token(issued.jti)


def test_client_ip_field_is_believed_only_from_a_registered_server(broker: RunningBroker, stub: Any) -> None:
    issue(stub, client_ip="10.9.9.9")
    assert broker.audit.events[-1]["source_ip"] == "127.0.0.1"
    issue(stub, client_ip="10.9.9.9", metadata=API_KEY_MD)
    assert broker.audit.events[-1]["source_ip"] == "10.9.9.9"


def test_a_server_removed_from_the_registry_stops_validating_on_an_open_stream(
    broker: RunningBroker, stub: Any
) -> None:
    issued = issue(stub)
    requests: Any = __import__("queue").Queue()
    answers = stub.ValidateTokenStream(iter(requests.get, None), timeout=TIMEOUT, metadata=API_KEY_MD)
    requests.put(pb.ValidateTokenRequest(token=issued.access_token, audience=AUDIENCE, request_id="1"))
    assert next(answers).valid
    broker.registry.servers.clear()  # the operator removes every server
    requests.put(pb.ValidateTokenRequest(token=issued.access_token, audience=AUDIENCE, request_id="2"))
    with pytest.raises(grpc.RpcError) as raised:
        next(answers)
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    requests.put(None)
