"""`TokenEndpoint`: tokenbroker's own client for an OAuth token endpoint (`POST
{public_url}/token`), the HTTP twin of the gRPC `IssueToken` that `BrokerAuth` uses.

One request is the client credentials grant (RFC 6749 section 4.4) authenticated by an
RFC 7523 client assertion, for one `resource` (RFC 8707: the MCP server's URI, the
audience) and `scope`, with a DPoP proof of the client's key (RFC 9449 section 5: `htm`
POST, `htu` the endpoint, no `ath`) that binds the token. When the endpoint answers
`use_dpop_nonce` (RFC 9449 section 8) the request is signed again, with the nonce of its
`DPoP-Nonce` header and a fresh assertion (its `jti` is single-use), and sent once more;
the last nonce is kept for the next request.

The endpoint is named directly (`TokenEndpoint(url)`: assertions are addressed to it, as
RFC 7523 section 3 allows) or found from the issuer's RFC 8414 metadata
(`TokenEndpoint.discover(public_url)`: assertions are addressed to the issuer, which the
metadata must name exactly, RFC 8414 section 3.3). No redirect is followed, and an answer
larger than 64 KiB is refused."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Generator, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from tokenbroker._core import ProofSigner
from tokenbroker.dpop_nonce import USE_DPOP_NONCE
from tokenbroker.errors import TokenBrokerError
from tokenbroker.mcp.nonce_memory import offered_nonce
from tokenbroker.mcp.resource_metadata import check_http_url
from tokenbroker.models import IssuedToken

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
METADATA_PATH = "/.well-known/oauth-authorization-server"
MAX_ANSWER_BYTES = 64 * 1024
_MAX_TOKEN_CHARS = 16 * 1024
_MAX_EXPIRES_IN = 86_400


class TokenEndpointError(TokenBrokerError):
    """The token endpoint refused the request (`error` is its RFC 6749 section 5.2 code,
    e.g. `invalid_client`, `invalid_target`, `invalid_scope`, `invalid_dpop_proof`), or
    answered something that is not a token response (`invalid_response`), or could not be
    reached (`temporarily_unavailable`, `status` 0). `description` is the endpoint's own,
    reduced to printable ASCII."""

    def __init__(self, error: str, description: str, *, status: int) -> None:
        self.error = _printable(error, 64)
        self.description = _printable(description, 300)
        self.status = status
        answered = f"answered {status}" if status else "gave no answer"
        super().__init__(f"token endpoint {answered}: {self.error}: {self.description}")


def _printable(text: str, limit: int) -> str:
    return "".join(c if 0x20 <= ord(c) <= 0x7E else "?" for c in text)[:limit]


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: httpx.Headers
    body: bytes


# A token request as a generator: yields the HTTP requests to send, is sent their answers,
# returns the token. One flow serves the sync and the async drivers.
_Flow = Generator[httpx.Request, _Answer, IssuedToken]


def _same_issuer(a: str, b: str) -> bool:
    """RFC 8414 section 3.3 compares issuers as strings; an empty path and `/` are the same
    URL (RFC 3986 section 6.2.3), which SDKs write either way."""

    def canonical(url: str) -> str:
        return url[:-1] if urlsplit(url).path == "/" else url

    return canonical(a) == canonical(b)


def _token_id(token: str) -> str:
    """The token's `jti`, read without verifying it (for the caller's information only)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return ""
    jti = claims.get("jti") if isinstance(claims, dict) else None
    return jti if isinstance(jti, str) else ""


