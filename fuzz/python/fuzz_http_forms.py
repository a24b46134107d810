"""Coverage-guided fuzzing (atheris) of how the HTTP door reads a request: the form body and
the headers that carry client credentials.

What is fuzzed, on a synthetic ASGI request (headers and a body that arrives in chunks the
fuzzer chooses, sometimes cut by a disconnect):
- `tokenbroker.http.forms.read_form`: the Content-Type and Content-Length headers, the
  body's size, its UTF-8 and its application/x-www-form-urlencoded fields;
- `Form.get` / `Form.all` (a parameter sent twice is refused, RFC 6749 section 3.2);
- `tokenbroker.http.token_endpoint.client_credential`: the `Authorization: Basic` header
  (RFC 6749 section 2.3.1), `client_secret`, `client_assertion` and their combinations, and
  `requested_resource` (RFC 8707);
- `tokenbroker.http.introspection`: the `Authorization: Bearer` API key and the `token`
  field, and the unverified read of a token's `aud`;
- the `DPoP` header through `tokenbroker._core.verify_dpop_proof`.
(`tokenbroker.client_auth` parses no header: it receives the credential already read.)

The oracle, beyond "no crash":
- the only exception a parser may raise is `OAuthError`, with the documented code and
  status (`invalid_request` 400/408/413 for a bad body, `invalid_client` 401 with a Basic
  challenge, `invalid_target` for a bad resource), `starlette.requests.ClientDisconnect`
  when the client went away mid-body, and `ValueError` from `verify_dpop_proof`; anything
  else (a `ValueError` from `int()`, a `UnicodeError`, an `IndexError`, a Rust panic) is a
  finding and stops the fuzzer;
- a body is accepted exactly when the rules allow it (form content type, Content-Length
  ASCII digits within the limit, at most 32 KiB, percent-encoded UTF-8, at most 32
  fields), whatever its chunking, and then every field reads as `urllib.parse.parse_qs`
  reads it (values in order, names in order of first appearance, "" counting as absent);
- the client credential is accepted exactly when one method is used once, and what it
  names is what was sent: Basic credentials the harness encodes itself (form-encoded
  id and secret, base64) decode back to the same id and secret;
- an accepted resource is the one non-empty `resource` sent, an absolute URI with an
  authority, no fragment and no space or control character (RFC 3986 has none);
- introspection reads the one `token` sent (at most 16 Ki characters) and looks up exactly
  the `Bearer` credential of the one Authorization header;
- a DPoP header (random bytes here, never a signed proof) is never accepted.

Run: `.venv/bin/python fuzz/python/fuzz_http_forms.py WORKDIR fuzz/python/corpus/http_forms
-max_total_time=60 -print_final_stats=1` (WORKDIR receives the new inputs; the seeds in
the repo are only read).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, quote_plus, unquote_plus, unquote_to_bytes

import atheris
import orjson

with atheris.instrument_imports(include=["tokenbroker", "starlette"]):
    from starlette.requests import ClientDisconnect, Request

    from tokenbroker._core import verify_dpop_proof
    from tokenbroker.http import forms
    from tokenbroker.http.errors import BASIC_CHALLENGE, OAuthError
    from tokenbroker.http.forms import Form, read_form
    from tokenbroker.http.introspection import MAX_TOKEN_CHARS, _server, _token_field, _unverified_audience
    from tokenbroker.http.token_endpoint import (
        JWT_BEARER_ASSERTION,
        MAX_HEADER_CREDENTIAL_CHARS,
        ClientCredential,
        client_credential,
        requested_resource,
    )

ENDPOINT_URL = "https://broker.test/token"
FORM_TYPE = forms.FORM_TYPE.encode()
FIELD_NAMES = [
    "client_id",
    "client_secret",
    "client_assertion",
    "client_assertion_type",
    "resource",
    "grant_type",
    "scope",
    "token",
    "token_type_hint",
    "assertion",
]
CONTENT_TYPES = [
    FORM_TYPE,
    FORM_TYPE + b"; charset=UTF-8",
    b"Application/X-WWW-Form-URLEncoded",
    b"  " + FORM_TYPE + b" ;boundary",
    FORM_TYPE + b"x",
    b"multipart/form-data; boundary=x",
    b"application/json",
    b"",
]
HEADER_NAMES = [b"content-type", b"content-length", b"authorization", b"dpop", b"x-forwarded-for"]
SCHEMES = ["Basic ", "basic ", "BASIC  ", "Basic\t", "Bearer ", "bAsIc ", "Basic"]
FIELD_VALUES = [
    "",
    "client_credentials",
    JWT_BEARER_ASSERTION,
    "https://mcp.test/mcp",
    "https://mcp.test/mcp#frag",
    "mcp.test/mcp",
    "http://[::1",
    " https://mcp.test/mcp",
    "tools:call tools:list",
]
ASSERTION_CLAIMS: list[object] = [
    {"iss": "c", "sub": "c", "aud": ENDPOINT_URL},
    {"sub": ""},
    {"sub": 7},
    [1, 2],
    {"sub": "spiffe://example.org/w"},
]


class Finding(AssertionError):
    """The oracle's verdict: what the parser did is wrong (not merely refused)."""


