"""Reading an `application/x-www-form-urlencoded` request body (RFC 6749 appendix B), with
the rules the OAuth endpoints share: a bounded body, a bounded number of fields, and no
parameter sent twice (RFC 6749 section 3.2: "Request and response parameters MUST NOT be
included more than once"), which also closes the door to parameter pollution between a
proxy and the broker.

By hand over `urllib.parse` rather than Starlette's `request.form()`: that needs the
python-multipart package, reads multipart bodies we do not accept, and keeps the last of
repeated fields, which is the pollution this module refuses."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import parse_qsl

from starlette.requests import Request

from tokenbroker.http.errors import OAuthError, invalid_request

MAX_FORM_BYTES = 32 * 1024  # an 8 KiB client assertion and the rest, with room
MAX_FIELDS = 32
BODY_SECONDS = 10.0
FORM_TYPE = "application/x-www-form-urlencoded"
_LENGTH = re.compile(r"0*([0-9]{1,9})")


class Form:
    """The fields of one request body; each at most once, except those in `repeatable`."""

    def __init__(self, fields: list[tuple[str, str]]):
        self._values: dict[str, list[str]] = {}
        for name, value in fields:
            self._values.setdefault(name, []).append(value)

    def all(self, name: str) -> list[str]:
        return self._values.get(name, [])

    def get(self, name: str) -> str | None:
        """The field's value ("" counts as absent, RFC 6749 section 3.1), or raises when it is repeated."""
        values = self._values.get(name, [])
        if len(values) > 1:
            raise invalid_request(f"parameter {name!r} is sent {len(values)} times: send it once")
        return values[0] if values and values[0] != "" else None

    def names(self) -> list[str]:
        return list(self._values)


async def read_form(request: Request) -> Form:
    """The request's form, or an `OAuthError`: wrong content type, a body over
    `MAX_FORM_BYTES`, more than `MAX_FIELDS` fields, or bytes that are not UTF-8."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != FORM_TYPE:
        raise invalid_request(f"the body must be {FORM_TYPE} (RFC 6749 section 4.4.2)")
    declared = request.headers.get("content-length")
    # ASCII digits (str.isdigit also takes "³", which int() refuses), few enough for int().
    length = _LENGTH.fullmatch(declared) if declared is not None else None
    if declared is not None and (length is None or int(length[1]) > MAX_FORM_BYTES):
        raise OAuthError("invalid_request", f"the body is larger than {MAX_FORM_BYTES} bytes", status=413)
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_SECONDS):  # a body sent a byte at a time holds nothing long
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_FORM_BYTES:
                    raise OAuthError("invalid_request", f"the body is larger than {MAX_FORM_BYTES} bytes", status=413)
    except TimeoutError:
        raise OAuthError("invalid_request", f"the body did not arrive within {BODY_SECONDS:g} s", status=408) from None
    try:
        text = body.decode("utf-8")
        fields = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS, errors="strict")
    except UnicodeDecodeError:
        raise invalid_request("the body is not UTF-8 (form values are percent-encoded UTF-8)") from None
    except ValueError:
        raise invalid_request(f"the body has more than {MAX_FIELDS} fields") from None
    return Form(fields)


__all__ = ["FORM_TYPE", "MAX_FIELDS", "MAX_FORM_BYTES", "Form", "read_form"]
