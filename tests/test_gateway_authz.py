"""`/authz`, forward auth (issue 13), against a real `tokenbroker serve`: the gateway's
credential, the original request's description, the 200 identity headers, the 401
challenges, 403 insufficient_scope, the request targets that are refused, and the
protected resource metadata the challenges name. nginx itself in front: test_gateway_nginx.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tokenbroker import ProofSigner
from tokenbroker.client_assertion import PrivateKey
from tokenbroker.registry import Binding

from support.broker_process import BrokerProcess
from support.oauth import OAuthDeployment, http_client, key_token, new_key, secret_token

GATEWAY_AUDIENCE = "http://gw.test/mcp"
OTHER_AUDIENCE = "http://other.test/mcp"
GATEWAY_KEY = "gateway-api-key-for-tests"
OTHER_KEY = "other-api-key-for-tests"
SECRET = "bearer-client-secret-for-tests"
SCOPES = ("tools:call", "tools:list")


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return new_key("ed25519")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, key: PrivateKey) -> Iterator[BrokerProcess]:
    d = OAuthDeployment(tmp_path_factory.mktemp("authz"))
    both = (GATEWAY_AUDIENCE, OTHER_AUDIENCE)
    d.add_key_client("agent", key, allowed_audiences=both, allowed_scopes=SCOPES, max_sessions=1000)
    d.add_key_client(
        "watched",
        key,
        allowed_audiences=both,
        allowed_scopes=SCOPES,
        detection_actions=("concurrent_origins=deny",),
    )
    d.add_secret_client("bearer-agent", SECRET, allowed_audiences=both, allowed_scopes=SCOPES, binding=Binding.BEARER)
    d.add_server("gateway", (GATEWAY_AUDIENCE,), GATEWAY_KEY, required_scopes=("tools:call",))
    d.add_server("other", (OTHER_AUDIENCE,), OTHER_KEY)
    process = d.broker(trusted_proxies='["127.0.0.1"]')
    try:
        yield process
    finally:
        assert process.stop() == 0, process.log.read_text()[-2000:]


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with http_client() as client:
        yield client


class Agent:
    """The DPoP client: a token for `audience` and a fresh proof per request."""

    def __init__(self, http: httpx.Client, broker: BrokerProcess, key: PrivateKey, *, scope: str, audience: str):
        self.signer = ProofSigner()
        answer = key_token(http, broker, key, "agent", signer=self.signer, resource=audience, scope=scope)
        assert answer.status_code == 200, answer.text
        self.token = answer.json()["access_token"]

    def headers(self, method: str = "GET", uri: str = GATEWAY_AUDIENCE) -> dict[str, str]:
        return {"Authorization": f"DPoP {self.token}", "DPoP": self.signer.sign(method, uri, self.token)}


def forwarded(path: str = "/mcp", method: str = "GET", host: str = "gw.test", **extra: str) -> dict[str, str]:
    """What Traefik and Caddy send: X-Forwarded-Method, -Proto, -Host, -Uri, and the key."""
    return {
        "X-Tokenbroker-Api-Key": GATEWAY_KEY,
        "X-Forwarded-Method": method,
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": host,
        "X-Forwarded-Uri": path,
        **extra,
    }


def authz(http: httpx.Client, broker: BrokerProcess, headers: dict[str, str], method: str = "GET") -> httpx.Response:
    return http.request(method, f"{broker.http_url}/authz", headers=headers)


def challenge(response: httpx.Response) -> str:
    values = response.headers.get_list("www-authenticate")
    assert len(values) == 1, values  # one header: what nginx's auth_request_set copies
    return values[0]


def test_a_valid_dpop_request_gets_200_with_the_identity_headers(
    http: httpx.Client, broker: BrokerProcess, key: PrivateKey
) -> None:
    agent = Agent(http, broker, key, scope="tools:call tools:list", audience=GATEWAY_AUDIENCE)
    answer = authz(http, broker, {**forwarded(), **agent.headers()})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-tokenbroker-client-id"] == "agent"
    assert answer.headers["x-tokenbroker-session-id"]
    assert answer.headers["x-tokenbroker-scopes"].split() == ["tools:call", "tools:list"]
    assert answer.headers["cache-control"] == "no-store"


def test_nginx_headers_and_the_original_method_are_read(
    http: httpx.Client, broker: BrokerProcess, key: PrivateKey
) -> None:
    """nginx sends X-Original-URI (with the query, dropped) and keeps the client's method."""
    agent = Agent(http, broker, key, scope="tools:call", audience=GATEWAY_AUDIENCE)
    headers = {
        "X-Tokenbroker-Api-Key": GATEWAY_KEY,
        "X-Original-URI": "/mcp?session=1",
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": "gw.test",
        **agent.headers("POST"),
    }
    assert authz(http, broker, headers, method="POST").status_code == 200
    # The proof covers POST: the same token with a GET proof for a POST is refused.
    headers.update(agent.headers("GET"))
    answer = authz(http, broker, headers, method="POST")
    assert answer.status_code == 401
    assert 'error="invalid_dpop_proof"' in challenge(answer)


