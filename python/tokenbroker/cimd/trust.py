"""`cimd_trusted_domains`: the document domains whose clients are approved automatically
(and still pinned). A pattern is an exact host name (`agents.example.com`) or `*.` and a
suffix (`*.example.com`: any name under example.com, at any depth, but not example.com
itself: list it too if it serves documents). The matching pattern is returned so that the
approval can record which rule let the client in."""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenbroker.errors import InvalidArgumentError

_NAME = re.compile(r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")


def check_trusted_domains(patterns: Iterable[str]) -> tuple[str, ...]:
    """The patterns in lower case, or raises naming the first unusable one."""
    checked: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise InvalidArgumentError("cimd_trusted_domains must be a list of host names or '*.suffix' patterns")
        lowered = pattern.strip().lower()
        name = lowered[2:] if lowered.startswith("*.") else lowered
        if not _NAME.fullmatch(name) or (lowered.startswith("*.") and "." not in name):
            raise InvalidArgumentError(
                f"cimd_trusted_domains entry {pattern[:100]!r} is not a host name or '*.suffix' with a dotted "
                "suffix: write agents.example.com or *.example.com"
            )
        checked.append(lowered)
    return tuple(checked)


def trusted_domain_rule(domain: str, patterns: Iterable[str]) -> str | None:
    """The first pattern of `patterns` (already checked) that `domain` matches, or None."""
    domain = domain.lower()
    for pattern in patterns:
        if pattern.startswith("*."):
            if domain.endswith(pattern[1:]) and len(domain) > len(pattern) - 1:
                return pattern
        elif domain == pattern:
            return pattern
    return None
