"""The broker's gRPC server: `build_server()` registers `tokenbroker.v1.TokenBroker`,
`grpc.health.v1.Health` and, when asked, server reflection on one port; `serve()` runs it
until SIGTERM or SIGINT, then shuts down gracefully (health NOT_SERVING, no new RPCs,
in-flight RPCs finish within the grace period). Every call goes through admission control
(`tokenbroker.service.admission`): classes of callers with their own threads and bounds,
and a deadline on request messages. An admitted call is then observed: the metrics
interceptor counts and times it, the audit interceptor writes the servicer's decisions
(`tokenbroker.service.metrics_interceptor`, `tokenbroker.service.audit_interceptor`).

Why the sync server (a thread pool) and not grpc.aio: measured on the 2-core build
machine, unary ValidateToken with a warm bearer token, the same load for both (a grpc.aio
client process keeping 32 calls in flight on one channel, 6 s per run, 5 alternating
runs per row, median requests/s):

    runs                                         grpc.aio   sync, 16 threads
    server on core 0, client on core 1             2406         3179
    unpinned                                       2494         2949
    pinned, plus 0.5 ms simulated store I/O        2274         3363
    server CPU per request, all runs             300-580 us   190-370 us

The sync server won every one of the 15 paired runs (by 10 to 80 %) and spent about a
third less CPU per request: the Rust engine releases the GIL, while the aio server pays
for its event loop and futures on every call. The price: each open ValidateTokenStream
holds one server thread for its lifetime; streams have their own threads (`max_streams`),
so they cannot take the unary calls' threads (their validations run on a separate bounded
pool)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped,unused-ignore]
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped,unused-ignore]
from grpc_reflection.v1alpha import reflection as server_reflection  # type: ignore[import-untyped,unused-ignore]

from tokenbroker.broker import Broker
from tokenbroker.errors import InvalidArgumentError
from tokenbroker.gateway.proxies import TrustedProxies
from tokenbroker.registry import Registry
from tokenbroker.service.admission import DEFAULT_MAX_WORKERS, AdmissionInterceptor, AdmissionLimits
from tokenbroker.service.audit_interceptor import AuditInterceptor, AuditLogLike
from tokenbroker.service.auth import CallerAuthenticator
from tokenbroker.service.health import HealthStatus
from tokenbroker.service.metrics_interceptor import MetricsInterceptor, MetricsLike
from tokenbroker.service.servicer import SERVICE_NAME, ClientAuthenticatorLike, EventsLike, TokenBrokerServicer
from tokenbroker.v1 import broker_pb2_grpc

DEFAULT_LISTEN = "127.0.0.1:50051"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The server's certificate and key (PEM). With `client_ca_file`, mutual TLS: every
    connection must present a client certificate signed by that CA (gRPC Python can
    verify client certificates only when it requires them, so `require_client_cert` is
    implied by `client_ca_file`); a registered certificate identifies an MCP server."""

    cert_file: str | os.PathLike[str]
    key_file: str | os.PathLike[str]
    client_ca_file: str | os.PathLike[str] | None = None
    require_client_cert: bool = False

    def server_credentials(self) -> Any:
        """`grpc.ServerCredentials`. Raises `InvalidArgumentError` for an unusable setting."""
        if self.require_client_cert and self.client_ca_file is None:
            raise InvalidArgumentError(
                "require_client_cert needs client_ca_file (the CA that signs client certificates)"
            )
        client_ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file is not None else None
        return grpc.ssl_server_credentials(
            [(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


class BrokerServer:
    """A built gRPC server and its health state. `port` is the bound port (useful with
    port 0). `start()` then `stop(grace)`, or `serve()`; also a context manager."""

    def __init__(
        self,
        server: Any,
        health_servicer: Any,
        servicer: TokenBrokerServicer,
        port: int,
        admission: AdmissionInterceptor | None = None,
    ) -> None:
        self.grpc_server = server
        self.health = health_servicer
        self.servicer = servicer
        self.port = port
        self.admission = admission
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        """Starts serving; health says SERVING for "" and for the broker service."""
        self.grpc_server.start()
        self._started = True
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def enter_graceful_shutdown(self) -> None:
        """Health says NOT_SERVING for every service (load balancers stop sending)."""
        self.health.enter_graceful_shutdown()

    def stop(self, grace: float | None = 5.0) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new RPCs, let in-flight RPCs finish for
        up to `grace` seconds, then cancel what is left. Blocks until stopped."""
        self.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        self.servicer.close()
        if self.admission is not None:
            self.admission.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Blocks until the server stops; True when `timeout` passed first (as grpc)."""
        return bool(self.grpc_server.wait_for_termination(timeout))

    def __enter__(self) -> BrokerServer:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop(grace=1.0)

    def __repr__(self) -> str:
        return f"BrokerServer(port={self.port})"


def build_server(
    broker: Broker,
    *,
    registry: Registry,
    authenticator: ClientAuthenticatorLike,
    audit: AuditLogLike,
    metrics: MetricsLike | None = None,
    listen: str = DEFAULT_LISTEN,
    tls: TlsFiles | None = None,
    max_workers: int | None = None,
    stream_workers: int = 8,
    options: tuple[tuple[str, Any], ...] = (),
    admission: AdmissionLimits | Any = None,
    reflection: bool = False,
    reuse_port: bool = False,
    events: EventsLike | None = None,
    trusted_proxies: Sequence[str] = (),
) -> BrokerServer:
    """A server for `broker` bound to `listen` ("host:port"; port 0 picks a free one),
    not yet started. `admission`: the call classes' bounds and the message deadline, as
    `AdmissionLimits` or any object with attributes of the same names (`Settings`);
    `max_workers`, when given, overrides its `max_workers` (the registered servers'
    threads). `reflection`: also serve gRPC server reflection (off by default: it tells
    anyone the whole API). `reuse_port`: share the port with other processes that ask
    for it too (SO_REUSEPORT, `serve --workers`); grpc would by default on Linux, so a
    second broker on a taken port would quietly split its traffic: off unless asked.
    `events`: what WatchEvents streams (`tokenbroker.events.Events`; none: UNIMPLEMENTED).
    Envoy's ext_authz `Check` is served too (`tokenbroker.gateway.envoy`); `trusted_proxies`
    says whose `source.address` names the client.
    Raises `RuntimeError` when the address cannot be bound."""
    if admission is None:
        limits = AdmissionLimits()
    else:
        limits = admission if isinstance(admission, AdmissionLimits) else AdmissionLimits.from_settings(admission)
    if max_workers is not None:
        limits = dataclasses.replace(limits, max_workers=max_workers)
    on_refusal = getattr(metrics, "admission_refused", None)
    # Watch streams hold no thread once their request is read (admission reads it).
    health_servicer = HealthStatus()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    interceptor = AdmissionInterceptor(
        registry,
        limits,
        mutual_tls=tls is not None and tls.client_ca_file is not None,
        on_refusal=on_refusal if callable(on_refusal) else None,
        health_status=health_servicer,
    )
    servicer = TokenBrokerServicer(
        broker,
        registry=registry,
        authenticator=authenticator,
        stream_workers=stream_workers,
        events=events,
    )
    # Admission first: a call it sheds is counted as its refusal, never as an RPC. The
    # metrics interceptor times the rest, audit writes included, as the servicer did.
    observers = (MetricsInterceptor(metrics),) if metrics is not None else ()
    # Every handler runs on its call class's threads; this pool serves none of them. The
    # classes bound every call; `maximum_concurrent_rpcs` (`max_concurrent_rpcs`, off by
    # default) bounds all of them at once, refused by grpc itself in one batch, before any
    # handler runs (the admission interceptor must know of it: `bind_server_bound`).
    server = grpc.server(
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="tb-grpc"),
        interceptors=(interceptor, *observers, AuditInterceptor(audit, metrics)),
        options=[("grpc.so_reuseport", int(reuse_port)), *options],
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs or None,
    )
    try:
        interceptor.bind_server_bound(server)
    except BaseException:
        interceptor.close()
        raise
    broker_pb2_grpc.add_TokenBrokerServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    from tokenbroker.gateway.envoy import add_envoy_authorization  # it imports tokenbroker.service: here, not above

    add_envoy_authorization(server, broker, CallerAuthenticator(registry), TrustedProxies(trusted_proxies))
    if reflection:
        server_reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, server_reflection.SERVICE_NAME),
            server,
        )
    try:
        port = (
            server.add_insecure_port(listen)
            if tls is None
            else server.add_secure_port(listen, tls.server_credentials())
        )
    except BaseException:
        interceptor.close()
        raise
    if not port:
        interceptor.close()
        raise RuntimeError(f"cannot bind {listen}")
    return BrokerServer(server, health_servicer, servicer, int(port), interceptor)


async def serve(server: BrokerServer, *, grace: float = 5.0, drain_seconds: float = 0.0) -> None:
    """Starts `server` and runs it until SIGTERM or SIGINT; then health NOT_SERVING, wait
    `drain_seconds` (for load balancers polling health to notice), stop accepting RPCs and
    give in-flight ones `grace` seconds to finish."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(signum, stopping.set)
            installed.append(signum)
    try:
        if not server.started:
            server.start()
        await stopping.wait()
        server.enter_graceful_shutdown()
        if drain_seconds > 0:
            await asyncio.sleep(drain_seconds)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await asyncio.to_thread(server.stop, grace)


__all__ = ["DEFAULT_LISTEN", "DEFAULT_MAX_WORKERS", "BrokerServer", "TlsFiles", "build_server", "serve"]
