"""The hash chain of an audit file, and what reads it: `verify` and `why`.

Each line `AuditLog` writes to a file or stream ends with two fields:

    {..., "seq": 7, "prev": "<hex SHA-256 of line 6's exact bytes, without its newline>"}

Line 1 has `"seq": 1` and a `prev` of 64 zeros (`GENESIS`). So an edited line no longer
hashes to the `prev` of the line after it, a removed line leaves a gap in `seq` and a
`prev` that names a line that is not there, and reordered lines go backwards in `seq`:
`verify` names the first line where that happens.

What the chain cannot see by itself: the last lines cut off the end (what is left is a
valid, shorter chain), and an edit of the very last line (no line after it records its
hash). Both are caught against a copy of a hash kept elsewhere: `verify` reports the last
hash, and `verify(..., expect=HASH)` (`tokenbroker audit verify --expect-last HASH`)
fails unless some line of the file hashes to HASH. The file may have grown since the copy
was taken; it must still pass through it.

Readers stream the file (memory bounded by `MAX_LINE_BYTES`, whatever the file's size)
and read a snapshot: the size of the file while they briefly hold a shared `flock`, which
writers hold exclusively around each line (`tokenbroker.audit`), so a reader never sees a
line half written.

`why(path, ID)` answers "what let this session (or token) in": the grant lines of that
session id or jti, and the decisions made later on that session, on its tokens and on its
client (revocations, listings), with who owns each decision where the line names it."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

GENESIS = "0" * 64
"""The `prev` of a file's first line."""
MAX_LINE_BYTES = 1 << 20
"""The longest line (without its newline) a writer writes and a reader reads: 1 MiB."""
MAX_DECISIONS = 10_000
"""The most decisions `why` returns (it says `truncated` when there were more)."""
# Reading backwards for the start of the last line goes by chunks of this size.
_TAIL_CHUNK = 8192
_HEX_HASH = re.compile(r"[0-9a-f]{64}")
# The fields of a line that name who owns the decision, and the name `why` gives each.
OWNER_FIELDS = (("approver", "approved_by"), ("client_owner", "owner"), ("caller", "caller"))
_ISSUE = "issue"  # tokenbroker.audit.ISSUE_EVENT (not imported: tokenbroker.audit imports this module)
_NOT_DECISIONS_ON_IT = frozenset((_ISSUE, "audit_suppressed"))
# Left out of what `why` prints: the checked `prev`, and what `why` itself says.
_NOT_PRINTED = frozenset(("prev", "line", "role", "owners"))


def line_hash(line: bytes) -> str:
    """The hex SHA-256 of a line's exact bytes, without its newline."""
    return hashlib.sha256(line).hexdigest()


def is_hash(text: str) -> bool:
    """Whether `text` is a line hash as this module writes it: 64 lowercase hex digits."""
    return _HEX_HASH.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class Link:
    """Where a chain ends: the `seq` and hash of its last line (0 and `GENESIS`: no line)."""

    seq: int = 0
    hash: str = GENESIS

    def chain(self, entry: dict[str, Any]) -> tuple[bytes, Link]:
        """`entry` as the line that follows this link (without its newline), and the new
        end of the chain. Refuses a line longer than `MAX_LINE_BYTES`: readers would
        refuse it, and a decision must not go unaudited."""
        line = orjson.dumps(
            {**entry, "seq": self.seq + 1, "prev": self.hash}, default=str, option=orjson.OPT_NON_STR_KEYS
        )
        if len(line) > MAX_LINE_BYTES:
            raise ValueError(
                f"an audit line of {len(line)} bytes is longer than the {MAX_LINE_BYTES} an audit line may hold: "
                "the fields given to AuditLog.record are too long"
            )
        return line, Link(self.seq + 1, line_hash(line))


@dataclass(frozen=True, slots=True)
class Tail:
    """The end of a file's chain, and whether its last line lacks its newline (a write
    cut short): the next line must then start with one."""

    link: Link
    torn: bool


def tail_of(fd: int, end: int) -> Tail:
    """The chain's end in the first `end` bytes of the file open (readable) at `fd`: the
    hash and `seq` of its last line, read from the end, in bounded memory. A last line
    that is not a chained audit line (a file written before chaining, a torn line) still
    gives its hash; its `seq` counts as 0, so the chain goes on at 1 and `verify` reports
    that line."""
    if end <= 0:
        return Tail(Link(), torn=False)
    torn = os.pread(fd, 1, end - 1) != b"\n"
    last_end = end if torn else end - 1
    start = _line_start(fd, last_end)
    if last_end - start <= MAX_LINE_BYTES:
        line = _pread_all(fd, start, last_end)
        return Tail(Link(_seq_of(line), line_hash(line)), torn)
    digest = hashlib.sha256()  # longer than any line a writer writes: hashed by chunks, no seq
    for chunk in _chunks(fd, start, last_end):
        digest.update(chunk)
    return Tail(Link(0, digest.hexdigest()), torn)


