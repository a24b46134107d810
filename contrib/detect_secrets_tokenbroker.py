"""A detect-secrets plugin for the secrets tokenbroker mints: server API keys `tbk_...` and
client secrets `tbs_...`, each 4 + 40 + 6 characters, the last 6 a checksum.

    detect-secrets scan --plugin contrib/detect_secrets_tokenbroker.py

A match is reported only when its checksum verifies, so a look-alike (a typo, a truncated
copy, a made-up example) is not a finding. The checksum is CRC32 of the prefix and body,
in 6 base62 digits: a format check anyone can compute, not a secret.

This file imports nothing of tokenbroker (it runs where the package is not installed), so
it repeats the pattern and the checksum of `tokenbroker.secret_format`; tokenbroker's
tests check that both agree."""

from __future__ import annotations

import hmac
import re
import zlib
from collections.abc import Generator

from detect_secrets.plugins.base import RegexBasedDetector

# As in tokenbroker.secret_format (PATTERN, ALPHABET, checksum).
PATTERN = r"\btb[ks]_[0-9A-Za-z]{46}\b"
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CHECKSUM_CHARS = 6


def checksum(prefix_and_body: str) -> str:
    """CRC32 of `prefix_and_body` as 6 base62 digits, most significant first."""
    number = zlib.crc32(prefix_and_body.encode("ascii"))
    digits = []
    for _ in range(CHECKSUM_CHARS):
        number, digit = divmod(number, 62)
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits))


def is_tokenbroker_secret(text: str) -> bool:
    """True when `text` is exactly a tokenbroker secret: format and checksum."""
    if not re.fullmatch(PATTERN, text, re.ASCII):
        return False
    return hmac.compare_digest(checksum(text[:-CHECKSUM_CHARS]), text[-CHECKSUM_CHARS:])


class TokenbrokerSecretDetector(RegexBasedDetector):
    """Scans for tokenbroker server API keys (tbk_) and client secrets (tbs_)."""

    secret_type = "Tokenbroker Secret"  # noqa: S105 (the name of a kind of finding)
    denylist = (re.compile(PATTERN, re.ASCII),)

    def analyze_string(self, string: str) -> Generator[str, None, None]:
        for match in super().analyze_string(string):
            if is_tokenbroker_secret(match):
                yield match