class TokenEndpoint:
    """A token endpoint that `BrokerAuth` obtains its tokens from over HTTP.

    `token_url`: the endpoint (e.g. `http://127.0.0.1:8080/token`); client assertions name
    it as their `aud`. `http_client`: an `httpx.AsyncClient` for the async flows or an
    `httpx.Client` for the sync ones (the other kind gets a short-lived client per token
    request); never the client `BrokerAuth` itself authenticates, whose auth is not used
    here anyway. `timeout`: seconds, for the clients made here."""

    def __init__(
        self,
        token_url: str,
        *,
        http_client: httpx.AsyncClient | httpx.Client | None = None,
        timeout: float = 10.0,
    ) -> None:
        check_http_url(token_url, "the token endpoint URL")
        self._token_url: str | None = token_url
        self._audience = token_url
        self._metadata_url = ""
        self._http = http_client
        self._timeout = timeout
        self._nonce: str | None = None

    @classmethod
    def discover(
        cls,
        issuer: str,
        *,
        http_client: httpx.AsyncClient | httpx.Client | None = None,
        timeout: float = 10.0,
    ) -> TokenEndpoint:
        """The token endpoint that `issuer`'s (tokenbroker's `public_url`) RFC 8414 metadata
        names, read at the first token request; assertions are addressed to the issuer."""
        scheme, netloc, path = check_http_url(issuer, "the issuer (tokenbroker's public_url)")
        endpoint = cls(issuer, http_client=http_client, timeout=timeout)
        endpoint._token_url = None
        endpoint._audience = issuer
        endpoint._metadata_url = f"{scheme}://{netloc}{METADATA_PATH}{path.rstrip('/')}"
        return endpoint

    @property
    def token_url(self) -> str | None:
        """The endpoint's URL (None until discovered)."""
        return self._token_url

    @property
    def assertion_audience(self) -> str:
        """The `aud` of the client assertions: the issuer, or the endpoint named directly."""
        return self._audience

    # -- one token request ---------------------------------------------------------------

    def request_token(
        self,
        *,
        client_id: str,
        assertion: Callable[[str], str],
        resource: str,
        scopes: Iterable[str],
        signer: ProofSigner,
    ) -> IssuedToken:
        """A token for `resource` bound to `signer`'s key. `assertion(aud)` signs a fresh
        client assertion for `aud`. Raises `TokenEndpointError`."""
        flow = self._flow(client_id, assertion, resource, tuple(scopes), signer)
        client = self._http if isinstance(self._http, httpx.Client) else None
        # A caller's client is used, never closed here (nullcontext).
        with httpx.Client(timeout=self._timeout) if client is None else nullcontext(client) as http:
            try:
                request = next(flow)
                while True:
                    request = flow.send(_send(http, request))
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    async def arequest_token(
        self,
        *,
        client_id: str,
        assertion: Callable[[str], str],
        resource: str,
        scopes: Iterable[str],
        signer: ProofSigner,
    ) -> IssuedToken:
        """The asyncio twin of `request_token`."""
        flow = self._flow(client_id, assertion, resource, tuple(scopes), signer)
        client = self._http if isinstance(self._http, httpx.AsyncClient) else None
        async with httpx.AsyncClient(timeout=self._timeout) if client is None else nullcontext(client) as http:
            try:
                request = next(flow)
                while True:
                    request = flow.send(await _asend(http, request))
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    def _flow(
        self,
        client_id: str,
        assertion: Callable[[str], str],
        resource: str,
        scopes: tuple[str, ...],
        signer: ProofSigner,
    ) -> _Flow:
        if self._token_url is None:
            answer = yield httpx.Request("GET", self._metadata_url, headers={"Accept": "application/json"})
            self._token_url = self._discovered(answer)
        token_url = self._token_url
        htu = str(httpx.URL(token_url).copy_with(query=None, fragment=None))
        for attempt in range(2):
            form = {
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion(self._audience),
                "resource": resource,
            }
            if scopes:
                form["scope"] = " ".join(scopes)
            headers = {
                "DPoP": signer.sign("POST", htu, None, nonce=self._nonce),
                "Accept": "application/json",
                "Accept-Encoding": "identity",
            }
            answer = yield httpx.Request("POST", token_url, data=form, headers=headers)
            nonce = offered_nonce(answer.headers)
            if nonce is not None:
                self._nonce = nonce
            if answer.status == 200:
                return self._issued(answer, scopes)
            refused = _refusal(answer)
            if refused.error == USE_DPOP_NONCE and nonce is not None and attempt == 0:
                continue  # RFC 9449 section 8: sign again with the nonce, once
            raise refused
        raise AssertionError("unreachable")  # pragma: no cover

    # -- answers -------------------------------------------------------------------------

    def _discovered(self, answer: _Answer) -> str:
        if answer.status != 200:
            raise TokenEndpointError(
                "invalid_response",
                f"authorization server metadata at {self._metadata_url} answered {answer.status}: "
                "is the issuer tokenbroker's public_url?",
                status=answer.status,
            )
        metadata = _json_object(answer, "authorization server metadata")
        issuer = metadata.get("issuer")
        if not isinstance(issuer, str) or not _same_issuer(issuer, self._audience):
            raise TokenEndpointError(
                "invalid_response",
                f"authorization server metadata names issuer {str(issuer)[:100]!r}, not {self._audience!r} "
                "(RFC 8414 section 3.3): use the issuer exactly as the server publishes it",
                status=answer.status,
            )
        token_url = metadata.get("token_endpoint")
        try:
            check_http_url(token_url if isinstance(token_url, str) else "", "token_endpoint")
        except ValueError as exc:
            raise TokenEndpointError("invalid_response", f"authorization server metadata: {exc}", status=200) from None
        assert isinstance(token_url, str)
        self._audience = issuer
        return token_url

    @staticmethod
    def _issued(answer: _Answer, scopes: tuple[str, ...]) -> IssuedToken:
        document = _json_object(answer, "token response")

        def invalid(what: str) -> TokenEndpointError:
            return TokenEndpointError("invalid_response", f"token response {what}", status=answer.status)

        token = document.get("access_token")
        if not isinstance(token, str) or not 0 < len(token) <= _MAX_TOKEN_CHARS or not token.isascii():
            raise invalid("has no usable access_token")
        token_type = document.get("token_type")
        kinds = {"dpop": "DPoP", "bearer": "Bearer"}
        if not isinstance(token_type, str) or token_type.lower() not in kinds:
            raise invalid("token_type is neither DPoP nor Bearer")
        if token_type.lower() != "dpop":
            # Every request here carries a DPoP proof: an unbound answer is a downgrade
            # (a misconfigured or hostile server), never used.
            raise invalid("token_type is Bearer although the request carried a DPoP proof: an unbound token is refused")
        expires_in = document.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int) or not 0 < expires_in <= _MAX_EXPIRES_IN:
            raise invalid(f"expires_in is not a number of seconds from 1 to {_MAX_EXPIRES_IN}")
        granted = document.get("scope")
        session_id = document.get("session_id")
        return IssuedToken(
            access_token=token,
            token_type=kinds[token_type.lower()],
            expires_at=int(time.time()) + expires_in,
            session_id=session_id if isinstance(session_id, str) else "",
            # RFC 6749 section 5.1: no scope means the scope requested.
            scopes=tuple(granted.split()) if isinstance(granted, str) else scopes,
            jti=_token_id(token),
        )

    def __repr__(self) -> str:
        return f"TokenEndpoint({self._token_url or self._metadata_url!r}, assertion_audience={self._audience!r})"


