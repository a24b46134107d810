"""Property tests: arbitrary bytes, text and JSON never raise and never validate."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenbroker import ProofSigner

from support import jose
from support.brokers import AUDIENCE, make_broker

BROKER, _ = make_broker()
ISSUED = BROKER.issue(client_id="agent", audience=AUDIENCE)
KEY = jose.ed25519_key_from_pem(BROKER.keyring.to_pem())
SIGNER = ProofSigner()
BOUND = BROKER.issue(client_id="agent", audience=AUDIENCE, dpop_jkt=SIGNER.jkt).access_token
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
claim_names = st.sampled_from(
    ["iss", "sub", "client_id", "aud", "sid", "jti", "iat", "nbf", "exp", "scope", "cnf", "once", "x"]
)
header_names = st.sampled_from(["alg", "typ", "kid", "jku", "jwk", "crit", "x"])


@SETTINGS
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_validate(data):
    assert not BROKER.validate(data, audience=AUDIENCE).valid


@SETTINGS
@given(st.text(max_size=600))
def test_arbitrary_text_never_validates(text):
    assert not BROKER.validate(text, audience=AUDIENCE).valid


@SETTINGS
@given(st.lists(st.text(alphabet="ABCabc0189-_=+/.", max_size=60), min_size=1, max_size=5))
def test_arbitrary_segments_never_validate(parts):
    assert not BROKER.validate(".".join(parts), audience=AUDIENCE).valid


@SETTINGS
@given(
    st.dictionaries(header_names, json_values, max_size=5),
    st.dictionaries(claim_names, json_values, max_size=12),
)
def test_arbitrary_json_signed_with_our_key_never_validates(header, claims):
    token = jose.sign_ed25519(KEY, jose.dumps(header), jose.dumps(claims))
    assert not BROKER.validate(token, audience=AUDIENCE).valid


@SETTINGS
@given(st.dictionaries(claim_names, json_values, max_size=12))
def test_arbitrary_claims_under_a_good_header_never_validate(claims):
    header = {"alg": "EdDSA", "typ": "at+jwt", "kid": BROKER.keyring.active_kid}
    token = jose.sign_ed25519(KEY, jose.dumps(header), jose.dumps(claims))
    assert not BROKER.validate(token, audience=AUDIENCE).valid


@SETTINGS
@given(st.text(max_size=400), st.text(max_size=10), st.text(max_size=40))
def test_arbitrary_proofs_never_validate_a_bound_token(proof, method, uri):
    result = BROKER.validate(BOUND, audience=AUDIENCE, dpop_proof=proof, http_method=method, http_uri=uri)
    assert not result.valid
