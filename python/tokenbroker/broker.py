"""`Broker`: issues short-lived, session- and audience-bound tokens and validates them.

Validation is one Rust call (structure, signature, claims, DPoP or certificate binding,
the replay keys), then one store check (session, revocation, and the one exact replay
record), then the scope check. A request that lacks a scope goes to the store without its
replay records, so nothing is recorded for a request that is refused."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from tokenbroker import _core
from tokenbroker.errors import InvalidArgumentError
from tokenbroker.keyring import Keyring
from tokenbroker.models import IssuedToken, Session, SessionLimit, Validation
from tokenbroker.reason import BY_NUMBER, Reason
from tokenbroker.store.base import Store
from tokenbroker.store.memory import MemoryStore

MAX_TTL_SECONDS = int(_core.MAX_LIFETIME_SECONDS)

_STATE_DETAILS = {
    Reason.SESSION_UNKNOWN: "session is unknown, expired or not this client's for this audience",
    Reason.SESSION_REVOKED: "session was revoked",
    Reason.CLIENT_REVOKED: "every session of this client was revoked",
    Reason.TOKEN_REVOKED: "token was revoked",
    Reason.REPLAYED: "DPoP proof or single-use token was already used: sign a fresh proof for each request",
    Reason.REPLAY_CACHE_FULL: (
        "too many DPoP proofs or single-use tokens of this client are still inside their window: "
        "refused rather than forgetting one; retry once older ones expire"
    ),
}


def _text(value: object) -> str | None:
    """A token or proof as text, or None when it cannot be one."""
    if isinstance(value, str):
        return value if value.isascii() else None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    return None


def _field(value: object) -> str | None:
    """A request field the engine can take (UTF-8 encodable text), else None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


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
        leeway_seconds: int = 5,
        dpop_max_age_seconds: int = 60,
        token_cache_capacity: int = 100_000,
        replay_capacity: int = 1_000_000,
        replay_fp_rate: float = 0.001,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(keyring, Keyring):
            raise InvalidArgumentError("keyring must be a tokenbroker.Keyring")
        if not 1 <= default_ttl_seconds <= MAX_TTL_SECONDS:
            raise InvalidArgumentError(f"default_ttl_seconds must be 1 to {MAX_TTL_SECONDS}")
        if session_ttl_seconds < 1:
            raise InvalidArgumentError("session_ttl_seconds must be positive")
        self.keyring = keyring
        self.issuer = issuer
        # The store's state epoch comes from the clock that stamps the tokens' iat.
        self.store: Store = store if store is not None else MemoryStore(clock=clock)
        self.default_ttl_seconds = default_ttl_seconds
        self.session_ttl_seconds = session_ttl_seconds
        self.session_limit = session_limit or SessionLimit()
        self._leeway = leeway_seconds
        self._clock = clock
        self._engine = _core.Engine(
            keyring._keys,
            issuer,
            leeway_seconds=leeway_seconds,
            dpop_max_age_seconds=dpop_max_age_seconds,
            token_cache_capacity=token_cache_capacity,
            replay_capacity=replay_capacity,
            replay_fp_rate=replay_fp_rate,
        )

    def _now(self) -> int:
        return int(self._clock())

    # -- issuance -------------------------------------------------------------------

    def _issue_args(self, ttl_seconds: int | None, scopes: Iterable[str], audience: str) -> tuple[int, list[str]]:
        ttl = self.default_ttl_seconds if ttl_seconds is None or ttl_seconds == 0 else ttl_seconds
        if not 1 <= ttl <= MAX_TTL_SECONDS:
            raise InvalidArgumentError(f"ttl_seconds must be 1 to {MAX_TTL_SECONDS}")
        if isinstance(scopes, str):
            scopes = scopes.split()
        if not audience:
            raise InvalidArgumentError("audience (the MCP server's resource URI) is required")
        return ttl, list(dict.fromkeys(scopes))

    def _session_args(
        self,
        client_id: str,
        audience: str,
        session_id: str | None,
        session_limit: SessionLimit | None,
        client_ip: str | None,
        now: int,
    ) -> dict[str, Any]:
        """The store's open_session arguments, shared by `issue` and `aissue`."""
        return {
            "client_id": client_id,
            "audience": audience,
            "session_id": session_id or None,
            "ttl_seconds": self.session_ttl_seconds,
            "limit": session_limit or self.session_limit,
            "client_ip": client_ip or "",
            "now": now,
        }

    def _sign(
        self,
        session: Session,
        client_id: str,
        audience: str,
        scopes: list[str],
        ttl: int,
        dpop_jkt: str | None,
        cert_thumbprint: str | None,
        once: bool,
        now: int,
    ) -> IssuedToken:
        ttl = min(ttl, session.expires_at - now)
        if ttl < 1:
            from tokenbroker.errors import SessionNotFoundError

            raise SessionNotFoundError(f"session {session.session_id!r} has expired")
        signed = self._engine.issue(
            client_id=client_id,
            audience=audience,
            session_id=session.session_id,
            scopes=scopes,
            ttl_seconds=ttl,
            dpop_jkt=dpop_jkt or None,
            cert_thumbprint=cert_thumbprint or None,
            once=once,
            now=now,
        )
        return IssuedToken(
            access_token=signed.access_token,
            token_type="DPoP" if dpop_jkt else "Bearer",
            expires_at=signed.expires_at,
            session_id=session.session_id,
            scopes=tuple(scopes),
            jti=signed.jti,
        )

    def issue(
        self,
        *,
        client_id: str,
        audience: str,
        scopes: Iterable[str] = (),
        ttl_seconds: int | None = None,
        session_id: str | None = None,
        dpop_jkt: str | None = None,
        cert_thumbprint: str | None = None,
        once: bool = False,
        client_ip: str | None = None,
        session_limit: SessionLimit | None = None,
    ) -> IssuedToken:
        """Issues a token bound to `audience` and to a session: `session_id` continues a
        live session of this client, None opens a new one under the session limit.

        Raises `InvalidArgumentError`, `SessionNotFoundError`, `SessionLimitExceededError`
        or `StoreUnavailableError`. The caller has already authenticated the client."""
        if not client_id:
            raise InvalidArgumentError("client_id is required")
        ttl, scope_list = self._issue_args(ttl_seconds, scopes, audience)
        now = self._now()
        session = self.store.open_session(
            **self._session_args(client_id, audience, session_id, session_limit, client_ip, now)
        )
        return self._sign(session, client_id, audience, scope_list, ttl, dpop_jkt, cert_thumbprint, once, now)

    async def aissue(
        self,
        *,
        client_id: str,
        audience: str,
        scopes: Iterable[str] = (),
        ttl_seconds: int | None = None,
        session_id: str | None = None,
        dpop_jkt: str | None = None,
        cert_thumbprint: str | None = None,
        once: bool = False,
        client_ip: str | None = None,
        session_limit: SessionLimit | None = None,
    ) -> IssuedToken:
        """The asyncio twin of `issue`."""
        if not client_id:
            raise InvalidArgumentError("client_id is required")
        ttl, scope_list = self._issue_args(ttl_seconds, scopes, audience)
        now = self._now()
        session = await self.store.aopen_session(
            **self._session_args(client_id, audience, session_id, session_limit, client_ip, now)
        )
        return self._sign(session, client_id, audience, scope_list, ttl, dpop_jkt, cert_thumbprint, once, now)

    # -- validation -----------------------------------------------------------------

    def _verdict(
        self,
        token: object,
        audience: str,
        dpop_proof: object,
        http_method: str | None,
        http_uri: str | None,
        cert_thumbprint: str | None,
        now: int,
    ) -> Any:
        text = _text(token)
        if text is None:
            return Reason.MALFORMED, "token is not ASCII text"
        proof = _text(dpop_proof) if dpop_proof is not None else None
        if dpop_proof is not None and proof is None:
            return Reason.PROOF_INVALID, "DPoP proof is not ASCII text"
        try:
            return self._engine.validate(
                text,
                _field(audience) or "",
                proof or None,
                _field(http_method),
                _field(http_uri),
                _field(cert_thumbprint),
                now,
            )
        except (TypeError, UnicodeError):  # e.g. a non-str method, a lone surrogate: never raise
            return Reason.MALFORMED, "request fields are not text"

    @staticmethod
    def _lacking_scope(scopes: tuple[str, ...], required_scopes: Sequence[str], request_id: str) -> Validation | None:
        """The refusal when the token lacks a required scope, else None. Known before the
        store is asked, so such a request is sent without replay records to set; the
        store's own reason still comes first."""
        if required_scopes and not set(required_scopes).issubset(scopes):
            missing = " ".join(sorted(set(required_scopes) - set(scopes)))[:200]
            return Validation.rejected(Reason.INSUFFICIENT_SCOPE, f"token lacks scope: {missing}", request_id)
        return None

    @staticmethod
    def _answer(verdict: Any, scopes: tuple[str, ...], state: Reason, request_id: str) -> Validation:
        if state is not Reason.OK:
            return Validation.rejected(state, _STATE_DETAILS.get(state, state.name.lower()), request_id)
        return Validation(
            True,
            Reason.OK,
            "",
            verdict.client_id,
            verdict.subject,
            verdict.session_id,
            verdict.audience,
            scopes,
            verdict.expires_at,
            verdict.jti,
            verdict.issuer,
            request_id,
        )

    def validate(
        self,
        token: str,
        *,
        audience: str,
        dpop_proof: str | None = None,
        http_method: str | None = None,
        http_uri: str | None = None,
        cert_thumbprint: str | None = None,
        client_ip: str | None = None,
        required_scopes: Sequence[str] = (),
        request_id: str = "",
    ) -> Validation:
        """Validates `token` for the caller's own `audience`. Never raises for a bad token:
        the answer is a `Validation` with a `Reason`. Raises `StoreUnavailableError` when
        the state store is down (fail closed)."""
        now = self._now()
        verdict = self._verdict(token, audience, dpop_proof, http_method, http_uri, cert_thumbprint, now)
        if isinstance(verdict, tuple):
            return Validation.rejected(verdict[0], verdict[1], request_id)
        if not verdict.ok:
            return Validation.rejected(BY_NUMBER[verdict.reason], verdict.detail, request_id)
        scopes = tuple(verdict.scope.split())
        lacking = self._lacking_scope(scopes, required_scopes, request_id)
        # Keywords spelled out rather than `**self._state_args(...)`: this is the hot path,
        # and building and unpacking a dict costs about a microsecond per validation.
        state = self.store.check_token(
            client_id=verdict.client_id,
            session_id=verdict.session_id,
            audience=verdict.audience,
            jti=verdict.jti,
            issued_at=verdict.issued_at,
            client_ip=client_ip or "",
            replay=tuple(verdict.replay) if lacking is None else (),
            now=now,
        )
        if lacking is not None and state is Reason.OK:
            return lacking
        return self._answer(verdict, scopes, state, request_id)

    async def avalidate(
        self,
        token: str,
        *,
        audience: str,
        dpop_proof: str | None = None,
        http_method: str | None = None,
        http_uri: str | None = None,
        cert_thumbprint: str | None = None,
        client_ip: str | None = None,
        required_scopes: Sequence[str] = (),
        request_id: str = "",
    ) -> Validation:
        """The asyncio twin of `validate`."""
        now = self._now()
        verdict = self._verdict(token, audience, dpop_proof, http_method, http_uri, cert_thumbprint, now)
        if isinstance(verdict, tuple):
            return Validation.rejected(verdict[0], verdict[1], request_id)
        if not verdict.ok:
            return Validation.rejected(BY_NUMBER[verdict.reason], verdict.detail, request_id)
        scopes = tuple(verdict.scope.split())
        lacking = self._lacking_scope(scopes, required_scopes, request_id)
        # Keywords spelled out rather than `**self._state_args(...)`: this is the hot path,
        # and building and unpacking a dict costs about a microsecond per validation.
        state = await self.store.acheck_token(
            client_id=verdict.client_id,
            session_id=verdict.session_id,
            audience=verdict.audience,
            jti=verdict.jti,
            issued_at=verdict.issued_at,
            client_ip=client_ip or "",
            replay=tuple(verdict.replay) if lacking is None else (),
            now=now,
        )
        if lacking is not None and state is Reason.OK:
            return lacking
        return self._answer(verdict, scopes, state, request_id)

    def validate_batch(self, requests: Iterable[Mapping[str, Any]]) -> list[Validation]:
        """Validates many tokens: one engine call (signatures batch-verified, the GIL
        released) and one store call (pipelined: one round trip for the batch). Each
        request holds `validate`'s keyword arguments plus `token`; answers keep the order."""
        reqs, verdicts, checks = self._batch_prepare(requests)
        states = self.store.check_tokens([args for _, args in checks]) if checks else []
        return self._batch_answers(reqs, verdicts, checks, states)

    async def avalidate_batch(self, requests: Iterable[Mapping[str, Any]]) -> list[Validation]:
        """The asyncio twin of `validate_batch`."""
        reqs, verdicts, checks = self._batch_prepare(requests)
        states = await self.store.acheck_tokens([args for _, args in checks]) if checks else []
        return self._batch_answers(reqs, verdicts, checks, states)

    def _batch_prepare(
        self, requests: Iterable[Mapping[str, Any]]
    ) -> tuple[list[Mapping[str, Any]], list[Any], list[tuple[int, dict[str, Any]]]]:
        """The engine's verdicts and the store checks to make, for the requests that passed
        the engine (without replay records for those that lack a scope)."""
        now = self._now()
        reqs = list(requests)
        verdicts = self._engine.validate_batch([self._batch_item(r) for r in reqs], now)
        checks = [(i, self._state_args(v, reqs[i], now)) for i, v in enumerate(verdicts) if v.ok]
        return reqs, verdicts, checks

    def _batch_answers(
        self,
        reqs: list[Mapping[str, Any]],
        verdicts: list[Any],
        checks: list[tuple[int, dict[str, Any]]],
        states: list[Reason],
    ) -> list[Validation]:
        state_of = {i: state for (i, _), state in zip(checks, states, strict=True)}
        answers = []
        for i, (verdict, r) in enumerate(zip(verdicts, reqs, strict=True)):
            request_id = r.get("request_id", "")
            if not verdict.ok:
                answers.append(Validation.rejected(BY_NUMBER[verdict.reason], verdict.detail, request_id))
                continue
            scopes = tuple(verdict.scope.split())
            lacking = self._lacking_scope(scopes, r.get("required_scopes", ()), request_id)
            state = state_of[i]
            if lacking is not None and state is Reason.OK:
                answers.append(lacking)
            else:
                answers.append(self._answer(verdict, scopes, state, request_id))
        return answers

    @staticmethod
    def _batch_item(r: Mapping[str, Any]) -> tuple[str, str, str | None, str | None, str | None, str | None]:
        # Fields that are not text become empty, so the engine refuses them in order
        # (MALFORMED, WRONG_AUDIENCE or PROOF_INVALID) instead of the whole batch raising.
        proof = r.get("dpop_proof")
        return (
            _text(r.get("token")) or "",
            _field(r.get("audience")) or "",
            (_text(proof) or "\x00") if proof else None,  # a non-ASCII proof is refused, not dropped
            _field(r.get("http_method")),
            _field(r.get("http_uri")),
            _field(r.get("cert_thumbprint")),
        )

    @classmethod
    def _state_args(cls, verdict: Any, r: Mapping[str, Any], now: int) -> dict[str, Any]:
        lacking = cls._lacking_scope(tuple(verdict.scope.split()), r.get("required_scopes", ()), "")
        return {
            "client_id": verdict.client_id,
            "session_id": verdict.session_id,
            "audience": verdict.audience,
            "jti": verdict.jti,
            "issued_at": verdict.issued_at,
            "client_ip": r.get("client_ip") or "",
            "replay": tuple(verdict.replay) if lacking is None else (),
            "now": now,
        }

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

    def jwks(self) -> dict[str, Any]:
        """The public JWKS to publish for resource servers and standard JWT libraries."""
        return self.keyring.jwks()

    def __repr__(self) -> str:
        return f"Broker(issuer={self.issuer!r}, store={type(self.store).__name__})"