def _line_start(fd: int, last_end: int) -> int:
    """The offset just after the last newline before `last_end` (0 when there is none)."""
    pos = last_end
    while pos > 0:
        size = min(_TAIL_CHUNK, pos)
        chunk = _pread_all(fd, pos - size, pos)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return pos - size + newline + 1
        pos -= size
    return 0


def _chunks(fd: int, start: int, stop: int) -> Iterator[bytes]:
    pos = start
    while pos < stop:
        chunk = os.pread(fd, min(_TAIL_CHUNK * 8, stop - pos), pos)
        if not chunk:
            return  # the file shrank under us: what was there is hashed
        pos += len(chunk)
        yield chunk


def _pread_all(fd: int, start: int, stop: int) -> bytes:
    return b"".join(_chunks(fd, start, stop))


def _seq_of(line: bytes) -> int:
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return 0
    seq = entry.get("seq") if isinstance(entry, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 else 0


# -- reading ------------------------------------------------------------------------------------


class BrokenChain(ValueError):
    """The first bad line of an audit file: its number (from 1) and what is wrong with it."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


def snapshot_size(file: BinaryIO) -> int:
    """The file's size while no writer is between the start and the end of a line (they
    hold the lock exclusively around each line; this waits for at most one line)."""
    fcntl.flock(file.fileno(), fcntl.LOCK_SH)
    try:
        return os.fstat(file.fileno()).st_size
    finally:
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True, slots=True)
class ChainLine:
    """One line of an audit file: its number (from 1), its JSON object and its hash."""

    number: int
    entry: dict[str, Any]
    hash: str


def read_chain(file: BinaryIO, end: int, *, verify: bool = True) -> Iterator[ChainLine]:
    """The lines of the first `end` bytes of `file` (open for binary reading, at its
    start). With `verify`, raises `BrokenChain` at the first line that breaks the chain
    (module doc); without, skips lines that are not JSON objects and checks no link.
    Memory is bounded by `MAX_LINE_BYTES`, whatever the file's size."""
    before = Link()
    for number, line, problem in _lines(file, end):
        entry, problem = (None, problem) if problem is not None else _parse(line)
        if entry is None:
            if verify:
                raise BrokenChain(number, problem or "not a JSON object")
            continue
        if verify:
            _check_link(number, entry, before)
        before = Link(number, line_hash(line))
        yield ChainLine(number, entry, before.hash)


def _lines(file: BinaryIO, end: int) -> Iterator[tuple[int, bytes, str | None]]:
    """(number, line without its newline, what is wrong with it or None)."""
    pos = number = 0
    while pos < end:
        raw = file.readline(min(MAX_LINE_BYTES + 1, end - pos))
        if not raw:
            return  # the file shrank under us: what is gone cannot be read
        number += 1
        pos += len(raw)
        if raw.endswith(b"\n"):
            line = raw[:-1]
            yield number, line, None if line else "an empty line: tokenbroker writes none (one was inserted)"
        elif pos >= end:
            yield number, raw, "no newline at its end: a write cut short (the broker stopped mid-line) or an edit"
        else:
            while pos < end and not raw.endswith(b"\n"):  # skip the rest of an overlong line
                raw = file.readline(min(MAX_LINE_BYTES + 1, end - pos))
                if not raw:
                    break
                pos += len(raw)
            yield number, b"", f"longer than {MAX_LINE_BYTES} bytes: not a line tokenbroker writes"


