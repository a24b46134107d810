"""Issue 3's acceptance, end to end: real `tokenbroker serve` processes, real redis-server
(one, and a three-master cluster), the real gRPC client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tokenbroker import Keyring, LimitPolicy, ProofSigner, Reason
from tokenbroker.client import BrokerClient
from tokenbroker.client_assertion import make_client_assertion, public_jwk
from tokenbroker.errors import PermissionDeniedError, SessionLimitExceededError, StoreUnavailableError
from tokenbroker.registry import ClientRecord, ClientStatus, ServerRecord
from tokenbroker.registry_file import FileRegistry, hash_secret

from support.broker_process import BrokerProcess, broker_env

ISSUER = "https://broker.e2e.test"
SERVER_A = "https://a.mcp.test/mcp"
SERVER_B = "https://b.mcp.test/mcp"
KEY_A, KEY_B, KEY_ADMIN = "key-a-" + "a" * 40, "key-b-" + "b" * 40, "key-admin-" + "c" * 40


@dataclass
class Deployment:
    """Keys, registry and client credentials shared by every broker process of a test."""

    workdir: Path
    client_key: ed25519.Ed25519PrivateKey
    env: dict[str, str]

    def broker(self) -> BrokerProcess:
        return BrokerProcess(self.workdir, dict(self.env)).start()

    def assertion(self, client_id: str = "agent") -> str:
        return make_client_assertion(self.client_key, client_id, ISSUER)


def deploy(tmp_path: Path, store_env: dict[str, str]) -> Deployment:
    Keyring.generate().save(tmp_path / "keys.json")
    client_key = ed25519.Ed25519PrivateKey.generate()
    registry = FileRegistry(tmp_path / "registry.toml")
    for client_id, limit, policy in [("agent", 2, LimitPolicy.REJECT), ("evicting", 1, LimitPolicy.EVICT_OLDEST)]:
        registry.add_client(
            ClientRecord(
                client_id,
                status=ClientStatus.APPROVED,
                public_jwk=public_jwk(client_key),
                allowed_audiences=(SERVER_A, SERVER_B),
                allowed_scopes=("tools:call",),
                max_sessions=limit,
                limit_policy=policy,
            )
        )
    registry.add_server(ServerRecord("server-a", audiences=(SERVER_A,), api_key_hash=hash_secret(KEY_A)))
    registry.add_server(ServerRecord("server-b", audiences=(SERVER_B,), api_key_hash=hash_secret(KEY_B)))
    registry.add_server(ServerRecord("ops", admin=True, api_key_hash=hash_secret(KEY_ADMIN)))
    env = {**broker_env(tmp_path, ISSUER, grace_seconds=2), **store_env}
    return Deployment(tmp_path, client_key, env)


@pytest.fixture(params=["redis", "cluster"])
def deployment(request: Any, tmp_path: Path) -> Deployment:
    if request.param == "redis":
        redis = request.getfixturevalue("redis_server")
        return deploy(tmp_path, {"TOKENBROKER_REDIS_URL": redis.url})
    cluster = request.getfixturevalue("redis_cluster")
    env = {"TOKENBROKER_REDIS_URL": cluster.url, "TOKENBROKER_REDIS_CLUSTER": "true", "TOKENBROKER_ISSUER": ISSUER}
    return deploy(tmp_path, env)


@pytest.fixture
def broker(deployment: Deployment) -> Iterator[BrokerProcess]:
    process = deployment.broker()
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log.read_text()[-2000:]


def client(process: BrokerProcess, api_key: str | None = None) -> BrokerClient:
    return BrokerClient(process.target, api_key=api_key, timeout=5)


def issue(deployment: Deployment, process: BrokerProcess, signer: ProofSigner, **kw: Any) -> Any:
    with client(process) as c:
        return c.issue(
            client_id=kw.pop("client_id", "agent"),
            client_assertion=deployment.assertion(kw.pop("assertion_for", "agent")),
            audience=kw.pop("audience", SERVER_A),
            scopes=["tools:call"],
            dpop_jkt=signer.jkt,
            **kw,
        )


def validate(
    process: BrokerProcess, token: str, proof: str | None, *, api_key: str = KEY_A, audience: str = SERVER_A
) -> Any:
    with client(process, api_key) as c:
        return c.validate(token, audience=audience, dpop_proof=proof, http_method="POST", http_uri=audience)


def test_issue_validate_replay_audience_session_limit_and_revocation(
    deployment: Deployment, broker: BrokerProcess
) -> None:
    signer = ProofSigner()
    issued = issue(deployment, broker, signer)
    assert issued.token_type == "DPoP"
    proof = signer.sign("POST", SERVER_A, issued.access_token)
    assert validate(broker, issued.access_token, proof).valid
    assert validate(broker, issued.access_token, proof).reason is Reason.REPLAYED

    # A token for server A presented to server B (validating for its own audience).
    proof_b = signer.sign("POST", SERVER_B, issued.access_token)
    assert validate(broker, issued.access_token, proof_b, api_key=KEY_B, audience=SERVER_B).reason is (
        Reason.WRONG_AUDIENCE
    )
    # Server A may not validate for an audience it does not own.
    with pytest.raises(PermissionDeniedError):
        validate(broker, issued.access_token, proof_b, api_key=KEY_A, audience=SERVER_B)

    # The (N+1)th concurrent session is refused ...
    issue(deployment, broker, signer)
    with pytest.raises(SessionLimitExceededError):
        issue(deployment, broker, signer)
    # ... or evicts the oldest, per the client's policy.
    first = issue(deployment, broker, signer, client_id="evicting", assertion_for="evicting")
    issue(deployment, broker, signer, client_id="evicting", assertion_for="evicting")
    evicted = validate(broker, first.access_token, signer.sign("POST", SERVER_A, first.access_token))
    assert evicted.reason is Reason.SESSION_REVOKED

    # Revoking the session fails its next validation.
    with client(broker, KEY_ADMIN) as admin:
        assert admin.revoke_session(issued.session_id) == 1
    after = validate(broker, issued.access_token, signer.sign("POST", SERVER_A, issued.access_token))
    assert after.reason is Reason.SESSION_REVOKED
    audit = (deployment.workdir / "audit.jsonl").read_text()
    assert '"decision":"grant"' in audit
    assert '"decision":"refuse"' in audit
    assert issued.access_token not in audit


def test_two_brokers_share_replay_records_and_revocations(deployment: Deployment) -> None:
    first, second = deployment.broker(), deployment.broker()
    try:
        signer = ProofSigner()
        issued = issue(deployment, first, signer)
        proof = signer.sign("POST", SERVER_A, issued.access_token)
        assert validate(first, issued.access_token, proof).valid
        assert validate(second, issued.access_token, proof).reason is Reason.REPLAYED

        with client(second, KEY_A) as on_second, client(first, KEY_ADMIN) as admin:
            assert admin.revoke_session(issued.session_id) == 1
            revoked_at = time.monotonic()
            answer = on_second.validate(
                issued.access_token,
                audience=SERVER_A,
                dpop_proof=signer.sign("POST", SERVER_A, issued.access_token),
                http_method="POST",
                http_uri=SERVER_A,
            )
            elapsed = time.monotonic() - revoked_at
        assert answer.reason is Reason.SESSION_REVOKED
        assert elapsed < 0.1, f"revocation reached the other replica after {elapsed * 1000:.0f} ms"
    finally:
        assert first.stop() == 0
        assert second.stop() == 0


def test_redis_killed_mid_traffic_fails_closed_and_recovers(tmp_path: Path, redis_server: Any) -> None:
    deployment = deploy(tmp_path, {"TOKENBROKER_REDIS_URL": redis_server.url})
    process = deployment.broker()
    signer = ProofSigner()
    issued = issue(deployment, process, signer)
    answers: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with client(process, KEY_A) as c:
            while not stop.is_set() and len(answers) < 2000:
                proof = signer.sign("POST", SERVER_A, issued.access_token)
                try:
                    v = c.validate(
                        issued.access_token, audience=SERVER_A, dpop_proof=proof, http_method="POST", http_uri=SERVER_A
                    )
                    answers.append("valid" if v.valid else v.reason.name)
                except StoreUnavailableError:
                    answers.append("UNAVAILABLE")

    worker = threading.Thread(target=traffic)
    try:
        worker.start()
        time.sleep(0.5)
        redis_server.kill()
        time.sleep(1.5)
        assert process.alive(), "the broker must stay up while Redis is down"
        assert process.serving()
        before_restart = len(answers)
        redis_server.restart()
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(timeout=30)
    outage = answers[:before_restart]
    assert "UNAVAILABLE" in outage
    # Every answer is UNAVAILABLE or a correct decision: valid before the kill; after the
    # restart Redis has lost the session (no persistence here), so SESSION_UNKNOWN.
    assert set(answers) <= {"valid", "UNAVAILABLE", "SESSION_UNKNOWN"}, set(answers)
    first_down = answers.index("UNAVAILABLE")
    assert "valid" not in answers[first_down:], "no valid=true after Redis went down and lost its state"
    # Without restarting the broker, validation works again.
    fresh = issue(deployment, process, signer)
    assert validate(process, fresh.access_token, signer.sign("POST", SERVER_A, fresh.access_token)).valid
    assert process.stop() == 0
