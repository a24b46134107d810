"""Coverage-guided fuzzing (atheris) of `tokenbroker.Broker.validate` and
`Broker.validate_batch` (and their asyncio twins, and `validate_request`) from Python.

Every input gets a fresh embedded broker (in-memory store, detection with its default
policy, which only alerts, and a fixed clock) that has issued
real tokens to a few clients for one MCP server: Bearer, DPoP-bound to an Ed25519 and to a
P-256 key, certificate-bound, single-use, for another audience, revoked, in a revoked
session, of a revoked client. The harness also holds the broker's signing keys (two live,
one retired) and signs tokens with claims the fuzzer chooses, and it signs DPoP proofs,
with the product's `ProofSigner` and by hand (Ed25519 and ES256, any header and claims).
Each argument of a call is then, as the fuzzer decides, the right value, a mutation of it
(bytes changed, segments swapped, a segment re-encoded), or another type or value
altogether: None, bytes, bytearray, memoryview, a str subclass, int, float, bool, list,
tuple, set, dict, a one-shot iterator, huge strings, NUL bytes, lone surrogates.

The oracle, beyond "no crash":
- exceptions: `validate` raises only `InvalidArgumentError` for an empty audience and
  `TypeError` when the audience is not passed at all; `validate_request` (a request already
  built) raises nothing; `validate_batch` raises only `TypeError` (the batch or an entry is
  not a request, a mapping or an answer) and `InvalidArgumentError` (an entry with an empty
  audience); `ValidateRequest(...)` raises only `TypeError` or `ValueError`. Anything else
  (`AttributeError`, `SystemError`, `OverflowError`, a Rust panic as `PanicException`) is a
  finding and stops the fuzzer;
- every answer is a `Validation`, `valid` exactly when the reason is OK;
- `valid=True` only for a token this broker issued, byte for byte, or one the harness
  signed with one of the broker's live keys, never one signed by a retired or foreign key;
  and then only when everything the documentation and RFC 9068 / 9449 / 8705 require
  holds: header (EdDSA, at+jwt, a live kid, nothing else), issuer, the audience given
  (exactly), integer times within the leeway and a lifetime of at most an hour, the
  session live and the client's for that audience, nothing revoked, every required scope
  held, `once` a boolean and a single-use token accepted once, no duplicate claim names;
  a DPoP-bound token only with a proof the harness signed (its signing input, byte for
  byte) with the bound key, for this token (`ath`), this method and URI, inside the proof
  window, and each proof accepted once; a certificate-bound token only with its
  thumbprint and no proof; an unbound token never with a proof; the answer's fields are
  the token's claims;
- `validate_batch` answers exactly once per entry, keeps an answered entry as it is, and
  agrees with `validate` (valid, reason, request id) entry by entry. The inputs are
  decoded twice from the same bytes: once for the batch and once for the single calls,
  each with freshly signed proofs, so replay detection sees the same thing in both (a
  second use of a proof inside the batch, and inside the singles); entries whose outcome
  depends on what the other run used (a mutated proof, a chosen proof `jti`, single-use
  tokens) are checked by the first rules only.

Run: `.venv/bin/python fuzz/python/fuzz_broker_validate.py WORKDIR
fuzz/python/corpus/broker_validate -max_total_time=60 -print_final_stats=1` (WORKDIR
receives the new inputs; the seeds in the repo are only read).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import atheris
import structlog
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def _drop(_logger: object, _name: str, _event: object) -> Any:
    raise structlog.DropEvent


# Detection's alerts are log lines: thousands per second would drown the fuzzer's output.
structlog.configure(processors=[_drop])

with atheris.instrument_imports(include=["tokenbroker"]):
    from tokenbroker import Broker, Keyring, ProofSigner, Reason, ValidateRequest, Validation
    from tokenbroker._core import LIMITS, jwk_thumbprint, normalize_htu
    from tokenbroker.detection.detector import Detection
    from tokenbroker.errors import InvalidArgumentError
    from tokenbroker.events import Events

ISSUER = "https://broker.test"
AUDIENCE = "https://mcp.test/mcp"
OTHER_AUDIENCE = "https://other-mcp.test/mcp"
NOW = 1_750_000_000
LEEWAY = 5
DPOP_MAX_AGE = 60
SCOPES = ("tools:call", "tools:list")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


CERT = b64url(hashlib.sha256(b"the client certificate").digest())

# The broker's keys: a retired one (tokens it signed must be refused), an old one still
# live, the active one. The harness keeps each private key to sign tokens of its own.
KEYRING = Keyring.generate()
_RETIRED_KID = KEYRING.active_kid
KEYRING.rotate()
KEYRING.rotate()
_SIGNING: dict[str, ed25519.Ed25519PrivateKey] = {}
for _kid in KEYRING.kids:
    _key = serialization.load_pem_private_key(KEYRING.to_pem(_kid), password=None)
    assert isinstance(_key, ed25519.Ed25519PrivateKey)
    _SIGNING[_kid] = _key
KEYRING.retire(_RETIRED_KID)
LIVE_KIDS = frozenset(KEYRING.kids)
FOREIGN = "foreign"
_SIGNING[FOREIGN] = ed25519.Ed25519PrivateKey.generate()
SIGNERS = [KEYRING.active_kid, *sorted(LIVE_KIDS - {KEYRING.active_kid}), _RETIRED_KID, FOREIGN]

# The client's DPoP keys: Ed25519 (the product's ProofSigner, and the same key by hand),
# P-256 (by hand), and a key no token is bound to.
ED_SIGNER = ProofSigner(bytes(range(32)))
ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(ED_SIGNER.secret_bytes())
ED_JWK: dict[str, Any] = json.loads(ED_SIGNER.public_jwk_json)
ED_JKT = ED_SIGNER.jkt
EC_KEY = ec.derive_private_key(0x5EED_F00D_CAFE, ec.SECP256R1())
_EC_NUMBERS = EC_KEY.public_key().public_numbers()
EC_JWK = {
    "kty": "EC",
    "crv": "P-256",
    "x": b64url(_EC_NUMBERS.x.to_bytes(32, "big")),
    "y": b64url(_EC_NUMBERS.y.to_bytes(32, "big")),
}
EC_JKT = jwk_thumbprint(json.dumps(EC_JWK))
STRANGER = ProofSigner(bytes([7]) * 32)
assert jwk_thumbprint(ED_SIGNER.public_jwk_json) == ED_JKT

URIS = [AUDIENCE, "HTTPS://MCP.test:443/mcp?page=2#top", "https://mcp.test/x/../mcp", "http://mcp.test/mcp", "/mcp"]
AUDIENCES = [AUDIENCE, OTHER_AUDIENCE, AUDIENCE + "/", AUDIENCE.upper(), ""]
METHODS = ["POST", "GET", "post", "P\x00ST"]
SCOPE_CHOICES: list[object] = [(), "tools:call", ["tools:call", "tools:list"], "admin", "tools:call\ttools:list", [""]]
SPLICES = ["\x00", "\ud800", "\udfff", "\u00e9", " ", "\n", "\u2028", "\ufeff", ".", "=", "+/"]
CLAIM_NAMES = ["iss", "sub", "client_id", "aud", "sid", "jti", "iat", "nbf", "exp", "scope", "cnf", "once"]
CLAIM_NAMES += ["attested_sub", "usage_window", "x"]
PROOF_CLAIMS = ["jti", "htm", "htu", "iat", "ath", "nonce", "x"]


class Finding(AssertionError):
    """The oracle's verdict: the broker did something its contract forbids."""


