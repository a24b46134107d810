"""Issue #8, the issuance side: the service boundary and client authentication, against
real `tokenbroker serve` processes (memory store), real gRPC clients and the real CLI.

Items: 2c (assertion `aud` is one string), 5 (bounded fields, rate-limited audit lines of
unauthenticated refusals, ListSessions audited), 6 (no client enumeration, failed
authentications rate-limited per client id and per source), 9 (no secret on the command
line), 10 (only relay servers owning the audience are believed about `client_ip`), 11
(the client's `binding` decides)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ed25519

from tokenbroker import Keyring, MemoryStore, ProofSigner
from tokenbroker.cli import main
from tokenbroker.client_assertion import make_client_assertion, public_jwk
from tokenbroker.client_auth import AUTH_FAILED, ClientAuthenticator
from tokenbroker.errors import AuthenticationError, RateLimitedError
from tokenbroker.ratelimit import KeyedBuckets, source_key
from tokenbroker.registry import Binding, ClientRecord, ClientStatus, ServerRecord
from tokenbroker.registry_file import FileRegistry, generate_secret, hash_secret
from tokenbroker.store.base import Remembered
from tokenbroker.v1 import broker_pb2 as pb
from tokenbroker.v1 import broker_pb2_grpc
from tokenbroker_bench.servers import free_port

from support.broker_process import BrokerProcess, broker_env

ISSUER = "https://broker.hardening.test"
SERVER_A = "https://a.mcp.test/mcp"
SERVER_B = "https://b.mcp.test/mcp"
KEY_A, KEY_GATEWAY_A, KEY_GATEWAY_B, KEY_ADMIN = (generate_secret() for _ in range(4))
SECRET = generate_secret()
TIMEOUT = 10
CLI = [sys.executable, "-c", "from tokenbroker.cli import main; main()"]


@dataclass
class Deployment:
    """A registry, keys and client credentials for the broker processes of a test."""

    workdir: Path
    client_key: ed25519.Ed25519PrivateKey
    env: dict[str, str]
    audit_offset: int = 0  # audit() returns the lines written after this many bytes

    def broker(self, **settings: str) -> BrokerProcess:
        extra = {f"TOKENBROKER_{name.upper()}": value for name, value in settings.items()}
        return BrokerProcess(self.workdir, {**self.env, **extra}).start()

    def assertion(self, client_id: str = "agent", *, key: Any = None, **claims: Any) -> str:
        if not claims:
            return make_client_assertion(key or self.client_key, client_id, ISSUER)
        now = int(time.time())
        body = {"iss": client_id, "sub": client_id, "aud": ISSUER, "iat": now, "exp": now + 60}
        body |= {"jti": uuid.uuid4().hex, **claims}
        return jwt.encode(body, key or self.client_key, algorithm="EdDSA")

    @property
    def audit_file(self) -> Path:
        return self.workdir / "audit.jsonl"

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_file.exists():
            return []
        with self.audit_file.open("rb") as f:
            f.seek(self.audit_offset)
            return [json.loads(line) for line in f.read().splitlines()]


def _client(client_id: str, **fields: Any) -> ClientRecord:
    values: dict[str, Any] = {
        "status": ClientStatus.APPROVED,
        "allowed_audiences": (SERVER_A, SERVER_B),
        "allowed_scopes": ("tools:call",),
    }
    return ClientRecord(client_id, **(values | fields))


def deploy(tmp_path: Path) -> Deployment:
    Keyring.generate().save(tmp_path / "keys.json")
    key = ed25519.Ed25519PrivateKey.generate()
    registry = FileRegistry(tmp_path / "registry.toml")
    jwk = public_jwk(key)
    for record in (
        _client("agent", public_jwk=jwk),  # binding dpop, the default
        _client("bearer-agent", public_jwk=jwk, binding=Binding.BEARER),
        _client("mtls-agent", public_jwk=jwk, binding=Binding.MTLS),
        _client("secret-agent", secret_hash=hash_secret(SECRET), binding=Binding.BEARER),
        _client("cidr-agent", public_jwk=jwk, allowed_cidrs=("10.0.0.0/8",)),
        _client("pending-agent", public_jwk=jwk, status=ClientStatus.PENDING),
    ):
        registry.add_client(record)
    registry.add_server(ServerRecord("server-a", audiences=(SERVER_A,), api_key_hash=hash_secret(KEY_A)))
    for name, audience, api_key in (("gateway-a", SERVER_A, KEY_GATEWAY_A), ("gateway-b", SERVER_B, KEY_GATEWAY_B)):
        registry.add_server(
            ServerRecord(name, audiences=(audience,), api_key_hash=hash_secret(api_key), relay_client_ip=True)
        )
    registry.add_server(ServerRecord("ops", admin=True, api_key_hash=hash_secret(KEY_ADMIN)))
    env = broker_env(tmp_path, ISSUER, log_level="warning")
    return Deployment(tmp_path, key, env)


@pytest.fixture
def fresh(tmp_path: Path) -> Deployment:
    """A deployment of this test alone, for brokers with settings of their own."""
    return deploy(tmp_path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, BrokerProcess]]:
    """One broker with the default settings for the tests that need no others."""
    deployment = deploy(tmp_path_factory.mktemp("hardening"))
    process = deployment.broker()
    try:
        yield deployment, process
    finally:
        assert process.stop() == 0, process.log.read_text()[-2000:]


@pytest.fixture
def deployment(shared: tuple[Deployment, BrokerProcess]) -> Deployment:
    """The shared deployment; its audit() holds only the lines of the current test."""
    found = shared[0]
    found.audit_offset = found.audit_file.stat().st_size if found.audit_file.exists() else 0
    return found


@pytest.fixture
def broker(shared: tuple[Deployment, BrokerProcess], deployment: Deployment) -> BrokerProcess:
    return shared[1]


@pytest.fixture
def stub(broker: BrokerProcess) -> Iterator[Any]:
    with grpc.insecure_channel(broker.target) as channel:
        yield broker_pb2_grpc.TokenBrokerStub(channel)


def api_key(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"ApiKey {key}"),)


def issue(stub: Any, deployment: Deployment, client_id: str = "agent", metadata: Any = (), **fields: Any) -> Any:
    fields.setdefault("audience", SERVER_A)
    if "client_secret" not in fields:
        fields.setdefault("client_assertion", deployment.assertion(client_id))
    if client_id in ("agent", "cidr-agent", "pending-agent"):
        fields.setdefault("dpop_jkt", ProofSigner().jkt)
    return stub.IssueToken(pb.IssueTokenRequest(client_id=client_id, **fields), timeout=TIMEOUT, metadata=metadata)


def refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def lines(deployment: Deployment, **match: Any) -> list[dict[str, Any]]:
    return [e for e in deployment.audit() if all(e.get(k) == v for k, v in match.items())]


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


def cli(deployment: Deployment, *args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Any:
    full_env = {**os.environ, **deployment.env, **(env or {})}
    return subprocess.run(
        [*CLI, *args], env=full_env, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


# -- item 2c: the assertion's aud is one string ------------------------------------------------


def test_assertion_with_an_audience_array_containing_the_issuer_is_refused(deployment: Deployment, stub: Any) -> None:
    assertion = deployment.assertion(aud=[ISSUER, "https://attacker.test"])
    code, details = refusal(lambda: issue(stub, deployment, client_assertion=assertion))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "aud must be one string" in details
    assert lines(deployment, event="issue", rule="credential.assertion_audience")


def test_assertion_for_the_token_endpoint_is_accepted(deployment: Deployment, stub: Any) -> None:
    issued = issue(stub, deployment, client_assertion=deployment.assertion(aud=f"{ISSUER}/token"))
    assert issued.token_type == "DPoP"


def test_assertion_for_the_issuer_with_a_trailing_slash_is_accepted(deployment: Deployment, stub: Any) -> None:
    assert issue(stub, deployment, client_assertion=deployment.assertion(aud=f"{ISSUER}/")).access_token


def test_assertion_for_a_path_below_the_issuer_is_refused(deployment: Deployment, stub: Any) -> None:
    assertion = deployment.assertion(aud=f"{ISSUER}/other")
    code, details = refusal(lambda: issue(stub, deployment, client_assertion=assertion))
    assert (code, "token endpoint" in details) == (grpc.StatusCode.UNAUTHENTICATED, True)


class ScriptedStore(MemoryStore):
    """A store whose `remember` gives a set answer and keeps what it was asked."""

    def __init__(self, answer: Remembered) -> None:
        super().__init__()
        self.answer = answer
        self.asked: list[dict[str, Any]] = []

    def remember(self, key: str, **kwargs: Any) -> Remembered:
        self.asked.append({"key": key, **kwargs})
        return self.answer


def scripted(tmp_path: Path, answer: Remembered) -> tuple[ClientAuthenticator, ScriptedStore, Any]:
    key = ed25519.Ed25519PrivateKey.generate()
    registry = FileRegistry(tmp_path / "registry.toml")
    registry.add_client(_client("agent", public_jwk=public_jwk(key)))
    store = ScriptedStore(answer)
    return ClientAuthenticator(registry, store, assertion_audience=ISSUER), store, key


def test_assertion_signed_before_the_store_lost_its_state_is_refused_as_stale(tmp_path: Path) -> None:
    auth, _, key = scripted(tmp_path, Remembered.STALE)
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate(
            client_id="agent", client_assertion=make_client_assertion(key, "agent", ISSUER), audience=SERVER_A
        )
    assert info.value.rule == "credential.assertion_stale"  # type: ignore[attr-defined]
    assert "replay state was reset" in str(info.value)
    assert "sign a new assertion" in str(info.value)


def test_assertion_over_the_clients_record_quota_is_rate_limited(tmp_path: Path) -> None:
    auth, _, key = scripted(tmp_path, Remembered.FULL)
    with pytest.raises(RateLimitedError) as info:
        auth.authenticate(
            client_id="agent", client_assertion=make_client_assertion(key, "agent", ISSUER), audience=SERVER_A
        )
    assert info.value.rule == "credential.quota"  # type: ignore[attr-defined]


def test_assertion_without_iat_counts_from_the_earliest_time_it_could_be_signed(tmp_path: Path) -> None:
    auth, store, key = scripted(tmp_path, Remembered.NEW)
    exp = int(time.time()) + 60
    claims = {"iss": "agent", "sub": "agent", "aud": ISSUER, "exp": exp, "jti": uuid.uuid4().hex}
    auth.authenticate(
        client_id="agent",
        client_assertion=jwt.encode(claims, key, algorithm="EdDSA"),
        audience=SERVER_A,
        dpop_jkt=ProofSigner().jkt,
    )
    assert (store.asked[0]["client_id"], store.asked[0]["issued_at"]) == ("agent", exp - auth.max_assertion_lifetime)


def test_token_endpoint_is_a_constructor_argument(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    registry = FileRegistry(tmp_path / "registry.toml")
    registry.add_client(_client("agent", public_jwk=public_jwk(key)))
    endpoint = "https://public.broker.test/oauth/token"
    auth = ClientAuthenticator(registry, MemoryStore(), assertion_audience=ISSUER, token_endpoint=endpoint)
    record = auth.authenticate(
        client_id="agent",
        client_assertion=make_client_assertion(key, "agent", endpoint),
        audience=SERVER_A,
        dpop_jkt=ProofSigner().jkt,
    )
    assert record.client_id == "agent"


# -- item 5: bounded fields, rate-limited audit lines, ListSessions audited ----------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"client_id": "a" * 257},
        {"audience": "https://a.mcp.test/" + "p" * 2048},
        {"session_id": "s" * 257},
        {"client_assertion": "e" * (8 * 1024 + 1)},
        {"client_secret": "x" * 1025},
        {"scopes": ["tools:call"] * 65},
        {"scopes": ["s" * 257]},
        {"client_ip": "1" * 129},
        {"dpop_jkt": "j" * 129},
        {"cert_thumbprint": "c" * 129},
    ],
    ids=lambda f: next(iter(f)),
)
def test_oversized_issue_field_is_invalid_argument_and_never_logged(
    deployment: Deployment, stub: Any, fields: dict[str, Any]
) -> None:
    request = {"client_id": "agent", "audience": SERVER_A, "client_secret": "x"} | fields
    code, details = refusal(lambda: stub.IssueToken(pb.IssueTokenRequest(**request), timeout=TIMEOUT))
    name = next(iter(fields))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert name in details
    assert "at most" in details
    assert deployment.audit() == []


@pytest.mark.parametrize(
    "fields",
    [
        {"token": "t" * (8 * 1024 + 1)},
        {"audience": SERVER_A + "x" * 2048},
        {"dpop_proof": "p" * (8 * 1024 + 1)},
        {"http_uri": SERVER_A + "x" * 2048},
        {"http_method": "M" * 17},
        {"request_id": "r" * 257},
        {"required_scopes": ["tools:call"] * 65},
    ],
    ids=lambda f: next(iter(f)),
)
def test_oversized_validate_field_is_invalid_argument(stub: Any, fields: dict[str, Any]) -> None:
    request = pb.ValidateTokenRequest(**({"token": "x", "audience": SERVER_A} | fields))
    code, details = refusal(lambda: stub.ValidateToken(request, timeout=TIMEOUT, metadata=api_key(KEY_A)))
    assert (code, next(iter(fields)) in details) == (grpc.StatusCode.INVALID_ARGUMENT, True)


def test_oversized_field_is_refused_before_the_caller_is_looked_up(stub: Any) -> None:
    request = pb.ValidateTokenRequest(token="t" * 9000, audience=SERVER_A)
    code, _ = refusal(lambda: stub.ValidateToken(request, timeout=TIMEOUT))  # no API key at all
    assert code is grpc.StatusCode.INVALID_ARGUMENT


def test_audit_lines_of_unauthenticated_refusals_are_rate_limited_and_counted(fresh: Deployment) -> None:
    metrics_port = free_port()
    process = fresh.broker(
        audit_refusal_burst="5",
        audit_refusals_per_second="0",
        metrics_port=str(metrics_port),
        source_auth_failure_burst="1000",
        client_auth_failure_burst="1000",
    )
    try:
        with grpc.insecure_channel(process.target) as channel:
            stub = broker_pb2_grpc.TokenBrokerStub(channel)
            for n in range(30):
                request = pb.IssueTokenRequest(client_id=f"ghost-{n}", client_secret="x", audience=SERVER_A)
                refusal(lambda request=request: stub.IssueToken(request, timeout=TIMEOUT))
        assert len(lines(fresh, event="issue", decision="refuse")) == 5
        assert metric(metrics_port, "tokenbroker_audit_suppressed_total") == 25
    finally:
        assert process.stop() == 0


def test_suppressed_audit_lines_are_summarised_before_the_next_line(fresh: Deployment) -> None:
    process = fresh.broker(audit_refusal_burst="2", audit_refusals_per_second="0")
    try:
        with grpc.insecure_channel(process.target) as channel:
            stub = broker_pb2_grpc.TokenBrokerStub(channel)
            for n in range(7):
                request = pb.IssueTokenRequest(client_id=f"ghost-{n}", client_secret="x", audience=SERVER_A)
                refusal(lambda request=request: stub.IssueToken(request, timeout=TIMEOUT))
            issue(stub, fresh)  # a grant is always written, after the summary
        events = fresh.audit()
        assert [e["event"] for e in events] == ["issue", "issue", "audit_suppressed", "issue"]
        assert (events[2]["suppressed"], events[2]["rule"]) == (5, "audit.rate_limited")
        assert events[3]["decision"] == "grant"
    finally:
        assert process.stop() == 0


def test_refusals_of_authenticated_clients_are_always_audited(fresh: Deployment) -> None:
    process = fresh.broker(audit_refusal_burst="1", audit_refusals_per_second="0")
    try:
        with grpc.insecure_channel(process.target) as channel:
            stub = broker_pb2_grpc.TokenBrokerStub(channel)
            for _ in range(4):  # the client proves itself each time, then asks for a foreign audience
                refusal(lambda: issue(stub, fresh, audience="https://elsewhere.test/mcp"))
        assert len(lines(fresh, rule="audience.not_allowed")) == 4
    finally:
        assert process.stop() == 0


def test_list_sessions_is_audited_like_the_other_admin_rpcs(deployment: Deployment, stub: Any) -> None:
    issue(stub, deployment)
    stub.ListSessions(pb.ListSessionsRequest(client_id="agent"), timeout=TIMEOUT, metadata=api_key(KEY_ADMIN))
    refusal(lambda: stub.ListSessions(pb.ListSessionsRequest(client_id="agent"), metadata=api_key(KEY_A)))
    granted, refused = lines(deployment, event="list_sessions")
    assert (granted["decision"], granted["rule"], granted["caller"], granted["client"]) == (
        "grant",
        "caller.admin",
        "ops",
        "agent",
    )
    assert (refused["decision"], refused["caller"]) == ("refuse", "server-a")


# -- item 6: one answer for every failed client authentication -----------------------------------


def test_unknown_client_wrong_credential_and_wrong_credential_type_get_one_answer(
    deployment: Deployment, stub: Any
) -> None:
    other_key = ed25519.Ed25519PrivateKey.generate()
    attempts = {
        "unknown client, assertion": {"client_id": "ghost", "client_assertion": deployment.assertion("ghost")},
        "unknown client, secret": {"client_id": "ghost", "client_secret": SECRET},
        "wrong key": {"client_id": "agent", "client_assertion": deployment.assertion("agent", key=other_key)},
        "wrong secret": {"client_id": "secret-agent", "client_secret": generate_secret()},
        "secret to a key client": {"client_id": "agent", "client_secret": SECRET},
        "assertion to a secret client": {
            "client_id": "secret-agent",
            "client_assertion": deployment.assertion("secret-agent"),
        },
    }
    answers = {
        name: refusal(lambda f=fields: stub.IssueToken(pb.IssueTokenRequest(audience=SERVER_A, **f), timeout=TIMEOUT))
        for name, fields in attempts.items()
    }
    assert set(answers.values()) == {(grpc.StatusCode.UNAUTHENTICATED, AUTH_FAILED)}, answers


def test_failed_authentication_audit_lines_keep_the_precise_rule(deployment: Deployment, stub: Any) -> None:
    refusal(lambda: issue(stub, deployment, "ghost", client_secret=SECRET))
    refusal(lambda: issue(stub, deployment, "agent", client_secret=SECRET))
    refusal(lambda: issue(stub, deployment, "secret-agent", client_secret="wrong"))
    rules = [e["rule"] for e in lines(deployment, event="issue", decision="refuse")]
    assert rules == ["client.unknown", "credential.no_secret", "credential.secret_invalid"]


def test_status_is_revealed_only_after_the_credential_verifies(deployment: Deployment, stub: Any) -> None:
    wrong = deployment.assertion("pending-agent", key=ed25519.Ed25519PrivateKey.generate())
    assert refusal(lambda: issue(stub, deployment, "pending-agent", client_assertion=wrong)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        AUTH_FAILED,
    )
    code, details = refusal(lambda: issue(stub, deployment, "pending-agent"))
    assert (code, "pending approval" in details) == (grpc.StatusCode.PERMISSION_DENIED, True)


def _median_seconds(call: Any, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        with pytest.raises(Exception):  # noqa: B017,PT011 (every attempt here is refused)
            call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def test_unknown_client_costs_what_a_known_client_with_a_wrong_key_costs(tmp_path: Path) -> None:
    key, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    registry = FileRegistry(tmp_path / "registry.toml")
    registry.add_client(_client("agent", public_jwk=public_jwk(key)))
    auth_kw: dict[str, Any] = {"audience": SERVER_A, "client_ip": "127.0.0.1"}
    auth = ClientAuthenticator(
        registry, MemoryStore(), assertion_audience=ISSUER, client_failure_burst=10**6, source_failure_burst=10**6
    )
    wrong_key = make_client_assertion(other, "agent", ISSUER)
    unknown = make_client_assertion(other, "ghost", ISSUER)
    medians: dict[str, list[float]] = {"known, wrong key": [], "unknown": []}
    for _ in range(5):  # interleaved rounds: machine noise falls on both alike
        medians["known, wrong key"].append(
            _median_seconds(lambda: auth.authenticate(client_id="agent", client_assertion=wrong_key, **auth_kw), 40)
        )
        medians["unknown"].append(
            _median_seconds(lambda: auth.authenticate(client_id="ghost", client_assertion=unknown, **auth_kw), 40)
        )
    known, ghost = (statistics.median(v) for v in medians.values())
    # Without the dummy verification an unknown client answers several times faster.
    assert 0.5 < ghost / known < 2.0, medians


def test_failed_authentications_are_rate_limited_per_client_id(fresh: Deployment) -> None:
    process = fresh.broker(client_auth_failure_burst="3", client_auth_failures_per_minute="0")
    try:
        with grpc.insecure_channel(process.target) as channel:
            stub = broker_pb2_grpc.TokenBrokerStub(channel)
            wrong = ed25519.Ed25519PrivateKey.generate()
            for _ in range(3):
                code, _ = refusal(lambda: issue(stub, fresh, client_assertion=fresh.assertion("agent", key=wrong)))
                assert code is grpc.StatusCode.UNAUTHENTICATED
            code, details = refusal(lambda: issue(stub, fresh, client_assertion=fresh.assertion("agent", key=wrong)))
            assert (code, "client id" in details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, True)
            assert issue(stub, fresh).access_token  # the right credential still passes
    finally:
        assert process.stop() == 0
    assert lines(fresh, rule="auth.rate_limited")


def _throttling_authenticator(tmp_path: Path, key: ed25519.Ed25519PrivateKey) -> ClientAuthenticator:
    """An authenticator whose client id bucket holds 3 failures and never refills."""
    registry = FileRegistry(tmp_path / "registry.toml")
    registry.add_client(_client("agent", public_jwk=public_jwk(key)))
    return ClientAuthenticator(
        registry, MemoryStore(), assertion_audience=ISSUER, client_failure_burst=3, client_failures_per_second=0
    )


def test_failures_from_one_address_do_not_lock_the_client_out_from_another(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    auth = _throttling_authenticator(tmp_path, key)
    wrong = ed25519.Ed25519PrivateKey.generate()
    for _ in range(3):  # the attacker drains the client id's bucket
        with pytest.raises(AuthenticationError):
            auth.authenticate(
                client_id="agent",
                client_assertion=make_client_assertion(wrong, "agent", ISSUER),
                audience=SERVER_A,
                client_ip="198.51.100.7",
            )
    record = auth.authenticate(
        client_id="agent",
        client_assertion=make_client_assertion(key, "agent", ISSUER),
        audience=SERVER_A,
        client_ip="203.0.113.9",
        dpop_jkt=ProofSigner().jkt,
    )
    assert record.client_id == "agent"


def test_a_failing_credential_for_a_throttled_client_id_is_rate_limited(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    auth = _throttling_authenticator(tmp_path, key)
    wrong = ed25519.Ed25519PrivateKey.generate()
    rules = []
    for n in range(4):  # from four addresses: only the client id's bucket runs dry
        with pytest.raises((AuthenticationError, RateLimitedError)) as raised:
            auth.authenticate(
                client_id="agent",
                client_assertion=make_client_assertion(wrong, "agent", ISSUER),
                audience=SERVER_A,
                client_ip=f"198.51.100.{n + 1}",
            )
        rules.append((type(raised.value).__name__, getattr(raised.value, "rule", "")))
    assert rules[3] == ("ClientThrottledError", "auth.rate_limited")
    assert [r for _, r in rules[:3]] == ["credential.assertion_invalid"] * 3


def test_failed_authentications_are_rate_limited_per_source_address(fresh: Deployment) -> None:
    process = fresh.broker(source_auth_failure_burst="3", source_auth_failures_per_minute="0")
    try:
        with grpc.insecure_channel(process.target) as channel:
            stub = broker_pb2_grpc.TokenBrokerStub(channel)
            for n in range(3):  # a different (unknown) client id each time
                refusal(lambda n=n: issue(stub, fresh, f"ghost-{n}", client_secret="x"))
            code, details = refusal(lambda: issue(stub, fresh, "bearer-agent"))
            assert (code, "address" in details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, True)
    finally:
        assert process.stop() == 0


def test_failure_tables_are_bounded() -> None:
    buckets = KeyedBuckets(rate=0, burst=2, max_keys=100)
    for n in range(1000):
        buckets.charge(f"client-{n}")
    assert len(buckets) == 100


def test_ipv6_sources_are_limited_per_64() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::7") != source_key("2001:db8:1:3::1")


# -- item 9: secrets come from files, stdin or the environment -------------------------------------


@pytest.mark.parametrize(
    ("args", "file_option"),
    [
        (("sessions", "--api-key", "tbk-secret-value", "agent"), "--api-key-file"),
        (
            ("issue", "--client-id", "a", "--audience", SERVER_A, "--client-secret", "tbs-secret-value"),
            "--client-secret-file",
        ),
    ],
    ids=["api-key", "client-secret"],
)
def test_a_secret_on_the_command_line_is_a_usage_error(
    deployment: Deployment, args: tuple[str, ...], file_option: str
) -> None:
    result = cli(deployment, *args)
    assert result.returncode == 2
    assert file_option in result.stderr
    assert "TOKENBROKER_" in result.stderr
    assert "secret-value" not in result.stderr


def test_api_key_file_dash_reads_the_key_from_stdin(deployment: Deployment, broker: BrokerProcess) -> None:
    args = ("sessions", "--target", broker.target, "--api-key-file", "-", "pending-agent")  # it has no session
    result = cli(deployment, *args, stdin=KEY_ADMIN)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_api_key_from_the_environment_is_used(deployment: Deployment, broker: BrokerProcess) -> None:
    env = {"TOKENBROKER_API_KEY": KEY_ADMIN}
    result = cli(deployment, "revoke", "--target", broker.target, "client", "never-issued", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"revoked": 0}


def test_client_secret_from_the_environment_issues_a_token(deployment: Deployment, broker: BrokerProcess) -> None:
    env = {"TOKENBROKER_CLIENT_SECRET": SECRET}
    args = ("issue", "--target", broker.target, "--client-id", "secret-agent", "--audience", SERVER_A)
    result = cli(deployment, *args, "--scope", "tools:call", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token_type"] == "Bearer"


def test_client_secret_file_dash_reads_the_secret_from_stdin(deployment: Deployment, broker: BrokerProcess) -> None:
    args = ("issue", "--target", broker.target, "--client-id", "secret-agent", "--audience", SERVER_A)
    result = cli(deployment, *args, "--client-secret-file", "-", stdin=SECRET + "\n")
    assert result.returncode == 0, result.stderr


# -- item 10: who is believed about the client's address -------------------------------------------


def test_client_ip_relayed_by_a_server_without_the_relay_flag_is_not_believed(
    deployment: Deployment, stub: Any
) -> None:
    code, details = refusal(
        lambda: issue(stub, deployment, "cidr-agent", client_ip="10.1.2.3", metadata=api_key(KEY_A))
    )
    assert (code, "127.0.0.1" in details) == (grpc.StatusCode.PERMISSION_DENIED, True)
    assert lines(deployment, rule="source.cidr")[0]["relayed_ip"] == "ignored"


def test_client_ip_relayed_by_a_relay_server_of_another_audience_is_not_believed(
    deployment: Deployment, stub: Any
) -> None:
    metadata = api_key(KEY_GATEWAY_B)  # relays for SERVER_B only
    code, _ = refusal(lambda: issue(stub, deployment, "cidr-agent", client_ip="10.1.2.3", metadata=metadata))
    assert code is grpc.StatusCode.PERMISSION_DENIED


def test_client_ip_relayed_by_the_relay_server_of_the_audience_is_believed(deployment: Deployment, stub: Any) -> None:
    issued = issue(stub, deployment, "cidr-agent", client_ip="10.1.2.3", metadata=api_key(KEY_GATEWAY_A))
    assert issued.access_token
    (grant,) = lines(deployment, decision="grant")
    assert (grant["source_ip"], grant["relayed_by"]) == ("10.1.2.3", "gateway-a")


def test_client_ip_sent_by_the_client_itself_is_not_believed(deployment: Deployment, stub: Any) -> None:
    code, _ = refusal(lambda: issue(stub, deployment, "cidr-agent", client_ip="10.1.2.3"))
    assert code is grpc.StatusCode.PERMISSION_DENIED


# -- item 11: the client's binding decides ------------------------------------------------------


def test_dpop_client_without_dpop_jkt_is_refused(deployment: Deployment, stub: Any) -> None:
    code, details = refusal(lambda: issue(stub, deployment, dpop_jkt=""))
    assert (code, "binding dpop" in details) == (grpc.StatusCode.PERMISSION_DENIED, True)
    assert lines(deployment, rule="binding.dpop_required")


def test_dpop_client_with_dpop_jkt_gets_a_dpop_token(deployment: Deployment, stub: Any) -> None:
    assert issue(stub, deployment).token_type == "DPoP"


def test_mtls_client_without_cert_thumbprint_is_refused(deployment: Deployment, stub: Any) -> None:
    code, details = refusal(lambda: issue(stub, deployment, "mtls-agent"))
    assert (code, "binding mtls" in details) == (grpc.StatusCode.PERMISSION_DENIED, True)


def test_mtls_client_with_cert_thumbprint_gets_a_certificate_bound_token(deployment: Deployment, stub: Any) -> None:
    thumbprint = "x4E3p5ZHtQlGtWm6QQyyPKhEXHCcbW9v0prt5gDA0qM"
    issued = issue(stub, deployment, "mtls-agent", cert_thumbprint=thumbprint)
    assert jwt.decode(issued.access_token, options={"verify_signature": False})["cnf"] == {"x5t#S256": thumbprint}


def test_bearer_client_gets_a_bearer_token(deployment: Deployment, stub: Any) -> None:
    issued = issue(stub, deployment, "bearer-agent")
    assert issued.token_type == "Bearer"
    assert "cnf" not in jwt.decode(issued.access_token, options={"verify_signature": False})


def test_bearer_client_sending_a_dpop_jkt_is_refused(deployment: Deployment, stub: Any) -> None:
    code, details = refusal(lambda: issue(stub, deployment, "bearer-agent", dpop_jkt=ProofSigner().jkt))
    assert (code, "binding bearer" in details) == (grpc.StatusCode.PERMISSION_DENIED, True)


def test_grant_audit_line_records_the_binding(deployment: Deployment, stub: Any) -> None:
    issue(stub, deployment)
    issue(stub, deployment, "bearer-agent")
    assert [e["binding"] for e in lines(deployment, decision="grant")] == ["dpop", "bearer"]


def test_registry_file_without_binding_loads_as_dpop(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text('[clients.old]\nstatus = "approved"\n')
    record = FileRegistry(path).client("old")
    assert record is not None
    assert record.binding is Binding.DPOP


def test_registry_file_with_an_unknown_binding_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text('[clients.old]\nbinding = "none"\n')
    with pytest.raises(ValueError, match="dpop, mtls, bearer"):
        FileRegistry(path)


def test_clients_add_and_update_set_the_binding_shown_by_clients_show(tmp_path: Path) -> None:
    env = {"TOKENBROKER_REGISTRY_FILE": str(tmp_path / "registry.toml"), "TOKENBROKER_ISSUER": ISSUER}
    runner = CliRunner()
    added = runner.invoke(main, ["clients", "add", "c", "--generate-secret", "--binding", "bearer"], env=env)
    assert added.exit_code == 0, added.output
    assert json.loads(runner.invoke(main, ["clients", "show", "c"], env=env).stdout)["binding"] == "bearer"
    assert runner.invoke(main, ["clients", "update", "c", "--binding", "mtls"], env=env).exit_code == 0
    assert json.loads(runner.invoke(main, ["clients", "show", "c"], env=env).stdout)["binding"] == "mtls"


def test_servers_add_relay_client_ip_is_stored_in_the_registry(tmp_path: Path) -> None:
    env = {"TOKENBROKER_REGISTRY_FILE": str(tmp_path / "registry.toml"), "TOKENBROKER_ISSUER": ISSUER}
    args = ["servers", "add", "gw", "--audience", SERVER_A, "--generate-api-key", "--relay-client-ip"]
    assert CliRunner().invoke(main, args, env=env).exit_code == 0
    record = FileRegistry(tmp_path / "registry.toml").server("gw")
    assert record is not None
    assert record.relay_client_ip


async def test_client_metadata_documents_that_cannot_be_used_count_as_failed_authentications(tmp_path: Path) -> None:
    # Else one source could make the broker fetch documents without limit.
    from tokenbroker.cimd import CimdFetchError

    class Unreachable:  # stands in for the document's origin, outside the thing under test
        async def record_for(self, client_id: str) -> Any:
            raise CimdFetchError("connect_failed", "no connection to docs.example on port 443", host="docs.example")

    auth = ClientAuthenticator(
        FileRegistry(tmp_path / "registry.toml"),
        MemoryStore(),
        assertion_audience=ISSUER,
        source_failure_burst=3,
        source_failures_per_second=0,
        cimd=Unreachable(),  # type: ignore[arg-type]
    )
    rules = []
    for n in range(4):
        with pytest.raises((AuthenticationError, RateLimitedError)) as raised:
            await auth.aauthenticate_client(
                client_id=f"https://docs.example/clients/{n}.json", client_assertion="a.b.c", client_ip="198.51.100.9"
            )
        rules.append(getattr(raised.value, "rule", ""))
    assert rules == ["cimd.connect_failed"] * 3 + ["auth.rate_limited"]
