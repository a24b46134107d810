"""`AuditInterceptor`: writes the audit line of every decision the servicer makes, and
counts issuance decisions (`tokenbroker_issuance_decisions`).

The servicer decides and says what it decided in a `Decision` (why a record, and why it
is written the moment it is made: `tokenbroker.service.decisions`). This interceptor
gives the handlers of the deciding methods a `DecidingContext` that writes each
decision as the handler hands it over; the other methods (the validations, GetJwks) are
left as they are, so the hot path pays nothing for it.

A line is written with exactly the fields the servicer gave, and `AuditLog` rate-limits
the lines of refusals marked `authenticated=False`."""

from __future__ import annotations

from typing import Any, Protocol

from tokenbroker.service.decisions import DECIDING_METHODS, ISSUE, DecidingContext, Decision
from tokenbroker.service.interceptor import WrapOnceInterceptor, behavior_of, with_behavior
from tokenbroker.service.metrics_interceptor import MetricsLike
from tokenbroker.service.servicer import SERVICE_NAME


class AuditLogLike(Protocol):
    """`tokenbroker.audit.AuditLog`, as the service uses it."""

    def record(
        self, *, event: str, client_id: str, audience: str, decision: str, rule: str, source_ip: str, **fields: Any
    ) -> None: ...


class AuditInterceptor(WrapOnceInterceptor):
    """Audits the decisions of the deciding methods (module doc); with `metrics`, counts
    the issuance decisions too."""

    def __init__(self, audit: AuditLogLike, metrics: MetricsLike | None = None, service: str = SERVICE_NAME) -> None:
        super().__init__(service)
        self._audit = audit
        self._metrics = metrics

    def record(self, decision: Decision) -> None:
        """Writes `decision`'s audit line, then, for an issuance, counts it."""
        self._audit.record(
            event=decision.event,
            client_id=decision.client_id,
            audience=decision.audience,
            decision=decision.decision,
            rule=decision.rule,
            source_ip=decision.source_ip,
            **decision.fields,
        )
        if self._metrics is not None and decision.event == ISSUE:
            self._metrics.issuance(decision.decision, decision.rule)

    def wrap(self, name: str, handler: Any) -> Any:
        if name not in DECIDING_METHODS:
            return handler
        original = behavior_of(handler)
        record = self.record

        def deciding(request: Any, context: Any) -> Any:
            return original(request, DecidingContext(context, record))

        return with_behavior(handler, deciding)


__all__ = ["AuditInterceptor", "AuditLogLike"]
