"""Issue 9, section 3: `BrokerClient` builds the request types `Broker` takes, so a request
the broker would refuse for its own sake is refused here, with the same error, before any
call; and a built `ValidateRequest` / `IssueRequest` goes over the wire as it is."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tokenbroker import IssueRequest, ProofSigner, Reason, ValidateRequest
from tokenbroker.client import BrokerClient
from tokenbroker.errors import InvalidArgumentError

from support.brokers import make_broker
from support.grpc_servers import API_KEY, AUDIENCE, CLIENT_ID, CLIENT_SECRET, RunningBroker, running_broker

TIMEOUT = 10
JKT = ProofSigner().jkt

BAD_ISSUES: list[dict[str, Any]] = [
    {"ttl_seconds": 3601},
    {"dpop_jkt": JKT, "cert_thumbprint": JKT},
]


@pytest.fixture
def closed() -> BrokerClient:
    """A client that cannot call: its channel is closed and nothing listens at its target."""
    client = BrokerClient("127.0.0.1:1", api_key=API_KEY, timeout=2)
    client.close()
    return client


@pytest.fixture
def broker() -> Iterator[RunningBroker]:
    with running_broker() as running:
        yield running


def _embedded_refusal(**fields: Any) -> str:
    broker, _ = make_broker()
    with pytest.raises(InvalidArgumentError) as refused:
        broker.issue(client_id=CLIENT_ID, audience=AUDIENCE, **fields)
    return str(refused.value)


@pytest.mark.parametrize("fields", BAD_ISSUES, ids=lambda f: "-".join(f))
def test_a_bad_issue_request_is_refused_before_any_call(closed: BrokerClient, fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        closed.issue(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, audience=AUDIENCE, **fields)
    assert str(refused.value) == _embedded_refusal(**fields)  # the broker's own words


@pytest.mark.parametrize("fields", BAD_ISSUES, ids=lambda f: "-".join(f))
async def test_a_bad_issue_request_is_refused_before_any_async_call(
    closed: BrokerClient, fields: dict[str, Any]
) -> None:
    with pytest.raises(InvalidArgumentError):
        await closed.aissue(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, audience=AUDIENCE, **fields)


def test_an_empty_audience_is_refused_before_any_call(closed: BrokerClient) -> None:
    with pytest.raises(InvalidArgumentError, match="audience"):
        closed.validate("x", audience="")
    with pytest.raises(InvalidArgumentError, match="audience"):
        closed.validate_batch([{"token": "x", "audience": ""}])


def test_a_token_that_is_not_text_is_answered_without_a_call(closed: BrokerClient) -> None:
    answer = closed.validate(b"\xff".decode("latin-1"), audience=AUDIENCE, request_id="r")
    assert (answer.valid, answer.reason, answer.request_id) == (False, Reason.MALFORMED, "r")


def test_a_batch_entry_with_an_unknown_keyword_is_refused_before_any_call(closed: BrokerClient) -> None:
    with pytest.raises(InvalidArgumentError, match=r"batch request 1 .*audiance"):
        closed.validate_batch([{"token": "x", "audience": AUDIENCE}, {"token": "x", "audiance": AUDIENCE}])
    with pytest.raises(InvalidArgumentError, match="batch request 0"):
        closed.validate_batch([{"audience": AUDIENCE}])


def test_built_requests_go_over_the_wire_as_they_are(broker: RunningBroker) -> None:
    with BrokerClient(broker.target, api_key=API_KEY, timeout=TIMEOUT) as client:
        wanted = IssueRequest(client_id=CLIENT_ID, audience=AUDIENCE, scopes="tools:call", ttl_seconds=60)
        issued = client.issue_request(wanted, client_secret=CLIENT_SECRET)
        assert issued.scopes == ("tools:call",)
        request = ValidateRequest(issued.access_token, audience=AUDIENCE, required_scopes="tools:call", request_id="a")
        answer = client.validate_request(request)
        assert (answer.valid, answer.audience, answer.request_id) == (True, AUDIENCE, "a")
        batch = client.validate_batch(
            [
                request,
                {"token": "garbage", "audience": AUDIENCE, "request_id": "b"},
                {"token": "caf\u00e9", "audience": AUDIENCE, "request_id": "c"},  # answered here
                ValidateRequest(issued.access_token, audience=AUDIENCE, required_scopes=("write",)),
            ]
        )
        assert [(v.reason, v.request_id) for v in batch] == [
            (Reason.OK, "a"),
            (Reason.MALFORMED, "b"),
            (Reason.MALFORMED, "c"),
            (Reason.INSUFFICIENT_SCOPE, ""),
        ]
        assert client.validate(issued.access_token, audience=AUDIENCE, required_scopes="tools:call").valid


async def test_built_requests_go_over_the_wire_as_they_are_async(broker: RunningBroker) -> None:
    async with BrokerClient(broker.target, api_key=API_KEY, timeout=TIMEOUT) as client:
        wanted = IssueRequest(client_id=CLIENT_ID, audience=AUDIENCE, once=True)
        issued = await client.aissue_request(wanted, client_secret=CLIENT_SECRET)
        request = ValidateRequest(issued.access_token, audience=AUDIENCE)
        first = await client.avalidate_request(request)
        again = await client.avalidate_request(request)
        assert (first.valid, again.reason) == (True, Reason.REPLAYED)  # a single-use token, sent as built
        batch = await client.avalidate_batch([{"token": "caf\u00e9", "audience": AUDIENCE}])
        assert [v.reason for v in batch] == [Reason.MALFORMED]
