from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    REASON_OK: _ClassVar[Reason]
    REASON_MALFORMED: _ClassVar[Reason]
    REASON_TOO_LARGE: _ClassVar[Reason]
    REASON_UNSUPPORTED_ALGORITHM: _ClassVar[Reason]
    REASON_UNKNOWN_KEY: _ClassVar[Reason]
    REASON_BAD_SIGNATURE: _ClassVar[Reason]
    REASON_EXPIRED: _ClassVar[Reason]
    REASON_NOT_YET_VALID: _ClassVar[Reason]
    REASON_WRONG_ISSUER: _ClassVar[Reason]
    REASON_WRONG_AUDIENCE: _ClassVar[Reason]
    REASON_SESSION_UNKNOWN: _ClassVar[Reason]
    REASON_SESSION_REVOKED: _ClassVar[Reason]
    REASON_CLIENT_REVOKED: _ClassVar[Reason]
    REASON_TOKEN_REVOKED: _ClassVar[Reason]
    REASON_REPLAYED: _ClassVar[Reason]
    REASON_PROOF_MISSING: _ClassVar[Reason]
    REASON_PROOF_INVALID: _ClassVar[Reason]
    REASON_BINDING_MISMATCH: _ClassVar[Reason]
    REASON_INSUFFICIENT_SCOPE: _ClassVar[Reason]
    REASON_REPLAY_CACHE_FULL: _ClassVar[Reason]
    REASON_ANOMALY: _ClassVar[Reason]
REASON_UNSPECIFIED: Reason
REASON_OK: Reason
REASON_MALFORMED: Reason
REASON_TOO_LARGE: Reason
REASON_UNSUPPORTED_ALGORITHM: Reason
REASON_UNKNOWN_KEY: Reason
REASON_BAD_SIGNATURE: Reason
REASON_EXPIRED: Reason
REASON_NOT_YET_VALID: Reason
REASON_WRONG_ISSUER: Reason
REASON_WRONG_AUDIENCE: Reason
REASON_SESSION_UNKNOWN: Reason
REASON_SESSION_REVOKED: Reason
REASON_CLIENT_REVOKED: Reason
REASON_TOKEN_REVOKED: Reason
REASON_REPLAYED: Reason
REASON_PROOF_MISSING: Reason
REASON_PROOF_INVALID: Reason
REASON_BINDING_MISMATCH: Reason
REASON_INSUFFICIENT_SCOPE: Reason
REASON_REPLAY_CACHE_FULL: Reason
REASON_ANOMALY: Reason

class IssueTokenRequest(_message.Message):
    __slots__ = ("client_id", "client_assertion", "client_secret", "audience", "scopes", "ttl_seconds", "session_id", "dpop_jkt", "cert_thumbprint", "client_ip", "once")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ASSERTION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DPOP_JKT_FIELD_NUMBER: _ClassVar[int]
    CERT_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    ONCE_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    client_assertion: str
    client_secret: str
    audience: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    session_id: str
    dpop_jkt: str
    cert_thumbprint: str
    client_ip: str
    once: bool
    def __init__(self, client_id: _Optional[str] = ..., client_assertion: _Optional[str] = ..., client_secret: _Optional[str] = ..., audience: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ..., session_id: _Optional[str] = ..., dpop_jkt: _Optional[str] = ..., cert_thumbprint: _Optional[str] = ..., client_ip: _Optional[str] = ..., once: _Optional[bool] = ...) -> None: ...

class IssueTokenResponse(_message.Message):
    __slots__ = ("access_token", "token_type", "expires_at", "session_id", "scopes", "jti")
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    access_token: str
    token_type: str
    expires_at: int
    session_id: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    jti: str
    def __init__(self, access_token: _Optional[str] = ..., token_type: _Optional[str] = ..., expires_at: _Optional[int] = ..., session_id: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., jti: _Optional[str] = ...) -> None: ...

class ValidateTokenRequest(_message.Message):
    __slots__ = ("token", "audience", "dpop_proof", "http_method", "http_uri", "cert_thumbprint", "client_ip", "required_scopes", "request_id", "resource")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    DPOP_PROOF_FIELD_NUMBER: _ClassVar[int]
    HTTP_METHOD_FIELD_NUMBER: _ClassVar[int]
    HTTP_URI_FIELD_NUMBER: _ClassVar[int]
    CERT_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_SCOPES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    token: str
    audience: str
    dpop_proof: str
    http_method: str
    http_uri: str
    cert_thumbprint: str
    client_ip: str
    required_scopes: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    resource: str
    def __init__(self, token: _Optional[str] = ..., audience: _Optional[str] = ..., dpop_proof: _Optional[str] = ..., http_method: _Optional[str] = ..., http_uri: _Optional[str] = ..., cert_thumbprint: _Optional[str] = ..., client_ip: _Optional[str] = ..., required_scopes: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., resource: _Optional[str] = ...) -> None: ...

class ValidateTokenResponse(_message.Message):
    __slots__ = ("valid", "reason", "detail", "client_id", "subject", "session_id", "scopes", "expires_at", "jti", "issuer", "request_id")
    VALID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    reason: Reason
    detail: str
    client_id: str
    subject: str
    session_id: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    expires_at: int
    jti: str
    issuer: str
    request_id: str
    def __init__(self, valid: _Optional[bool] = ..., reason: _Optional[_Union[Reason, str]] = ..., detail: _Optional[str] = ..., client_id: _Optional[str] = ..., subject: _Optional[str] = ..., session_id: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., expires_at: _Optional[int] = ..., jti: _Optional[str] = ..., issuer: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ValidateTokenBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ValidateTokenRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ValidateTokenRequest, _Mapping]]] = ...) -> None: ...

class ValidateTokenBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[ValidateTokenResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[ValidateTokenResponse, _Mapping]]] = ...) -> None: ...

class RevokeSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class RevokeClientRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("jti",)
    JTI_FIELD_NUMBER: _ClassVar[int]
    jti: str
    def __init__(self, jti: _Optional[str] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: int
    def __init__(self, revoked: _Optional[int] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "audience", "created_at", "expires_at", "last_seen_at", "last_ip")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_IP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    audience: str
    created_at: int
    expires_at: int
    last_seen_at: int
    last_ip: str
    def __init__(self, session_id: _Optional[str] = ..., audience: _Optional[str] = ..., created_at: _Optional[int] = ..., expires_at: _Optional[int] = ..., last_seen_at: _Optional[int] = ..., last_ip: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ...) -> None: ...

class GetJwksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetJwksResponse(_message.Message):
    __slots__ = ("jwks_json",)
    JWKS_JSON_FIELD_NUMBER: _ClassVar[int]
    jwks_json: str
    def __init__(self, jwks_json: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("client_id", "follow")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    follow: bool
    def __init__(self, client_id: _Optional[str] = ..., follow: _Optional[bool] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event", "signal", "severity", "client_id", "session_id", "source_ip", "action", "evidence_json", "time")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IP_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_JSON_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    event: str
    signal: str
    severity: str
    client_id: str
    session_id: str
    source_ip: str
    action: str
    evidence_json: str
    time: str
    def __init__(self, event: _Optional[str] = ..., signal: _Optional[str] = ..., severity: _Optional[str] = ..., client_id: _Optional[str] = ..., session_id: _Optional[str] = ..., source_ip: _Optional[str] = ..., action: _Optional[str] = ..., evidence_json: _Optional[str] = ..., time: _Optional[str] = ...) -> None: ...
