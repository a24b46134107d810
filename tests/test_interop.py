"""Standard JWT libraries and tokenbroker agree both ways (DESIGN.md section 2)."""

import time

import jwt
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet as JoseKeySet
from joserfc.jwk import OKPKey

from tokenbroker import Reason, _core

from support.brokers import AUDIENCE, ISSUER, make_broker


def test_our_tokens_verify_in_pyjwt_with_our_jwks():
    broker, _ = make_broker()
    issued = broker.issue(client_id="agent", audience=AUDIENCE, scopes=["a", "b"])
    jwk_set = jwt.PyJWKSet.from_dict(broker.jwks())
    header = jwt.get_unverified_header(issued.access_token)
    assert header == {"alg": "EdDSA", "typ": "at+jwt", "kid": broker.keyring.active_kid}
    claims = jwt.decode(
        issued.access_token, jwk_set[header["kid"]].key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER
    )
    assert claims["sub"] == claims["client_id"] == "agent"
    assert claims["sid"] == issued.session_id
    assert claims["scope"] == "a b"
    assert claims["exp"] - claims["iat"] == 300
    assert len(claims["jti"]) >= 22  # 128 random bits, base64url


def test_our_tokens_verify_in_joserfc_with_our_jwks():
    broker, _ = make_broker()
    issued = broker.issue(client_id="agent", audience=AUDIENCE)
    # jwks() is a plain dict; joserfc types its parameter as a TypedDict of the same shape.
    keys = JoseKeySet.import_key_set(broker.jwks())  # type: ignore[arg-type]
    token = jose_jwt.decode(issued.access_token, keys, algorithms=["EdDSA"])
    assert token.claims["aud"] == AUDIENCE
    assert token.header["typ"] == "at+jwt"


def _pyjwt_claims(broker, session_id):
    now = int(time.time())
    return {
        "iss": ISSUER,
        "sub": "agent",
        "client_id": "agent",
        "aud": AUDIENCE,
        "sid": session_id,
        "jti": _core.random_id(),
        "iat": now,
        "nbf": now,
        "exp": now + 120,
        "scope": "tools:call",
    }


def test_tokens_pyjwt_signs_with_our_key_validate_in_our_engine():
    broker, _ = make_broker()
    session = broker.issue(client_id="agent", audience=AUDIENCE).session_id
    token = jwt.encode(
        _pyjwt_claims(broker, session),
        broker.keyring.to_pem(),
        algorithm="EdDSA",
        headers={"kid": broker.keyring.active_kid, "typ": "at+jwt"},
    )
    result = broker.validate(token, audience=AUDIENCE, required_scopes=["tools:call"])
    assert result.valid, result.detail
    assert result.client_id == "agent"


def test_tokens_joserfc_signs_with_our_key_validate_in_our_engine():
    broker, _ = make_broker()
    session = broker.issue(client_id="agent", audience=AUDIENCE).session_id
    key = OKPKey.import_key(broker.keyring.to_jwk(private=True))
    token = jose_jwt.encode(
        {"alg": "EdDSA", "typ": "at+jwt", "kid": broker.keyring.active_kid},
        _pyjwt_claims(broker, session),
        key,
        algorithms=["EdDSA"],
    )
    assert broker.validate(token, audience=AUDIENCE).valid


def test_pyjwt_token_without_typ_is_not_an_access_token():
    broker, _ = make_broker()
    session = broker.issue(client_id="agent", audience=AUDIENCE).session_id
    token = jwt.encode(
        _pyjwt_claims(broker, session),
        broker.keyring.to_pem(),
        algorithm="EdDSA",
        headers={"kid": broker.keyring.active_kid},
    )
    result = broker.validate(token, audience=AUDIENCE)
    assert (result.valid, result.reason) == (False, Reason.MALFORMED)
