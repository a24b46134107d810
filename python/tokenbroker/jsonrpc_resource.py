"""`resource_of`: what an MCP request touches, read from its JSON-RPC 2.0 body, for the
broker's detection (`ValidateTokenRequest.resource`: `resource_breadth` counts the distinct
resources a session touches).

A request names a tool, a resource URI or a prompt: "tools/call add",
"resources/read file:///notes.txt", "prompts/get summary"; any other method is its name
alone ("initialize", "tools/list", "notifications/initialized"). The answer goes into
detection state and events, so it is bounded and printable whatever the body holds: only a
body of at most `MAX_BODY` bytes is parsed, each part is cut to `MAX_NAME` characters after
non-printable characters (controls, format characters such as bidi overrides, line
separators, lone surrogates) are removed, and a body that is not a JSON-RPC request (too
large, not JSON, not an object, no method: a response the client sends back) names nothing
(None). A batch (MCP 2025-03-26) names what its first request touches: one batch is one
validation, and adding the batch's size would make each size a new "resource"."""

from __future__ import annotations

import orjson

MAX_BODY = 64 * 1024  # bytes of a body parsed; a larger body names nothing
MAX_NAME = 256  # characters kept of a method and of a tool name, URI or prompt name
MAX_RESOURCE = 2 * MAX_NAME + 1  # the longest answer in characters: method, space, name
# ... and in UTF-8 bytes: well under the 2048 a broker accepts in `resource` (a longer one
# would be INVALID_ARGUMENT, and the request refused, for a long non-ASCII tool name).
MAX_RESOURCE_BYTES = 1024

# The methods whose target is one of their params: method -> the param naming it.
_TARGETS = {"tools/call": "name", "resources/read": "uri", "prompts/get": "name"}


def _printable(text: str) -> str:
    """`text` without non-printable characters, cut to `MAX_NAME`."""
    if not text.isprintable():
        text = "".join(ch for ch in text if ch.isprintable())
    return text[:MAX_NAME]


def _request_resource(request: object) -> str | None:
    """What one JSON-RPC request object touches; None when it is not one."""
    if not isinstance(request, dict):
        return None
    method = request.get("method")
    if not isinstance(method, str):
        return None
    name = _printable(method)
    if not name:
        return None
    param = _TARGETS.get(method)
    params = request.get("params")
    if param is None or not isinstance(params, dict):
        return name
    target = params.get(param)
    target = _printable(target) if isinstance(target, str) else ""
    if not target:
        return name
    answer = f"{name} {target}"
    encoded = answer.encode("utf-8")  # no surrogate is left: `_printable` removed them
    if len(encoded) <= MAX_RESOURCE_BYTES:
        return answer
    return encoded[:MAX_RESOURCE_BYTES].decode("utf-8", "ignore")  # a cut character is dropped


def resource_of(body: bytes) -> str | None:
    """What the JSON-RPC request in `body` touches (see the module docstring), at most
    `MAX_RESOURCE` characters and `MAX_RESOURCE_BYTES` UTF-8 bytes; None when `body` names
    nothing. Never raises."""
    if not isinstance(body, bytes | bytearray | memoryview) or len(body) > MAX_BODY:
        return None
    try:
        message = orjson.loads(body)  # orjson refuses nesting deeper than 1024 levels
    except orjson.JSONDecodeError:
        return None
    if isinstance(message, list):
        message = message[0] if message else None
    return _request_resource(message)
