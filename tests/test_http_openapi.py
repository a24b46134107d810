"""The OpenAPI description of the HTTP door (python/tokenbroker/http/openapi.json) is the
door: it is valid OpenAPI 3.1, `/openapi.json` serves exactly it, every route of
`build_http_app` is described and nothing else is, and the answers that fuzzing cannot
reach (tests/test_http_schemathesis.py: it has no DPoP key, no client assertion and never
stops the store) conform to it under schemathesis' own checks: a DPoP-bound token after a
nonce challenge, introspection with `cnf`, revocation, each 401 with its challenge, 413,
429 with `Retry-After`, and 503 with the store down. All against a real `tokenbroker
serve` on loopback (and a real redis-server for the 503s)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from tokenbroker import Keyring, ProofSigner
from tokenbroker.app import build_components
from tokenbroker.client_assertion import make_client_assertion
from tokenbroker.config import Settings
from tokenbroker.http.app import build_http_app
from tokenbroker.http.errors import BASIC_CHALLENGE
from tokenbroker.http.metadata import METADATA_PATH
from tokenbroker.resource_metadata import WELL_KNOWN_PATH

from support.http_door import AUDIENCE, KEY_CLIENT, SECRET_CLIENT, Door, start_door
from support.redis_servers import RedisServer

DESCRIPTION: dict[str, Any] = json.loads(
    resources.files("tokenbroker.http").joinpath("openapi.json").read_text("utf-8")
)
SCHEMA = schemathesis.openapi.from_dict(DESCRIPTION)
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# What "conforms to the description" means here and in the schemathesis run.
CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
BEARER_CHALLENGE = 'Bearer realm="tokenbroker", error="invalid_token"'
FAILURE_BURST = 3  # failed authentications per client id before 429, for the 429 test


def described_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method.upper()) for path, item in document["paths"].items() for method in item if method in HTTP_METHODS
    }


def conforms(path: str, method: str, response: httpx.Response, *, unavailable: bool = False) -> httpx.Response:
    """Raises schemathesis' failure report unless `response` is what the description
    says `method path` answers (status, content type, headers, body), and not a 5xx
    unless the test made the broker `unavailable`."""
    checks = [check for check in CONFORMANCE if not (unavailable and check is not_a_server_error)]
    SCHEMA[path][method].Case().validate_response(response, checks=checks)
    return response


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def walk(node: Any, key: str) -> Iterator[Any]:
    """Every value under `key` anywhere in a JSON document."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key:
                yield value
            yield from walk(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


# -- the description itself ---------------------------------------------------------------------


def test_the_description_is_valid_openapi_3_1() -> None:
    assert DESCRIPTION["openapi"] == "3.1.0"
    SCHEMA.validate()  # against the OpenAPI 3.1 meta-schema
    for path, method in described_operations(DESCRIPTION):
        assert SCHEMA[path][method].label == f"{method} {path}"  # raises on an operation that does not load


def test_validation_refuses_a_broken_description() -> None:
    """The check above can fail: the same validation refuses a response without a description."""
    broken = json.loads(json.dumps(DESCRIPTION))
    del broken["paths"]["/token"]["post"]["responses"]["200"]["description"]
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict(broken).validate()


def test_every_schema_is_valid_json_schema_and_every_reference_resolves() -> None:
    schemas = [*DESCRIPTION["components"]["schemas"].values(), *walk(DESCRIPTION["paths"], "schema")]
    for schema in schemas:
        jsonschema_rs.meta.validate(schema)
    references = list(walk(DESCRIPTION, "$ref"))
    assert references
    for reference in references:
        node: Any = DESCRIPTION
        assert reference.startswith("#/"), reference
        for part in reference[2:].split("/"):
            assert part in node, f"{reference} does not resolve"
            node = node[part]


def test_every_answer_describes_the_headers_it_always_carries() -> None:
    for path, method in described_operations(DESCRIPTION):
        for status, answer in DESCRIPTION["paths"][path][method.lower()]["responses"].items():
            while "$ref" in answer:
                answer = DESCRIPTION["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
            headers = {name.lower() for name in answer.get("headers", {})}
            assert {"x-content-type-options", "content-security-policy"} <= headers, (path, status)
            if status == "401":
                assert "www-authenticate" in headers, (path, status)
            if status in ("429", "503") and path != "/healthz":
                assert "retry-after" in headers, (path, status)


@pytest.fixture
def components(tmp_path: Path, no_tokenbroker_env: None) -> Any:
    settings = Settings.load(public_url="https://broker.test", registry_file=tmp_path / "registry.toml")
    return build_components(settings, keyring=Keyring.generate())


def routed_operations(app: Any) -> set[tuple[str, str]]:
    """The app's (path, method) pairs; Starlette adds HEAD to every GET route by itself."""
    pairs = set()
    for route in app.routes:
        assert isinstance(route, Route)
        methods = set(route.methods or ())
        if "GET" in methods:
            methods.discard("HEAD")
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # Starlette's {rest:path} is OpenAPI's {rest}
        pairs |= {(path, method) for method in methods}
    return pairs


def test_every_route_is_described_and_every_description_is_routed(components: Any) -> None:
    assert routed_operations(build_http_app(components)) == described_operations(DESCRIPTION)


def test_under_an_issuer_with_a_path_the_oauth_endpoints_move_and_the_others_stay(components: Any) -> None:
    """What the description's `info.description` says about issuers with a path."""
    at_root = {"/healthz", "/openapi.json", "/authz"}

    def moved(path: str) -> str:
        if path == METADATA_PATH:
            return f"{METADATA_PATH}/auth"
        return path if path in at_root or path.startswith(WELL_KNOWN_PATH) else f"/auth{path}"

    expected = {(moved(path), method) for path, method in described_operations(DESCRIPTION)}
    assert routed_operations(build_http_app(components, public_url="https://broker.test/auth")) == expected


# -- the door's answers, held to the description ------------------------------------------------


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    door = start_door(tmp_path_factory.mktemp("openapi"), client_auth_failure_burst=str(FAILURE_BURST))
    try:
        yield door
    finally:
        door.broker.stop()


@pytest.fixture
def http(door: Door) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=door.url, timeout=10) as client:
        yield client


def test_the_served_description_is_the_file(http: httpx.Client) -> None:
    served = conforms("/openapi.json", "GET", http.get("/openapi.json"))
    assert served.status_code == 200
    assert served.json() == DESCRIPTION


def test_the_public_documents_conform(door: Door, http: httpx.Client) -> None:
    metadata = conforms(METADATA_PATH, "GET", http.get(METADATA_PATH)).json()
    assert (metadata["issuer"], metadata["token_endpoint"]) == (door.url, door.token_url)
    assert conforms("/jwks", "GET", http.get("/jwks")).json()["keys"]
    assert conforms("/healthz", "GET", http.get("/healthz")).json() == {"status": "serving"}
    refused = conforms("/authorize", "GET", http.get("/authorize", params={"response_type": "code"}))
    assert (refused.status_code, refused.json()["error"]) == (400, "unsupported_response_type")


def assertion(door: Door) -> dict[str, str]:
    key = door.client_key.read_bytes()
    return {
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": make_client_assertion(key, KEY_CLIENT, audience=door.url),
    }


def test_a_dpop_token_after_a_nonce_challenge_introspected_with_cnf_then_revoked(
    door: Door, http: httpx.Client
) -> None:
    signer = ProofSigner()
    form = {"grant_type": "client_credentials", "scope": "tools:call"}
    challenged = http.post(
        "/token", data={**form, **assertion(door)}, headers={"DPoP": signer.sign("POST", door.token_url)}
    )
    conforms("/token", "POST", challenged)
    assert (challenged.status_code, challenged.json()["error"]) == (400, "use_dpop_nonce")
    nonce = challenged.headers["DPoP-Nonce"]

    proof = signer.sign("POST", door.token_url, nonce=nonce)
    issued = conforms("/token", "POST", http.post("/token", data={**form, **assertion(door)}, headers={"DPoP": proof}))
    assert issued.status_code == 200, issued.text
    assert issued.json()["token_type"] == "DPoP"
    assert issued.headers["DPoP-Nonce"]  # the next nonce (RFC 9449 section 8.2)
    token = issued.json()["access_token"]

    server = {"Authorization": f"Bearer {door.api_key}"}
    active = conforms("/introspect", "POST", http.post("/introspect", data={"token": token}, headers=server)).json()
    assert (active["active"], active["token_type"], active["cnf"]) == (True, "DPoP", {"jkt": signer.jkt})
    assert (active["client_id"], active["aud"], active["scope"]) == (KEY_CLIENT, AUDIENCE, "tools:call")

    revoked = conforms("/revoke", "POST", http.post("/revoke", data={"token": token, **assertion(door)}))
    assert (revoked.status_code, revoked.content) == (200, b"")
    after = conforms("/introspect", "POST", http.post("/introspect", data={"token": token}, headers=server))
    assert after.json() == {"active": False}


def test_a_dpop_client_without_a_proof_gets_400(door: Door, http: httpx.Client) -> None:
    answer = conforms(
        "/token", "POST", http.post("/token", data={"grant_type": "client_credentials", **assertion(door)})
    )
    assert (answer.status_code, answer.json()["error"]) == (400, "invalid_request")


def test_a_bearer_token_for_the_secret_client(door: Door, http: httpx.Client) -> None:
    credentials = basic(SECRET_CLIENT, door.client_secret)
    issued = conforms(
        "/token", "POST", http.post("/token", data={"grant_type": "client_credentials"}, headers=credentials)
    )
    assert issued.status_code == 200, issued.text
    assert (issued.json()["token_type"], issued.headers.get("DPoP-Nonce")) == ("Bearer", None)
    assert issued.headers["Cache-Control"] == "no-store"


def test_every_401_carries_its_challenge(door: Door, http: httpx.Client) -> None:
    form = {"grant_type": "client_credentials"}
    answers = [
        ("/token", http.post("/token", data=form, headers=basic(SECRET_CLIENT, "not-the-secret")), BASIC_CHALLENGE),
        ("/token", http.post("/token", data=form, headers={"Authorization": "Bearer x"}), BASIC_CHALLENGE),
        ("/token", http.post("/token", data=form), BASIC_CHALLENGE),
        ("/revoke", http.post("/revoke", data={"token": "x"}, headers=basic(SECRET_CLIENT, "no")), BASIC_CHALLENGE),
        ("/introspect", http.post("/introspect", data={"token": "x"}), BEARER_CHALLENGE),
        (
            "/introspect",
            http.post("/introspect", data={"token": "x"}, headers={"Authorization": "Bearer no"}),
            BEARER_CHALLENGE,
        ),
    ]
    for path, answer, challenge in answers:
        conforms(path, "POST", answer)
        assert (answer.status_code, answer.json()["error"]) == (401, "invalid_client"), path
        assert answer.headers["WWW-Authenticate"] == challenge, path


def test_a_body_over_the_bound_is_413(door: Door, http: httpx.Client) -> None:
    large = {"grant_type": "client_credentials", "padding": "x" * 40_000}
    server = {"Authorization": f"Bearer {door.api_key}"}
    for path, headers in (("/token", {}), ("/introspect", server), ("/revoke", server)):
        answer = conforms(path, "POST", http.post(path, data=large, headers=headers))
        assert (answer.status_code, answer.json()["error"]) == (413, "invalid_request"), path


def test_failed_authentications_over_the_burst_are_429_with_retry_after(http: httpx.Client) -> None:
    form = {"grant_type": "client_credentials"}
    statuses = []
    for _ in range(FAILURE_BURST + 1):
        answer = conforms("/token", "POST", http.post("/token", data=form, headers=basic("nobody", "wrong")))
        statuses.append(answer.status_code)
    assert statuses == [401] * FAILURE_BURST + [429]
    assert answer.json()["error"] == "invalid_client"
    assert int(answer.headers["Retry-After"]) > 0


def test_with_the_store_down_every_stateful_endpoint_is_503(tmp_path: Path, redis_server: RedisServer) -> None:
    door = start_door(tmp_path, redis_url=redis_server.url)
    try:
        with httpx.Client(base_url=door.url, timeout=10) as http:
            credentials = basic(SECRET_CLIENT, door.client_secret)
            form = {"grant_type": "client_credentials"}
            token = http.post("/token", data=form, headers=credentials).json()["access_token"]
            redis_server.kill()
            health = conforms("/healthz", "GET", http.get("/healthz"), unavailable=True)
            assert (health.status_code, health.json()) == (503, {"status": "not_serving", "store": "unreachable"})
            server = {"Authorization": f"Bearer {door.api_key}"}
            answers = [
                ("/token", http.post("/token", data=form, headers=credentials)),
                ("/introspect", http.post("/introspect", data={"token": token}, headers=server)),
                ("/revoke", http.post("/revoke", data={"token": token}, headers=server)),
            ]
            for path, answer in answers:
                conforms(path, "POST", answer, unavailable=True)
                assert (answer.status_code, answer.json()["error"]) == (503, "temporarily_unavailable"), path
                assert int(answer.headers["Retry-After"]) > 0
    finally:
        door.broker.stop()


# Malformed input the schemathesis run does not generate (its headers are ASCII, its URIs
# well formed): each is the client's mistake, so a 4xx the description names, never a 5xx.
ANY_BASIC = basic("someone", "something")  # parsed before any client is looked up
FORM = {"grant_type": "client_credentials"}
NOT_UTF8_BASIC = {"Authorization": "Basic " + base64.b64encode(b"\xff:\xfe").decode()}


MALFORMED = [
    # Each of these three was a 500 once (found by this test; see the token endpoint's parsers).
    pytest.param("/token", FORM, {"Authorization": b"Basic \xe9\xe9"}, 401, id="basic-latin1-token"),
    pytest.param("/revoke", {"token": "x"}, {"Authorization": b"Basic \xe9"}, 401, id="basic-latin1-revoke"),
    pytest.param("/token", {**FORM, "resource": "http://[::1"}, ANY_BASIC, 400, id="resource-bad-ipv6"),
    pytest.param("/token", FORM, NOT_UTF8_BASIC, 401, id="basic-not-utf8"),
    pytest.param("/token", FORM, {**ANY_BASIC, "DPoP": b"\xe9\xff.a.b"}, 400, id="dpop-latin1"),
    pytest.param("/introspect", {"token": "x"}, {"Authorization": b"Bearer \xe9"}, 401, id="bearer-latin1"),
]


@pytest.mark.parametrize(("path", "form", "headers", "status"), MALFORMED)
def test_malformed_input_is_a_described_4xx(
    http: httpx.Client, path: str, form: dict[str, str], headers: dict[str, Any], status: int
) -> None:
    answer = http.post(path, data=form, headers=headers)
    assert answer.status_code == status, answer.text[:300]
    conforms(path, "POST", answer)


def test_a_body_that_is_not_utf8_is_a_400(http: httpx.Client) -> None:
    body = b"grant_type=client_credentials&scope=%FF%FE"
    answer = http.post("/token", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    conforms("/token", "POST", answer)
    assert (answer.status_code, answer.json()["error"]) == (400, "invalid_request")