NOTES: set[str] | None = None  # seeds.py sets it to learn what each input reached


def note(tag: str) -> None:
    if NOTES is not None:
        NOTES.add(tag)


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Finding(what if len(what) <= 1000 else what[:1000] + "...")


class Text(str):
    """A str subclass: `isinstance(value, str)` holds, the type is not str."""

    __slots__ = ()


# -- what the harness signed ------------------------------------------------------------


@dataclass
class Signed:
    """A JWS the harness (or the broker) signed: what its header and payload said."""

    header: Any
    claims: Any
    signer: str  # a kid of the broker's, FOREIGN, or a DPoP key's thumbprint
    duplicate_names: bool = False


def _loads(raw: bytes) -> tuple[Any, bool]:
    """JSON as Python reads it (last duplicate wins), and whether a name was repeated."""
    repeated = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeated
        repeated = repeated or len({k for k, _ in items}) != len(items)
        return dict(items)

    try:
        return json.loads(raw, object_pairs_hook=pairs), repeated
    except (ValueError, RecursionError):
        return None, repeated


def read_jws(compact: str, signer: str) -> tuple[str, Signed]:
    """(signing input, what it says) of a compact JWS the harness holds."""
    head, payload, _ = compact.split(".")
    header, dup_h = _loads(unb64url(head))
    claims, dup_c = _loads(unb64url(payload))
    return f"{head}.{payload}", Signed(header, claims, signer, dup_h or dup_c)


def sign_jws(header: bytes, payload: bytes, key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> str:
    signing_input = f"{b64url(header)}.{b64url(payload)}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(signing_input.encode())
    else:
        r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input}.{b64url(signature)}"


# -- one broker and what it issued ------------------------------------------------------

TOKEN_KINDS = [
    "dpop_ed",
    "bearer",
    "dpop_es",
    "cert",
    "once",
    "other_audience",
    "revoked_token",
    "revoked_session",
    "revoked_client",
    "crafted",
    "raw",
]


# One delivery queue for the alerts of every broker (each would otherwise start a thread).
EVENTS = Events(keep=100)