def _parse(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None, "not JSON: edited, or not written by tokenbroker (garbage appended?)"
    if not isinstance(entry, dict):
        return None, "not a JSON object: edited, or not written by tokenbroker"
    return entry, None


def _check_link(number: int, entry: dict[str, Any], before: Link) -> None:
    """Raises `BrokenChain` unless line `number` follows `before`, the line before it."""
    seq, prev = entry.get("seq"), entry.get("prev")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise BrokenChain(number, "no seq: not a chained audit line (written before chaining, or edited)")
    if not isinstance(prev, str) or not is_hash(prev):
        raise BrokenChain(number, "no prev hash: not a chained audit line (written before chaining, or edited)")
    if seq > number:
        raise BrokenChain(number, f"seq {seq} where {number} was expected: a line was removed before it, or moved")
    if seq < number:
        raise BrokenChain(number, f"seq {seq} where {number} was expected: lines were reordered or repeated")
    if prev == before.hash:
        return
    if number == 1:
        raise BrokenChain(
            1, "its prev is not 64 zeros: lines were removed from the start (or the file continues another file)"
        )
    raise BrokenChain(
        number - 1,
        f"its hash is not the prev that line {number} records: line {number - 1} was edited (or line {number}'s prev)",
    )


# -- verify -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verified:
    """An intact chain: how many lines, the hash of the last (`GENESIS` for an empty
    file), the bytes read (the snapshot's size) and, when a hash was expected, the line
    that hashes to it (0: the expected hash was `GENESIS`, the empty file's)."""

    lines: int
    last_hash: str
    size: int
    expected_at: int | None = None


def verify(path: str | os.PathLike[str], *, expect: str | None = None) -> Verified:
    """Checks the chain of the audit file at `path` (a snapshot: module doc); raises
    `BrokenChain` at the first bad line. With `expect` (a hash kept elsewhere), also
    fails unless some line hashes to it: lines were cut off the end, or the last line
    was edited."""
    if expect is not None and not is_hash(expect):
        raise ValueError("the expected hash must be 64 lowercase hex digits: the last hash `audit verify` printed")
    lines, last, expected_at = 0, GENESIS, 0 if expect == GENESIS else None
    with Path(path).open("rb") as file:
        end = snapshot_size(file)
        for line in read_chain(file, end):
            lines, last = line.number, line.hash
            if expected_at is None and line.hash == expect:
                expected_at = line.number
    if expect is not None and expected_at is None:
        raise BrokenChain(
            max(lines, 1),
            f"no line hashes to the expected {expect} (the chain ends at line {lines}, hash {last}): "
            "lines were cut off the end, or the last line was edited",
        )
    return Verified(lines, last, end, expected_at)


# -- why ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Why:
    """What let a session or token in (`why`): the ids it was found as ("session",
    "jti"), the sessions and clients of its grants, and the decisions, in file order."""

    query: str
    found_as: tuple[str, ...]
    sessions: tuple[str, ...]
    clients: tuple[str, ...]
    decisions: tuple[dict[str, Any], ...]
    truncated: bool
    verified: bool
    lines: int
    last_hash: str


def why(path: str | os.PathLike[str], ident: str, *, verify: bool = True) -> Why | None:
    """The decisions that let session or token `ident` (a session id or a jti) in: its
    grant lines (event `issue`, decision `grant`), then every later decision that names
    that session, one of its tokens, or (naming no session or token) its client, each
    with its line number, its `role` (`let_in`, `on_session`, `on_token`, `on_client`)
    and its `owners` (approver, client owner, caller: what the line names). None when no
    grant names `ident`. With `verify`, raises `BrokenChain` on a broken chain first."""
    if not ident:
        raise ValueError("give a session id (`session_id` of `tokenbroker issue`) or a token's jti")
    found_as: set[str] = set()
    sessions: set[str] = set()
    jtis: set[str] = set()
    clients: set[str] = set()
    with Path(path).open("rb") as file:
        end = snapshot_size(file)
        lines, last = 0, GENESIS
        for line in read_chain(file, end, verify=verify):
            lines, last = line.number, line.hash
            kind = _granted_as(line.entry, ident)
            if kind is None:
                continue
            found_as.add(kind)
            for ids, name in ((sessions, "session"), (jtis, "jti"), (clients, "client")):
                value = _text(line.entry, name)
                if value and len(ids) < MAX_DECISIONS:
                    ids.add(value)
        if not found_as:
            return None
        file.seek(0)
        decisions: list[dict[str, Any]] = []
        truncated = False
        for line in read_chain(file, end, verify=verify):
            role = _role(line.entry, ident, sessions, jtis, clients)
            if role is None:
                continue
            if len(decisions) == MAX_DECISIONS:
                truncated = True
                break
            decisions.append(_decision(line, role))
    return Why(
        query=ident,
        found_as=tuple(sorted(found_as)),
        sessions=tuple(sorted(sessions)),
        clients=tuple(sorted(clients)),
        decisions=tuple(decisions),
        truncated=truncated,
        verified=verify,
        lines=lines,
        last_hash=last,
    )


def _text(entry: dict[str, Any], name: str) -> str | None:
    value = entry.get(name)
    return value if isinstance(value, str) else None


def _granted_as(entry: dict[str, Any], ident: str) -> str | None:
    """ "session" or "jti" when `entry` is a grant of that session or token, else None."""
    if entry.get("event") != _ISSUE or entry.get("decision") != "grant":
        return None
    if _text(entry, "session") == ident:
        return "session"
    if _text(entry, "jti") == ident:
        return "jti"
    return None


def _role(entry: dict[str, Any], ident: str, sessions: set[str], jtis: set[str], clients: set[str]) -> str | None:
    """What the line is to the session or token asked about, or None: a line that names
    a session or a token is about that one only; one that names neither, about its client."""
    if _granted_as(entry, ident) is not None:
        return "let_in"
    if entry.get("event") in _NOT_DECISIONS_ON_IT:
        return None
    session, jti = _text(entry, "session"), _text(entry, "jti")
    if session:
        return "on_session" if session in sessions else None
    if jti:
        return "on_token" if jti in jtis else None
    client = _text(entry, "client")
    return "on_client" if client and client in clients else None


def _decision(line: ChainLine, role: str) -> dict[str, Any]:
    """The line as `why` prints it: its number and role, its fields (the chain's `prev`
    left out: it was checked), and who owns the decision."""
    owners = {label: value for label, name in OWNER_FIELDS if (value := _text(line.entry, name))}
    fields = {k: v for k, v in line.entry.items() if k not in _NOT_PRINTED}
    return {"line": line.number, "role": role, **fields, "owners": owners}


__all__ = [
    "GENESIS",
    "MAX_LINE_BYTES",
    "BrokenChain",
    "ChainLine",
    "Link",
    "Tail",
    "Verified",
    "Why",
    "line_hash",
    "read_chain",
    "tail_of",
    "verify",
    "why",
]
