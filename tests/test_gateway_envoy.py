"""Envoy's external authorization, `envoy.service.auth.v3.Authorization/Check`, on the
broker's gRPC port (issue 13): CheckRequests shaped as Envoy's ext_authz filter sends them
(the `headers` map with pseudo-headers, or the newer `header_map`; the source address and
URL-encoded peer certificate; per-route `context_extensions`), answered as the ext_authz
API specifies. No Envoy binary: Debian does not package it (see contrib/gateways)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import pytest
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2

from tokenbroker import ProofSigner
from tokenbroker.registry import ServerRecord

from support.grpc_servers import InMemoryRegistry, RunningBroker, _hash, make_pki, running_broker

AUDIENCE = "https://gw.test/mcp"
OTHER = "https://other.test/mcp"
KEY = "envoy-gateway-api-key"
METADATA = (("authorization", f"ApiKey {KEY}"),)
_CLIENTS = itertools.count()  # a client per token: the broker's session limit is per client


@pytest.fixture(scope="module")
def running() -> Iterator[RunningBroker]:
    registry = InMemoryRegistry(
        servers=[ServerRecord("envoy", audiences=(AUDIENCE,), api_key_hash=_hash(KEY), required_scopes=("tools:call",))]
    )
    with running_broker(registry=registry, trusted_proxies=["127.0.0.1"]) as broker:
        yield broker


@pytest.fixture(scope="module")
def stub(running: RunningBroker) -> Iterator[Any]:
    with grpc.insecure_channel(running.target) as channel:
        yield external_auth_pb2_grpc.AuthorizationStub(channel)


def check_request(
    headers: dict[str, str],
    *,
    method: str = "POST",
    path: str = "/mcp",
    host: str = "gw.test",
    certificate: str = "",
    header_map: bool = False,
    context: dict[str, str] | None = None,
    body: bytes = b"",
) -> Any:
    """A CheckRequest as Envoy 1.3x's ext_authz filter builds it for an HTTP/1.1 request."""
    every = {
        ":authority": host,
        ":path": path,
        ":method": method,
        ":scheme": "https",
        "x-forwarded-proto": "https",
        "x-request-id": "8f3c1e4b-7d2a-4d55-9a3e-2f1e0c9b6a71",
        "user-agent": "mcp-client/1.0",
        "accept": "application/json, text/event-stream",
        **({"content-type": "application/json"} if body else {}),
        **{name.lower(): value for name, value in headers.items()},
    }
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1418223913406925513",
        method=method,
        path=path,
        host=host,
        scheme="https",
        protocol="HTTP/1.1",
        size=len(body) if body else -1,
        raw_body=body,
    )
    if header_map:
        http.header_map.headers.extend(base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in every.items())
    else:
        http.headers.update(every)
    source = attribute_context_pb2.AttributeContext.Peer(
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="198.51.100.23", port_value=51234)
        ),
        certificate=certificate,
    )
    destination = attribute_context_pb2.AttributeContext.Peer(
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="10.0.0.5", port_value=443))
    )
    attributes = attribute_context_pb2.AttributeContext(
        source=source,
        destination=destination,
        request=attribute_context_pb2.AttributeContext.Request(http=http),
        context_extensions=context or {},
    )
    return external_auth_pb2.CheckRequest(attributes=attributes)


def dpop_headers(running: RunningBroker, *, scopes: str = "tools:call", audience: str = AUDIENCE) -> dict[str, str]:
    signer = ProofSigner()
    token = running.broker.issue(
        client_id=f"agent-{next(_CLIENTS)}", audience=audience, scopes=scopes, dpop_jkt=signer.jkt
    )
    return {"authorization": f"DPoP {token.access_token}", "dpop": signer.sign("POST", AUDIENCE, token.access_token)}


def headers_of(options: Any) -> dict[str, str]:
    return {option.header.key: option.header.value for option in options}


@pytest.mark.parametrize("header_map", [False, True])
def test_a_valid_request_is_ok_with_identity_headers_and_credentials_removed(
    running: RunningBroker, stub: Any, header_map: bool
) -> None:
    answer = stub.Check(check_request(dpop_headers(running), header_map=header_map), metadata=METADATA)
    assert answer.status.code == code_pb2.OK
    assert answer.WhichOneof("http_response") == "ok_response"
    added = headers_of(answer.ok_response.headers)
    assert added["x-tokenbroker-client-id"].startswith("agent-")
    assert added["x-tokenbroker-session-id"]
    assert added["x-tokenbroker-scopes"] == "tools:call"
    assert all(
        o.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD for o in answer.ok_response.headers
    )
    assert all(o.keep_empty_value for o in answer.ok_response.headers)  # an empty value still overwrites
    assert sorted(answer.ok_response.headers_to_remove) == ["authorization", "dpop"]


