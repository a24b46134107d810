"""Every mutation of a valid token is rejected, with the reason that names the fault."""

import json
import time

import pytest

from tokenbroker import Reason, _core

from support import jose
from support.brokers import AUDIENCE, ISSUER, make_broker

ED25519_ORDER = 2**252 + 27742317777372353535851937790883648493


@pytest.fixture
def setup():
    broker, _ = make_broker()
    issued = broker.issue(client_id="agent", audience=AUDIENCE, scopes=["read"])
    key = jose.ed25519_key_from_pem(broker.keyring.to_pem())
    return broker, issued, key


def reason(broker, token):
    result = broker.validate(token, audience=AUDIENCE)
    assert result.detail.count("\n") == 0
    if len(token) >= 16:
        assert token not in result.detail
    return result.reason if not result.valid else Reason.OK


def good_claims(issued, **changes):
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": "agent",
        "client_id": "agent",
        "aud": AUDIENCE,
        "sid": issued.session_id,
        "jti": _core.random_id(),
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "scope": "read",
    }
    for name, value in changes.items():
        if value is ...:
            claims.pop(name)
        else:
            claims[name] = value(now) if callable(value) else value  # times relative to this test's now
    return claims


def good_header(broker, **changes):
    header = {"alg": "EdDSA", "typ": "at+jwt", "kid": broker.keyring.active_kid}
    for name, value in changes.items():
        if value is ...:
            header.pop(name)
        else:
            header[name] = value
    return header


def test_the_unmutated_forms_are_valid(setup):
    broker, issued, key = setup
    assert reason(broker, issued.access_token) is Reason.OK
    rebuilt = jose.sign_ed25519(key, jose.dumps(good_header(broker)), jose.dumps(good_claims(issued)))
    assert reason(broker, rebuilt) is Reason.OK


def test_every_byte_replaced_is_rejected(setup):
    broker, issued, _ = setup
    token = issued.access_token
    alphabet = "AQgw_-.="
    for i in range(len(token)):
        for c in alphabet:
            if token[i] != c:
                mutated = token[:i] + c + token[i + 1 :]
                assert reason(broker, mutated) is not Reason.OK, (i, c)


def test_truncation_and_extension_are_rejected(setup):
    broker, issued, _ = setup
    token = issued.access_token
    for cut in range(1, len(token), 7):
        assert reason(broker, token[:cut]) is not Reason.OK
    for suffix in [".", "A", "=", ".x", " ", "\n"]:
        assert reason(broker, token + suffix) is not Reason.OK


@pytest.mark.parametrize("segment", [0, 1, 2])
def test_base64_re_encodings_of_the_same_bytes_are_malformed(setup, segment):
    broker, issued, _ = setup
    parts = issued.access_token.split(".")
    raw = jose.unb64(parts[segment])
    variants = [parts[segment] + "=" * (-len(parts[segment]) % 4 or 4)]  # padding
    std = jose.b64(raw).replace("-", "+").replace("_", "/")
    if std != parts[segment]:
        variants.append(std)  # standard alphabet
    if len(parts[segment]) % 4:
        # Same decoded bytes, non-zero unused trailing bits.
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet.index(parts[segment][-1])
        variants.append(parts[segment][:-1] + alphabet[last | 1])
    for variant in variants:
        if variant == parts[segment]:
            continue
        mutated = ".".join([*parts[:segment], variant, *parts[segment + 1 :]])
        assert reason(broker, mutated) is Reason.MALFORMED, variant


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"alg": "none"}, Reason.UNSUPPORTED_ALGORITHM),
        ({"alg": "HS256"}, Reason.UNSUPPORTED_ALGORITHM),
        ({"alg": "ES256"}, Reason.UNSUPPORTED_ALGORITHM),
        ({"alg": "eddsa"}, Reason.UNSUPPORTED_ALGORITHM),
        ({"alg": ...}, Reason.UNSUPPORTED_ALGORITHM),
        ({"alg": ["EdDSA"]}, Reason.UNSUPPORTED_ALGORITHM),
        ({"typ": "JWT"}, Reason.MALFORMED),
        ({"typ": "application/at+jwt"}, Reason.MALFORMED),
        ({"typ": ...}, Reason.MALFORMED),
        ({"kid": ...}, Reason.MALFORMED),
        ({"kid": 1}, Reason.MALFORMED),
        ({"kid": "unknown-key"}, Reason.UNKNOWN_KEY),
        ({"jku": "https://evil.test/jwks"}, Reason.MALFORMED),
        ({"x5u": "https://evil.test/cert"}, Reason.MALFORMED),
        ({"jwk": {"kty": "OKP"}}, Reason.MALFORMED),
        ({"crit": ["exp"]}, Reason.MALFORMED),
        ({"b64": False}, Reason.MALFORMED),
        ({"cty": "JWT"}, Reason.MALFORMED),
        ({"zip": "DEF"}, Reason.MALFORMED),
    ],
)
def test_header_variants_are_rejected(setup, changes, expected):
    broker, issued, key = setup
    token = jose.sign_ed25519(key, jose.dumps(good_header(broker, **changes)), jose.dumps(good_claims(issued)))
    assert reason(broker, token) is expected