def test_no_token_gets_401_with_both_challenges_and_resource_metadata(
    http: httpx.Client, broker: BrokerProcess
) -> None:
    answer = authz(http, broker, forwarded())
    assert answer.status_code == 401
    value = challenge(answer)
    assert value.startswith("DPoP ")
    assert ", Bearer " in value
    assert 'resource_metadata="http://gw.test/.well-known/oauth-protected-resource/mcp"' in value
    assert "error=" not in value  # no credentials: no error (RFC 6750 section 3.1)


def test_a_replayed_proof_gets_401(http: httpx.Client, broker: BrokerProcess, key: PrivateKey) -> None:
    agent = Agent(http, broker, key, scope="tools:call", audience=GATEWAY_AUDIENCE)
    headers = {**forwarded(), **agent.headers()}
    assert authz(http, broker, headers).status_code == 200
    again = authz(http, broker, headers)
    assert again.status_code == 401
    assert 'error="invalid_dpop_proof"' in challenge(again)


def test_another_servers_token_gets_401(http: httpx.Client, broker: BrokerProcess, key: PrivateKey) -> None:
    agent = Agent(http, broker, key, scope="tools:call", audience=OTHER_AUDIENCE)
    answer = authz(http, broker, {**forwarded(), **agent.headers()})
    assert answer.status_code == 401
    assert 'error="invalid_token"' in challenge(answer)
    assert answer.json()["error"] == "invalid_token"


def test_a_missing_scope_gets_403_naming_the_scopes(http: httpx.Client, broker: BrokerProcess, key: PrivateKey) -> None:
    agent = Agent(http, broker, key, scope="tools:list", audience=GATEWAY_AUDIENCE)  # the record requires tools:call
    answer = authz(http, broker, {**forwarded(), **agent.headers()})
    assert answer.status_code == 403
    assert 'error="insufficient_scope"' in challenge(answer)
    assert 'scope="tools:call"' in challenge(answer)


def test_the_routes_scopes_are_added_to_the_records(http: httpx.Client, broker: BrokerProcess, key: PrivateKey) -> None:
    agent = Agent(http, broker, key, scope="tools:call tools:list", audience=GATEWAY_AUDIENCE)
    route = forwarded(**{"X-Tokenbroker-Required-Scopes": "tools:list"})
    assert authz(http, broker, {**route, **agent.headers()}).status_code == 200
    route["X-Tokenbroker-Required-Scopes"] = "admin:write"
    answer = authz(http, broker, {**route, **agent.headers()})
    assert answer.status_code == 403
    assert 'scope="tools:call admin:write"' in challenge(answer)
    route["X-Tokenbroker-Required-Scopes"] = 'bad"scope'
    assert authz(http, broker, {**route, **agent.headers()}).status_code == 400  # the gateway's configuration


def test_the_forwarded_client_address_reaches_detection(
    http: httpx.Client, broker: BrokerProcess, key: PrivateKey
) -> None:
    """From a trusted proxy (127.0.0.1 here), X-Forwarded-For is the client's address: the
    same session from another /16 a second later is concurrent_origins, denied for this client."""
    signer = ProofSigner()
    answer = key_token(http, broker, key, "watched", signer=signer, resource=GATEWAY_AUDIENCE, scope="tools:call")
    token = answer.json()["access_token"]

    def from_address(address: str) -> httpx.Response:
        proof = {"Authorization": f"DPoP {token}", "DPoP": signer.sign("GET", GATEWAY_AUDIENCE, token)}
        return authz(http, broker, {**forwarded(), **proof, "X-Forwarded-For": f"6.6.6.6, {address}"})

    assert from_address("198.51.100.7").status_code == 200
    assert from_address("198.51.100.8").status_code == 200  # the same network
    refused = from_address("203.0.113.9")  # another /16, within the window: the thief
    assert refused.status_code == 401
    assert 'error="invalid_token"' in challenge(refused)
    assert "detection" in refused.json()["error_description"]


def test_a_bearer_client_is_let_through(http: httpx.Client, broker: BrokerProcess) -> None:
    answer = secret_token(http, broker, "bearer-agent", SECRET, resource=GATEWAY_AUDIENCE, scope="tools:call")
    token = answer.json()["access_token"]
    granted = authz(http, broker, {**forwarded(), "Authorization": f"Bearer {token}"})
    assert granted.status_code == 200
    assert granted.headers["x-tokenbroker-client-id"] == "bearer-agent"