class World:
    """A fresh broker, the tokens it issued, and everything the oracle needs to judge an
    answer: sessions, revocations, what the harness signed, what was already accepted."""

    def __init__(self) -> None:
        self.broker = Broker(
            KEYRING,
            issuer=ISSUER,
            clock=lambda: NOW,
            token_cache_capacity=64,
            replay_capacity=4096,
            detection=Detection(events=EVENTS),
        )
        self.tokens: dict[str, Signed] = {}  # compact token -> what it says, who signed it
        self.proofs: dict[str, Signed] = {}  # proof signing input -> what the harness signed
        self.sessions: dict[str, tuple[str, str]] = {}  # sid -> (client, audience)
        self.revoked_sessions: set[str] = set()
        self.revoked_jtis: set[str] = set()
        self.revoked_clients: set[str] = set()
        self.accepted_proofs: set[tuple[str, str]] = set()  # (jkt, jti)
        self.used_once: set[tuple[str, str]] = set()  # (iss, jti)
        self.kinds: dict[str, str] = {}  # issued on first use: most inputs need two or three

    ISSUED = ("dpop_ed", "bearer", "dpop_es", "cert", "once", "other_audience", "revoked_token", "revoked_session")
    ISSUED += ("revoked_client",)

    def token(self, kind: str) -> str:
        """The token of `kind`, issued (and revoked, for the revoked kinds) on first use."""
        if kind in self.kinds:
            return self.kinds[kind]
        if kind == "dpop_ed":
            token = self._issue("dpop-ed", scopes=SCOPES, dpop_jkt=ED_JKT)
        elif kind == "dpop_es":
            token = self._issue("dpop-es", scopes=SCOPES[:1], dpop_jkt=EC_JKT)
        elif kind == "cert":
            token = self._issue("cert", cert_thumbprint=CERT)
        elif kind == "once":
            token = self._issue("once", scopes=SCOPES, once=True)
        elif kind == "other_audience":
            token = self._issue("bearer", audience=OTHER_AUDIENCE)
        elif kind == "revoked_token":
            token = self._issue("bearer", scopes=SCOPES)
            jti = self.tokens[token].claims["jti"]
            self.broker.revoke_token(jti)
            self.revoked_jtis.add(jti)
        elif kind == "revoked_session":
            token = self._issue("revoked-session")
            sid = self.tokens[token].claims["sid"]
            self.broker.revoke_session(sid)
            self.revoked_sessions.add(sid)
        elif kind == "revoked_client":
            token = self._issue("revoked-client", scopes=SCOPES)
            self.broker.revoke_client("revoked-client")
            self.revoked_clients.add("revoked-client")
        else:
            token = self._issue("bearer", scopes=SCOPES)
        self.kinds[kind] = token
        return token

    def claims_of(self, kind: str) -> dict[str, Any]:
        claims = self.tokens[self.token(kind)].claims
        assert isinstance(claims, dict)
        return claims

    def _issue(self, client_id: str, audience: str = AUDIENCE, **fields: Any) -> str:
        issued = self.broker.issue(client_id=client_id, audience=audience, **fields)
        token = issued.access_token
        _, signed = read_jws(token, KEYRING.active_kid)
        self.tokens[token] = signed
        self.sessions[issued.session_id] = (client_id, audience)
        return token

    def craft_token(self, fdp: atheris.FuzzedDataProvider) -> str:
        """A token with claims and header the fuzzer picks, signed by the harness with a
        live, retired or foreign key."""
        claims: dict[str, Any] = dict(self.claims_of("dpop_ed"))
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            name = fdp.PickValueInList(CLAIM_NAMES)
            if fdp.ConsumeIntInRange(0, 5) == 5:
                claims.pop(name, None)
            else:
                claims[name] = self.claim_value(fdp, name)
        signer = SIGNERS[fdp.ConsumeIntInRange(0, len(SIGNERS) - 1)]
        header: dict[str, Any] = {"alg": "EdDSA", "typ": "at+jwt", "kid": signer}
        if signer == FOREIGN:
            header["kid"] = KEYRING.active_kid  # a real kid over someone else's signature
        if fdp.ConsumeIntInRange(0, 7) == 7:
            header[fdp.PickValueInList(["alg", "typ", "kid", "crit", "jku", "x"])] = json_value(fdp)
        payload = json.dumps(claims, separators=(",", ":")).encode()
        if fdp.ConsumeIntInRange(0, 9) == 9:  # a claim named twice, or bytes changed
            payload = mutate_bytes(fdp, payload)
        token = sign_jws(json.dumps(header).encode(), payload, _SIGNING[signer])
        self.tokens[token] = read_jws(token, signer)[1]
        return token

    def claim_value(self, fdp: atheris.FuzzedDataProvider, name: str) -> Any:
        if fdp.ConsumeBool():
            return json_value(fdp)
        if name in ("iat", "nbf", "exp"):
            return NOW + fdp.ConsumeIntInRange(-4000, 4000)
        if name in ("sid", "sub", "client_id"):  # another token's (by kind: the same in both runs)
            return self.claims_of(fdp.PickValueInList(list(self.ISSUED)))[name]
        if name == "aud":
            return fdp.PickValueInList(AUDIENCES)
        if name == "cnf":
            choices: list[Any] = [{"jkt": ED_JKT}, {"jkt": EC_JKT}, {"x5t#S256": CERT}, {}, {"jkt": ED_JKT, "x": 1}]
            return fdp.PickValueInList(choices)
        if name == "scope":
            return fdp.PickValueInList(["tools:call", "", "tools:call  tools:list", "admin tools:call"])
        if name == "once":
            return fdp.PickValueInList([True, False, "true", 1, None])
        if name == "jti":  # never random: both runs of an input must sign the same token
            tail = "0" * fdp.ConsumeIntInRange(0, 12)
            return fdp.PickValueInList([self.claims_of("dpop_ed")["jti"], "short", "fuzz-jti-" + tail])
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))


