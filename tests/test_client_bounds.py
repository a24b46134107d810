"""Issue #8 item 4 (one client must not hurt every other client) and item 2 on the memory
store (state loss must not reopen replays), with the replay path of DESIGN.md section 3:
the engine's bloom filter only marks replay keys, the store is the one exact record.

Embedded tests go through `Broker` and `MemoryStore`; the last ones run real
`tokenbroker serve` processes on the memory store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tokenbroker import Broker, Keyring, LimitPolicy, MemoryStore, ProofSigner, Reason, SessionLimit, ValidateRequest
from tokenbroker.client import BrokerClient
from tokenbroker.client_assertion import make_client_assertion, public_jwk
from tokenbroker.client_auth import ClientAuthenticator
from tokenbroker.errors import AuthenticationError, ClientNotAllowedError
from tokenbroker.registry import ClientRecord, ClientStatus, ServerRecord
from tokenbroker.registry_file import FileRegistry, hash_secret
from tokenbroker.store.base import Remembered, SessionOpen, TokenCheck

from support.broker_process import BrokerProcess, broker_env
from support.brokers import AUDIENCE, ISSUER, FakeClock, make_broker


def _dpop(broker: Broker, client_id: str = "c") -> tuple[ProofSigner, str]:
    signer = ProofSigner()
    return signer, broker.issue(client_id=client_id, audience=AUDIENCE, dpop_jkt=signer.jkt).access_token


def _validate(broker: Broker, token: str, proof: str, **kw: Any) -> Any:
    return broker.validate(token, audience=AUDIENCE, dpop_proof=proof, http_method="POST", http_uri=AUDIENCE, **kw)


def _fresh_proof(signer: ProofSigner, token: str, clock: FakeClock) -> str:
    return signer.sign("POST", AUDIENCE, token, iat=int(clock.now))


# -- one exact record, in the store ---------------------------------------------------------


def test_the_engine_passes_a_replayed_proof_and_leaves_the_decision_to_the_store():
    broker, clock = make_broker()
    signer, token = _dpop(broker)
    proof = _fresh_proof(signer, token, clock)
    now = int(clock.now)
    request = ValidateRequest(token, audience=AUDIENCE, dpop_proof=proof, http_method="POST", http_uri=AUDIENCE)
    first = broker.engine.validate(request, now)
    again = broker.engine.validate(request, now)
    assert first.ok
    assert again.ok
    assert first.replay == again.replay  # the same key: the store refuses the second
    assert broker.engine.stats().maybe_seen == 1  # the bloom filter marked the second "maybe seen"


def test_a_replayed_proof_is_refused_by_the_store_record():
    broker, clock = make_broker()
    signer, token = _dpop(broker)
    proof = _fresh_proof(signer, token, clock)
    assert _validate(broker, token, proof).valid
    assert broker.store.sizes().replay_records == 1  # type: ignore[attr-defined]
    assert _validate(broker, token, proof).reason is Reason.REPLAYED


def test_a_single_use_token_validates_once():
    broker, _ = make_broker()
    token = broker.issue(client_id="c", audience=AUDIENCE, once=True).access_token
    assert broker.validate(token, audience=AUDIENCE).valid
    assert broker.validate(token, audience=AUDIENCE).reason is Reason.REPLAYED


def test_a_proof_replayed_in_its_last_accepted_second_is_refused_without_leeway():
    broker, clock = make_broker(leeway_seconds=0, dpop_max_age_seconds=60)
    signer, token = _dpop(broker)
    proof = signer.sign("POST", AUDIENCE, token, iat=int(clock.now) - 60)  # accepted through this second
    assert _validate(broker, token, proof).valid
    assert _validate(broker, token, proof).reason is Reason.REPLAYED


def test_a_proof_repeated_in_one_batch_is_accepted_once():
    broker, clock = make_broker()
    signer, token = _dpop(broker)
    proof = _fresh_proof(signer, token, clock)
    request = {"token": token, "audience": AUDIENCE, "dpop_proof": proof, "http_method": "POST", "http_uri": AUDIENCE}
    assert [v.reason for v in broker.validate_batch([request, request])] == [Reason.OK, Reason.REPLAYED]


def test_bloom_false_positives_never_refuse_a_fresh_proof():
    broker, clock = make_broker(replay_capacity=1, replay_fp_rate=0.4)  # a filter that saturates at once
    signer, token = _dpop(broker)
    answers = [_validate(broker, token, _fresh_proof(signer, token, clock)).reason for _ in range(200)]
    assert broker.engine.stats().maybe_seen > 0  # the filter did say "maybe seen" for fresh proofs
    assert set(answers) == {Reason.OK}


# -- per-client quotas ----------------------------------------------------------------------


def test_a_client_over_its_replay_quota_is_refused_and_its_neighbour_is_not():
    broker, clock = make_broker(store=MemoryStore(max_replay_records_per_client=3))
    noisy_signer, noisy = _dpop(broker, "noisy")
    quiet_signer, quiet = _dpop(broker, "quiet")
    noisy_answers = [_validate(broker, noisy, _fresh_proof(noisy_signer, noisy, clock)).reason for _ in range(5)]
    assert noisy_answers == [Reason.OK] * 3 + [Reason.REPLAY_CACHE_FULL] * 2
    assert all(_validate(broker, quiet, _fresh_proof(quiet_signer, quiet, clock)).valid for _ in range(3))


def test_a_full_client_is_refused_with_a_detail_that_says_what_to_do():
    broker, clock = make_broker(store=MemoryStore(max_replay_records_per_client=1))
    signer, token = _dpop(broker)
    assert _validate(broker, token, _fresh_proof(signer, token, clock)).valid
    refused = _validate(broker, token, _fresh_proof(signer, token, clock))
    assert refused.reason is Reason.REPLAY_CACHE_FULL
    assert "retry once older ones expire" in refused.detail


def test_a_client_quota_frees_up_as_its_records_expire():
    broker, clock = make_broker(store=MemoryStore(max_replay_records_per_client=2))
    signer, token = _dpop(broker)
    for _ in range(2):
        assert _validate(broker, token, _fresh_proof(signer, token, clock)).valid
    assert _validate(broker, token, _fresh_proof(signer, token, clock)).reason is Reason.REPLAY_CACHE_FULL
    clock.advance(120)  # past the proofs' window: their records may be forgotten
    token = broker.issue(client_id="c", audience=AUDIENCE, dpop_jkt=signer.jkt).access_token
    assert _validate(broker, token, _fresh_proof(signer, token, clock)).valid


def test_assertion_records_count_against_the_client_quota_and_not_its_neighbours():
    now = int(time.time())
    store = MemoryStore(max_replay_records_per_client=2)
    outcomes = [store.remember(f"a-{i}", client_id="noisy", issued_at=now, until=now + 60, now=now) for i in range(3)]
    assert outcomes == [Remembered.NEW, Remembered.NEW, Remembered.FULL]
    assert store.remember("b-0", client_id="quiet", issued_at=now, until=now + 60, now=now) is Remembered.NEW


def test_a_remembered_value_is_seen_while_it_lives():
    now = int(time.time())
    store = MemoryStore()
    assert store.remember("k", client_id="c", issued_at=now, until=now + 60, now=now) is Remembered.NEW
    assert store.remember("k", client_id="c", issued_at=now, until=now + 60, now=now + 59) is Remembered.SEEN


# -- nothing recorded for a refused request ----------------------------------------------------


@pytest.mark.parametrize("refusal", ["client", "session", "token", "unknown_session", "scope"])
def test_a_refused_request_leaves_no_replay_record(refusal: str):
    broker, clock = make_broker()
    signer = ProofSigner()
    issued = broker.issue(client_id="c", audience=AUDIENCE, dpop_jkt=signer.jkt, scopes=["read"])
    required: tuple[str, ...] = ()
    if refusal == "client":
        broker.revoke_client("c")
    elif refusal == "session":
        broker.revoke_session(issued.session_id)
    elif refusal == "token":
        broker.revoke_token(issued.jti)
    elif refusal == "unknown_session":
        broker = Broker(broker.keyring, issuer=ISSUER, clock=clock)  # same keys, a store without the session
    else:
        required = ("write",)
    for _ in range(50):
        proof = _fresh_proof(signer, issued.access_token, clock)
        assert not _validate(broker, issued.access_token, proof, required_scopes=required).valid
    assert broker.store.sizes().replay_records == 0  # type: ignore[attr-defined]


def test_a_proof_refused_for_scope_is_not_used_up():
    broker, clock = make_broker()
    signer, token = _dpop(broker)
    proof = _fresh_proof(signer, token, clock)
    assert _validate(broker, token, proof, required_scopes=["write"]).reason is Reason.INSUFFICIENT_SCOPE
    assert _validate(broker, token, proof).valid


# -- dead sessions ---------------------------------------------------------------------------


def test_evicted_sessions_are_purged_so_the_store_stays_bounded():
    store = MemoryStore()
    limit = SessionLimit(max_sessions=1, policy=LimitPolicy.EVICT_OLDEST)
    now = int(time.time())
    args: dict[str, Any] = {
        "audience": AUDIENCE,
        "session_id": None,
        "ttl_seconds": 3600,
        "limit": limit,
        "client_ip": "",
    }
    for _ in range(20_000):
        store.open_session(SessionOpen(client_id="noisy", now=now, **args))
    sizes = store.sizes()
    assert sizes.live_sessions == 1
    assert sizes.ended_sessions <= MemoryStore.ENDED_SESSIONS_PER_CLIENT
    held = sizes.live_sessions + sizes.ended_sessions
    assert sizes.session_heap <= 2 * held + MemoryStore.SESSION_HEAP_SLACK


def test_an_evicted_session_still_answers_session_revoked():
    broker, _ = make_broker(session_limit=SessionLimit(max_sessions=1, policy=LimitPolicy.EVICT_OLDEST))
    first = broker.issue(client_id="c", audience=AUDIENCE)
    broker.issue(client_id="c", audience=AUDIENCE)
    assert broker.validate(first.access_token, audience=AUDIENCE).reason is Reason.SESSION_REVOKED


def test_revoked_sessions_stop_counting_against_the_limit_at_once():
    broker, _ = make_broker(session_limit=SessionLimit(max_sessions=2))
    first = broker.issue(client_id="c", audience=AUDIENCE)
    broker.issue(client_id="c", audience=AUDIENCE)
    broker.revoke_session(first.session_id)
    assert broker.issue(client_id="c", audience=AUDIENCE).session_id
    assert len(broker.sessions("c")) == 2


def test_expired_sessions_of_every_client_are_forgotten():
    broker, clock = make_broker(session_ttl_seconds=60)
    for i in range(500):
        broker.issue(client_id=f"c{i}", audience=AUDIENCE, ttl_seconds=30)
    clock.advance(61)
    broker.issue(client_id="late", audience=AUDIENCE, ttl_seconds=30)
    sizes = broker.store.sizes()  # type: ignore[attr-defined]
    assert (sizes.live_sessions, sizes.ended_sessions) == (1, 0)


# -- the store's epoch -----------------------------------------------------------------------


def test_a_token_issued_before_the_store_epoch_is_session_unknown():
    start = int(time.time())
    store = MemoryStore(clock=lambda: float(start))
    session = store.open_session(
        SessionOpen(
            client_id="c",
            audience=AUDIENCE,
            session_id=None,
            ttl_seconds=600,
            limit=SessionLimit(),
            client_ip="",
            now=start,
        )
    )
    check = TokenCheck("c", session.session_id, AUDIENCE, "j", start, "", (), start)
    assert store.check_token(check._replace(issued_at=start - 1)) is Reason.SESSION_UNKNOWN
    assert store.check_token(check) is Reason.OK


def test_a_single_use_value_issued_before_the_store_epoch_is_stale():
    start = int(time.time())
    store = MemoryStore(clock=lambda: float(start))
    assert store.remember("k", client_id="c", issued_at=start - 1, until=start + 60, now=start) is Remembered.STALE
    assert store.sizes().replay_records == 0


# -- real `tokenbroker serve` processes on the memory store ------------------------------------

SERVER_KEY = "key-bounds-" + "k" * 40
QUOTA = 40  # max_replay_records_per_client of the processes


@dataclass
class Deployment:
    """The key file, registry and client keys that every broker process of a test shares."""

    workdir: Path
    keys: dict[str, ed25519.Ed25519PrivateKey]
    env: dict[str, str]

    def broker(self) -> BrokerProcess:
        return BrokerProcess(self.workdir, dict(self.env)).start()

    def assertion(self, client_id: str) -> str:
        return make_client_assertion(self.keys[client_id], client_id, ISSUER)


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    Keyring.generate().save(tmp_path / "keys.json")
    registry = FileRegistry(tmp_path / "registry.toml")
    keys = {name: ed25519.Ed25519PrivateKey.generate() for name in ("noisy", "quiet")}
    for client_id, key in keys.items():
        registry.add_client(
            ClientRecord(
                client_id,
                status=ClientStatus.APPROVED,
                public_jwk=public_jwk(key),
                allowed_audiences=(AUDIENCE,),
                allowed_scopes=("tools:call",),
            )
        )
    registry.add_server(ServerRecord("server", audiences=(AUDIENCE,), api_key_hash=hash_secret(SERVER_KEY)))
    env = broker_env(tmp_path, ISSUER, audit=False, max_replay_records_per_client=str(QUOTA))
    return Deployment(tmp_path, keys, env)


@pytest.fixture
def broker(deployment: Deployment) -> Iterator[BrokerProcess]:
    process = deployment.broker()
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log.read_text()[-2000:]


def _issue(deployment: Deployment, process: BrokerProcess, client_id: str, signer: ProofSigner) -> str:
    with BrokerClient(process.target, timeout=5) as c:
        issued = c.issue(
            client_id=client_id,
            client_assertion=deployment.assertion(client_id),
            audience=AUDIENCE,
            scopes=["tools:call"],
            dpop_jkt=signer.jkt,
        )
    return str(issued.access_token)


def _requests(signer: ProofSigner, token: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "token": token,
            "audience": AUDIENCE,
            "dpop_proof": signer.sign("POST", AUDIENCE, token),
            "http_method": "POST",
            "http_uri": AUDIENCE,
        }
        for _ in range(count)
    ]


def test_a_flooding_client_is_refused_while_its_neighbour_keeps_validating(
    deployment: Deployment, broker: BrokerProcess
):
    noisy_signer, quiet_signer = ProofSigner(), ProofSigner()
    noisy = _issue(deployment, broker, "noisy", noisy_signer)
    quiet = _issue(deployment, broker, "quiet", quiet_signer)
    with BrokerClient(broker.target, api_key=SERVER_KEY, timeout=10) as server:
        flood = server.validate_batch(_requests(noisy_signer, noisy, 2 * QUOTA))
        accepted = QUOTA - 1  # the client's assertion at issuance holds one record of its quota
        assert [v.reason for v in flood] == [Reason.OK] * accepted + [Reason.REPLAY_CACHE_FULL] * (2 * QUOTA - accepted)
        answers = [server.validate(**request) for request in _requests(quiet_signer, quiet, 20)]
        assert all(v.valid for v in answers), [v.reason for v in answers]


def test_a_restarted_memory_store_broker_refuses_an_already_used_assertion(deployment: Deployment):
    signer = ProofSigner()
    request: dict[str, Any] = {
        "client_id": "quiet",
        "audience": AUDIENCE,
        "scopes": ["tools:call"],
        "dpop_jkt": signer.jkt,
    }
    first = deployment.broker()
    assertion = deployment.assertion("quiet")  # signed once the first process serves: inside its epoch
    try:
        with BrokerClient(first.target, timeout=5) as c:
            assert c.issue(client_assertion=assertion, **request).access_token
            with pytest.raises(AuthenticationError):
                c.issue(client_assertion=assertion, **request)  # used: refused by the live record
    finally:
        assert first.stop() == 0, first.log.read_text()[-2000:]
    stopped_at = int(time.time())
    while int(time.time()) <= stopped_at:  # the epoch has one-second resolution (see MemoryStore)
        time.sleep(0.05)
    second = deployment.broker()  # same key file and registry; the record died with the first
    try:
        with BrokerClient(second.target, timeout=5) as c, pytest.raises(AuthenticationError):
            c.issue(client_assertion=assertion, **request)
        with BrokerClient(second.target, timeout=5) as c:  # a fresh assertion still works
            assert c.issue(client_assertion=deployment.assertion("quiet"), **request).access_token
    finally:
        assert second.stop() == 0, second.log.read_text()[-2000:]


# -- a refused client writes no assertion record ----------------------------------------------


@pytest.mark.parametrize(("status", "said"), [(ClientStatus.PENDING, "pending"), (ClientStatus.DISABLED, "disabled")])
def test_an_unapproved_clients_assertions_leave_no_record(tmp_path: Path, status: ClientStatus, said: str):
    key = ed25519.Ed25519PrivateKey.generate()
    registry = FileRegistry(tmp_path / "registry.toml")
    registry.add_client(
        ClientRecord("waiting", public_jwk=public_jwk(key), status=status, allowed_audiences=(AUDIENCE,))
    )
    store = MemoryStore()
    auth = ClientAuthenticator(registry, store, assertion_audience=ISSUER)
    before = store.sizes().replay_records
    for _ in range(5):
        with pytest.raises(ClientNotAllowedError, match=said):
            auth.authenticate(
                client_id="waiting", client_assertion=make_client_assertion(key, "waiting", ISSUER), audience=AUDIENCE
            )
    assert store.sizes().replay_records == before


def test_the_verified_token_cache_holds_the_live_tokens_not_its_capacity_of_dead_ones() -> None:
    """A soak showed the serve process growing for as long as it took the cache to hold
    100,000 expired tokens: entries now leave when their token expires."""
    broker, clock = make_broker(token_cache_capacity=100_000, session_limit=SessionLimit(max_sessions=10_000))
    for _ in range(3):
        for _ in range(200):
            token = broker.issue(client_id="c", audience=AUDIENCE, ttl_seconds=60).access_token
            assert broker.validate(token, audience=AUDIENCE).valid
        clock.advance(61 + 5)  # past exp and the leeway: the 200 are dead
    # Each insert removes at most 64 of the dead (one insert must not hold the lock for
    # them all): four new tokens take the last 200 out.
    fresh = [broker.issue(client_id="c", audience=AUDIENCE, ttl_seconds=60).access_token for _ in range(4)]
    assert all(broker.validate(token, audience=AUDIENCE).valid for token in fresh)
    assert broker.engine.stats().cached_tokens == 4
    assert all(broker.validate(token, audience=AUDIENCE).valid for token in fresh)  # live ones stay valid