NOTES: set[str] | None = None  # seeds.py sets it to learn what each input reached


def note(tag: str) -> None:
    if NOTES is not None:
        NOTES.add(tag)


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Finding(what if len(what) <= 1000 else what[:1000] + "...")


# -- the input --------------------------------------------------------------------------


@dataclass
class Plan:
    """One synthetic request, decoded from the fuzzer's bytes (no side effect)."""

    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    cuts: list[int] = field(default_factory=list)  # chunk boundaries in `body`
    disconnect_at: int | None = None  # index of the chunk replaced by http.disconnect
    basic: tuple[str, str] | None = None  # the id and secret the harness encoded, if it did


def _text(fdp: atheris.FuzzedDataProvider, limit: int) -> str:
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, limit))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _assertion(fdp: atheris.FuzzedDataProvider) -> str:
    """A JWS-shaped client assertion whose payload the fuzzer picks (never signed: only its
    unverified `sub` is read here)."""
    claims = fdp.PickValueInList(ASSERTION_CLAIMS)
    payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)) if fdp.ConsumeBool() else orjson.dumps(claims)
    return f"eyJhbGciOiJFZERTQSJ9.{_b64url(payload)}.{_b64url(fdp.ConsumeBytes(8))}"


def _field_value(fdp: atheris.FuzzedDataProvider, name: str) -> str:
    """A value for field `name`: first what a client would send there, else any."""
    kind = fdp.ConsumeIntInRange(0, 4)
    if kind == 0:
        if name == "client_assertion":
            return _assertion(fdp)
        if name == "client_assertion_type":
            return JWT_BEARER_ASSERTION
        if name == "grant_type":
            return "client_credentials"
        if name in ("resource", "scope"):
            return fdp.PickValueInList(FIELD_VALUES[3:])
        return _text(fdp, 40)
    if kind == 1:
        return fdp.PickValueInList(FIELD_VALUES)
    if kind == 2:
        return _assertion(fdp)
    if kind == 3:
        return "x" * fdp.ConsumeIntInRange(0, MAX_TOKEN_CHARS + 2)
    return _text(fdp, 40)