def json_value(fdp: atheris.FuzzedDataProvider) -> Any:
    """Any JSON value (and the numbers JSON parsers disagree on)."""
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind == 0:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))
    if kind == 1:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 12))
    if kind == 2:
        return fdp.PickValueInList([2**63, 2**64, 2**64 + 1, -1, 0, 1 << 40, (1 << 40) - 1])
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind == 4:
        return fdp.ConsumeBool()
    if kind == 5:
        return None
    if kind == 6:
        return [json_value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 2))]
    if kind == 7:
        return {fdp.ConsumeUnicode(4): json_value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 2))}
    if kind == 8:
        return "x" * fdp.ConsumeIntInRange(1000, 1030)  # around the 1024-byte claim limit
    return float(fdp.PickValueInList([NOW, NOW + 0.5]))


# -- values of every type ---------------------------------------------------------------


def mutate_bytes(fdp: atheris.FuzzedDataProvider, data: bytes) -> bytes:
    pos = fdp.ConsumeIntInRange(0, len(data))
    op = fdp.ConsumeIntInRange(0, 3)
    if op == 0:
        return data[:pos] + fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8)) + data[pos:]
    if op == 1:
        return data[:pos] + data[pos + fdp.ConsumeIntInRange(1, 8) :]
    if op == 2 and data.endswith(b"}"):
        return data[:-1] + b',"sub":"other","jti":"0123456789abcdef0123"}'
    return data[:pos] + bytes([fdp.ConsumeIntInRange(0, 255)]) + data[pos + 1 :]


def mutate_text(fdp: atheris.FuzzedDataProvider, text: str, world: World) -> str:
    """`text` changed: a character, a cut, an insertion, segments swapped or taken from
    another token, or a segment decoded, changed and encoded again (canonical base64url
    over different JSON: the parse past base64 is reached)."""
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        pos = fdp.ConsumeIntInRange(0, len(text))
        op = fdp.ConsumeIntInRange(0, 7)
        parts = text.split(".")
        if op == 0:
            text = text[:pos] + chr(fdp.ConsumeIntInRange(0, 0x7F)) + text[pos + 1 :]
        elif op == 1:
            text = text[:pos] + text[pos + fdp.ConsumeIntInRange(1, 16) :]
        elif op == 2:
            text = text[:pos] + fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 8)) + text[pos:]
        elif op == 3:
            text = text[:pos]
        elif op == 4 and len(parts) == 3:
            i, j = fdp.ConsumeIntInRange(0, 2), fdp.ConsumeIntInRange(0, 2)
            parts[i], parts[j] = parts[j], parts[i]
            text = ".".join(parts)
        elif op == 5 and len(parts) == 3:
            other = world.token(fdp.PickValueInList(list(World.ISSUED))).split(".")
            i = fdp.ConsumeIntInRange(0, 2)
            parts[i] = other[i] if len(other) == 3 else parts[i]
            text = ".".join(parts)
        elif op == 6 and len(parts) == 3:
            i = fdp.ConsumeIntInRange(0, 2)
            with contextlib.suppress(ValueError):
                parts[i] = b64url(mutate_bytes(fdp, unb64url(parts[i])))
            text = ".".join(parts)
        else:
            text = text[:pos] + text[pos : pos + 1].swapcase() + text[pos + 1 :]
    return text


def number(fdp: atheris.FuzzedDataProvider) -> object:
    return fdp.PickValueInList(
        [0, -1, 2**63, 2**64 + 1, fdp.ConsumeInt(16), float("nan"), float("inf"), -0.0, True, False, 1e308]
    )


def variant(fdp: atheris.FuzzedDataProvider, right: object, world: World) -> object:
    """The right value (most often: it is what no data left picks), or anything else."""
    kind = fdp.ConsumeIntInRange(0, 21)
    if kind <= 8:
        return right
    text = right if isinstance(right, str) else ""
    if kind == 9:
        return mutate_text(fdp, text, world)
    if kind == 10:
        return None
    if kind == 11:
        raw = text.encode("utf-8", "surrogatepass")
        return fdp.PickValueInList([raw, bytearray(raw), memoryview(raw)])
    if kind == 12:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 64))  # lone surrogates too
    if kind == 13:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    if kind == 14:
        return number(fdp)
    if kind == 15:
        return fdp.PickValueInList([[text], (text,), {text}, {text: 1}, [text, None], frozenset(), [[text]]])
    if kind == 16:  # huge: past every size limit
        return (text or "A") * (1 << fdp.ConsumeIntInRange(4, 14))
    if kind == 17:
        pos = fdp.ConsumeIntInRange(0, len(text))
        return text[:pos] + fdp.PickValueInList(SPLICES) + text[pos:]
    if kind == 18:
        return Text(text)
    if kind == 19:
        return ""
    if kind == 20:
        return object()
    return text + "\x00"


# -- calls ------------------------------------------------------------------------------

OPTIONAL = ["dpop_proof", "http_method", "http_uri", "cert_thumbprint", "client_ip", "required_scopes"]
OPTIONAL += ["request_id", "resource"]
ABSENT = object()


@dataclass
class Call:
    """One validation: `validate(token, **kwargs)`, or a built `ValidateRequest`, or (in a
    batch only) an answer kept in place."""

    token: object
    kwargs: dict[str, object]
    request: ValidateRequest | None = None
    answer: Validation | None = None
    extra: dict[str, object] = field(default_factory=dict)  # keys validate_batch ignores
    required_view: object = ABSENT  # what a one-shot required_scopes iterator yields
    comparable: bool = True  # the batch and the single call must agree

    def entry(self) -> object:
        if self.answer is not None:
            return self.answer
        if self.request is not None:
            return self.request
        return {"token": self.token, **self.kwargs, **self.extra}


