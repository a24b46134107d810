"""validate_batch gives, in order, the answers validate would give one by one."""

import asyncio

from tokenbroker import Keyring, ProofSigner, Reason

from support.brokers import AUDIENCE, OTHER_AUDIENCE, make_broker


def _requests(broker, clock):
    signer = ProofSigner()
    good = [broker.issue(client_id=f"c{i % 3}", audience=AUDIENCE).access_token for i in range(8)]
    bound = broker.issue(client_id="d", audience=AUDIENCE, dpop_jkt=signer.jkt).access_token
    proof = signer.sign("POST", AUDIENCE, bound, iat=int(clock.now))
    foreign = make_broker(Keyring.generate())[0].issue(client_id="x", audience=AUDIENCE).access_token
    revoked = broker.issue(client_id="r", audience=AUDIENCE)
    broker.revoke_session(revoked.session_id)
    reqs = [{"token": t, "audience": AUDIENCE, "request_id": f"g{i}"} for i, t in enumerate(good)]
    reqs += [
        {"token": bound, "audience": AUDIENCE, "dpop_proof": proof, "http_method": "POST", "http_uri": AUDIENCE},
        {"token": bound, "audience": AUDIENCE, "dpop_proof": proof, "http_method": "POST", "http_uri": AUDIENCE},
        {"token": foreign, "audience": AUDIENCE},
        {"token": good[0], "audience": OTHER_AUDIENCE},
        {"token": good[1], "audience": AUDIENCE, "required_scopes": ["admin"]},
        {"token": revoked.access_token, "audience": AUDIENCE},
        {"token": None, "audience": AUDIENCE},
        {"token": "a.b.c", "audience": AUDIENCE},
    ]
    return reqs


EXPECTED_TAIL = [
    Reason.OK,
    Reason.REPLAYED,
    Reason.UNKNOWN_KEY,
    Reason.WRONG_AUDIENCE,
    Reason.INSUFFICIENT_SCOPE,
    Reason.SESSION_REVOKED,
    Reason.MALFORMED,
    Reason.MALFORMED,
]


def test_batch_answers_in_order_with_the_single_call_reasons():
    broker, clock = make_broker(session_limit=None)
    answers = broker.validate_batch(_requests(broker, clock))
    assert [a.reason for a in answers] == [Reason.OK] * 8 + EXPECTED_TAIL
    assert [a.request_id for a in answers[:8]] == [f"g{i}" for i in range(8)]
    assert answers[0].client_id == "c0"


def test_async_batch_matches():
    broker, clock = make_broker(session_limit=None)
    answers = asyncio.run(broker.avalidate_batch(_requests(broker, clock)))
    assert [a.reason for a in answers] == [Reason.OK] * 8 + EXPECTED_TAIL


def test_batch_on_redis_gives_the_same_answers(redis_server):
    from tokenbroker import RedisStore

    store = RedisStore.from_url(redis_server.url)
    try:
        broker, clock = make_broker(store=store, session_limit=None)
        answers = broker.validate_batch(_requests(broker, clock))
        assert [a.reason for a in answers] == [Reason.OK] * 8 + EXPECTED_TAIL
        answers = asyncio.run(broker.avalidate_batch(_requests(broker, clock)))
        assert [a.reason for a in answers] == [Reason.OK] * 8 + EXPECTED_TAIL
    finally:
        store.close()
