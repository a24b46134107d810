"""Option values more than one command group parses the same way."""

from __future__ import annotations

from collections.abc import Iterable


def scopes(values: Iterable[str]) -> tuple[str, ...]:
    """`--scope a --scope "b c"` -> ("a", "b", "c"), without duplicates."""
    return tuple(dict.fromkeys(s for value in values for s in value.split()))
