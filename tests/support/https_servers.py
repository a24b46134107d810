"""A real HTTPS server on 127.0.0.1 for the CIMD fetcher tests, with a throwaway test CA.

`make_test_ca(directory)` writes a CA certificate (`ca.ca_file`, what `cimd_ca_file` names)
and issues server certificates for chosen DNS names and IP addresses. `HttpsServer` runs
in a thread with its own event loop (so synchronous and asynchronous tests can both use
it), answers each request target with a chosen `Reply` (any status, headers and body; a
delay before answering; a body trickled byte by byte; chunked; or exact raw bytes), and
records every request (target, Host header) and every SNI name it was sent."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class TestCa:
    """A CA that exists only for one test run."""

    __test__ = False  # not a pytest test class

    directory: Path
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    issued: int = 0

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    def issue(
        self, *, dns_names: Iterable[str] = ("localhost", "cimd.test"), ips: Iterable[str] = ("127.0.0.1",)
    ) -> tuple[Path, Path]:
        """A server certificate and key for these names (files: certificate, key)."""
        self.issued += 1
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(f"test server {self.issued}"))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_file = self.directory / f"server-{self.issued}.pem"
        key_file = self.directory / f"server-{self.issued}.key"
        cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(_pem_key(key))
        return cert_file, key_file


def make_test_ca(directory: Path, common_name: str = "tokenbroker test CA") -> TestCa:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca = TestCa(directory=directory, key=key, certificate=certificate)
    ca.ca_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return ca


@dataclass(frozen=True)
class Reply:
    """What the server answers for one request target."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    delay: float = 0.0  # seconds before anything is written
    trickle: float = 0.0  # seconds between the body's bytes (a slow origin)
    chunked: bool = False  # Transfer-Encoding: chunked instead of Content-Length
    raw: bytes | None = None  # exactly these bytes instead of an HTTP answer

    @classmethod
    def json(
        cls,
        document: Any,
        *,
        cache_control: str | None = None,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
        **options: Any,
    ) -> Reply:
        extra = [("Content-Type", content_type), *headers]
        if cache_control is not None:
            extra.append(("Cache-Control", cache_control))
        return cls(body=json.dumps(document).encode(), headers=tuple(extra), **options)

    def encode(self) -> tuple[bytes, bytes]:
        """(status line and headers, body as sent)."""
        reason = HTTPStatus(self.status).phrase if self.status in HTTPStatus._value2member_map_ else "Status"
        lines = [f"HTTP/1.1 {self.status} {reason}", *(f"{name}: {value}" for name, value in self.headers)]
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(self.body), self.body) if self.body else b"0\r\n\r\n"
        else:
            lines.append(f"Content-Length: {len(self.body)}")
            body = self.body
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body


NOT_FOUND = Reply(status=404, body=b'{"error":"not found"}')


@dataclass(frozen=True)
class SeenRequest:
    method: str
    target: str
    host: str | None
    headers: dict[str, str]


@dataclass
class HttpsServer:
    """An HTTPS server on 127.0.0.1 (a free port) answering `replies` by request target."""

    cert_file: Path
    key_file: Path
    replies: dict[str, Reply] = field(default_factory=dict)
    requests: list[SeenRequest] = field(default_factory=list)
    sni_names: list[str | None] = field(default_factory=list)
    port: int = 0

    def url(self, target: str, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{target}"

    def count(self, target: str) -> int:
        return sum(1 for request in self.requests if request.target == target)

    def __enter__(self) -> HttpsServer:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        context.sni_callback = self._on_sni
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(lambda loop, details: None)  # refused handshakes are the point
        self._tasks: set[asyncio.Task[None]] = set()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="https-test-server", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the test HTTPS server did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def shutdown() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _on_sni(self, ssl_object: object, server_name: str | None, context: ssl.SSLContext) -> None:
        self.sni_names.append(server_name)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                name, colon, value = line.partition(":")
                if colon:
                    headers[name.strip().lower()] = value.strip()
            self.requests.append(SeenRequest(method, target, headers.get("host"), headers))
            reply = self.replies.get(target, NOT_FOUND)
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.raw is not None:
                writer.write(reply.raw)
            else:
                status_and_headers, body = reply.encode()
                writer.write(status_and_headers)
                if reply.trickle:
                    for index in range(len(body)):
                        writer.write(body[index : index + 1])
                        await writer.drain()
                        await asyncio.sleep(reply.trickle)
                else:
                    writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ssl.SSLError, ValueError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
