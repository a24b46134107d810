"""What an MCP request touches (`resource`, detection's input): `resource_of` reading a
JSON-RPC body, and BrokerAuthMiddleware reading the body before it validates, relaying
`resource` and the client address to the broker (embedded or over gRPC) while the app
still receives the identical body, chunk for chunk, whatever its size."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbroker import Broker, Keyring
from tokenbroker._core import ValidateRequest
from tokenbroker.client import BrokerClient
from tokenbroker.mcp import BrokerAuthMiddleware
from tokenbroker.mcp.jsonrpc_resource import MAX_BODY, MAX_NAME, MAX_RESOURCE, MAX_RESOURCE_BYTES, resource_of
from tokenbroker.models import Validation

from support.grpc_servers import API_KEY, AUDIENCE, CLIENT_ID, RunningBroker, running_broker

ISSUER = "https://broker.resource.test"
URL = "http://testserver/mcp"


def rpc(method: str, params: Any = None, **extra: Any) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method, **extra}
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


def padded(body: bytes, size: int) -> bytes:
    """`body` with trailing JSON whitespace, `size` bytes in all (still the same request)."""
    assert len(body) <= size
    return body + b" " * (size - len(body))


# -- resource_of ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "resource"),
    [
        (rpc("tools/call", {"name": "add", "arguments": {"a": 1}}), "tools/call add"),
        (rpc("resources/read", {"uri": "file:///notes.txt"}), "resources/read file:///notes.txt"),
        (rpc("prompts/get", {"name": "summary"}), "prompts/get summary"),
        (rpc("tools/list"), "tools/list"),
        (rpc("initialize", {"protocolVersion": "2025-06-18"}), "initialize"),
        (b'{"jsonrpc":"2.0","method":"notifications/initialized"}', "notifications/initialized"),
    ],
)
def test_a_request_names_its_method_and_what_it_targets(body: bytes, resource: str) -> None:
    assert resource_of(body) == resource


@pytest.mark.parametrize(
    "params",
    [None, {}, {"name": 7}, {"name": ""}, {"name": None}, ["add"], "add"],
)
def test_a_target_method_without_a_usable_target_names_the_method_alone(params: Any) -> None:
    assert resource_of(rpc("tools/call", params)) == "tools/call"


def test_the_target_is_read_from_the_param_its_method_names() -> None:
    assert resource_of(rpc("resources/read", {"name": "x"})) == "resources/read"
    assert resource_of(rpc("tools/list", {"name": "add"})) == "tools/list"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"jsonrpc":"2.0","method":"tools/call"',  # truncated
        b"\xff\xfe{}",
        b"42",
        b'"tools/call"',
        b"null",
        b"{}",
        b'{"jsonrpc":"2.0","id":1,"result":{}}',  # a response the client sends back
        b'{"method":7}',
        b'{"method":""}',
        b'{"method":"\\u0000\\u001f"}',  # nothing printable left
        b"[]",
        b"[1, 2]",
        b"[" * 5000 + b"]" * 5000,  # deeper than orjson goes
    ],
)
def test_a_body_that_is_not_a_json_rpc_request_names_nothing(body: bytes) -> None:
    assert resource_of(body) is None


def test_a_batch_names_what_its_first_request_touches() -> None:
    batch = b"[" + rpc("tools/call", {"name": "add"}) + b"," + rpc("resources/read", {"uri": "a:b"}) + b"]"
    assert resource_of(batch) == "tools/call add"


def test_a_body_of_exactly_the_bound_is_read_and_one_byte_more_is_not() -> None:
    body = rpc("tools/call", {"name": "add"})
    assert resource_of(padded(body, MAX_BODY)) == "tools/call add"
    assert resource_of(padded(body, MAX_BODY + 1)) is None


def test_names_are_cut_to_the_bound() -> None:
    assert resource_of(rpc("tools/call", {"name": "n" * 10_000})) == "tools/call " + "n" * MAX_NAME
    assert resource_of(rpc("m" * 10_000)) == "m" * MAX_NAME


def test_non_printable_characters_are_removed_before_the_cut() -> None:
    name = "ad\x00d\n\x1b[31m\u202e\u2028\x85" + "\x01" * 1000 + "x"
    assert resource_of(rpc("tools/call", {"name": name})) == "tools/call add[31mx"
    assert resource_of(rpc("tools/\x7flist")) == "tools/list"


def test_a_lone_surrogate_is_not_json_so_it_never_reaches_the_answer() -> None:
    assert resource_of(b'{"method":"tools/call","params":{"name":"a\\ud800b"}}') is None
    assert resource_of(b'{"method":"tools/call","params":{"name":"a\\ud83d\\ude00b"}}') == "tools/call a\U0001f600b"


def test_a_long_non_ascii_name_stays_within_the_byte_bound_cut_at_a_character() -> None:
    answer = resource_of(rpc("\U0001f600" * 300, {"name": "\U0001f600" * 300}))
    assert answer == "\U0001f600" * MAX_NAME  # an unknown method: no target
    answer = resource_of(rpc("tools/call", {"name": "\U0001f600" * 300}))
    assert answer is not None
    assert answer.startswith("tools/call \U0001f600")
    assert len(answer.encode("utf-8")) <= MAX_RESOURCE_BYTES
    assert answer.encode("utf-8").decode("utf-8") == answer


def answer_is_bounded(answer: str | None) -> None:
    if answer is not None:
        assert answer
        assert len(answer) <= MAX_RESOURCE
        assert len(answer.encode("utf-8")) <= MAX_RESOURCE_BYTES
        assert answer.replace(" ", "").isprintable()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise_and_the_answer_is_bounded(body: bytes) -> None:
    answer_is_bounded(resource_of(body))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what orjson writes
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=600),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
methods = st.sampled_from(["tools/call", "resources/read", "prompts/get", "tools/list"]) | st.text(max_size=400)
requests = st.fixed_dictionaries(
    {"method": methods},
    optional={
        "jsonrpc": st.just("2.0"),
        "id": json_values,
        "params": st.dictionaries(st.sampled_from(["name", "uri", "arguments"]), json_values) | json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(requests, st.lists(requests, max_size=3), json_values))
def test_arbitrary_json_never_raises_and_the_answer_is_bounded(message: Any) -> None:
    answer_is_bounded(resource_of(orjson.dumps(message)))


# -- BrokerAuthMiddleware ----------------------------------------------------------------


@pytest.fixture
def broker() -> Broker:
    return Broker(Keyring.generate(), issuer=ISSUER)


class Recording:
    """A validator that records each call's keyword arguments and how many body messages
    the middleware had taken from the server by then, then asks `inner`."""

    def __init__(self, inner: Any, server: Server | None = None) -> None:
        self.inner = inner
        self.server = server
        self.calls: list[dict[str, Any]] = []
        self.received_before: list[int] = []

    async def avalidate(self, token: str, **kw: Any) -> Validation:
        self.calls.append(kw)
        self.received_before.append(self.server.taken if self.server else -1)
        return await self.inner.avalidate(token, **kw)  # type: ignore[no-any-return]


class Server:
    """An ASGI server's side of one request: hands out `messages` in order (then waits
    for nothing: a disconnect), records what was sent back."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages
        self.taken = 0
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.taken += 1
        if self.taken <= len(self.messages):
            return self.messages[self.taken - 1]
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])


