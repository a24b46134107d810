"""The gRPC service: `build_server()` serves a `Broker` as `tokenbroker.v1.TokenBroker`
(with health and reflection); `serve()` runs it until SIGTERM."""

from tokenbroker.service.auth import CallerAuthenticator
from tokenbroker.service.server import BrokerServer, TlsFiles, build_server, serve
from tokenbroker.service.servicer import TokenBrokerServicer

__all__ = ["BrokerServer", "CallerAuthenticator", "TlsFiles", "TokenBrokerServicer", "build_server", "serve"]
