"""The request types every door builds, from keyword arguments: `ValidateRequest` and
`IssueRequest` (Rust types: their constructors map "" to None and check the rules that
need no state). `ValidateFields` and `IssueFields` type those keyword arguments once, for
`Broker`, `BrokerClient` and their asyncio twins (`**fields: Unpack[ValidateFields]`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Required, TypedDict

from tokenbroker._core import IssueRequest, ValidateRequest
from tokenbroker.errors import InvalidArgumentError
from tokenbroker.models import Validation
from tokenbroker.reason import Reason


class ValidateFields(TypedDict, total=False):
    """`validate`'s keyword arguments (after the token)."""

    audience: Required[str]
    dpop_proof: str | None
    http_method: str | None
    http_uri: str | None
    cert_thumbprint: str | None
    client_ip: str | None
    required_scopes: Iterable[str] | str | None
    request_id: str
    resource: str | None


class IssueFields(TypedDict, total=False):
    """`issue`'s keyword arguments."""

    client_id: Required[str]
    audience: Required[str]
    scopes: Iterable[str] | str
    ttl_seconds: int | None
    session_id: str | None
    dpop_jkt: str | None
    cert_thumbprint: str | None
    once: bool
    client_ip: str | None
    attested_subject: str | None
    usage_window: int | None


def _ascii_text(value: object) -> str | None:
    """A token or proof as ASCII text (str or bytes), or None when it cannot be one."""
    if isinstance(value, str):
        return value if value.isascii() else None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    return None


def validate_request(
    token: object,
    *,
    audience: str,
    dpop_proof: object = None,
    http_method: str | None = None,
    http_uri: str | None = None,
    cert_thumbprint: str | None = None,
    client_ip: str | None = None,
    required_scopes: Iterable[str] | str | None = (),
    request_id: str = "",
    resource: str | None = None,
) -> ValidateRequest | Validation:
    """The `ValidateRequest` for `Broker.validate`'s keyword arguments, or the refusal when
    a field cannot be one (a token that is not text is an answer, never an exception).
    Raises `InvalidArgumentError` for an empty audience: the caller's own configuration."""
    rid = request_id if isinstance(request_id, str) else ""
    text = _ascii_text(token)
    if text is None:
        return Validation.rejected(Reason.MALFORMED, "token is not ASCII text", rid)
    proof = None
    if dpop_proof is not None and dpop_proof != "":
        proof = _ascii_text(dpop_proof)
        if proof is None:
            return Validation.rejected(Reason.PROOF_INVALID, "DPoP proof is not ASCII text", rid)
    if required_scopes is None:  # an optional setting left unset: no scope required
        required_scopes = ()
    elif not isinstance(required_scopes, str | tuple | list):
        # Read once: a one-shot iterator must not come back empty on the second try below
        # (a request would then need no scope at all).
        try:
            required_scopes = tuple(required_scopes)
        except TypeError:
            return Validation.rejected(Reason.MALFORMED, "required_scopes is not a list of scopes", rid)
    try:
        return ValidateRequest(
            text,
            audience=audience,
            dpop_proof=proof,
            http_method=http_method,
            http_uri=http_uri,
            cert_thumbprint=cert_thumbprint,
            client_ip=client_ip,
            required_scopes=required_scopes,  # a space-separated string is split
            request_id=rid,
            resource=resource,
        )
    except (TypeError, UnicodeError):  # e.g. a non-str method, a lone surrogate: never raise
        pass
    # Off the hot path: an optional field that is not text is absent (the engine then
    # refuses what needed it, e.g. a DPoP proof without its method); anything else that
    # is not text is a malformed request.
    try:
        return ValidateRequest(
            text,
            audience=audience,
            dpop_proof=proof,
            http_method=_text_or_none(http_method),
            http_uri=_text_or_none(http_uri),
            cert_thumbprint=_text_or_none(cert_thumbprint),
            client_ip=_text_or_none(client_ip),
            required_scopes=required_scopes,
            request_id=rid,
            resource=_text_or_none(resource),
        )
    except (TypeError, UnicodeError):
        return Validation.rejected(Reason.MALFORMED, "request fields are not text", rid)


def _text_or_none(value: object) -> str | None:
    """`value` when it is text the engine can take (UTF-8 encodable), else None."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def issue_request(
    *,
    client_id: str,
    audience: str,
    scopes: Iterable[str] | str = (),
    ttl_seconds: int | None = None,
    session_id: str | None = None,
    dpop_jkt: str | None = None,
    cert_thumbprint: str | None = None,
    once: bool = False,
    client_ip: str | None = None,
    attested_subject: str | None = None,
    usage_window: int | None = None,
) -> IssueRequest:
    """The `IssueRequest` for `Broker.issue`'s keyword arguments. Raises
    `InvalidArgumentError` for a request no store needs to see (lifetime, ids, scopes,
    binding)."""
    try:
        return IssueRequest(
            client_id=client_id,
            audience=audience,
            scopes=scopes,
            ttl_seconds=ttl_seconds,
            session_id=session_id,
            dpop_jkt=dpop_jkt,
            cert_thumbprint=cert_thumbprint,
            once=once,
            client_ip=client_ip,
            attested_subject=attested_subject,
            usage_window=usage_window,
        )
    except (TypeError, UnicodeError, OverflowError) as exc:
        raise InvalidArgumentError(f"issue request: {exc}") from None