def test_a_dpop_token_presented_as_bearer_gets_401(http: httpx.Client, broker: BrokerProcess, key: PrivateKey) -> None:
    agent = Agent(http, broker, key, scope="tools:call", audience=GATEWAY_AUDIENCE)
    answer = authz(http, broker, {**forwarded(), "Authorization": f"Bearer {agent.token}"})
    assert answer.status_code == 401
    assert "DPoP" in challenge(answer)


@pytest.mark.parametrize("api_key", ["", "not-a-registered-key"])
def test_a_gateway_without_a_registered_key_gets_401_invalid_client(
    http: httpx.Client, broker: BrokerProcess, api_key: str
) -> None:
    sent = {name: value for name, value in {**forwarded(), "X-Tokenbroker-Api-Key": api_key}.items() if value}
    answer = authz(http, broker, sent)
    assert answer.status_code == 401
    assert answer.json()["error"] == "invalid_client"
    assert answer.headers["www-authenticate"].startswith("ApiKey ")  # not a challenge a client could answer


@pytest.mark.parametrize("missing", ["X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Uri"])
def test_a_gateway_that_misdescribes_the_request_gets_400(
    http: httpx.Client, broker: BrokerProcess, key: PrivateKey, missing: str
) -> None:
    """Not 401: nginx would pass a challenge to a client whose token is not the problem
    (it answers 500 for a 400 from the auth server)."""
    agent = Agent(http, broker, key, scope="tools:call", audience=GATEWAY_AUDIENCE)
    sent = {name: value for name, value in {**forwarded(), **agent.headers()}.items() if name != missing}
    answer = authz(http, broker, sent)
    assert answer.status_code == 400
    assert missing in answer.json()["error_description"]
    assert "www-authenticate" not in answer.headers
    assert agent.token not in answer.text
    assert GATEWAY_KEY not in answer.text


def test_a_route_that_is_not_the_gateways_gets_403_without_a_challenge(
    http: httpx.Client, broker: BrokerProcess, key: PrivateKey
) -> None:
    agent = Agent(http, broker, key, scope="tools:call", audience=OTHER_AUDIENCE)
    # The gateway's key, another server's route: a gateway validates only for its own audiences.
    answer = authz(http, broker, {**forwarded(host="other.test"), **agent.headers(uri=OTHER_AUDIENCE)})
    assert answer.status_code == 403
    assert "www-authenticate" not in answer.headers


@pytest.mark.parametrize(
    "target",
    ["/mcp/../mcp", "/x/%2e%2e/mcp", "/mcp%2f", "//mcp", "/mcp\\", "mcp", "/mc%zzp", "/mcp#/../x"],
)
def test_targets_that_could_route_elsewhere_get_400(
    http: httpx.Client, broker: BrokerProcess, key: PrivateKey, target: str
) -> None:
    agent = Agent(http, broker, key, scope="tools:call", audience=GATEWAY_AUDIENCE)
    answer = authz(http, broker, {**forwarded(path=target), **agent.headers()})
    assert answer.status_code == 400, answer.text


def test_two_spellings_that_disagree_get_400(http: httpx.Client, broker: BrokerProcess, key: PrivateKey) -> None:
    """A gateway that sets one spelling passes a client's copy of the other: never believed."""
    agent = Agent(http, broker, key, scope="tools:call", audience=GATEWAY_AUDIENCE)
    for extra in ({"X-Original-URI": "/other"}, {"X-Original-Method": "DELETE"}):
        answer = authz(http, broker, {**forwarded(), **agent.headers(), **extra})
        assert answer.status_code == 400, extra


def test_two_authorization_headers_get_400(http: httpx.Client, broker: BrokerProcess) -> None:
    headers = [*list(forwarded().items()), ("Authorization", "Bearer a"), ("Authorization", "Bearer b")]
    answer = http.get(f"{broker.http_url}/authz", headers=headers)
    assert answer.status_code == 400


def test_the_metadata_the_challenge_names_is_served(http: httpx.Client, broker: BrokerProcess) -> None:
    url = f"{broker.http_url}/.well-known/oauth-protected-resource/mcp"
    answer = http.get(url, headers={"X-Forwarded-Proto": "http", "X-Forwarded-Host": "gw.test"})
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["resource"] == GATEWAY_AUDIENCE
    assert document["authorization_servers"] == [broker.env["TOKENBROKER_ISSUER"]]
    assert document["scopes_supported"] == ["tools:call"]
    unknown = http.get(url, headers={"X-Forwarded-Proto": "http", "X-Forwarded-Host": "nowhere.test"})
    assert unknown.status_code == 404


def test_the_log_holds_no_token_or_key(broker: BrokerProcess) -> None:
    text = Path(broker.log).read_text()
    assert "authz refused" in text
    assert GATEWAY_KEY not in text
    assert SECRET not in text
    for line in text.splitlines():
        if "authz refused" in line and line.startswith("{"):
            assert "eyJ" not in json.dumps(json.loads(line))