def ascii_text(value: object) -> str | None:
    """A token or proof as the broker reads it: ASCII str, or ASCII bytes-like."""
    if isinstance(value, str):
        return value if value.isascii() else None
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    return None


def make_proof(
    fdp: atheris.FuzzedDataProvider,
    world: World,
    token: str,
    method: object,
    uri: object,
    earlier: list[tuple[str, bool]],
    bound_to: object,
) -> tuple[object, bool]:
    """A DPoP proof for the request (signed now, so with a fresh jti), and whether the
    batch and the single call can be compared on it. First choice: the proof the token
    needs (by the product's ProofSigner for the Ed25519 key, by hand for P-256), none for
    a token that is not DPoP-bound."""
    htm = method if isinstance(method, str) else "POST"
    htu = uri if isinstance(uri, str) else AUDIENCE
    o = fdp.ConsumeIntInRange(0, 80)
    iat = NOW if o == 0 else NOW + 10 - o  # from 5 s past the leeway to 5 s too old
    nonce = fdp.PickValueInList([None, "n-1", ""])
    right = {ED_JKT: 0, EC_JKT: 3}.get(bound_to, 7)  # type: ignore[call-overload]
    kind = [right, *(k for k in range(8) if k != right)][fdp.ConsumeIntInRange(0, 7)]
    comparable = True
    proof: object
    if kind in (0, 1, 5):
        signer = STRANGER if kind == 5 else ED_SIGNER
        jti = None
        if kind == 1:  # a jti of the fuzzer's: the same in both runs, so not comparable
            jti, comparable = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 300)), False
        try:
            proof = signer.sign(htm, htu, token, iat=iat, jti=jti, nonce=nonce)
        except (TypeError, ValueError):
            return None, comparable
        signing_input, signed = read_jws(proof, signer.jkt)
        world.proofs[signing_input] = signed
    elif kind in (2, 3):  # by hand: Ed25519 or ES256, header and claims of the fuzzer's
        key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey = ED_KEY if kind == 2 else EC_KEY
        header: dict[str, Any] = {"typ": "dpop+jwt", "alg": "EdDSA" if kind == 2 else "ES256"}
        header["jwk"] = ED_JWK if kind == 2 else EC_JWK
        claims: dict[str, Any] = {"jti": b64url(os.urandom(16)), "htm": htm, "htu": htu, "iat": iat}
        claims["ath"] = b64url(hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest())
        if nonce is not None:
            claims["nonce"] = nonce
        for _ in range(fdp.ConsumeIntInRange(0, 2)):
            target = header if fdp.ConsumeIntInRange(0, 3) == 3 else claims
            name = fdp.PickValueInList(["typ", "alg", "jwk", "kid", "crit"] if target is header else PROOF_CLAIMS)
            if name == "jti":
                comparable = False
            target[name] = json_value(fdp)
        try:
            raw_header, raw_claims = json.dumps(header).encode(), json.dumps(claims).encode()
        except ValueError:
            return None, comparable
        proof = sign_jws(raw_header, raw_claims, key)
        signing_input, signed = read_jws(proof, ED_JKT if kind == 2 else EC_JKT)
        world.proofs[signing_input] = signed
    elif kind == 4 and earlier:  # the proof of an earlier call, again: a replay
        proof, comparable = fdp.PickValueInList(earlier)
    elif kind == 6:
        return variant(fdp, "", world), comparable
    else:
        return None, comparable
    if fdp.ConsumeIntInRange(0, 5) == 5:
        proof, comparable = mutate_text(fdp, str(proof), world), False
    return proof, comparable


def pick(fdp: atheris.FuzzedDataProvider, options: list[Any]) -> Any:
    """One of `options`, the first as often as all the others together."""
    i = fdp.ConsumeIntInRange(0, 2 * len(options) - 3)
    return options[i - len(options) + 2 if i >= len(options) - 1 else 0]


