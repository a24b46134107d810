"""Helpers for tests of the gRPC service: an in-memory registry, minimal stand-ins for the
issuance authenticator, audit log and metrics, throwaway TLS certificates, and a broker
server running in-process on 127.0.0.1 with a free port."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tokenbroker import Broker, Keyring, MemoryStore
from tokenbroker.errors import AuthenticationError, ClientNotAllowedError
from tokenbroker.registry import Binding, ClientRecord, ClientStatus, ServerRecord
from tokenbroker.service import BrokerServer, TlsFiles, build_server
from tokenbroker.service.admission import AdmissionLimits

ISSUER = "https://broker.test"
AUDIENCE = "https://mcp-a.test/mcp"
OTHER_AUDIENCE = "https://mcp-b.test/mcp"
CLIENT_ID = "agent-7"  # binding bearer
DPOP_CLIENT_ID = "agent-dpop"  # the same credential and policy, binding dpop
CLIENT_SECRET = "client-secret-for-tests"
API_KEY = "server-a-api-key"
ADMIN_API_KEY = "admin-api-key"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class InMemoryRegistry:
    """The `Registry` protocol over two dicts; API keys and secrets stored as SHA-256."""

    def __init__(self, clients: Iterable[ClientRecord] = (), servers: Iterable[ServerRecord] = ()) -> None:
        self.clients = {c.client_id: c for c in clients}
        self.servers = list(servers)

    def client(self, client_id: str) -> ClientRecord | None:
        return self.clients.get(client_id)

    def server_by_api_key(self, api_key: str) -> ServerRecord | None:
        presented = _hash(api_key)
        for server in self.servers:
            if server.api_key_hash and hmac.compare_digest(presented, server.api_key_hash):
                return server
        return None

    def server_by_cert(self, cert_thumbprint: str) -> ServerRecord | None:
        for server in self.servers:
            if server.cert_thumbprint and hmac.compare_digest(cert_thumbprint, server.cert_thumbprint):
                return server
        return None


class CredentialRefused(AuthenticationError):
    """As `tokenbroker.client_auth.CredentialRefusedError`: carries the deciding `.rule`."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


