"""Reference server 2: what a user would write instead of tokenbroker. The same
`tokenbroker.v1.TokenBroker` validation RPCs on the same sync grpcio server, validating
with PyJWT and redis-py:

- the caller's API key (`authorization: ApiKey ...`, compared in constant time);
- the access token: `jwt.decode` with the broker's public key (its JWKS file), EdDSA only,
  `typ` at+jwt, the caller's audience, the issuer, `exp`/`iat` required, 5 s leeway;
- the DPoP proof when the token has `cnf.jkt`: `typ` dpop+jwt, its embedded public `jwk`
  (PyJWK), `htm`, `htu`, `iat` within 60 s, `ath` = SHA-256 of the token, the RFC 7638
  thumbprint of the `jwk` = `cnf.jkt`;
- replay: `SET <jti> 1 NX EX 65` on Redis (one round trip per validation; a batch sends
  its SETs in one pipeline).

It does less than the broker (no sessions, no revocation, no cache of verified tokens):
a fair floor for "what you would get without it".

    TOKENBROKER_BENCH_API_KEY=... python -m tokenbroker_bench.reference_pyjwt --port 50062 \\
        --jwks jwks.json --issuer https://broker.bench.test --redis-url redis://127.0.0.1:6379/0"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped,unused-ignore]
import jwt
import redis

from tokenbroker.v1 import broker_pb2 as pb
from tokenbroker.v1 import broker_pb2_grpc
from tokenbroker_bench import _reference

API_KEY_ENV = "TOKENBROKER_BENCH_API_KEY"
LEEWAY = 5
PROOF_MAX_AGE = 60
REPLAY_TTL = PROOF_MAX_AGE + LEEWAY


class Refused(Exception):
    def __init__(self, reason: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 thumbprint of a public OKP or EC JWK."""
    members = ("crv", "kty", "x") if jwk.get("kty") == "OKP" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


