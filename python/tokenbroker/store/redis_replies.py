"""Reading Redis replies. A pipeline hands back a failed call's exception in place of its
reply; these raise `ReplyError` for it, and for a reply of a type the store never expects."""

from __future__ import annotations

from typing import Any

from tokenbroker.store.redis_errors import ReplyError


def reply_value(reply: object) -> Any:
    """The reply itself, or `ReplyError` (caused by it) when the call failed."""
    if isinstance(reply, BaseException):
        raise ReplyError(type(reply).__name__) from reply
    return reply


def reply_text(value: object) -> str:
    """A string reply (bytes or text, whatever the client decodes) as text."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise ReplyError(f"unexpected reply type {type(value).__name__}")


def reply_texts(reply: object) -> list[str]:
    """A script's array reply as text (numbers included)."""
    if not isinstance(reply, list):
        raise ReplyError(f"unexpected reply type {type(reply).__name__}")
    return [str(x) if isinstance(x, int) else reply_text(x) for x in reply]
