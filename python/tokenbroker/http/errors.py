"""OAuth error answers (RFC 6749 section 5.2, RFC 9449 sections 7 and 8): one exception
type that every handler raises and one function that turns it into the response."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import JSONResponse

# RFC 6749 section 5.1: responses with tokens or credentials must not be cached.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# On every answer of the door: nothing here is for a browser to render or frame.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}
BASIC_CHALLENGE = 'Basic realm="tokenbroker", charset="UTF-8"'


class OAuthError(Exception):
    """An RFC 6749 error response: `error` (the registered code), a one-line
    `description` for the developer (never a token or secret), the HTTP status and any
    extra headers (a challenge, `DPoP-Nonce`, `Retry-After`); `rule`, for the audit line."""

    def __init__(
        self,
        error: str,
        description: str,
        *,
        status: int = 400,
        headers: Mapping[str, str] | None = None,
        rule: str | None = None,
    ):
        super().__init__(description)
        self.error = error
        self.rule = rule or error  # what the audit line names: the broker's rule when one decided
        self.description = description
        self.status = status
        self.headers = dict(headers or {})


def invalid_request(description: str) -> OAuthError:
    return OAuthError("invalid_request", description)


def invalid_client(description: str) -> OAuthError:
    """401 with a Basic challenge: RFC 6749 section 5.2 requires it when the client used
    Basic, and HTTP requires a challenge on every 401 (RFC 9110 section 15.5.2)."""
    return OAuthError("invalid_client", description, status=401, headers={"WWW-Authenticate": BASIC_CHALLENGE})


def error_response(exc: OAuthError) -> JSONResponse:
    # `error_description` is limited to printable ASCII without `"` and `\` (RFC 6749 5.2).
    description = "".join(c if 0x20 <= ord(c) <= 0x7E and c not in '"\\' else "?" for c in exc.description)[:500]
    return JSONResponse(
        {"error": exc.error, "error_description": description},
        status_code=exc.status,
        headers={**NO_STORE, **exc.headers},
    )


__all__ = [
    "BASIC_CHALLENGE",
    "NO_STORE",
    "SECURITY_HEADERS",
    "OAuthError",
    "error_response",
    "invalid_client",
    "invalid_request",
]
