"""Decision records: how the servicer tells the audit interceptor what it decided, without
knowing about audit lines or metrics.

Why a record and not an interceptor that reads the call: an audit line says more than a
call shows from outside. The rule of a refusal is the domain error's `.rule` (the status
sent says only PERMISSION_DENIED), the grant's binding is the authenticated client's
record, the source address is the relayed one only when the caller may relay it, and a
refusal of a caller that never proved itself (`authenticated=False`) is rate-limited. So
the servicer, which decides all that, puts it in a `Decision`; the audit interceptor
writes it (`tokenbroker.service.audit_interceptor`).

Why the record is handed over at once (`decide(context, decision)`), not after the
handler returns: the line is written at the moment of the decision, as before. An admin
call's line is written before the revocation is carried out, a grant's before the token
leaves, so an audit log that cannot be written fails the call (INTERNAL) before the
action or the token escapes it.

The record travels with the call: the audit interceptor gives the handler a
`DecidingContext`, the call's grpc context plus a place for its decisions. A servicer
served without the interceptor gets grpc's own context, and `decide` drops the record:
it only translates."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tokenbroker.audit import ISSUE_EVENT

ISSUE = ISSUE_EVENT
"""The event of an IssueToken decision (an admin call's event is its action: "revoke_session")."""

DECIDING_METHODS = frozenset(
    {"IssueToken", "RevokeSession", "RevokeClient", "RevokeToken", "ListSessions", "WatchEvents"}
)
"""The TokenBroker methods whose handlers `decide`: only these get a `DecidingContext`."""


@dataclass(frozen=True, slots=True)
class Decision:
    """One policy decision, as its audit line tells it: the `event` asked for, by
    `client_id` for `audience` from `source_ip`, the `decision` ("grant" or "refuse") and
    the `rule` that made it, and the line's other `fields` in their order. Among them,
    `authenticated=False` marks a refusal of a caller that never proved itself."""

    event: str
    client_id: str
    audience: str
    decision: str
    rule: str
    source_ip: str
    fields: Mapping[str, Any]


class DecidingContext:
    """A call's grpc context that also takes the call's decisions, handing each to `taker`
    as it is made. Everything else is the grpc context's own."""

    __slots__ = ("_context", "_taker")

    def __init__(self, context: Any, taker: Callable[[Decision], None]) -> None:
        self._context = context
        self._taker = taker

    def decided(self, decision: Decision) -> None:
        self._taker(decision)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def decide(context: Any, decision: Decision) -> None:
    """Hands `decision` to whoever observes the call (see the module doc); a plain grpc
    context has nobody, and the decision is not recorded."""
    taker = getattr(context, "decided", None)
    if taker is not None:
        taker(decision)


__all__ = ["DECIDING_METHODS", "ISSUE", "DecidingContext", "Decision", "decide"]