def test_duplicate_header_member_is_malformed(setup):
    broker, issued, key = setup
    kid = broker.keyring.active_kid
    header = f'{{"alg":"EdDSA","typ":"at+jwt","kid":"{kid}","alg":"none"}}'.encode()
    assert reason(broker, jose.sign_ed25519(key, header, jose.dumps(good_claims(issued)))) is Reason.MALFORMED


def _claims_cases():
    return [
        ({"iss": "https://evil.test"}, Reason.WRONG_ISSUER),
        ({"aud": "https://other.test/mcp"}, Reason.WRONG_AUDIENCE),
        ({"aud": [AUDIENCE]}, Reason.MALFORMED),
        ({"iat": lambda n: n - 400, "nbf": lambda n: n - 400, "exp": lambda n: n - 60}, Reason.EXPIRED),
        ({"nbf": lambda n: n + 60}, Reason.NOT_YET_VALID),
        ({"iat": lambda n: n + 60, "nbf": lambda n: n + 60, "exp": lambda n: n + 300}, Reason.NOT_YET_VALID),
        ({"exp": lambda n: float(n + 300)}, Reason.MALFORMED),
        ({"exp": lambda n: str(n + 300)}, Reason.MALFORMED),
        ({"exp": 2**64}, Reason.MALFORMED),
        ({"exp": lambda n: n + 3601}, Reason.MALFORMED),
        ({"iat": -1}, Reason.MALFORMED),
        ({"sub": "someone-else"}, Reason.MALFORMED),
        ({"client_id": "someone-else"}, Reason.MALFORMED),
        ({"jti": "short"}, Reason.MALFORMED),
        ({"scope": ["read"]}, Reason.MALFORMED),
        ({"scope": "read\nwrite"}, Reason.MALFORMED),
        ({"cnf": {"jkt": "not-a-thumbprint"}}, Reason.MALFORMED),
        ({"cnf": "jkt"}, Reason.MALFORMED),
        ({"once": 1}, Reason.MALFORMED),
        ({"sid": "unknown-session"}, Reason.SESSION_UNKNOWN),
        *[({name: ...}, Reason.MALFORMED) for name in ("iss", "sub", "client_id", "aud", "sid", "jti", "iat", "exp")],
    ]


@pytest.mark.parametrize(("changes", "expected"), _claims_cases())
def test_claim_variants_are_rejected(setup, changes, expected):
    broker, issued, key = setup
    token = jose.sign_ed25519(key, jose.dumps(good_header(broker)), jose.dumps(good_claims(issued, **changes)))
    assert reason(broker, token) is expected


@pytest.mark.parametrize(
    "payload",
    [
        b'{"aud":"https://other.test/mcp","aud":"%s"}',
        b"[1,2]",
        b'{"exp":NaN}',
        b'{"exp":Infinity}',
        b'{"exp":1e400}',
        b"\xff\xfe",
        b"",
    ],
)
def test_claim_json_faults_are_malformed(setup, payload):
    broker, issued, key = setup
    if b"%s" in payload:
        claims = good_claims(issued)
        claims.pop("aud")
        payload = payload.replace(b"%s", AUDIENCE.encode())[:-1] + b"," + jose.dumps(claims)[1:]
    token = jose.sign_ed25519(key, jose.dumps(good_header(broker)), payload)
    assert reason(broker, token) is Reason.MALFORMED