def decode_call(fdp: atheris.FuzzedDataProvider, world: World, earlier: list[tuple[str, bool]]) -> Call:
    kind = TOKEN_KINDS[fdp.ConsumeIntInRange(0, len(TOKEN_KINDS) - 1)]
    if kind == "crafted":
        token_text = world.craft_token(fdp)
    elif kind == "raw":
        token_text = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 200))
    else:
        token_text = world.token(kind)
    claims = world.tokens[token_text].claims if token_text in world.tokens else None
    comparable = not (isinstance(claims, dict) and claims.get("once") is True)  # used up by the first run
    audience = pick(fdp, AUDIENCES)
    if kind == "other_audience" and audience == AUDIENCE:
        audience = OTHER_AUDIENCE
    method = variant(fdp, pick(fdp, METHODS), world)
    uri = variant(fdp, pick(fdp, URIS), world)
    cnf = claims.get("cnf") if isinstance(claims, dict) else None
    bound_to = cnf.get("jkt") if isinstance(cnf, dict) else None
    proof, proof_comparable = make_proof(fdp, world, token_text, method, uri, earlier, bound_to)
    if isinstance(proof, str):
        earlier.append((proof, proof_comparable))
    scopes = pick(fdp, SCOPE_CHOICES)
    rights: dict[str, object] = {
        "dpop_proof": proof,
        "http_method": method,
        "http_uri": uri,
        "cert_thumbprint": CERT,
        "client_ip": "203.0.113.7",
        "required_scopes": scopes,
        "request_id": "req-1",
        "resource": AUDIENCE + "/tools",
    }
    kwargs: dict[str, object] = {}
    if fdp.ConsumeIntInRange(0, 31) != 31:
        kwargs["audience"] = variant(fdp, audience, world)
    for name in OPTIONAL:
        if fdp.ConsumeIntInRange(0, 3) != 3:
            right = rights[name]
            kwargs[name] = right if name in ("dpop_proof", "http_method", "http_uri") else variant(fdp, right, world)
    call = Call(variant(fdp, token_text, world), kwargs, comparable=comparable and proof_comparable)
    if "audience" not in kwargs:
        call.comparable = False  # validate() needs it; a batch mapping reads it as None
    form = fdp.ConsumeIntInRange(0, 9)
    if form == 8:
        with contextlib.suppress(TypeError, ValueError):  # refused by the stateless rules: a mapping
            call.request = ValidateRequest(call.token, **kwargs)  # type: ignore[arg-type]
    elif form == 9:
        reason = Reason(fdp.ConsumeIntInRange(2, max(Reason)))
        call.answer = Validation.rejected(reason, "answered by the door", "door-1")
    scopes_given = kwargs.get("required_scopes")
    if call.request is None and fdp.ConsumeIntInRange(0, 15) == 15 and isinstance(scopes_given, list | tuple):
        kwargs["required_scopes"] = iter(scopes_given)  # one-shot: read once, or no scope is required
        call.required_view = scopes_given
    if fdp.ConsumeIntInRange(0, 15) == 15:
        call.extra["audiance"] = AUDIENCE  # misspelt: validate_batch ignores unknown keys
    return call


@dataclass
class Plan:
    calls: list[Call]
    container: str  # how the batch is passed: list, tuple, generator
    stray: object  # an entry that is neither a request nor a mapping, or ABSENT
    stray_at: int
    use_async: bool


STRAYS: list[object] = [ABSENT, 7, "token", [("token", "x")], None, b"{}", 1.5]


def decode(data: bytes, world: World) -> Plan:
    """The calls of one input. Run twice on the same bytes, it gives the same calls with
    other proofs (signed anew: other jti)."""
    fdp = atheris.FuzzedDataProvider(data)
    n = fdp.ConsumeIntInRange(1, 4)
    container = fdp.PickValueInList(["list", "list", "tuple", "generator"])
    stray = fdp.PickValueInList(STRAYS[1:]) if fdp.ConsumeIntInRange(0, 15) == 15 else ABSENT
    stray_at = fdp.ConsumeIntInRange(0, n)
    use_async = fdp.ConsumeIntInRange(0, 3) == 3
    earlier: list[tuple[str, bool]] = []
    calls = [decode_call(fdp, world, earlier) for _ in range(n)]
    return Plan(calls, container, stray, stray_at, use_async)


# -- the oracle -------------------------------------------------------------------------


def required_of(call: Call, request: ValidateRequest | None) -> list[object] | None:
    """The scopes the caller required, as the caller wrote them (None: not a list of scopes)."""
    if request is not None:
        return list(request.required_scopes)
    value = call.kwargs.get("required_scopes", ())
    if call.required_view is not ABSENT:
        value = call.required_view
    if value is None:
        return []
    if isinstance(value, str):
        return list(value.split())
    try:
        return list(value)  # type: ignore[call-overload]  # any iterable: bytes are one of ints
    except TypeError:
        return None


def presented_proof(value: object) -> tuple[bool, str | None]:
    """(refused outright, the proof as text): "" and None are no proof."""
    if value is None or (isinstance(value, str) and value == ""):
        return False, None
    text = ascii_text(value)
    if text is None:
        return True, None
    return False, text or None


def check_answer(world: World, call: Call, answer: object, what: str) -> None:
    check(isinstance(answer, Validation), f"{what}: answered {type(answer).__name__}, not a Validation")
    assert isinstance(answer, Validation)
    check(isinstance(answer.reason, Reason), f"{what}: reason {answer.reason!r} is not a Reason")
    check(answer.valid is (answer.reason is Reason.OK), f"{what}: valid={answer.valid} with {answer.reason!r}")
    check(bool(answer) is answer.valid, f"{what}: bool() disagrees with valid")
    if call.answer is None:  # not a door's answer kept in place
        note(f"{what.split()[0]}:{answer.reason.name}")
    if answer.valid:
        check_valid(world, call, answer, what)


