"""Helpers for end-to-end tests of the HTTP door (`tokenbroker serve`'s `/token`,
`/introspect`, ...), shared by every test that talks OAuth to a real broker process.

- `OAuthDeployment`: a key file and a registry of clients and servers written before the
  broker starts (so nothing waits for the registry's reload), and brokers whose issuer
  (`public_url`) is their own HTTP URL, optionally with a path (`https://h/auth` style);
- `http_client`: an httpx client that never reads proxy settings from the environment,
  so every request stays on 127.0.0.1;
- client credentials in the three forms of RFC 6749 section 2.3 and RFC 7523 section 2.2
  (`assertion_fields`, `basic_authorization`, `secret_fields`), the token request's form
  (`token_form`) and DPoP proofs (`ProofSigner` from tokenbroker);
- reading answers: `claims_of` (a JWT's payload, unverified), `oauth_error`, `audit_lines`.

Plain helpers, no pytest: a test module builds its deployment in its own fixture."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tokenbroker import Keyring, ProofSigner
from tokenbroker.client_assertion import PrivateKey, make_client_assertion, public_jwk
from tokenbroker.registry import Binding, ClientRecord, ClientStatus, ServerRecord
from tokenbroker.registry_file import FileRegistry, hash_secret
from tokenbroker_bench.servers import free_port

from support.broker_process import BrokerProcess, broker_env

AUDIENCE_A = "https://a.mcp.test/mcp"
AUDIENCE_B = "https://b.mcp.test/mcp"
SCOPES = ("tools:call", "tools:list")
CLIENT_CREDENTIALS = "client_credentials"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
METADATA_PATH = "/.well-known/oauth-authorization-server"


def new_key(kind: str) -> PrivateKey:
    """A fresh client key: "ed25519" (EdDSA), "p256" (ES256) or "rsa" (2048 bits: RS256, PS256)."""
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key kind {kind!r}: use ed25519, p256 or rsa")


class OAuthDeployment:
    """One broker deployment's files in `workdir`: the signing keys (`keys.json`), the
    registry (`registry.toml`) and the audit log (`audit.jsonl`), shared by every broker
    process started from it (as replicas share them)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        Keyring.generate().save(workdir / "keys.json")
        self.registry = FileRegistry(workdir / "registry.toml")

    @property
    def audit_file(self) -> Path:
        return self.workdir / "audit.jsonl"

    def add_key_client(self, client_id: str, key: PrivateKey, **fields: Any) -> ClientRecord:
        """An approved `private_key_jwt` client of `key` (fields override the defaults:
        audience A, both scopes, binding dpop)."""
        return self._add_client(client_id, public_jwk=public_jwk(key), **fields)

    def add_secret_client(self, client_id: str, secret: str, **fields: Any) -> ClientRecord:
        """An approved client that authenticates with `secret` (only its hash is stored)."""
        return self._add_client(client_id, secret_hash=hash_secret(secret), **fields)

    def _add_client(self, client_id: str, **fields: Any) -> ClientRecord:
        values: dict[str, Any] = {
            "status": ClientStatus.APPROVED,
            "allowed_audiences": (AUDIENCE_A,),
            "allowed_scopes": SCOPES,
            "binding": Binding.DPOP,
        }
        values.update(fields)
        record = ClientRecord(client_id, **values)
        self.registry.add_client(record)
        return record

    def add_server(self, server_id: str, audiences: Iterable[str], api_key: str, **fields: Any) -> ServerRecord:
        record = ServerRecord(server_id, audiences=tuple(audiences), api_key_hash=hash_secret(api_key), **fields)
        self.registry.add_server(record)
        return record

    def broker(self, *, path: str = "", public_url: str | None = None, **settings: str) -> BrokerProcess:
        """A started `tokenbroker serve` whose `public_url` is its own HTTP URL plus `path`
        ("" or "/auth"), or `public_url` (a replica behind another's name); `settings` are
        more TOKENBROKER_* settings by name (`redis_url=...`, `require_dpop_nonce="true"`)."""
        http_port = free_port()
        issuer = public_url or f"http://127.0.0.1:{http_port}{path}"
        env = broker_env(self.workdir, issuer)
        env.update({f"TOKENBROKER_{name.upper()}": value for name, value in settings.items()})
        return BrokerProcess(self.workdir, env, http_port=http_port).start()

    def audit_lines(self) -> list[dict[str, Any]]:
        """Every audit line written so far (the file is unbuffered: a line is there once
        the answer was sent)."""
        if not self.audit_file.exists():
            return []
        lines = self.audit_file.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def issuer_of(broker: BrokerProcess) -> str:
    """The broker's issuer, `public_url`, as `OAuthDeployment.broker` set it."""
    return broker.env["TOKENBROKER_ISSUER"]


def token_url(broker: BrokerProcess) -> str:
    """The token endpoint's URL as clients name it (a proof's `htu`, an assertion's `aud`)."""
    return endpoint_url(broker, "token")


def endpoint_url(broker: BrokerProcess, name: str) -> str:
    """The URL of endpoint `name` ("token", "introspect", "revoke", "jwks", "authorize")
    under the issuer, as the metadata names it."""
    return f"{issuer_of(broker).rstrip('/')}/{name}"