def test_signature_faults_are_bad_signatures(setup):
    broker, issued, key = setup
    head, body, sig = issued.access_token.split(".")
    raw = jose.unb64(sig)
    flipped = bytes([raw[0] ^ 1]) + raw[1:]
    assert reason(broker, f"{head}.{body}.{jose.b64(flipped)}") is Reason.BAD_SIGNATURE
    assert reason(broker, f"{head}.{body}.{jose.b64(raw[:63])}") is Reason.BAD_SIGNATURE
    assert reason(broker, f"{head}.{body}.{jose.b64(raw + b'x')}") is Reason.BAD_SIGNATURE
    # Malleability: S + L verifies under a lax verifier, never under verify_strict.
    s = int.from_bytes(raw[32:], "little") + ED25519_ORDER
    malleated = raw[:32] + s.to_bytes(32, "little")
    assert reason(broker, f"{head}.{body}.{jose.b64(malleated)}") is Reason.BAD_SIGNATURE
    other = jose.sign_ed25519(key, jose.dumps(good_header(broker)), jose.dumps(good_claims(issued)))
    assert reason(broker, f"{head}.{body}.{other.split('.')[2]}") is Reason.BAD_SIGNATURE


def test_oversized_token_is_too_large(setup):
    broker, issued, key = setup
    claims = good_claims(issued, padding="x" * 9000)
    token = jose.sign_ed25519(key, jose.dumps(good_header(broker)), jose.dumps(claims))
    assert reason(broker, token) is Reason.TOO_LARGE


@pytest.mark.parametrize("token", ["", ".", "..", "a.b", "a.b.c.d", None, 42, b"\xff.\xfe.\xfd", "é.é.é"])
def test_non_tokens_are_malformed(setup, token):
    broker, _, _ = setup
    result = broker.validate(token, audience=AUDIENCE)
    assert (result.valid, result.reason) == (False, Reason.MALFORMED)


def test_cached_decision_never_stands_in_for_request_checks(setup):
    broker, issued, _ = setup
    token = issued.access_token
    assert reason(broker, token) is Reason.OK  # now cached
    assert broker.validate(token, audience="https://other.test/mcp").reason is Reason.WRONG_AUDIENCE
    assert broker.validate(token, audience=AUDIENCE, required_scopes=["write"]).reason is Reason.INSUFFICIENT_SCOPE
    broker.revoke_session(issued.session_id)
    assert reason(broker, token) is Reason.SESSION_REVOKED


def test_details_never_echo_attacker_input_at_length(setup):
    broker, issued, key = setup
    evil = "x" * 500
    token = jose.sign_ed25519(key, jose.dumps(good_header(broker, **{evil: 1})), jose.dumps(good_claims(issued)))
    result = broker.validate(token, audience=AUDIENCE)
    assert result.reason is Reason.MALFORMED
    assert len(result.detail) < 120
    assert json.dumps(result.detail)


@pytest.mark.parametrize(
    ("kwargs", "valid"),
    [
        ({"token": "\ud800"}, False),
        ({"audience": "\ud800"}, False),
        ({"http_method": 7, "dpop_proof": "a.b.c"}, False),
        ({"dpop_proof": "\ud800", "http_method": "POST", "http_uri": AUDIENCE}, False),
        ({"cert_thumbprint": b"\xff"}, True),  # a bearer token: the certificate is not consulted
    ],
)
def test_unusable_fields_are_answers_never_exceptions(setup, kwargs, valid):
    broker, issued, _ = setup
    args = {"token": issued.access_token, "audience": AUDIENCE, **kwargs}
    token = args.pop("token")
    assert broker.validate(token, **args).valid is valid
    (answer,) = broker.validate_batch([{"token": token, **args}])
    assert answer.valid is valid