class ClientRefused(ClientNotAllowedError):
    """As `tokenbroker.client_auth.ClientRefusedError`: carries the deciding `.rule`."""

    def __init__(self, message: str, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


class SecretAuthenticator:
    """A minimal stand-in for `tokenbroker.client_auth.ClientAuthenticator`: client secret only,
    the same error types and `.rule` names."""

    def __init__(self, registry: InMemoryRegistry) -> None:
        self.registry = registry

    def authenticate(
        self,
        *,
        client_id: str,
        client_assertion: str | None,
        client_secret: str | None,
        audience: str,
        scopes: Iterable[str],
        client_ip: str,
        dpop_jkt: str | None = None,
        cert_thumbprint: str | None = None,
    ) -> ClientRecord:
        record = self.registry.client(client_id)
        if record is None:
            raise ClientRefused(f"client {client_id!r} is not registered", "client.unknown")
        if record.status is not ClientStatus.APPROVED:
            raise ClientRefused(f"client {client_id!r} is {record.status}", f"client.{record.status}")
        if (
            not client_secret
            or not record.secret_hash
            or not hmac.compare_digest(_hash(client_secret), record.secret_hash)
        ):
            raise CredentialRefused(f"client {client_id!r} presented a wrong secret", "credential.secret_invalid")
        if audience not in record.allowed_audiences:
            raise ClientRefused(f"client {client_id!r} may not get tokens for {audience!r}", "audience.not_allowed")
        return record


@dataclass
class RecordingAudit:
    events: list[dict[str, Any]] = field(default_factory=list)

    def record(self, **event: Any) -> None:
        self.events.append(event)


@dataclass
class RecordingMetrics:
    rpcs: list[tuple[str, str]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    issuances: list[tuple[str, str]] = field(default_factory=list)
    refusals: list[tuple[str, str]] = field(default_factory=list)  # admission control's

    def rpc(self, method: str, code: str, seconds: float) -> None:
        assert seconds >= 0
        self.rpcs.append((method, code))

    def validation(self, reason: str) -> None:
        self.reasons.append(reason)

    def issuance(self, decision: str, rule: str) -> None:
        self.issuances.append((decision, rule))

    def admission_refused(self, call_class: str, reason: str) -> None:
        self.refusals.append((call_class, reason))


def default_registry(*, max_sessions: int = 10, server_cert_thumbprint: str | None = None) -> InMemoryRegistry:
    """Two approved clients (secret; binding bearer, and binding dpop), server A (API key,
    audiences A and B, not admin, relays client addresses), an admin server, and
    optionally a server identified by its mTLS certificate."""
    servers = [
        ServerRecord(
            "server-a", audiences=(AUDIENCE, OTHER_AUDIENCE), api_key_hash=_hash(API_KEY), relay_client_ip=True
        ),
        ServerRecord("admin", audiences=(), api_key_hash=_hash(ADMIN_API_KEY), admin=True),
    ]
    if server_cert_thumbprint:
        servers.append(ServerRecord("server-mtls", audiences=(AUDIENCE,), cert_thumbprint=server_cert_thumbprint))
    client = ClientRecord(
        CLIENT_ID,
        status=ClientStatus.APPROVED,
        secret_hash=_hash(CLIENT_SECRET),
        allowed_audiences=(AUDIENCE, OTHER_AUDIENCE),
        allowed_scopes=("tools:call", "resources:read"),
        max_sessions=max_sessions,
        binding=Binding.BEARER,
    )
    dpop_client = dataclasses.replace(client, client_id=DPOP_CLIENT_ID, binding=Binding.DPOP)
    return InMemoryRegistry([client, dpop_client], servers)


@dataclass
class RunningBroker:
    server: BrokerServer
    broker: Broker
    registry: InMemoryRegistry
    audit: RecordingAudit
    metrics: RecordingMetrics

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@contextmanager
def running_broker(
    *,
    store: Any = None,
    registry: InMemoryRegistry | None = None,
    tls: TlsFiles | None = None,
    grace: float = 1.0,
    trusted_proxies: Iterable[str] = (),
    admission: AdmissionLimits | None = None,
) -> Iterator[RunningBroker]:
    """A started broker server on 127.0.0.1:<free port>, stopped on exit. `admission`:
    its bounds (default: `AdmissionLimits()` with 8 workers)."""
    broker = Broker(Keyring.generate(), issuer=ISSUER, store=store if store is not None else MemoryStore())
    registry = registry or default_registry()
    audit, metrics = RecordingAudit(), RecordingMetrics()
    server = build_server(
        broker,
        registry=registry,
        authenticator=SecretAuthenticator(registry),
        audit=audit,
        metrics=metrics,
        listen="127.0.0.1:0",
        tls=tls,
        max_workers=None if admission is not None else 8,
        stream_workers=4,
        admission=admission,
        reflection=True,
        trusted_proxies=tuple(trusted_proxies),
    )
    server.start()
    try:
        yield RunningBroker(server, broker, registry, audit, metrics)
    finally:
        server.stop(grace)


# -- throwaway PKI ------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    client_cert_file: Path
    client_key_file: Path
    client_thumbprint: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("tokenbroker test CA"))
        .issuer_name(_name("tokenbroker test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, san: list[x509.GeneralName], usage: x509.ObjectIdentifier) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return key, cert

    server_key, server_cert = leaf(
        "localhost",
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client_key, client_cert = leaf("server-mtls", [x509.DNSName("server-mtls")], ExtendedKeyUsageOID.CLIENT_AUTH)
    pki = Pki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server-key.pem",
        directory / "client.pem",
        directory / "client-key.pem",
        base64.urlsafe_b64encode(hashlib.sha256(client_cert.public_bytes(serialization.Encoding.DER)).digest())
        .rstrip(b"=")
        .decode(),
    )
    pki.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.server_cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.server_key_file, server_key)
    pki.client_cert_file.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.client_key_file, client_key)
    return pki
