"""Reference server 1: the same `tokenbroker.v1.TokenBroker` service on the same sync
grpcio server (same thread pool size as `tokenbroker serve`), doing nothing: every
validation answers a fixed valid response (echoing `request_id`, so streams can match
answers). Its throughput is the transport's ceiling on this machine.

    python -m tokenbroker_bench.reference_noop --port 50061"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tokenbroker.v1 import broker_pb2 as pb
from tokenbroker.v1 import broker_pb2_grpc
from tokenbroker_bench import _reference

# A response of the broker's size and shape; its values are placeholders.
_FIXED: dict[str, Any] = {
    "valid": True,
    "reason": pb.REASON_OK,
    "client_id": "bench-client",
    "subject": "bench-client",
    "session_id": "s" * 22,
    "scopes": ["tools:call"],
    "expires_at": 4_102_444_800,
    "jti": "j" * 22,
    "issuer": "https://broker.bench.test",
}


def answer(request_id: str) -> pb.ValidateTokenResponse:
    return pb.ValidateTokenResponse(request_id=request_id, **_FIXED)


class NoopServicer(broker_pb2_grpc.TokenBrokerServicer):  # type: ignore[misc,unused-ignore]
    def ValidateToken(self, request: pb.ValidateTokenRequest, context: Any) -> pb.ValidateTokenResponse:
        return answer(request.request_id)

    def ValidateTokenBatch(self, request: pb.ValidateTokenBatchRequest, context: Any) -> pb.ValidateTokenBatchResponse:
        return pb.ValidateTokenBatchResponse(responses=[answer(r.request_id) for r in request.requests])

    def ValidateTokenStream(
        self, request_iterator: Iterator[pb.ValidateTokenRequest], context: Any
    ) -> Iterator[pb.ValidateTokenResponse]:
        for request in request_iterator:
            yield answer(request.request_id)


def main() -> None:
    args = _reference.arguments(__doc__ or "").parse_args()
    _reference.serve(NoopServicer(), args.port, args.max_workers)


if __name__ == "__main__":
    main()