def _body(fdp: atheris.FuzzedDataProvider) -> bytes:
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:  # fields, encoded as a client would (names from the OAuth endpoints)
        pairs = []
        for _ in range(fdp.ConsumeIntInRange(0, 8)):
            name = _text(fdp, 12) if fdp.ConsumeBool() else fdp.PickValueInList(FIELD_NAMES)
            pairs.append(f"{quote_plus(name)}={quote_plus(_field_value(fdp, name))}")
        sep = fdp.PickValueInList(["&", "&", "&&", ";"])
        return sep.join(pairs).encode()
    if kind == 1:  # raw bytes: escapes, bad UTF-8, separators
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
    if kind == 2:  # many fields, around the limit of 32
        n = fdp.ConsumeIntInRange(0, 40)
        return "&".join(f"f{i}={i}" for i in range(n)).encode()
    # around the size limit of 32 KiB
    piece = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64)) or b"a"
    return (piece * (forms.MAX_FORM_BYTES // len(piece) + 2))[: forms.MAX_FORM_BYTES + fdp.ConsumeIntInRange(-2, 2)]


def _basic_header(fdp: atheris.FuzzedDataProvider, plan: Plan) -> bytes:
    client_id, secret = _text(fdp, 20), _text(fdp, 20)
    encoded = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    scheme = fdp.PickValueInList(SCHEMES)
    if scheme.lower().startswith("basic "):
        plan.basic = (client_id, secret)
    trailer = fdp.PickValueInList(["", " ", "\t"])
    value = f"{scheme}{base64.b64encode(encoded).decode()}{trailer}"
    return value.encode("latin-1", "replace")


def _header_value(fdp: atheris.FuzzedDataProvider, name: bytes, plan: Plan, body: bytes) -> bytes:
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 3:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
    if name == b"content-type":
        return fdp.PickValueInList(CONTENT_TYPES)
    if name == b"content-length":
        choices = [
            str(len(body)).encode(),
            b"0",
            str(forms.MAX_FORM_BYTES + 1).encode(),
            b"-1",
            b"1e3",
            b" 7",
            b"0" * fdp.ConsumeIntInRange(0, 5000) + b"7",
            b"9" * fdp.ConsumeIntInRange(0, 5000),
        ]
        return fdp.PickValueInList(choices)
    if name == b"authorization":
        if kind == 0:
            return _basic_header(fdp, plan)
        return (fdp.PickValueInList(SCHEMES) + _text(fdp, 60)).encode("latin-1", "replace")
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))


def plan_from(data: bytes) -> Plan:
    fdp = atheris.FuzzedDataProvider(data)
    plan = Plan(body=_body(fdp))
    if fdp.ConsumeIntInRange(0, 7) != 7:  # most requests are forms (0 is what no data left picks)
        plan.headers.append((b"content-type", fdp.PickValueInList(CONTENT_TYPES[:4])))
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        name = fdp.PickValueInList(HEADER_NAMES) if fdp.ConsumeIntInRange(0, 9) else fdp.ConsumeBytes(8).lower()
        plan.headers.append((name, _header_value(fdp, name, plan, plan.body)))
    plan.cuts = sorted(fdp.ConsumeIntInRange(0, len(plan.body)) for _ in range(fdp.ConsumeIntInRange(0, 4)))
    if fdp.ConsumeIntInRange(0, 15) == 15:
        plan.disconnect_at = fdp.ConsumeIntInRange(0, len(plan.cuts))
    if sum(1 for name, _ in plan.headers if name == b"authorization") != 1:
        plan.basic = None  # the harness's Basic header is not the one credential sent
    return plan


# -- the request ------------------------------------------------------------------------


def _chunks(plan: Plan) -> list[bytes]:
    bounds = [0, *plan.cuts, len(plan.body)]
    return [plan.body[a:b] for a, b in itertools.pairwise(bounds)]


