"""Sessions, their limit and expiry, and revocation taking effect on the next validate."""

import asyncio

import pytest

from tokenbroker import Reason, SessionLimit
from tokenbroker.errors import InvalidArgumentError, SessionLimitExceededError, SessionNotFoundError

from support.brokers import AUDIENCE, OTHER_AUDIENCE, make_broker


def test_issue_opens_a_session_and_continuing_it_keeps_the_id():
    broker, _ = make_broker()
    first = broker.issue(client_id="c", audience=AUDIENCE)
    again = broker.issue(client_id="c", audience=AUDIENCE, session_id=first.session_id)
    assert again.session_id == first.session_id
    assert [s.session_id for s in broker.sessions("c")] == [first.session_id]
    assert broker.validate(again.access_token, audience=AUDIENCE).session_id == first.session_id


def test_another_clients_session_cannot_be_continued():
    broker, _ = make_broker()
    first = broker.issue(client_id="c", audience=AUDIENCE)
    with pytest.raises(SessionNotFoundError):
        broker.issue(client_id="intruder", audience=AUDIENCE, session_id=first.session_id)
    with pytest.raises(InvalidArgumentError):
        broker.issue(client_id="c", audience=OTHER_AUDIENCE, session_id=first.session_id)


def test_session_limit_rejects_the_next_session():
    broker, _ = make_broker(session_limit=SessionLimit(2))
    broker.issue(client_id="c", audience=AUDIENCE)
    broker.issue(client_id="c", audience=AUDIENCE)
    with pytest.raises(SessionLimitExceededError, match="limit 2"):
        broker.issue(client_id="c", audience=AUDIENCE)
    broker.issue(client_id="other", audience=AUDIENCE)


def test_session_limit_evicts_the_oldest_by_policy():
    broker, clock = make_broker(session_limit=SessionLimit(2, "evict_oldest"))  # type: ignore[arg-type]  # the string form is accepted too
    oldest = broker.issue(client_id="c", audience=AUDIENCE)
    clock.advance(1)
    middle = broker.issue(client_id="c", audience=AUDIENCE)
    clock.advance(1)
    newest = broker.issue(client_id="c", audience=AUDIENCE)
    assert broker.validate(oldest.access_token, audience=AUDIENCE).reason is Reason.SESSION_REVOKED
    assert broker.validate(middle.access_token, audience=AUDIENCE).valid
    assert broker.validate(newest.access_token, audience=AUDIENCE).valid
    assert len(broker.sessions("c")) == 2


def test_revoked_sessions_free_their_slot():
    broker, _ = make_broker(session_limit=SessionLimit(1))
    first = broker.issue(client_id="c", audience=AUDIENCE)
    broker.revoke_session(first.session_id)
    broker.issue(client_id="c", audience=AUDIENCE)


def test_session_expires_and_caps_token_lifetime():
    broker, clock = make_broker(session_ttl_seconds=100)
    issued = broker.issue(client_id="c", audience=AUDIENCE, ttl_seconds=3600)
    assert issued.expires_at == int(clock.now) + 100
    clock.advance(50)
    assert broker.validate(issued.access_token, audience=AUDIENCE).valid
    clock.advance(60)
    assert not broker.validate(issued.access_token, audience=AUDIENCE).valid
    with pytest.raises(SessionNotFoundError):
        broker.issue(client_id="c", audience=AUDIENCE, session_id=issued.session_id)
    assert broker.sessions("c") == []


def test_token_expiry_takes_effect():
    broker, clock = make_broker()
    issued = broker.issue(client_id="c", audience=AUDIENCE, ttl_seconds=60)
    clock.advance(59)
    assert broker.validate(issued.access_token, audience=AUDIENCE).valid
    clock.advance(10)
    assert broker.validate(issued.access_token, audience=AUDIENCE).reason is Reason.EXPIRED


def test_revoke_session_applies_on_the_next_validate():
    broker, _ = make_broker()
    issued = broker.issue(client_id="c", audience=AUDIENCE)
    assert broker.validate(issued.access_token, audience=AUDIENCE).valid
    assert broker.revoke_session(issued.session_id) == 1
    assert broker.validate(issued.access_token, audience=AUDIENCE).reason is Reason.SESSION_REVOKED
    assert broker.revoke_session(issued.session_id) == 0


def test_revoke_client_applies_to_every_session_on_the_next_validate():
    broker, _ = make_broker()
    tokens = [broker.issue(client_id="c", audience=AUDIENCE) for _ in range(2)]
    bystander = broker.issue(client_id="d", audience=AUDIENCE)
    assert broker.revoke_client("c") == 2
    for t in tokens:
        assert broker.validate(t.access_token, audience=AUDIENCE).reason is Reason.CLIENT_REVOKED
    assert broker.validate(bystander.access_token, audience=AUDIENCE).valid
    assert broker.validate(broker.issue(client_id="c", audience=AUDIENCE).access_token, audience=AUDIENCE).valid


def test_revoke_token_applies_on_the_next_validate_and_spares_its_session():
    broker, _ = make_broker()
    issued = broker.issue(client_id="c", audience=AUDIENCE)
    sibling = broker.issue(client_id="c", audience=AUDIENCE, session_id=issued.session_id)
    assert broker.revoke_token(issued.jti) == 1
    assert broker.validate(issued.access_token, audience=AUDIENCE).reason is Reason.TOKEN_REVOKED
    assert broker.validate(sibling.access_token, audience=AUDIENCE).valid
    assert broker.revoke_token(issued.jti) == 0