def test_no_token_is_denied_401_with_the_challenge(stub: Any) -> None:
    answer = stub.Check(check_request({}), metadata=METADATA)
    assert answer.status.code == code_pb2.UNAUTHENTICATED
    denied = answer.denied_response
    assert denied.status.code == 401
    challenge = headers_of(denied.headers)["www-authenticate"]
    assert challenge.startswith("DPoP ")
    assert "Bearer " in challenge
    assert 'resource_metadata="https://gw.test/.well-known/oauth-protected-resource/mcp"' in challenge


def test_a_replayed_proof_and_another_servers_token_are_denied_401(running: RunningBroker, stub: Any) -> None:
    headers = dpop_headers(running)
    assert stub.Check(check_request(headers), metadata=METADATA).status.code == code_pb2.OK
    replayed = stub.Check(check_request(headers), metadata=METADATA)
    assert replayed.denied_response.status.code == 401
    assert 'error="invalid_dpop_proof"' in headers_of(replayed.denied_response.headers)["www-authenticate"]
    foreign = stub.Check(check_request(dpop_headers(running, audience=OTHER)), metadata=METADATA)
    assert foreign.denied_response.status.code == 401
    assert 'error="invalid_token"' in headers_of(foreign.denied_response.headers)["www-authenticate"]


def test_a_missing_scope_is_denied_403_and_routes_add_scopes(running: RunningBroker, stub: Any) -> None:
    narrow = stub.Check(check_request(dpop_headers(running, scopes="tools:list")), metadata=METADATA)
    assert narrow.status.code == code_pb2.PERMISSION_DENIED
    assert narrow.denied_response.status.code == 403
    assert 'scope="tools:call"' in headers_of(narrow.denied_response.headers)["www-authenticate"]
    route = {"required_scopes": "tools:list"}
    wide = dpop_headers(running, scopes="tools:call tools:list")
    assert stub.Check(check_request(wide, context=route), metadata=METADATA).status.code == code_pb2.OK
    answer = stub.Check(check_request(dpop_headers(running), context=route), metadata=METADATA)
    assert answer.denied_response.status.code == 403


def test_the_peer_certificate_binds_an_mtls_token(running: RunningBroker, stub: Any, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    pem = pki.client_cert_file.read_text()
    token = running.broker.issue(
        client_id="m", audience=AUDIENCE, scopes="tools:call", cert_thumbprint=pki.client_thumbprint
    )
    headers = {"authorization": f"Bearer {token.access_token}"}
    # Envoy's include_peer_certificate: the URL-encoded PEM.
    granted = stub.Check(check_request(headers, certificate=quote(pem, safe="")), metadata=METADATA)
    assert granted.status.code == code_pb2.OK
    (tmp_path / "other").mkdir()
    other = make_pki(tmp_path / "other").client_cert_file.read_text()
    refused = stub.Check(check_request(headers, certificate=quote(other, safe="")), metadata=METADATA)
    assert refused.denied_response.status.code == 401
    missing = stub.Check(check_request(headers), metadata=METADATA)
    assert missing.denied_response.status.code == 401


def test_a_route_that_is_not_the_gateways_is_denied_403_without_a_challenge(running: RunningBroker, stub: Any) -> None:
    answer = stub.Check(check_request(dpop_headers(running), host="other.test"), metadata=METADATA)
    assert answer.denied_response.status.code == 403
    assert "www-authenticate" not in headers_of(answer.denied_response.headers)


def test_a_dot_segment_path_is_denied_400(running: RunningBroker, stub: Any) -> None:
    answer = stub.Check(check_request(dpop_headers(running), path="/x/../mcp"), metadata=METADATA)
    assert answer.status.code == code_pb2.INVALID_ARGUMENT
    assert answer.denied_response.status.code == 400


def test_the_query_is_not_part_of_the_audience(running: RunningBroker, stub: Any) -> None:
    answer = stub.Check(check_request(dpop_headers(running), path="/mcp?sessionId=abc"), metadata=METADATA)
    assert answer.status.code == code_pb2.OK


def test_a_json_rpc_body_names_the_resource(running: RunningBroker, stub: Any) -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file"}}'
    assert stub.Check(check_request(dpop_headers(running), body=body), metadata=METADATA).status.code == code_pb2.OK


def test_an_unregistered_gateway_gets_an_rpc_error(running: RunningBroker, stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.Check(check_request(dpop_headers(running)), metadata=(("authorization", "ApiKey nope"),))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as raised:
        stub.Check(check_request(dpop_headers(running)))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
