"""A document's bytes to a JSON object, strictly.

Strict because two parsers must not read one document two ways: a member given twice
(which `client_id`, which `jwks`?) is refused rather than resolved to the last one, as
are NaN and Infinity, a byte order mark, and anything that is not UTF-8."""

from __future__ import annotations

import json
from typing import Any

from tokenbroker.cimd.errors import CimdFetchError


class _Refused(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise _Refused(f"the member {name[:40]!r} appears twice")
        result[name] = value
    return result


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def parse_json_object(body: bytes, *, host: str) -> dict[str, Any]:
    """The JSON object in `body`, or raises `CimdFetchError` `not_json`."""
    try:
        text = body.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _Refused as error:
        raise CimdFetchError("not_json", f"the document at {host} is not usable JSON: {error}", host=host) from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CimdFetchError("not_json", f"the document at {host} is not valid UTF-8 JSON", host=host) from None
    if not isinstance(value, dict):
        raise CimdFetchError("not_json", f"the document at {host} is not a JSON object", host=host)
    return value