def request_of(plan: Plan) -> Request:
    messages: list[dict[str, Any]] = []
    chunks = _chunks(plan)
    for i, chunk in enumerate(chunks):
        if plan.disconnect_at == i:
            messages.append({"type": "http.disconnect"})
            break
        messages.append({"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1})

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": "/token",
        "raw_path": b"/token",
        "query_string": b"",
        "root_path": "",
        "headers": plan.headers,
        "client": ("127.0.0.1", 40000),
        "server": ("broker.test", 443),
    }
    return Request(scope, receive)


def header_values(plan: Plan, name: bytes) -> list[str]:
    """What a header says, read straight from the ASGI scope (ISO-8859-1, as HTTP allows)."""
    return [value.decode("latin-1") for key, value in plan.headers if key == name]


# -- the model of each parser (RFC 6749 and the modules' documented rules) -------------

DIGITS = re.compile(r"[0-9]+")
B64URL = re.compile(r"[A-Za-z0-9_-]*")
ERROR = "error"  # the model's answer: refused
EITHER = "either"  # the model does not decide (lenient decoding the RFC leaves open)


def _strict_percent_utf8(text: str) -> bool:
    """Whether every name and value percent-decodes to UTF-8 (form values are UTF-8)."""
    for part in re.split(r"[&=]", text):
        try:
            unquote_to_bytes(part.replace("+", " ")).decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True


def expected_form(plan: Plan) -> tuple[int, str] | dict[str, list[str]]:
    """(status, error) the body must be refused with, or its fields as parse_qs reads them."""
    content_types = header_values(plan, b"content-type")
    # Python's str.strip(), as the module does: wider than HTTP's OWS (SP, HTAB), harmlessly.
    media = content_types[0].split(";", 1)[0].strip().lower() if content_types else ""
    if media != forms.FORM_TYPE:
        return 400, "invalid_request"
    lengths = header_values(plan, b"content-length")
    if lengths:
        declared = lengths[0]
        digits = declared.lstrip("0")
        if not DIGITS.fullmatch(declared) or len(digits) > 9 or int(digits or "0") > forms.MAX_FORM_BYTES:
            return 413, "invalid_request"
    chunks = _chunks(plan)
    if plan.disconnect_at is not None:
        if len(b"".join(chunks[: plan.disconnect_at])) > forms.MAX_FORM_BYTES:
            return 413, "invalid_request"
        return 499, "disconnect"
    if len(plan.body) > forms.MAX_FORM_BYTES:
        return 413, "invalid_request"
    try:
        text = plan.body.decode("utf-8")
    except UnicodeDecodeError:
        return 400, "invalid_request"
    if 1 + text.count("&") > forms.MAX_FIELDS or not _strict_percent_utf8(text):
        return 400, "invalid_request"
    return parse_qs(text, keep_blank_values=True)


class _Refused(Exception):
    pass


def _one(fields: dict[str, list[str]], name: str) -> str | None:
    """RFC 6749 section 3.1 and 3.2: "" is absent, twice is refused."""
    values = fields.get(name, [])
    if len(values) > 1:
        raise _Refused(name)
    return values[0] if values and values[0] != "" else None


def _strict_b64(text: str) -> bytes | None:
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def _strict_b64url(text: str) -> bytes | None:
    if not B64URL.fullmatch(text) or len(text) % 4 == 1:
        return None
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _expected_basic(header: str, form_id: str | None) -> tuple[str, str] | str:
    scheme, _, rest = header.partition(" ")
    if scheme.lower() != "basic":
        return ERROR
    encoded = rest.strip(" \t")
    decoded = _strict_b64(encoded)
    if decoded is None:
        return EITHER  # whitespace other than SP and HTAB, or a non-canonical encoding
    if len(encoded) > MAX_HEADER_CREDENTIAL_CHARS:
        return ERROR
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        return ERROR
    client_id, sep, secret = text.partition(":")
    if not sep or not client_id or not secret:
        return ERROR
    client_id, secret = unquote_plus(client_id), unquote_plus(secret)
    if form_id is not None and form_id != client_id:
        return ERROR
    return client_id, secret


def expected_credential(plan: Plan, fields: dict[str, list[str]]) -> tuple[str, str, str | None, str | None] | str:
    """(method, client_id, secret, assertion), ERROR or EITHER: RFC 6749 section 2.3, one
    method, used once, and RFC 7523 section 2.2 for an assertion."""
    headers = header_values(plan, b"authorization")
    if len(headers) > 1:
        return ERROR
    header = headers[0] if headers else None
    try:
        form_id, secret = _one(fields, "client_id"), _one(fields, "client_secret")
        assertion, assertion_type = _one(fields, "client_assertion"), _one(fields, "client_assertion_type")
    except _Refused:
        return ERROR
    if sum(1 for present in (header, secret, assertion) if present) > 1:
        return ERROR
    if assertion_type is not None and assertion is None:
        return ERROR
    if header is not None:
        basic = _expected_basic(header, form_id)
        if isinstance(basic, str):
            return basic
        return "client_secret_basic", basic[0], basic[1], None
    if assertion is not None:
        if assertion_type != JWT_BEARER_ASSERTION or assertion.count(".") != 2:
            return ERROR
        payload = assertion.split(".")[1]
        if len(payload) > 16 * 1024:
            return ERROR
        raw = _strict_b64url(payload)
        if raw is None:
            return EITHER
        try:
            claims = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return ERROR
        subject = claims.get("sub") if isinstance(claims, dict) else None
        if not isinstance(subject, str) or not subject:
            return ERROR
        return "private_key_jwt", form_id or subject, None, assertion
    if secret is not None:
        return ERROR if form_id is None else ("client_secret_post", form_id, secret, None)
    return ERROR


def is_absolute_uri(value: str) -> bool:
    """RFC 3986 absolute-URI with an authority, and no fragment (RFC 8707 section 2). No
    character of a URI (or an IRI, RFC 3987) is a control character or a space."""
    if any(c <= " " or c == "\x7f" for c in value) or "#" in value:
        return False
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]", value) is not None