class PyJwtServicer(broker_pb2_grpc.TokenBrokerServicer):  # type: ignore[misc,unused-ignore]
    def __init__(self, jwks: dict[str, Any], issuer: str, redis_url: str, api_key: str) -> None:
        self._keys = {key.key_id: key for key in jwt.PyJWKSet.from_dict(jwks).keys}
        self._issuer = issuer
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2.0, max_connections=64)
        self._api_key = api_key.encode()

    # -- checks ---------------------------------------------------------------------------

    def _caller(self, context: Any) -> None:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and hmac.compare_digest(str(value).encode(), b"ApiKey " + self._api_key):
                return
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown caller")

    def _claims(self, request: pb.ValidateTokenRequest) -> dict[str, Any]:
        """The token's claims and, when DPoP-bound, the proof's jti in `_proof_jti`."""
        try:
            header = jwt.get_unverified_header(request.token)
            key = self._keys.get(str(header.get("kid")))
            if key is None or header.get("typ") != "at+jwt":
                raise Refused(pb.REASON_UNKNOWN_KEY, "unknown key or wrong typ")
            claims: dict[str, Any] = jwt.decode(
                request.token,
                key.key,
                algorithms=["EdDSA"],
                audience=request.audience,
                issuer=self._issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "iss", "aud", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise Refused(pb.REASON_EXPIRED, "expired") from None
        except jwt.InvalidAudienceError:
            raise Refused(pb.REASON_WRONG_AUDIENCE, "wrong audience") from None
        except jwt.InvalidIssuerError:
            raise Refused(pb.REASON_WRONG_ISSUER, "wrong issuer") from None
        except jwt.InvalidSignatureError:
            raise Refused(pb.REASON_BAD_SIGNATURE, "bad signature") from None
        except jwt.PyJWTError:
            raise Refused(pb.REASON_MALFORMED, "malformed token") from None
        jkt = (claims.get("cnf") or {}).get("jkt")
        if jkt:
            claims["_proof_jti"] = self._proof(request, str(jkt))
        return claims

    def _proof(self, request: pb.ValidateTokenRequest, jkt: str) -> str:
        if not request.dpop_proof:
            raise Refused(pb.REASON_PROOF_MISSING, "DPoP proof missing")
        try:
            header = jwt.get_unverified_header(request.dpop_proof)
            jwk = header.get("jwk")
            if header.get("typ") != "dpop+jwt" or not isinstance(jwk, dict) or "d" in jwk:
                raise Refused(pb.REASON_PROOF_INVALID, "not a DPoP proof")
            algorithm = str(header.get("alg"))
            if algorithm not in ("EdDSA", "ES256"):
                raise Refused(pb.REASON_PROOF_INVALID, "proof algorithm")
            key = jwt.PyJWK(jwk, algorithm=algorithm)
            proof: dict[str, Any] = jwt.decode(request.dpop_proof, key.key, algorithms=[algorithm])
        except jwt.PyJWTError:
            raise Refused(pb.REASON_PROOF_INVALID, "proof signature") from None
        ath = _b64(hashlib.sha256(request.token.encode()).digest())
        iat = proof.get("iat")
        if (
            proof.get("htm") != request.http_method
            or proof.get("htu") != request.http_uri
            or proof.get("ath") != ath
            or not isinstance(iat, int)
            or abs(time.time() - iat) > PROOF_MAX_AGE
            or not proof.get("jti")
        ):
            raise Refused(pb.REASON_PROOF_INVALID, "proof claims")
        if jwk_thumbprint(jwk) != jkt:
            raise Refused(pb.REASON_BINDING_MISMATCH, "proof key is not the token's")
        return "ref:dpop:" + str(proof["jti"])

    @staticmethod
    def _response(request: pb.ValidateTokenRequest, claims: dict[str, Any]) -> pb.ValidateTokenResponse:
        return pb.ValidateTokenResponse(
            valid=True,
            reason=pb.REASON_OK,
            client_id=str(claims.get("client_id", "")),
            subject=str(claims.get("sub", "")),
            session_id=str(claims.get("sid", "")),
            scopes=str(claims.get("scope", "")).split(),
            expires_at=int(claims["exp"]),
            jti=str(claims["jti"]),
            issuer=str(claims["iss"]),
            request_id=request.request_id,
        )

    @staticmethod
    def _refused(request: pb.ValidateTokenRequest, refused: Refused) -> pb.ValidateTokenResponse:
        return pb.ValidateTokenResponse(
            valid=False,
            reason=refused.reason,  # type: ignore[arg-type]
            detail=refused.detail,
            request_id=request.request_id,
        )

    def _one(self, request: pb.ValidateTokenRequest, context: Any) -> pb.ValidateTokenResponse:
        try:
            claims = self._claims(request)
        except Refused as refused:
            return self._refused(request, refused)
        replay_key = claims.get("_proof_jti")
        if replay_key is not None:
            try:
                fresh = self._redis.set(replay_key, 1, nx=True, ex=REPLAY_TTL)
            except redis.RedisError:
                context.abort(grpc.StatusCode.UNAVAILABLE, "redis unavailable")
            if not fresh:
                return self._refused(request, Refused(pb.REASON_REPLAYED, "proof replayed"))
        return self._response(request, claims)

    # -- RPCs -----------------------------------------------------------------------------

    def ValidateToken(self, request: pb.ValidateTokenRequest, context: Any) -> pb.ValidateTokenResponse:
        self._caller(context)
        return self._one(request, context)

    def ValidateTokenBatch(self, request: pb.ValidateTokenBatchRequest, context: Any) -> pb.ValidateTokenBatchResponse:
        self._caller(context)
        checked: list[dict[str, Any] | Refused] = []
        for item in request.requests:
            try:
                checked.append(self._claims(item))
            except Refused as refused:
                checked.append(refused)
        pipe = self._redis.pipeline(transaction=False)
        pending = [c for c in checked if not isinstance(c, Refused) and c.get("_proof_jti") is not None]
        for claims in pending:
            pipe.set(claims["_proof_jti"], 1, nx=True, ex=REPLAY_TTL)
        try:
            results = pipe.execute() if pending else []
        except redis.RedisError:
            context.abort(grpc.StatusCode.UNAVAILABLE, "redis unavailable")
        fresh = {id(claims): bool(ok) for claims, ok in zip(pending, results, strict=True)}
        responses = []
        for item, outcome in zip(request.requests, checked, strict=True):
            if isinstance(outcome, Refused):
                responses.append(self._refused(item, outcome))
            elif not fresh.get(id(outcome), True):
                responses.append(self._refused(item, Refused(pb.REASON_REPLAYED, "proof replayed")))
            else:
                responses.append(self._response(item, outcome))
        return pb.ValidateTokenBatchResponse(responses=responses)

    def ValidateTokenStream(
        self, request_iterator: Iterator[pb.ValidateTokenRequest], context: Any
    ) -> Iterator[pb.ValidateTokenResponse]:
        self._caller(context)
        for request in request_iterator:
            yield self._one(request, context)


def main() -> None:
    parser = _reference.arguments(__doc__ or "")
    parser.add_argument("--jwks", type=Path, required=True, help="the broker's public JWKS file")
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    api_key = os.environ.get(API_KEY_ENV, "")
    if not api_key:
        raise SystemExit(f"set {API_KEY_ENV} to the API key callers present")
    servicer = PyJwtServicer(json.loads(args.jwks.read_text()), args.issuer, args.redis_url, api_key)
    _reference.serve(servicer, args.port, args.max_workers)


if __name__ == "__main__":
    main()