def door_url(broker: BrokerProcess, name: str) -> str:
    """Where to send a request for endpoint `name` to this very process: its own port, the
    issuer's path (the same as `endpoint_url` unless the broker is a replica that serves
    another broker's `public_url`)."""
    prefix = urlsplit(issuer_of(broker)).path.rstrip("/")
    return f"{broker.http_url}{prefix}/{name}"


def http_client(timeout: float = 10.0) -> httpx.Client:
    """An httpx client for loopback brokers: `trust_env=False`, so no HTTP(S)_PROXY or
    netrc of the developer's shell can send a request anywhere but 127.0.0.1."""
    return httpx.Client(trust_env=False, timeout=timeout)


# -- client credentials ---------------------------------------------------------------------


def assertion_fields(
    key: PrivateKey,
    client_id: str,
    audience: str,
    *,
    algorithm: str | None = None,
    now: int | None = None,
    send_client_id: bool = True,
) -> dict[str, str]:
    """The form fields of `private_key_jwt` (RFC 7523 section 2.2): a fresh assertion for
    `audience` (the issuer, or the token endpoint), signed with `algorithm`."""
    fields = {
        "client_assertion_type": JWT_BEARER,
        "client_assertion": make_client_assertion(key, client_id, audience, algorithm=algorithm, now=now),
    }
    if send_client_id:
        fields["client_id"] = client_id
    return fields


def basic_authorization(client_id: str, secret: str) -> str:
    """The `Authorization` header of `client_secret_basic`: RFC 6749 section 2.3.1 has the
    id and the secret form-encoded (appendix B) before they are joined by ":" and base64'd,
    so a ":" in the id cannot be mistaken for the separator."""
    joined = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return "Basic " + base64.b64encode(joined.encode("utf-8")).decode("ascii")


def secret_fields(client_id: str, secret: str) -> dict[str, str]:
    """The form fields of `client_secret_post`."""
    return {"client_id": client_id, "client_secret": secret}


def token_form(
    credential: dict[str, str] | None = None, *, resource: str | None = None, scope: str | None = None
) -> dict[str, str]:
    """A client credentials token request (RFC 6749 section 4.4.2) with `credential`'s fields."""
    form = {"grant_type": CLIENT_CREDENTIALS, **(credential or {})}
    if resource is not None:
        form["resource"] = resource
    if scope is not None:
        form["scope"] = scope
    return form


def post_token(
    http: httpx.Client,
    broker: BrokerProcess,
    form: dict[str, str],
    *,
    dpop: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POSTs a token request to this broker process, with a `DPoP` proof when given."""
    sent = dict(headers or {})
    if dpop is not None:
        sent["DPoP"] = dpop
    return http.post(door_url(broker, "token"), data=form, headers=sent)


def key_token(
    http: httpx.Client,
    broker: BrokerProcess,
    key: PrivateKey,
    client_id: str,
    *,
    signer: ProofSigner | None = None,
    nonce: str | None = None,
    resource: str | None = None,
    scope: str | None = None,
    algorithm: str | None = None,
) -> httpx.Response:
    """A `private_key_jwt` token request with a fresh assertion (aud: the issuer) and, with
    `signer`, a fresh DPoP proof for the token endpoint (with `nonce` when given)."""
    form = token_form(
        assertion_fields(key, client_id, issuer_of(broker), algorithm=algorithm), resource=resource, scope=scope
    )
    proof = signer.sign("POST", token_url(broker), nonce=nonce) if signer is not None else None
    return post_token(http, broker, form, dpop=proof)


def secret_token(
    http: httpx.Client,
    broker: BrokerProcess,
    client_id: str,
    secret: str,
    *,
    resource: str | None = None,
    scope: str | None = None,
) -> httpx.Response:
    """A `client_secret_basic` token request without a proof (a Bearer client's)."""
    headers = {"Authorization": basic_authorization(client_id, secret)}
    return post_token(http, broker, token_form(resource=resource, scope=scope), headers=headers)


# -- reading answers --------------------------------------------------------------------------


def claims_of(token: str) -> dict[str, Any]:
    """A JWT's payload, NOT verified (tests verify with PyJWT where that is the point)."""
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert isinstance(claims, dict)
    return claims


def oauth_error(response: httpx.Response) -> str:
    """The RFC 6749 section 5.2 `error` of an error answer ("" when the body has none)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("error", "")) if isinstance(body, dict) else ""


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Polls `predicate()` until it is true or `timeout` seconds passed; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


__all__ = [
    "AUDIENCE_A",
    "AUDIENCE_B",
    "CLIENT_CREDENTIALS",
    "JWT_BEARER",
    "METADATA_PATH",
    "SCOPES",
    "OAuthDeployment",
    "assertion_fields",
    "basic_authorization",
    "claims_of",
    "door_url",
    "endpoint_url",
    "http_client",
    "issuer_of",
    "key_token",
    "new_key",
    "oauth_error",
    "post_token",
    "secret_fields",
    "secret_token",
    "token_form",
    "token_url",
    "wait_for",
]