def check_valid(world: World, call: Call, answer: Validation, what: str) -> None:
    request = call.request
    kw: dict[str, object] = dict(call.kwargs)
    if request is not None:
        kw = {
            "audience": request.audience,
            "dpop_proof": request.dpop_proof,
            "http_method": request.http_method,
            "http_uri": request.http_uri,
            "cert_thumbprint": request.cert_thumbprint,
            "request_id": request.request_id,
        }
    text = request.token if request is not None else ascii_text(call.token)
    check(text is not None, f"{what}: valid for a token that is not ASCII text")
    assert text is not None
    info = world.tokens.get(text)
    note("valid:" + next((k for k, t in world.kinds.items() if t == text), "crafted"))
    check(info is not None, f"{what}: valid for a token neither the broker issued nor the harness signed: {text!r}")
    assert info is not None
    check(info.signer in LIVE_KIDS, f"{what}: valid for a token signed by {info.signer!r}, not a live broker key")
    header = info.header
    check(header == {"alg": "EdDSA", "typ": "at+jwt", "kid": info.signer}, f"{what}: valid with header {header!r}")
    check(not info.duplicate_names, f"{what}: valid for a token with a claim named twice (RFC 7519 section 4)")
    c = info.claims
    check(isinstance(c, dict), f"{what}: valid for a token whose claims are not a JSON object")
    audience = kw.get("audience")
    check(isinstance(audience, str) and c.get("aud") == audience, f"{what}: valid for aud {c.get('aud')!r}")
    check(c.get("iss") == ISSUER, f"{what}: valid for issuer {c.get('iss')!r}")
    exp, iat = c.get("exp"), c.get("iat")
    nbf = c.get("nbf", iat)
    check(all(type(t) is int for t in (exp, iat, nbf)), f"{what}: valid with times {exp!r} {iat!r} {nbf!r}")
    assert isinstance(exp, int)
    assert isinstance(iat, int)
    assert isinstance(nbf, int)
    check(exp + LEEWAY > NOW, f"{what}: valid after expiry (exp {exp}, now {NOW})")
    check(iat <= NOW + LEEWAY and nbf <= NOW + LEEWAY, f"{what}: valid before iat/nbf")
    check(0 < exp - iat <= LIMITS.max_lifetime_seconds and nbf < exp, f"{what}: valid with a lifetime {exp - iat}")
    client, sid, jti = c.get("client_id"), c.get("sid"), c.get("jti")
    check(c.get("sub") == client, f"{what}: valid with sub {c.get('sub')!r} for client {client!r}")
    check(world.sessions.get(sid) == (client, audience), f"{what}: valid in session {sid!r}, not {client!r}'s")
    check(sid not in world.revoked_sessions, f"{what}: valid in a revoked session")
    check(jti not in world.revoked_jtis, f"{what}: valid for a revoked token")
    check(client not in world.revoked_clients, f"{what}: valid for a revoked client")
    scope = c.get("scope", "")
    check(isinstance(scope, str), f"{what}: valid with scope {scope!r}")
    held = [s for s in str(scope).split(" ") if s]
    required = required_of(call, request)
    check(required is not None, f"{what}: valid though required_scopes is not a list of scopes")
    assert required is not None
    check(all(r in held for r in required), f"{what}: valid without the required scopes {required!r} (held {held})")
    once = c.get("once", False)
    check(type(once) is bool, f"{what}: valid with once={once!r}")
    if once:
        check((ISSUER, jti) not in world.used_once, f"{what}: a single-use token accepted twice")
        world.used_once.add((ISSUER, str(jti)))
    refused, proof = presented_proof(kw.get("dpop_proof"))
    check(not refused, f"{what}: valid with a DPoP proof that is not ASCII text")
    if "cnf" not in c:
        check(proof is None, f"{what}: valid with a DPoP proof for a token that is not DPoP-bound (RFC 9449 7.1)")
    elif isinstance(c["cnf"], dict) and set(c["cnf"]) == {"x5t#S256"}:
        check(proof is None, f"{what}: valid with a DPoP proof for a certificate-bound token")
        presented = kw.get("cert_thumbprint")
        check(presented == c["cnf"]["x5t#S256"], f"{what}: valid with certificate {presented!r} (RFC 8705)")
    elif isinstance(c["cnf"], dict) and set(c["cnf"]) == {"jkt"}:
        check_proof(world, kw, text, c["cnf"]["jkt"], proof, what)
    else:
        raise Finding(f"{what}: valid with cnf {c['cnf']!r}: a binding nobody checked")
    rid = kw.get("request_id", "")
    fields = (answer.client_id, answer.subject, answer.session_id, answer.audience, answer.jti, answer.issuer)
    check(fields == (client, c.get("sub"), sid, audience, jti, ISSUER), f"{what}: answer fields {fields!r}")
    check(answer.expires_at == exp and answer.scopes == tuple(held), f"{what}: answer exp/scopes")
    check(answer.request_id == (rid if isinstance(rid, str) else ""), f"{what}: request_id {answer.request_id!r}")