def test_validation_records_session_activity():
    broker, clock = make_broker()
    issued = broker.issue(client_id="c", audience=AUDIENCE, client_ip="10.0.0.1")
    clock.advance(5)
    broker.validate(issued.access_token, audience=AUDIENCE, client_ip="10.0.0.2")
    (session,) = broker.sessions("c")
    assert (session.last_seen_at, session.last_ip) == (int(clock.now), "10.0.0.2")


def test_insufficient_scope_is_reported_after_state_checks():
    broker, _ = make_broker()
    issued = broker.issue(client_id="c", audience=AUDIENCE, scopes=["read"])
    assert broker.validate(issued.access_token, audience=AUDIENCE, required_scopes=["read"]).valid
    result = broker.validate(issued.access_token, audience=AUDIENCE, required_scopes=["read", "write"])
    assert (result.reason, result.detail) == (Reason.INSUFFICIENT_SCOPE, "token lacks scope: write")
    broker.revoke_session(issued.session_id)
    assert broker.validate(issued.access_token, audience=AUDIENCE, required_scopes=["write"]).reason is (
        Reason.SESSION_REVOKED
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl_seconds": 3601},
        {"ttl_seconds": -1},
        {"audience": ""},
        {"client_id": ""},
        {"scopes": ["bad scope\n"]},
        {"dpop_jkt": "short"},
        {"dpop_jkt": "A" * 43, "cert_thumbprint": "A" * 43},
    ],
)
def test_bad_issue_arguments_raise_invalid_argument(kwargs):
    broker, _ = make_broker()
    args = {"client_id": "c", "audience": AUDIENCE, **kwargs}
    with pytest.raises(InvalidArgumentError):
        broker.issue(**args)


def test_async_twins_behave_like_the_sync_methods():
    async def scenario():
        broker, _ = make_broker()
        issued = await broker.aissue(client_id="c", audience=AUDIENCE, scopes=["s"])
        assert (await broker.avalidate(issued.access_token, audience=AUDIENCE)).valid
        assert len(await broker.asessions("c")) == 1
        assert await broker.arevoke_token(issued.jti) == 1
        assert (await broker.avalidate(issued.access_token, audience=AUDIENCE)).reason is Reason.TOKEN_REVOKED
        assert await broker.arevoke_session(issued.session_id) == 1
        assert await broker.arevoke_client("c") == 0

    asyncio.run(scenario())


def test_issued_token_repr_never_shows_the_token():
    broker, _ = make_broker()
    issued = broker.issue(client_id="c", audience=AUDIENCE)
    assert issued.access_token not in repr(issued)
    assert issued.access_token.split(".")[2] not in repr(issued)


def test_memory_store_replay_records_are_bounded_and_refuse_when_full():
    from tokenbroker import MemoryStore, ProofSigner

    broker, clock = make_broker(store=MemoryStore(max_replay_records=2))
    signer = ProofSigner()
    token = broker.issue(client_id="c", audience=AUDIENCE, dpop_jkt=signer.jkt).access_token

    def check():
        proof = signer.sign("POST", AUDIENCE, token, iat=int(clock.now))
        return broker.validate(token, audience=AUDIENCE, dpop_proof=proof, http_method="POST", http_uri=AUDIENCE)

    assert check().valid
    assert check().valid
    assert check().reason is Reason.REPLAY_CACHE_FULL
    clock.advance(120)  # the first records' windows are over: they can be forgotten
    assert check().valid


def test_memory_store_forgets_expired_replay_records_as_traffic_goes_on():
    from tokenbroker import MemoryStore
    from tokenbroker.store import SessionOpen, TokenCheck

    store = MemoryStore(clock=lambda: 0.0)  # the store's epoch: this test's time starts at 0
    session = store.open_session(
        SessionOpen(
            client_id="c",
            audience=AUDIENCE,
            session_id=None,
            ttl_seconds=10_000,
            limit=SessionLimit(),
            client_ip="",
            now=0,
        )
    )
    for t in range(300):  # 20 records a second, each kept 60 s
        for i in range(20):
            check = TokenCheck("c", session.session_id, AUDIENCE, "j", 0, "", ((f"{t}-{i}", t + 60),), t)
            assert store.check_token(check) is Reason.OK
    assert len(store._replay) <= 20 * 61


def test_required_scopes_may_be_a_string_or_a_one_shot_iterator():
    broker, _ = make_broker()
    issued = broker.issue(client_id="c", audience=AUDIENCE, scopes=["read"])
    assert broker.validate(issued.access_token, audience=AUDIENCE, required_scopes="read").valid
    lacking = broker.validate(issued.access_token, audience=AUDIENCE, required_scopes="read write")
    assert (lacking.reason, lacking.detail) == (Reason.INSUFFICIENT_SCOPE, "token lacks scope: write")
    # An iterator read once, even when another field sends the request down the lenient path
    # (both arguments of the wrong type on purpose).
    answer = broker.validate(issued.access_token, audience=AUDIENCE, required_scopes=iter(["write"]), http_method=7)  # type: ignore[arg-type]
    assert answer.reason is Reason.INSUFFICIENT_SCOPE


def test_an_empty_audience_is_the_callers_error_at_every_door():
    broker, _ = make_broker()
    issued = broker.issue(client_id="c", audience=AUDIENCE)
    with pytest.raises(InvalidArgumentError):
        broker.validate(issued.access_token, audience="")
    with pytest.raises(InvalidArgumentError):
        broker.validate_batch([{"token": issued.access_token, "audience": AUDIENCE}, {"token": "x", "audience": ""}])


def test_required_scopes_none_requires_no_scope():
    broker, _ = make_broker()
    issued = broker.issue(client_id="c", audience=AUDIENCE, scopes=["read"])
    assert broker.validate(issued.access_token, audience=AUDIENCE, required_scopes=None).valid