class BodyApp:
    """The protected app: takes every body message (up to the last), answers 200."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            self.received.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def chunks(body: bytes, size: int) -> list[dict[str, Any]]:
    """`body` as ASGI messages of `size` bytes (at least one message)."""
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    return [{"type": "http.request", "body": part, "more_body": i < len(parts) - 1} for i, part in enumerate(parts)]


def scope_for(token: str, *, method: str = "POST", content_type: bytes | None = b"application/json") -> dict[str, Any]:
    headers = [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/mcp",
        "raw_path": b"/mcp",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("192.0.2.7", 40000),
        "server": ("testserver", 80),
    }


def bearer(broker: Broker, audience: str = URL) -> str:
    return broker.issue(client_id="agent", audience=audience, scopes=["tools:call"]).access_token


async def serve(
    validator: Any, scope: dict[str, Any], messages: list[dict[str, Any]], audience: str = URL
) -> tuple[Server, BodyApp, Recording]:
    """One request through the middleware; the recording validator wraps `validator`."""
    server, app = Server(messages), BodyApp()
    recording = Recording(validator, server)
    middleware = BrokerAuthMiddleware(app, broker=recording, audience=audience, require_dpop=False)
    await middleware(scope, server.receive, server.send)  # type: ignore[arg-type]  # a plain dict is the message
    return server, app, recording


TOOLS_CALL = rpc("tools/call", {"name": "add", "arguments": {"a": 1, "b": 2}})


@pytest.mark.parametrize(
    ("body", "chunk", "resource"),
    [
        (TOOLS_CALL, 1 << 20, "tools/call add"),  # small, one message
        (TOOLS_CALL, 7, "tools/call add"),  # small, in many messages
        (padded(TOOLS_CALL, MAX_BODY), 1 << 20, "tools/call add"),  # exactly the bound, one message
        (padded(TOOLS_CALL, MAX_BODY), 4096, "tools/call add"),  # exactly the bound, in 16
        (padded(TOOLS_CALL, MAX_BODY + 1), 1 << 20, None),  # one byte over: passed on, not parsed
        (padded(TOOLS_CALL, 200 * 1024), 1 << 20, None),  # 200 KiB in one message
        (padded(TOOLS_CALL, 200 * 1024), 4096, None),  # 200 KiB in 50 messages
        (b"", 1, None),  # no body at all
    ],
)
async def test_the_app_receives_the_identical_body_and_the_broker_what_it_touches(
    broker: Broker, body: bytes, chunk: int, resource: str | None
) -> None:
    messages = chunks(body, chunk)
    server, app, recording = await serve(broker, scope_for(bearer(broker)), messages)
    assert server.status == 200
    assert app.received == messages  # same bodies, same more_body flags, same order
    assert b"".join(m["body"] for m in app.received) == body
    assert [c["resource"] for c in recording.calls] == [resource]
    assert [c["client_ip"] for c in recording.calls] == ["192.0.2.7"]


async def test_a_large_body_is_not_buffered_past_the_bound_before_the_broker_call(broker: Broker) -> None:
    chunk = 4096
    messages = chunks(padded(TOOLS_CALL, 1024 * 1024), chunk)
    server, app, recording = await serve(broker, scope_for(bearer(broker)), messages)
    assert app.received == messages
    # Reading stops at the first message past 64 KiB: 17 of 256, the rest read by the app.
    assert recording.received_before == [MAX_BODY // chunk + 1]
    assert server.taken == len(messages)


async def test_a_disconnect_before_the_body_ends_reaches_the_app_and_names_nothing(broker: Broker) -> None:
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": TOOLS_CALL[:10], "more_body": True},
        {"type": "http.disconnect"},
    ]
    _, app, recording = await serve(broker, scope_for(bearer(broker)), messages)
    assert app.received == messages
    assert [c["resource"] for c in recording.calls] == [None]


@pytest.mark.parametrize(
    "content_type", [b"application/json", b"Application/JSON; charset=utf-8", b"application/vnd.mcp+json"]
)
async def test_a_json_content_type_is_read(broker: Broker, content_type: bytes) -> None:
    _, _, recording = await serve(broker, scope_for(bearer(broker), content_type=content_type), chunks(TOOLS_CALL, 64))
    assert [c["resource"] for c in recording.calls] == ["tools/call add"]


@pytest.mark.parametrize("content_type", [None, b"text/plain", b"application/jsonx", b"multipart/form-data"])
async def test_a_body_of_another_type_is_passed_on_unread(broker: Broker, content_type: bytes | None) -> None:
    messages = chunks(TOOLS_CALL, 64)
    _, app, recording = await serve(broker, scope_for(bearer(broker), content_type=content_type), messages)
    assert app.received == messages
    assert [c["resource"] for c in recording.calls] == [None]
    assert recording.received_before == [0]


async def test_two_content_types_are_not_trusted_to_name_a_resource(broker: Broker) -> None:
    scope = scope_for(bearer(broker))
    scope["headers"].append((b"content-type", b"text/plain"))
    _, app, recording = await serve(broker, scope, chunks(TOOLS_CALL, 64))
    assert [c["resource"] for c in recording.calls] == [None]
    assert app.received == chunks(TOOLS_CALL, 64)


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_a_stream_or_session_end_touches_nothing_and_its_body_is_not_read(broker: Broker, method: str) -> None:
    messages = [{"type": "http.request", "body": b"", "more_body": False}]
    _, app, recording = await serve(broker, scope_for(bearer(broker), method=method), messages)
    assert [c["resource"] for c in recording.calls] == [None]
    assert recording.received_before == [0]
    assert app.received == messages


async def test_a_request_refused_on_its_headers_reads_no_body(broker: Broker) -> None:
    scope = scope_for("x")
    scope["headers"] = [(b"host", b"testserver"), (b"content-type", b"application/json")]  # no credentials
    server, app, recording = await serve(broker, scope, chunks(TOOLS_CALL, 64))
    assert server.status == 401
    assert (recording.calls, server.taken, app.received) == ([], 0, [])


async def test_a_refused_token_is_refused_with_its_body_read_once(broker: Broker) -> None:
    server, app, recording = await serve(
        broker, scope_for(bearer(broker, "https://other.example/mcp")), chunks(TOOLS_CALL, 64)
    )
    assert server.status == 401
    assert [c["resource"] for c in recording.calls] == ["tools/call add"]
    assert app.received == []


async def test_the_embedded_broker_receives_the_resource(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []
    checked = broker.avalidate_request

    async def recording(request: ValidateRequest) -> Validation:
        seen.append(request.resource)
        return await checked(request)

    monkeypatch.setattr(broker, "avalidate_request", recording)
    server, _, _ = await serve(broker, scope_for(bearer(broker)), chunks(TOOLS_CALL, 64))
    assert server.status == 200
    assert seen == ["tools/call add"]


# -- over gRPC: BrokerClient as the middleware's broker ----------------------------------


@pytest.fixture
def grpc_broker() -> Iterator[RunningBroker]:
    with running_broker() as running:
        yield running


async def test_a_broker_client_relays_the_resource_over_grpc(
    grpc_broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str | None, str | None]] = []
    checked = grpc_broker.broker.validate_request

    def recording(request: ValidateRequest) -> Validation:
        seen.append((request.resource, request.client_ip))
        return checked(request)

    monkeypatch.setattr(grpc_broker.broker, "validate_request", recording)
    token = grpc_broker.broker.issue(client_id=CLIENT_ID, audience=AUDIENCE, scopes=["tools:call"]).access_token
    async with BrokerClient(grpc_broker.target, api_key=API_KEY, tls=False, timeout=5) as client:
        messages = chunks(TOOLS_CALL, 16)
        server, app, _ = await serve(client, scope_for(token), messages, audience=AUDIENCE)
    assert server.status == 200
    assert app.received == messages
    assert seen == [("tools/call add", "192.0.2.7")]