def check_proof(world: World, kw: dict[str, object], token: str, jkt: object, proof: str | None, what: str) -> None:
    check(proof is not None, f"{what}: a DPoP-bound token valid without a proof")
    assert proof is not None
    signed = world.proofs.get(proof.rpartition(".")[0])
    check(signed is not None, f"{what}: valid with a DPoP proof the harness never signed: {proof!r}")
    assert signed is not None
    check(signed.signer == jkt, f"{what}: valid with a proof signed by {signed.signer}, token bound to {jkt}")
    check(not signed.duplicate_names, f"{what}: valid with a proof that names a member twice")
    h, p = signed.header, signed.claims
    check(isinstance(h, dict) and set(h) == {"typ", "alg", "jwk"}, f"{what}: valid with proof header {h!r}")
    check(isinstance(p, dict), f"{what}: valid with proof claims {p!r}")
    check(h["typ"] == "dpop+jwt" and h["alg"] in ("EdDSA", "ES256"), f"{what}: valid with proof header {h!r}")
    method, uri = kw.get("http_method"), kw.get("http_uri")
    check(isinstance(method, str) and p.get("htm") == method, f"{what}: valid with htm {p.get('htm')!r} != {method!r}")
    htu = p.get("htu")
    check(isinstance(htu, str) and isinstance(uri, str), f"{what}: valid with htu {htu!r} for {uri!r}")
    assert isinstance(htu, str)
    assert isinstance(uri, str)
    normal = normalize_htu(htu)
    check(normal is not None and normal == normalize_htu(uri), f"{what}: valid with htu {htu!r} for {uri!r}")
    ath = b64url(hashlib.sha256(token.encode()).digest())
    check(p.get("ath") == ath, f"{what}: valid with a proof for another token (ath)")
    iat = p.get("iat")
    check(type(iat) is int, f"{what}: valid with proof iat {iat!r}")
    assert isinstance(iat, int)
    check(NOW - DPOP_MAX_AGE - LEEWAY <= iat <= NOW + LEEWAY, f"{what}: valid with proof iat {iat - NOW:+d} s")
    jti = p.get("jti")
    check(isinstance(jti, str) and 1 <= len(jti) <= 256, f"{what}: valid with proof jti {jti!r}")
    nonce = p.get("nonce", "n")
    check(isinstance(nonce, str) and 1 <= len(nonce) <= 256, f"{what}: valid with proof nonce {nonce!r}")
    key = (str(jkt), str(jti))
    check(key not in world.accepted_proofs, f"{what}: a DPoP proof accepted twice (jti {jti!r})")
    world.accepted_proofs.add(key)


# -- running one input ------------------------------------------------------------------

LOOP = asyncio.new_event_loop()
SINGLE, BATCH = "single", "batch"


def run_single(world: World, call: Call, use_async: bool) -> Validation | BaseException | None:
    """validate / validate_request (or the asyncio twins): the answer, or the allowed
    exception it raised."""
    broker = world.broker
    if call.answer is not None:
        return None
    try:
        if call.request is not None:
            if use_async:
                return LOOP.run_until_complete(broker.avalidate_request(call.request))
            return broker.validate_request(call.request)
        if use_async:
            return LOOP.run_until_complete(broker.avalidate(call.token, **call.kwargs))  # type: ignore[arg-type]
        return broker.validate(call.token, **call.kwargs)  # type: ignore[arg-type]
    except InvalidArgumentError as exc:
        audience = call.kwargs.get("audience")
        if call.request is not None or not (isinstance(audience, str) and audience == ""):
            raise Finding(f"validate raised {exc!r} for audience {audience!r}") from exc
        return exc
    except TypeError as exc:
        if call.request is not None or "audience" in call.kwargs:
            raise Finding(f"validate raised {exc!r} though every argument was passed") from exc
        return exc


def batch_entries(plan: Plan) -> object:
    entries = [c.entry() for c in plan.calls]
    if plan.stray is not ABSENT:
        entries.insert(plan.stray_at, plan.stray)
    if plan.container == "tuple":
        return tuple(entries)
    if plan.container == "generator":
        return (e for e in entries)
    return entries


def run_batch(world: World, plan: Plan) -> list[Validation] | BaseException:
    entries = batch_entries(plan)
    try:
        if plan.use_async:
            return LOOP.run_until_complete(world.broker.avalidate_batch(entries))  # type: ignore[arg-type]
        return world.broker.validate_batch(entries)  # type: ignore[arg-type]
    except TypeError as exc:
        check(plan.stray is not ABSENT, f"validate_batch raised {exc!r} for a batch of requests and mappings")
        return exc
    except InvalidArgumentError as exc:
        empty = [c for c in plan.calls if c.request is None and c.answer is None and c.kwargs.get("audience") == ""]
        check(empty != [], f"validate_batch raised {exc!r}, yet no entry has an empty audience")
        return exc


def TestOneInput(data: bytes) -> None:
    world = World()
    batch_plan = decode(data, world)
    single_plan = decode(data, world)  # the same calls, proofs signed anew
    answers = run_batch(world, batch_plan)
    singles = [run_single(world, call, single_plan.use_async) for call in single_plan.calls]
    for i, (call, single) in enumerate(zip(single_plan.calls, singles, strict=True)):
        if isinstance(single, Validation):
            check_answer(world, call, single, f"validate #{i}")
    if isinstance(answers, BaseException):
        if isinstance(answers, InvalidArgumentError):
            check(any(isinstance(s, InvalidArgumentError) for s in singles), "only the batch refused an audience")
        return
    n = len(batch_plan.calls)
    check(len(answers) == n, f"validate_batch gave {len(answers)} answers to {n} entries")
    check(not any(isinstance(s, InvalidArgumentError) for s in singles), "validate refused, the batch did not")
    for i, (b_call, s_call, answer, single) in enumerate(
        zip(batch_plan.calls, single_plan.calls, answers, singles, strict=True)
    ):
        check_answer(world, b_call, answer, f"validate_batch #{i}")
        if b_call.answer is not None:
            check(answer == b_call.answer, f"validate_batch #{i}: an answered entry was not kept as it was")
            continue
        if not (b_call.comparable and s_call.comparable and isinstance(single, Validation)):
            continue
        got, want = (answer.valid, answer.reason, answer.request_id), (single.valid, single.reason, single.request_id)
        details = f"{answer.detail!r} / {single.detail!r}"
        check(got == want, f"validate_batch #{i} answered {got}, validate {want}: {details}")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