# -- running one input ------------------------------------------------------------------

LOOP = asyncio.new_event_loop()


def oauth_error(exc: OAuthError, codes: dict[str, set[int]], what: str) -> None:
    check(exc.error in codes, f"{what}: unexpected OAuth error code {exc.error!r}")
    check(exc.status in codes[exc.error], f"{what}: {exc.error} with status {exc.status}")
    if exc.error == "invalid_client":
        check(exc.headers.get("WWW-Authenticate") == BASIC_CHALLENGE, f"{what}: 401 without a Basic challenge")
    check(isinstance(exc.description, str) and exc.description != "", f"{what}: no description")


def run_read_form(plan: Plan) -> Form | None:
    expected = expected_form(plan)
    try:
        form = LOOP.run_until_complete(read_form(request_of(plan)))
    except OAuthError as exc:
        oauth_error(exc, {"invalid_request": {400, 408, 413}}, "read_form")
        note(f"form:{exc.status}")
        check(isinstance(expected, tuple), f"read_form refused a good body ({exc.status}: {exc.description})")
        assert isinstance(expected, tuple)
        check(exc.status == expected[0], f"read_form answered {exc.status}, the rules say {expected[0]}")
        return None
    except ClientDisconnect:
        note("form:disconnect")
        check(expected == (499, "disconnect"), "read_form saw a disconnect the request did not have")
        return None
    check(not isinstance(expected, tuple), f"read_form accepted a body the rules refuse ({expected})")
    note("form:ok")
    assert isinstance(expected, dict)
    check(form.names() == list(expected), f"field names {form.names()!r} != parse_qs {list(expected)!r}")
    for name, values in expected.items():
        check(form.all(name) == values, f"field {name!r}: {form.all(name)!r} != parse_qs {values!r}")
        try:
            got = form.get(name)
        except OAuthError as exc:
            oauth_error(exc, {"invalid_request": {400}}, "Form.get")
            check(len(values) > 1, f"Form.get refused {name!r} sent once")
            continue
        check(len(values) == 1, f"Form.get accepted {name!r} sent {len(values)} times (RFC 6749 section 3.2)")
        check(got == (values[0] or None), f"Form.get({name!r}) = {got!r}, sent {values[0]!r}")
    check(form.get("never-sent-field") is None and form.all("never-sent-field") == [], "an absent field is present")
    return form


def guarded(call: Callable[[], Any], codes: dict[str, set[int]], what: str) -> tuple[bool, Any]:
    """(True, result) or (False, the OAuthError); any other exception propagates (a finding)."""
    try:
        return True, call()
    except OAuthError as exc:
        oauth_error(exc, codes, what)
        return False, exc


