"""The format of the secrets tokenbroker mints, made for secret scanners (DESIGN,
"Detection events"): a scanner that finds one in a commit, a log or a paste can tell it
apart from random text exactly, with no false positive from a look-alike.

    tbk_<40 random base62 characters><6 base62 characters of CRC32>   a server API key
    tbs_<40 random base62 characters><6 base62 characters of CRC32>   a client secret

The prefix says what the secret is; the 40 characters come from `secrets` (40 x
log2(62) = 238 random bits, far beyond any brute force, which is why a fast hash stores
them); the checksum is CRC32 of prefix + body, written as 6 base62
digits, as GitHub's token format does. base62 keeps the secret one "word" (no `-`, `_`
or `=` inside it), so a double-click selects it whole and a regex with word boundaries
finds it in any text.

Only the SHA-256 of a secret is stored (`registry_file.hash_secret`), whatever its
format, so the secrets minted before this format (43 characters of base64url) still
authenticate unchanged; they just cannot be told from random text by a scanner.

`contrib/detect_secrets_tokenbroker.py` and `contrib/gitleaks.toml` repeat `PATTERN` and
the checksum (they must run without tokenbroker installed); tests/test_secret_scanning.py
checks that the copies agree."""

from __future__ import annotations

import re
import secrets
import zlib
from collections.abc import Iterator, Mapping
from typing import Literal, get_args

Kind = Literal["server_api_key", "client_secret"]
KINDS: tuple[Kind, ...] = get_args(Kind)
PREFIXES: Mapping[Kind, str] = {"server_api_key": "tbk_", "client_secret": "tbs_"}
_KIND_OF_PREFIX = {prefix: kind for kind, prefix in PREFIXES.items()}

# Hand-written base62 (20 lines): no library is worth a dependency for it, and the
# contrib plugin, which cannot import anything of ours, repeats these lines as they are.
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_CHARS = 40  # 40 x log2(62) = 238.2 random bits
CHECKSUM_CHARS = 6  # 62**6 > 2**32: any CRC32 fits
PREFIX_CHARS = 4
LENGTH = PREFIX_CHARS + BODY_CHARS + CHECKSUM_CHARS

# One regex for both kinds, what the gitleaks rules and the detect-secrets plugin match
# (RE2 syntax too, for gitleaks: no look-around). The word boundaries keep a longer run of
# letters and digits, or one glued to a preceding word, from matching.
PATTERN = r"\btb[ks]_[0-9A-Za-z]{46}\b"
# Each kind's own regex, as the gitleaks rules write them.
KIND_PATTERNS: Mapping[Kind, str] = {
    kind: rf"\b{prefix}[0-9A-Za-z]{{{BODY_CHARS + CHECKSUM_CHARS}}}\b" for kind, prefix in PREFIXES.items()
}
_FIND = re.compile(PATTERN, re.ASCII)
_EXACT = re.compile(r"tb[ks]_[0-9A-Za-z]{46}", re.ASCII)


def _base62(number: int, width: int) -> str:
    """`number` as exactly `width` base62 digits, most significant first (0-padded)."""
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(ALPHABET[digit])
    if number:
        raise ValueError(f"{width} base62 digits cannot hold that number")
    return "".join(reversed(digits))


def checksum(prefix_and_body: str) -> str:
    """The 6 base62 characters that end a secret: CRC32 of its prefix and body.

    CRC32 is a format check, not security: it lets a scanner tell a real tokenbroker
    secret from a look-alike (a typo, a truncated copy, a made-up example) without asking
    anyone, and anyone can compute it. The secret's strength is its 238 random bits."""
    return _base62(zlib.crc32(prefix_and_body.encode("ascii")), CHECKSUM_CHARS)


def mint(kind: Kind) -> str:
    """A new secret of `kind`: its prefix, 40 random base62 characters, the checksum."""
    prefix = PREFIXES.get(kind)
    if prefix is None:
        raise ValueError(f"unknown kind of secret {kind!r}: one of {', '.join(KINDS)}")
    body = "".join(secrets.choice(ALPHABET) for _ in range(BODY_CHARS))
    return prefix + body + checksum(prefix + body)


def parse(text: str) -> Kind | None:
    """The kind of the secret `text` is, when it is one exactly (format and checksum),
    else None. No stripping: a secret with surrounding spaces is not one."""
    if not isinstance(text, str) or len(text) != LENGTH or not _EXACT.fullmatch(text):
        return None
    head, tail = text[:-CHECKSUM_CHARS], text[-CHECKSUM_CHARS:]
    if not secrets.compare_digest(checksum(head), tail):
        return None
    return _KIND_OF_PREFIX[text[:PREFIX_CHARS]]


def find(text: str) -> Iterator[str]:
    """The secrets in `text` that match `PATTERN` and whose checksum verifies, in order."""
    for match in _FIND.finditer(text):
        if parse(match.group()) is not None:
            yield match.group()


__all__ = [
    "ALPHABET",
    "KINDS",
    "KIND_PATTERNS",
    "LENGTH",
    "PATTERN",
    "PREFIXES",
    "Kind",
    "checksum",
    "find",
    "mint",
    "parse",
]
