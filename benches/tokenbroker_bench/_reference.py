"""What the two reference servers share: a sync grpcio server with the broker's thread
pool size, grpc.health.v1 (so the bench waits for them as for the broker), loopback only,
stopped by SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc  # type: ignore[import-untyped,unused-ignore]
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped,unused-ignore]

from tokenbroker.service.server import DEFAULT_MAX_WORKERS
from tokenbroker.v1 import broker_pb2_grpc


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--max-workers", type=int, default=DEFAULT_MAX_WORKERS, help="server threads")
    return parser


def serve(servicer: Any, port: int, max_workers: int = DEFAULT_MAX_WORKERS) -> None:
    """Serves `servicer` (a TokenBrokerServicer) on 127.0.0.1:`port` until SIGTERM/SIGINT."""
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ref-grpc"))
    broker_pb2_grpc.add_TokenBrokerServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise SystemExit(f"cannot bind 127.0.0.1:{port}")
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    stopping.wait()
    server.stop(1.0).wait()
