"""One HTTP/1.1 GET over a connection the fetcher opened itself, with every bound.

The fetcher connects to the address it checked and hands the plain TCP stream here; TLS
is started on it for the URL's host name (SNI and certificate verification for the name,
never for the address), so nothing resolves the name a second time (DNS rebinding) while
the certificate still proves the host. h11 parses the answer; the status, the media type
and the declared length are checked before any of the body is read, and the body is read
only up to the cap (refused beyond it, never truncated). Compression is not asked for and
not accepted, so the cap is the size of what is parsed."""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass

import h11

from tokenbroker.cimd.errors import CimdFetchError
from tokenbroker.errors import InvalidArgumentError

MAX_HEADER_BYTES = 16 * 1024
_READ_CHUNK = 16 * 1024
USER_AGENT = "tokenbroker-cimd/1"
_DIGITS = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class Answer:
    """A 200 answer whose body fit the cap."""

    headers: tuple[tuple[str, str], ...]  # names in lower case, in the order received
    body: bytes

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The system's trust store, plus `ca_file` when set; TLS 1.2 or later; HTTP/1.1."""
    context = ssl.create_default_context(cafile=None)
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as error:
            raise InvalidArgumentError(
                f"cimd_ca_file {ca_file!r} is not a readable PEM CA bundle ({error.__class__.__name__})"
            ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


async def start_tls(writer: asyncio.StreamWriter, context: ssl.SSLContext, host: str) -> None:
    """TLS on `writer` for `host` (SNI unless `host` is an IP address, and the certificate
    checked for it), or raises `CimdFetchError` `tls`."""
    try:
        await writer.start_tls(context, server_hostname=host)
    except ssl.SSLCertVerificationError as error:
        raise CimdFetchError(
            "tls", f"the certificate of {host} was not accepted: {error.verify_message}", host=host
        ) from None
    except (ssl.SSLError, ConnectionError) as error:
        raise CimdFetchError(
            "tls", f"the TLS handshake with {host} failed ({error.__class__.__name__})", host=host
        ) from None


def _media_type_is_json(values: list[str]) -> bool:
    if len(values) != 1:
        return False
    media_type, *parameters = (part.strip().lower() for part in values[0].split(";"))
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return False
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip() == "charset" and value.strip().strip('"') != "utf-8":
            return False
    return True


def _check_head(response: h11.Response, host: str, max_bytes: int) -> list[tuple[str, str]]:
    """The answer's headers when its status and headers allow reading the body, else raises."""
    headers = [(name.decode("ascii").lower(), value.decode("latin-1")) for name, value in response.headers]
    status = response.status_code
    if 300 <= status < 400:
        raise CimdFetchError(
            "redirect",
            f"{host} answered {status} (a redirect): redirects are not followed, so serve the document at its URL",
            host=host,
        )
    if status != 200:
        raise CimdFetchError("bad_status", f"{host} answered {status}, not 200", host=host)
    encodings = [v.strip().lower() for name, v in headers if name == "content-encoding"]
    if any(encoding not in ("", "identity") for encoding in encodings):
        raise CimdFetchError(
            "bad_response", f"{host} sent a compressed body: serve the document uncompressed", host=host
        )
    if not _media_type_is_json([v for name, v in headers if name == "content-type"]):
        raise CimdFetchError("not_json", f"{host} did not answer with Content-Type application/json (UTF-8)", host=host)
    for name, value in headers:
        if name == "content-length" and _DIGITS.fullmatch(value.strip()) and int(value) > max_bytes:
            raise CimdFetchError("too_large", f"the document at {host} is larger than {max_bytes} bytes", host=host)
    return headers


async def get(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    host: str,
    host_header: str,
    target: str,
    max_bytes: int,
) -> Answer:
    """Sends `GET target` and reads a 200 JSON answer of at most `max_bytes`, or raises
    `CimdFetchError` (`redirect`, `bad_status`, `not_json`, `too_large`, `bad_response`)."""
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
    request = h11.Request(
        method="GET",
        target=target,
        headers=[
            ("Host", host_header),
            ("Accept", "application/json"),
            ("Accept-Encoding", "identity"),
            ("User-Agent", USER_AGENT),
            ("Connection", "close"),
        ],
    )
    try:
        writer.write(connection.send(request) or b"")
        writer.write(connection.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        headers: list[tuple[str, str]] | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(_READ_CHUNK))
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Response):
                headers = _check_head(event, host, max_bytes)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_bytes:
                    raise CimdFetchError(
                        "too_large", f"the document at {host} is larger than {max_bytes} bytes", host=host
                    )
            elif isinstance(event, h11.EndOfMessage):
                assert headers is not None  # h11 sends EndOfMessage only after a Response
                return Answer(headers=tuple(headers), body=bytes(body))
            else:  # ConnectionClosed or PAUSED: the answer ended before it was complete
                raise CimdFetchError("bad_response", f"{host} closed the connection mid-answer", host=host)
    except h11.RemoteProtocolError:
        raise CimdFetchError("bad_response", f"{host} did not answer in valid HTTP/1.1", host=host) from None
    except h11.LocalProtocolError:
        raise CimdFetchError("bad_url", f"the request for {host} cannot be written in HTTP/1.1", host=host) from None
    except (ConnectionError, ssl.SSLError) as error:
        raise CimdFetchError(
            "bad_response", f"the connection to {host} failed mid-answer ({error.__class__.__name__})", host=host
        ) from None