def run_credential(plan: Plan, form: Form, fields: dict[str, list[str]], request: Request) -> None:
    codes = {"invalid_request": {400}, "invalid_client": {401}}
    ok, got = guarded(lambda: client_credential(request, form), codes, "client_credential")
    expected = expected_credential(plan, fields)
    if expected == EITHER:
        return
    if not ok:
        check(expected == ERROR, f"client_credential refused {expected!r}: {got.description}")
        return
    check(isinstance(got, ClientCredential), "client_credential returned no ClientCredential")
    note(f"credential:{got.method}")
    check(expected != ERROR, f"client_credential accepted what RFC 6749 section 2.3 refuses: {got.method}")
    actual = (got.method, got.client_id, got.secret, got.assertion)
    check(actual == expected, f"client_credential read {actual!r}, the request says {expected!r}")
    if plan.basic is not None and got.method == "client_secret_basic":
        check((got.client_id, got.secret) == plan.basic, f"Basic credentials {plan.basic!r} read as {actual!r}")


def run_resource(form: Form, fields: dict[str, list[str]]) -> None:
    ok, got = guarded(lambda: requested_resource(form), {"invalid_target": {400}}, "requested_resource")
    sent = [r for r in fields.get("resource", []) if r]
    if not ok:  # the model checks what is accepted; RFC 3986's authority is stricter than it
        check(sent != [], "requested_resource refused a request that names no resource")
        return
    if got is None:
        check(not sent, f"resource {sent!r} read as absent")
        return
    check(sent == [got], f"resource read as {got!r}, sent {sent!r}")
    note("resource:ok")
    check(is_absolute_uri(got), f"resource {got!r} accepted: not an absolute URI without a fragment (RFC 8707)")


def run_introspection(plan: Plan, form: Form, fields: dict[str, list[str]], request: Request) -> None:
    ok, got = guarded(lambda: _token_field(form), {"invalid_request": {400}}, "introspection token")
    values = fields.get("token", [])
    good = len(values) == 1 and values[0] != "" and len(values[0]) <= MAX_TOKEN_CHARS
    check(ok == good, f"introspection token field {'accepted' if ok else 'refused'}: {[len(v) for v in values]}")
    if ok:
        note("introspection:token")
        check(got == values[0], "introspection read another token than the one sent")
        audience = _unverified_audience(got)
        check(audience is None or (isinstance(audience, str) and audience != ""), "unverified aud is not text")
    asked: list[str] = []
    registry = SimpleNamespace(server_by_api_key=lambda key: asked.append(key) or "server")
    components: Any = SimpleNamespace(registry=registry)
    ok, got = guarded(lambda: _server(components, request), {"invalid_request": {400}}, "introspection caller")
    headers = header_values(plan, b"authorization")
    check(ok == (len(headers) <= 1), "introspection's one-Authorization-header rule")
    if ok:
        scheme, _, key = (headers[0] if headers else "").partition(" ")
        wanted = [key.strip()] if scheme.lower() == "bearer" and key.strip() else []
        check(asked == wanted, f"introspection looked up API key {asked!r}, the header says {wanted!r}")


def run_dpop(plan: Plan) -> None:
    for proof in header_values(plan, b"dpop"):
        try:
            verify_dpop_proof(proof, "POST", ENDPOINT_URL, max_age_seconds=60, leeway_seconds=5)
        except ValueError:
            continue
        raise Finding(f"a DPoP header the harness never signed verified: {proof!r}")


def TestOneInput(data: bytes) -> None:
    plan = plan_from(data)
    run_dpop(plan)
    form = run_read_form(plan)
    if form is None:
        return
    fields = expected_form(plan)
    assert isinstance(fields, dict)
    request = request_of(plan)  # headers only: the body was read
    run_credential(plan, form, fields, request)
    run_resource(form, fields)
    run_introspection(plan, form, fields, request)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
