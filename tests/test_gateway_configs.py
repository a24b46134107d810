"""The shipped gateway configurations (contrib/gateways/) are checked by their tools' own
syntax checks where Debian packages the tool (`make gateways` installs nginx and caddy):
`nginx -t`, `caddy validate`. Envoy and Traefik are not packaged by Debian: envoy.yaml is
parsed into Envoy's own Bootstrap message (the protos of xds-protos, every typed_config
resolved, so a misspelt field or a wrong type fails), and traefik.yml is checked for the
structure the forward auth depends on. Neither is run by its tool here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (its typed_config resolves)
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401 (as above)
from google.protobuf import json_format

from tokenbroker.gateway.door import CREDENTIAL_HEADERS, IDENTITY_HEADERS

from support.nginx_gateway import NginxGateway

CONTRIB = Path(__file__).resolve().parent.parent / "contrib" / "gateways"


def test_nginx_accepts_the_shipped_configuration(tmp_path: Path) -> None:
    checked = NginxGateway(tmp_path / "nginx", upstream_port=18000, broker_port=18080, api_key="k").check()
    assert checked.returncode == 0, checked.stderr
    assert "syntax is ok" in checked.stderr
    assert "test is successful" in checked.stderr


def test_nginx_refuses_a_broken_configuration(tmp_path: Path) -> None:
    """The check above can fail: a configuration missing a brace is refused."""
    gateway = NginxGateway(tmp_path / "nginx", upstream_port=18000, broker_port=18080, api_key="k")
    gateway.site_text = (CONTRIB / "nginx.conf").read_text().replace("location = /mcp {", "location = /mcp ", 1)
    assert gateway.check().returncode != 0


def _caddy() -> str:
    found = shutil.which("caddy")
    if found is None:
        raise RuntimeError("caddy is missing: run `make gateways` (as root: apt-get install caddy)")
    return found


def _caddy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENBROKER_GATEWAY_API_KEY": "tbk_example", "HOME": str(path.parent)}
    command = [_caddy(), "validate", "--config", str(path), "--adapter", "caddyfile"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)


def test_caddy_validates_the_shipped_caddyfile(tmp_path: Path) -> None:
    shutil.copy(CONTRIB / "Caddyfile", tmp_path / "Caddyfile")
    checked = _caddy_validate(tmp_path / "Caddyfile")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Valid configuration" in checked.stdout + checked.stderr


def test_caddy_refuses_a_broken_caddyfile(tmp_path: Path) -> None:
    text = (CONTRIB / "Caddyfile").read_text().replace("copy_headers", "copy_headerz", 1)
    (tmp_path / "Caddyfile").write_text(text)
    assert _caddy_validate(tmp_path / "Caddyfile").returncode != 0


def _typed(message: Any, cls: Any) -> Any:
    value = cls()
    assert message.Unpack(value), cls
    return value


def test_the_envoy_configuration_is_envoys_api() -> None:
    document = yaml.safe_load((CONTRIB / "envoy.yaml").read_text())
    bootstrap = json_format.ParseDict(document, bootstrap_pb2.Bootstrap())  # raises on any unknown field or type
    clusters = {cluster.name: cluster for cluster in bootstrap.static_resources.clusters}
    (listener,) = bootstrap.static_resources.listeners
    manager = _typed(
        listener.filter_chains[0].filters[0].typed_config, http_connection_manager_pb2.HttpConnectionManager
    )
    assert manager.use_remote_address.value  # the client's own X-Forwarded-For is not believed
    ext_authz = _typed(manager.http_filters[0].typed_config, ext_authz_pb2.ExtAuthz)
    assert manager.http_filters[0].name == "envoy.filters.http.ext_authz"
    assert manager.http_filters[-1].name == "envoy.filters.http.router"
    assert not ext_authz.failure_mode_allow  # fail closed
    assert ext_authz.include_peer_certificate
    assert ext_authz.grpc_service.envoy_grpc.cluster_name in clusters
    assert [(m.key, m.value.split()[0]) for m in ext_authz.grpc_service.initial_metadata] == [
        ("authorization", "ApiKey")
    ]
    routes = manager.route_config.virtual_hosts[0].routes
    assert {route.route.cluster for route in routes} <= set(clusters)
    metadata = next(r for r in routes if r.match.prefix == "/.well-known/oauth-protected-resource")
    off = _typed(metadata.typed_per_filter_config["envoy.filters.http.ext_authz"], ext_authz_pb2.ExtAuthzPerRoute)
    assert off.disabled  # the metadata is public
    mcp = next(r for r in routes if r.match.path == "/mcp")
    scopes = _typed(mcp.typed_per_filter_config["envoy.filters.http.ext_authz"], ext_authz_pb2.ExtAuthzPerRoute)
    assert scopes.check_settings.context_extensions["required_scopes"]


def test_a_misspelt_envoy_field_is_refused() -> None:
    """The check above can fail."""
    text = (CONTRIB / "envoy.yaml").read_text().replace("failure_mode_allow", "failure_mode_alow", 1)
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict(yaml.safe_load(text), bootstrap_pb2.Bootstrap())


def test_the_traefik_configuration_forwards_and_strips_what_it_must() -> None:
    http = yaml.safe_load((CONTRIB / "traefik.yml").read_text())["http"]
    middlewares = http["middlewares"]
    router = http["routers"]["mcp"]
    auth = middlewares["tokenbroker"]["forwardAuth"]
    assert auth["address"].endswith("/authz")
    assert auth["trustForwardHeader"] is False
    assert set(auth["authResponseHeaders"]) == set(IDENTITY_HEADERS)
    assert set(CREDENTIAL_HEADERS) <= set(auth["authRequestHeaders"])
    assert "X-Tokenbroker-Api-Key" in auth["authRequestHeaders"]
    order = router["middlewares"]
    assert order.index("tokenbroker-key") < order.index("tokenbroker") < order.index("strip-credentials")
    stripped = middlewares["strip-credentials"]["headers"]["customRequestHeaders"]
    assert {name for name, value in stripped.items() if value == ""} >= {*CREDENTIAL_HEADERS, "X-Tokenbroker-Api-Key"}
    assert http["routers"]["mcp-metadata"]["rule"].count("/.well-known/oauth-protected-resource") == 1