def _json_object(answer: _Answer, what: str) -> dict[str, Any]:
    try:
        document = json.loads(answer.body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise TokenEndpointError("invalid_response", f"{what} is not a JSON object", status=answer.status)
    return document


def _refusal(answer: _Answer) -> TokenEndpointError:
    """The RFC 6749 section 5.2 error of a refusal."""
    try:
        document = json.loads(answer.body)
    except ValueError:
        document = None
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, str) or not error:
        return TokenEndpointError("invalid_response", "the refusal carries no OAuth error", status=answer.status)
    assert isinstance(document, dict)
    description = document.get("error_description")
    return TokenEndpointError(error, description if isinstance(description, str) else "", status=answer.status)


# -- HTTP -------------------------------------------------------------------------------


def _unreachable(request: httpx.Request, exc: httpx.HTTPError) -> TokenEndpointError:
    url = request.url.copy_with(query=None, fragment=None)
    return TokenEndpointError("temporarily_unavailable", f"{url} is unreachable ({type(exc).__name__})", status=0)


def _too_large(status: int) -> TokenEndpointError:
    return TokenEndpointError("invalid_response", f"answer is larger than {MAX_ANSWER_BYTES} bytes", status=status)


def _send(client: httpx.Client, request: httpx.Request) -> _Answer:
    # auth=None: no client auth (BrokerAuth's own, if any, would recurse into itself).
    try:
        response = client.send(request, stream=True, auth=None, follow_redirects=False)
        try:
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise _too_large(response.status_code)
        finally:
            response.close()
    except httpx.HTTPError as exc:
        raise _unreachable(request, exc) from None
    return _Answer(response.status_code, response.headers, bytes(body))


async def _asend(client: httpx.AsyncClient, request: httpx.Request) -> _Answer:
    try:
        response = await client.send(request, stream=True, auth=None, follow_redirects=False)
        try:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise _too_large(response.status_code)
        finally:
            await response.aclose()
    except httpx.HTTPError as exc:
        raise _unreachable(request, exc) from None
    return _Answer(response.status_code, response.headers, bytes(body))


__all__ = ["ASSERTION_TYPE", "MAX_ANSWER_BYTES", "TokenEndpoint", "TokenEndpointError"]
