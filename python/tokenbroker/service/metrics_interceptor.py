"""`MetricsInterceptor`: the RPC and validation metrics of every TokenBroker call, read
from its outcome, so the servicer never touches metrics.

- `metrics.rpc(method, code, seconds)` per call: "OK" when the handler returned (a stream:
  when it ended), the status it aborted with when it raised (grpc's context keeps it:
  `context.code()`; the servicer aborts for every error), "CANCELLED" for a stream the
  caller went away from. The seconds are the handler's, from after admission control
  read the request to the last answer.
- `metrics.validation(reason)` per answer of ValidateToken, ValidateTokenBatch and
  ValidateTokenStream, the reason's name ("OK", "EXPIRED", ...) read from the response.

It goes after `AdmissionInterceptor`: a call that admission sheds never reaches a handler
and is counted as a refusal (`tokenbroker_admission_refusals`), not as an RPC."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from tokenbroker.reason import BY_NUMBER
from tokenbroker.service.interceptor import WrapOnceInterceptor, behavior_of, with_behavior
from tokenbroker.service.servicer import SERVICE_NAME

# By wire number: a protobuf message holds the reason as its number.
_REASON_NAMES: tuple[str, ...] = tuple(reason.name for reason in BY_NUMBER)


class MetricsLike(Protocol):
    """`tokenbroker.metrics.Metrics`, as the service uses it."""

    def rpc(self, method: str, code: str, seconds: float) -> None: ...

    def validation(self, reason: str) -> None: ...

    def issuance(self, decision: str, rule: str) -> None: ...


def _code_name(context: Any) -> str:
    """The status a call that raised ends with ("UNKNOWN" when nothing set one, as grpc sends)."""
    code = context.code()
    return "UNKNOWN" if code is None else str(code.name)


def _reason_name(reason: int) -> str:
    try:
        return _REASON_NAMES[reason]
    except IndexError:  # a number this broker does not know: counted, under its number
        return str(reason)


def _one_answer(response: Any) -> tuple[Any]:
    """ValidateToken: the response is the answer."""
    return (response,)


def _batch_answers(response: Any) -> Any:
    """ValidateTokenBatch: the response holds the answers."""
    return response.responses


def _timed(
    name: str,
    original: Any,
    rpc: Callable[[str, str, float], None],
    validation: Callable[[str], None],
    answers: Callable[[Any], Iterable[Any]] | None = None,
) -> Any:
    """For a unary response: the RPC, and each validation answer `answers` finds in it."""

    def timed(request: Any, context: Any) -> Any:
        started = time.perf_counter()
        try:
            response = original(request, context)
        except BaseException:
            rpc(name, _code_name(context), time.perf_counter() - started)
            raise
        if answers is not None:
            for answer in answers(response):
                validation(_reason_name(answer.reason))
        rpc(name, "OK", time.perf_counter() - started)
        return response

    return timed


def _timed_stream(
    name: str, original: Any, rpc: Callable[[str, str, float], None], validation: Callable[[str], None] | None
) -> Any:
    """For a response stream: each answer counted as it is sent (when `validation` is
    given), the RPC when the stream ends."""

    def timed(request: Any, context: Any) -> Iterator[Any]:
        started = time.perf_counter()
        code = "OK"
        responses: Any = ()
        try:
            responses = original(request, context)
            for response in responses:
                if validation is not None:
                    validation(_reason_name(response.reason))
                yield response
        except GeneratorExit:  # grpc dropped the stream: the caller cancelled
            code = "CANCELLED"
            raise
        except BaseException:
            code = _code_name(context)
            raise
        finally:
            # The servicer's stream stops its workers when closed: now, not when collected.
            close = getattr(responses, "close", None)
            if close is not None:
                close()
            rpc(name, code, time.perf_counter() - started)

    return timed


class MetricsInterceptor(WrapOnceInterceptor):
    """Records the RPC and validation metrics of every TokenBroker call (module doc)."""

    def __init__(self, metrics: MetricsLike, service: str = SERVICE_NAME) -> None:
        super().__init__(service)
        self._metrics = metrics

    def wrap(self, name: str, handler: Any) -> Any:
        original = behavior_of(handler)
        rpc, validation = self._metrics.rpc, self._metrics.validation
        if handler.response_streaming:
            timed = _timed_stream(name, original, rpc, validation if name == "ValidateTokenStream" else None)
        else:
            answers = {"ValidateToken": _one_answer, "ValidateTokenBatch": _batch_answers}.get(name)
            timed = _timed(name, original, rpc, validation, answers)
        return with_behavior(handler, timed)


__all__ = ["MetricsInterceptor", "MetricsLike"]
