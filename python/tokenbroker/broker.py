"""`Broker`: issues short-lived, session- and audience-bound tokens and validates them.

Validation is one Rust call (structure, signature, claims, DPoP or certificate binding,
required scopes, the replay keys), then one store check (session, revocation, and the one
exact replay record). A request that lacks a scope goes to the store without its replay
records, so nothing is recorded for a request that is refused; the store's own reason
(revoked, say) still comes first.

Every door builds the same request types, `ValidateRequest` and `IssueRequest` (Rust
types: their constructors are where "" becomes None and where the stateless rules are
checked), and gets the same answers: `Validation` and `IssuedToken`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Unpack

from tokenbroker._core import LIMITS, Claims, Engine, IssueRequest, ValidateRequest, Verdict
from tokenbroker.detection.detector import Detection, learned_window
from tokenbroker.detection.observe import Observe
from tokenbroker.errors import InvalidArgumentError, SessionNotFoundError
from tokenbroker.keyring import Keyring
from tokenbroker.models import IssuedToken, Session, SessionLimit, Validation
from tokenbroker.reason import BY_NUMBER, Reason
from tokenbroker.requests import IssueFields, ValidateFields, issue_request, validate_request
from tokenbroker.store.base import SessionOpen, Store, TokenCheck
from tokenbroker.store.memory import MemoryStore

MAX_TTL_SECONDS = LIMITS.max_lifetime_seconds

BatchRequest = ValidateRequest | Validation | Mapping[str, Any]

_STATE_DETAILS = {
    Reason.SESSION_UNKNOWN: "session is unknown, expired or not this client's for this audience",
    Reason.SESSION_REVOKED: "session was revoked",
    Reason.CLIENT_REVOKED: "every session of this client was revoked",
    Reason.TOKEN_REVOKED: "token was revoked",
    Reason.REPLAYED: "DPoP proof or single-use token was already used: sign a fresh proof for each request",
    Reason.ANOMALY: "refused by detection: this use does not look like the client's (see the broker's events)",
    Reason.REPLAY_CACHE_FULL: (
        "too many DPoP proofs or single-use tokens of this client are still inside their window: "
        "refused rather than forgetting one; retry once older ones expire"
    ),
}


def _refusal(verdict: Verdict, request_id: str) -> Validation:
    return Validation.rejected(BY_NUMBER[verdict.reason], verdict.detail, request_id)


def _answer(verdict: Verdict, claims: Claims, state: Reason, request_id: str) -> Validation:
    """The answer once the store has spoken: its refusal first, then a missing scope."""
    if state is not Reason.OK:
        return Validation.rejected(state, _STATE_DETAILS.get(state, state.name.lower()), request_id)
    if verdict.missing_scopes is not None:
        return Validation.rejected(Reason.INSUFFICIENT_SCOPE, verdict.missing_scopes, request_id)
    return Validation(
        True,
        Reason.OK,
        "",
        claims.client_id,
        claims.subject,
        claims.session_id,
        claims.audience,
        claims.scopes,
        claims.expires_at,
        claims.jti,
        claims.issuer,
        request_id,
    )


def _token_check(
    claims: Claims, verdict: Verdict, request: ValidateRequest, now: int, detection: Detection | None
) -> TokenCheck:
    """The store's check of one request the engine passed. Built positionally: this is the
    hot path, where keywords or a dict cost about a microsecond per validation. Watched by
    detection unless a scope is missing (the request is refused whatever is seen)."""
    observe = None
    if detection is not None and verdict.missing_scopes is None:
        observe = detection.observe(claims.client_id, request.client_ip, request.resource, claims.usage_window, now)
    return TokenCheck(
        claims.client_id,
        claims.session_id,
        claims.audience,
        claims.jti,
        claims.issued_at,
        request.client_ip or "",
        verdict.replay,
        now,
        observe,
    )


def _report(detection: Detection | None, check: TokenCheck, claims: Claims) -> None:
    """Hands what the store found to detection (nothing to do on the common path)."""
    observe: Observe | None = check.observe
    if detection is not None and observe is not None and observe.found:
        detection.report(check.client_id, check.session_id, check.client_ip, observe, claims.usage_window, check.now)


class Broker:
    """The token broker, embedded. Thread-safe; asyncio callers use the `a*` twins."""

    def __init__(
        self,
        keyring: Keyring,
        *,
        issuer: str,
        store: Store | None = None,
        default_ttl_seconds: int = 300,
        session_ttl_seconds: int = 8 * 3600,
        session_limit: SessionLimit | None = None,
        session_idle_seconds: int | None = None,
        leeway_seconds: int = 5,
        dpop_max_age_seconds: int = 60,
        token_cache_capacity: int = 100_000,
        replay_capacity: int = 1_000_000,
        replay_fp_rate: float = 0.001,
        detection: Detection | Literal[False] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(keyring, Keyring):
            raise InvalidArgumentError("keyring must be a tokenbroker.Keyring")
        if session_ttl_seconds < 1:
            raise InvalidArgumentError("session_ttl_seconds must be positive")
        # The engine checks every bound it enforces (lifetimes, leeway, proof age).
        self._engine = Engine(
            keyring.key_set,
            issuer,
            default_ttl_seconds=default_ttl_seconds,
            leeway_seconds=leeway_seconds,
            dpop_max_age_seconds=dpop_max_age_seconds,
            token_cache_capacity=token_cache_capacity,
            replay_capacity=replay_capacity,
            replay_fp_rate=replay_fp_rate,
        )
        self.keyring = keyring
        self.issuer = issuer
        # The store's state epoch comes from the clock that stamps the tokens' iat.
        self.store: Store = store if store is not None else MemoryStore(clock=clock)
        self.default_ttl_seconds = default_ttl_seconds
        self.session_ttl_seconds = session_ttl_seconds
        self.session_limit = session_limit or SessionLimit()
        # Sessions opened without an idle time of their own end after this long unused (None: never).
        if session_idle_seconds is not None and session_idle_seconds < 1:
            raise InvalidArgumentError("session_idle_seconds must be positive (or None: sessions never idle out)")
        self.session_idle_seconds = session_idle_seconds
        self._leeway = leeway_seconds
        self._clock = clock
        # Watches every validation (tokenbroker.detection); None: the defaults (every signal
        # alerts), False: nothing watched.
        self.detection: Detection | None = (
            None if detection is False else detection if detection is not None else Detection()
        )
        self._windows: dict[str, tuple[int, int | None]] = {}  # client -> (until, learned window)

    @property
    def engine(self) -> Engine:
        """The Rust engine (its `stats()` feed metrics)."""
        return self._engine

    def _now(self) -> int:
        return int(self._clock())

    # -- issuance -------------------------------------------------------------------

    def issue(
        self,
        *,
        session_limit: SessionLimit | None = None,
        continuation: str | None = None,
        idle_seconds: int | None = None,
        **fields: Unpack[IssueFields],
    ) -> IssuedToken:
        """Issues a token bound to `audience` and to a session: `session_id` continues a
        live session of this client; None continues the live session `continuation`
        names (same client and audience), if any, else opens a new one under the session
        limit (the client's `session_limit`, else the broker's) that the continuation
        then names. `idle_seconds` makes a session opened now end after that long
        without activity (see `issue_request`).

        Raises `InvalidArgumentError`, `SessionNotFoundError`, `SessionLimitExceededError`
        or `StoreUnavailableError`. The caller has already authenticated the client."""
        request = issue_request(**fields)
        return self.issue_request(
            request, session_limit=session_limit, continuation=continuation, idle_seconds=idle_seconds
        )

    async def aissue(
        self,
        *,
        session_limit: SessionLimit | None = None,
        continuation: str | None = None,
        idle_seconds: int | None = None,
        **fields: Unpack[IssueFields],
    ) -> IssuedToken:
        """The asyncio twin of `issue`."""
        request = issue_request(**fields)
        return await self.aissue_request(
            request, session_limit=session_limit, continuation=continuation, idle_seconds=idle_seconds
        )

    def issue_request(
        self,
        request: IssueRequest,
        *,
        session_limit: SessionLimit | None = None,
        continuation: str | None = None,
        idle_seconds: int | None = None,
    ) -> IssuedToken:
        """`issue` for a request already built (as the gRPC and HTTP doors do).

        `continuation` (an opaque string the door computes, e.g. a hash of client,
        audience and DPoP key thumbprint) continues a session without a session id, for
        clients that ask for a new token rather than refresh: they keep one session
        instead of exhausting the limit. `idle_seconds` (None: the broker's
        `session_idle_seconds`, by default never) ends a session opened now after that
        long without an issuance or a successful validation; it frees its place under the
        limit, and its tokens are refused like those of an expired session.

        Lifetimes, by choice: a token's `exp` is capped by its session's hard end
        (created + `session_ttl_seconds`) as before, never by the idle expiry. Issuing
        slides an idle-ending session's expiry to now + max(idle seconds, the token's
        lifetime), within the hard end: a session never idles out under a token it just
        issued, even one that is never used (the simpler and safer rule than tracking
        each live token's exp)."""
        now = self._now()
        request = self._windowed(request, now, None)
        opening = self._session_open(request, session_limit, now, continuation, idle_seconds)
        return self._sign(request, self.store.open_session(opening), now)

    async def aissue_request(
        self,
        request: IssueRequest,
        *,
        session_limit: SessionLimit | None = None,
        continuation: str | None = None,
        idle_seconds: int | None = None,
    ) -> IssuedToken:
        """The asyncio twin of `issue_request`."""
        now = self._now()
        request = self._windowed(request, now, await self._ahours(request, now))
        opening = self._session_open(request, session_limit, now, continuation, idle_seconds)
        return self._sign(request, await self.store.aopen_session(opening), now)

    # -- usage windows (detection's outside_usage_window) ---------------------------

    _WINDOW_CACHE_SECONDS = 300
    _WINDOW_CACHE_MAX = 65_536

    async def _ahours(self, request: IssueRequest, now: int) -> list[int] | None:
        """The client's usage hours for a learned window, when one is needed and not cached."""
        if request.usage_window is not None or self.detection is None or not self.detection.learn_usage_window:
            return None
        cached = self._windows.get(request.client_id)
        if cached is not None and cached[0] > now:
            return None
        return await self.store.ausage_hours(request.client_id)

    def _windowed(self, request: IssueRequest, now: int, hours: list[int] | None) -> IssueRequest:
        """`request` carrying the client's usage window: its own (the client record's, set by
        the door), else the one learned from the client's usage hours (cached for five
        minutes), else none."""
        if request.usage_window is not None or self.detection is None or not self.detection.learn_usage_window:
            return request
        cached = self._windows.get(request.client_id)
        if cached is None or cached[0] <= now:
            if hours is None:
                hours = self.store.usage_hours(request.client_id)
            if len(self._windows) >= self._WINDOW_CACHE_MAX:
                self._windows.clear()  # bounded; a miss costs one store read
            cached = (now + self._WINDOW_CACHE_SECONDS, learned_window(hours))
            self._windows[request.client_id] = cached
        window = cached[1]
        if window is None:
            return request
        return IssueRequest(
            client_id=request.client_id,
            audience=request.audience,
            scopes=request.scopes,
            ttl_seconds=request.ttl_seconds,
            session_id=request.session_id,
            dpop_jkt=request.dpop_jkt,
            cert_thumbprint=request.cert_thumbprint,
            once=request.once,
            client_ip=request.client_ip,
            attested_subject=request.attested_subject,
            usage_window=window,
        )

    def _session_open(
        self,
        request: IssueRequest,
        session_limit: SessionLimit | None,
        now: int,
        continuation: str | None,
        idle_seconds: int | None,
    ) -> SessionOpen:
        """What the store opens (or continues) for `request`: the client's limit, else the
        broker's; the token's lifetime, which an idle-ending session is kept live for."""
        return SessionOpen(
            request.client_id,
            request.audience,
            request.session_id,
            self.session_ttl_seconds,
            session_limit or self.session_limit,
            request.client_ip or "",
            now,
            continuation,
            idle_seconds if idle_seconds is not None else self.session_idle_seconds,
            request.ttl_seconds or self.default_ttl_seconds,
        )

    def _sign(self, request: IssueRequest, session: Session, now: int) -> IssuedToken:
        if session.expires_at <= now:
            raise SessionNotFoundError(f"session {session.session_id!r} has expired")
        signed = self._engine.issue(request, session_id=session.session_id, not_after=session.expires_at, now=now)
        return IssuedToken(
            access_token=signed.access_token,
            token_type="DPoP" if request.dpop_jkt else "Bearer",
            expires_at=signed.expires_at,
            session_id=session.session_id,
            scopes=request.scopes,
            jti=signed.jti,
        )

    # -- validation -----------------------------------------------------------------

    def validate(self, token: str, **fields: Unpack[ValidateFields]) -> Validation:
        """Validates `token` for the caller's own `audience`. Never raises for a bad token:
        the answer is a `Validation` with a `Reason`. Raises `InvalidArgumentError` for an
        empty audience and `StoreUnavailableError` when the state store is down (fail
        closed)."""
        request = validate_request(token, **fields)
        return request if isinstance(request, Validation) else self.validate_request(request)

    async def avalidate(self, token: str, **fields: Unpack[ValidateFields]) -> Validation:
        """The asyncio twin of `validate`."""
        request = validate_request(token, **fields)
        return request if isinstance(request, Validation) else await self.avalidate_request(request)

    def validate_request(self, request: ValidateRequest) -> Validation:
        """`validate` for a request already built (as the gRPC and HTTP doors do)."""
        now = self._now()
        verdict = self._engine.validate(request, now)
        claims = verdict.claims
        if claims is None:
            return _refusal(verdict, request.request_id)
        check = _token_check(claims, verdict, request, now, self.detection)
        state = self.store.check_token(check)
        if check.observe is not None and check.observe.found:  # the common path calls nothing
            _report(self.detection, check, claims)
        return _answer(verdict, claims, state, request.request_id)

    async def avalidate_request(self, request: ValidateRequest) -> Validation:
        """The asyncio twin of `validate_request`."""
        now = self._now()
        verdict = self._engine.validate(request, now)
        claims = verdict.claims
        if claims is None:
            return _refusal(verdict, request.request_id)
        check = _token_check(claims, verdict, request, now, self.detection)
        state = await self.store.acheck_token(check)
        _report(self.detection, check, claims)
        return _answer(verdict, claims, state, request.request_id)

    def validate_batch(self, requests: Iterable[BatchRequest]) -> list[Validation]:
        """Validates many tokens: one engine call (token and proof signatures
        batch-verified, the GIL released) and one store call (pipelined: one round trip
        for the batch). Each request is a `ValidateRequest` or a mapping of `validate`'s
        keyword arguments plus `token` (or a `Validation`: a request a door has already
        answered, kept in its place); answers keep the order."""
        batch = _Batch(self, requests)
        states = self.store.check_tokens(batch.checks) if batch.checks else []
        return batch.answers(states, self.detection)

    async def avalidate_batch(self, requests: Iterable[BatchRequest]) -> list[Validation]:
        """The asyncio twin of `validate_batch`."""
        batch = _Batch(self, requests)
        states = await self.store.acheck_tokens(batch.checks) if batch.checks else []
        return batch.answers(states, self.detection)

    # -- revocation and sessions ----------------------------------------------------

    def revoke_session(self, session_id: str) -> int:
        """Revokes a session and every token issued in it; returns how many were revoked."""
        return self.store.revoke_session(session_id, now=self._now())

    def revoke_client(self, client_id: str) -> int:
        """Revokes every live session of a client; returns how many."""
        return self.store.revoke_client(client_id, now=self._now())

    def revoke_token(self, jti: str) -> int:
        """Revokes one token by its `jti`; returns 1 if newly revoked, 0 if it already was."""
        now = self._now()
        return self.store.revoke_token(jti, until=now + MAX_TTL_SECONDS + self._leeway, now=now)

    def sessions(self, client_id: str) -> list[Session]:
        """The client's live sessions."""
        return self.store.sessions(client_id, now=self._now())

    async def arevoke_session(self, session_id: str) -> int:
        return await self.store.arevoke_session(session_id, now=self._now())

    async def arevoke_client(self, client_id: str) -> int:
        return await self.store.arevoke_client(client_id, now=self._now())

    async def arevoke_token(self, jti: str) -> int:
        now = self._now()
        return await self.store.arevoke_token(jti, until=now + MAX_TTL_SECONDS + self._leeway, now=now)

    async def asessions(self, client_id: str) -> list[Session]:
        return await self.store.asessions(client_id, now=self._now())

    # -- introspection (RFC 7662) -----------------------------------------------------

    async def aintrospect(self, token: str, *, audience: str) -> tuple[Validation, Claims | None]:
        """Whether `token` is active for `audience`: signature, lifetime, issuer, audience
        and its state in the store (session live, nothing revoked), but not its binding:
        the resource server that asks checks the DPoP proof or certificate against the
        returned claims' `confirmation` itself. Writes no replay record (a single-use
        token is not used up); like a validation, it counts as the session's activity.
        The claims are None unless the token is active."""
        if not audience:
            raise InvalidArgumentError("audience (the caller's own resource URI) is required")
        now = self._now()
        verdict = self._engine.introspect(token, audience, now)
        claims = verdict.claims
        if claims is None:
            return _refusal(verdict, ""), None
        check = TokenCheck(
            claims.client_id, claims.session_id, claims.audience, claims.jti, claims.issued_at, "", (), now
        )
        state = await self.store.acheck_token(check)
        answer = _answer(verdict, claims, state, "")
        return answer, (claims if answer.valid else None)

    def jwks(self) -> dict[str, Any]:
        """The public JWKS to publish for resource servers and standard JWT libraries."""
        return self.keyring.jwks()

    def __repr__(self) -> str:
        return f"Broker(issuer={self.issuer!r}, store={type(self.store).__name__})"


class _Batch:
    """One batch through the engine: each request built (or refused at once), the engine's
    verdicts for the built ones, and the store checks of those that passed it."""

    def __init__(self, broker: Broker, requests: Iterable[BatchRequest]) -> None:
        # Every request is built before any is validated: a batch refused for one bad
        # request (an empty audience) spends no replay record.
        self.items = [_built(r) for r in requests]
        built = [r for r in self.items if isinstance(r, ValidateRequest)]
        now = broker._now()
        verdicts = iter(broker.engine.validate_batch(built, now))
        self.checks: list[TokenCheck] = []
        self.order: list[Validation | tuple[Verdict, ValidateRequest]] = []
        for item in self.items:
            if isinstance(item, Validation):
                self.order.append(item)
                continue
            verdict = next(verdicts)
            self.order.append((verdict, item))
            if verdict.claims is not None:
                self.checks.append(_token_check(verdict.claims, verdict, item, now, broker.detection))

    def answers(self, states: list[Reason], detection: Detection | None) -> list[Validation]:
        checks = iter(self.checks)
        state_of = iter(states)
        out: list[Validation] = []
        for entry in self.order:
            if isinstance(entry, Validation):
                out.append(entry)
                continue
            verdict, request = entry
            claims = verdict.claims
            if claims is None:
                out.append(_refusal(verdict, request.request_id))
            else:
                _report(detection, next(checks), claims)
                out.append(_answer(verdict, claims, next(state_of), request.request_id))
        return out


def _built(r: BatchRequest) -> ValidateRequest | Validation:
    """A batch entry as a request (or its answer, when it cannot be one)."""
    if isinstance(r, ValidateRequest | Validation):
        return r
    if not isinstance(r, Mapping):  # r.get would raise AttributeError
        raise TypeError(f"a batch request is a ValidateRequest or a mapping, not {type(r).__name__}")
    return validate_request(**_keywords(r))


def _keywords(r: Mapping[str, Any]) -> dict[str, Any]:
    """A batch mapping as `validate_request` keywords (`token` required, the rest optional;
    unknown keys are ignored, as before)."""
    names = (
        "dpop_proof",
        "http_method",
        "http_uri",
        "cert_thumbprint",
        "client_ip",
        "required_scopes",
        "request_id",
        "resource",
    )
    out: dict[str, Any] = {"token": r.get("token"), "audience": r.get("audience")}
    for name in names:
        if name in r:
            out[name] = r[name]
    return out
