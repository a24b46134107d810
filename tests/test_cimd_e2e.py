"""CIMD clients end to end (issue 11, "Acceptance"), all real processes on loopback: a
`tokenbroker serve` (memory store, an audit file) whose `cimd_ca_file` is a throwaway test
CA and whose `cimd_allow_loopback` lets documents live on 127.0.0.1; a local HTTPS server
(tests/support/https_servers.py) serving each client's metadata document with keys this
test holds; httpx posting `client_credentials` requests with a `private_key_jwt` assertion
(iss = sub = the document URL, aud = the issuer) and a DPoP proof; the operator's
`tokenbroker clients approve|show` and `tokenbroker audit verify|why` run as their own
processes against the broker's registry and audit files.

Documents are served with `Cache-Control: max-age=0`, so every token request fetches the
document again and a change is seen by the next request. The fetcher limits fetches per
host (10 at once, then 1 a second) and answers its last good copy when a refetch is
refused, which would hide a change: every test checks afterwards that the broker never
fell back to a last good copy (`cimd_refetch_failed` in its log).

The broker reads its registry file again at most once a second, so after each CLI change
the test waits that second before the next request (`REGISTRY_RELOAD_SECONDS`).

SSRF at the door: client ids naming loopback (without the allowance), private,
link-local, cloud-metadata and IPv4-mapped addresses are asked for by a second broker
that runs, with its client and an HTTPS server that would answer, in a network namespace
holding only loopback (`unshare -rn`): nothing it does can reach another machine. Each id
is refused with 401 `invalid_client` and the audit rule `cimd.blocked_address` (a refused
connection would have been `cimd.connect_failed`), and the HTTPS server sees no
connection. This file is also the program run inside the namespace (`--ssrf-probe`)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tokenbroker import Keyring, ProofSigner
from tokenbroker.cimd import jwk_thumbprint
from tokenbroker.client_assertion import make_client_assertion, public_jwk

from support.broker_process import BrokerProcess, broker_env
from support.https_servers import HttpsServer, Reply, make_test_ca

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
AUDIENCE = "http://127.0.0.1:9/mcp"  # the resource CIMD clients may get tokens for (cimd_default_audiences)
SCOPE = "tools:call"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TRUSTED_DOMAIN = "localhost"  # in cimd_trusted_domains; the test certificate covers it and 127.0.0.1
REGISTRY_RELOAD_SECONDS = 1.1  # FileRegistry stats its file at most once a second
NO_CACHE = "max-age=0"


# -- the client's side: keys, documents, requests -------------------------------------------


@dataclass(frozen=True)
class ClientKey:
    """An Ed25519 key a CIMD client signs its assertions with."""

    private: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)

    @property
    def jwk(self) -> dict[str, str]:
        return public_jwk(self.private)

    @property
    def thumbprint(self) -> str:
        return jwk_thumbprint(self.jwk)


def document(url: str, *keys: ClientKey) -> dict[str, Any]:
    """A Client ID Metadata Document for `url` publishing `keys`."""
    return {
        "client_id": url,
        "client_name": "e2e agent",
        "token_endpoint_auth_method": "private_key_jwt",
        "grant_types": ["client_credentials"],
        "jwks": {"keys": [key.jwk for key in keys]},
    }


@dataclass
class Answer:
    status: int
    body: dict[str, Any]
    dpop_jkt: str  # the thumbprint of the DPoP key the request's proof was signed with


def ask_token(token_url: str, issuer: str, client_id: str, key: ClientKey) -> Answer:
    """One client credentials request: assertion signed by `key`, a fresh DPoP proof."""
    signer = ProofSigner()
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": make_client_assertion(key.private, client_id, issuer),
        "resource": AUDIENCE,
        "scope": SCOPE,
    }
    response = httpx.post(token_url, data=form, headers={"DPoP": signer.sign("POST", token_url)}, timeout=15)
    return Answer(response.status_code, response.json(), signer.jkt)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(text)
            if isinstance(value, dict):
                lines.append(value)
    return lines


# -- the deployment ---------------------------------------------------------------------------


@dataclass
class Published:
    """A client whose document the HTTPS server serves."""

    url: str
    path: str
    bodies: list[bytes] = field(default_factory=list)  # every version served, in order

    @property
    def fingerprint(self) -> str:
        """The hex SHA-256 of the document version served now (what the audit names)."""
        return hashlib.sha256(self.bodies[-1]).hexdigest()


@dataclass
class Deployment:
    broker: BrokerProcess
    documents: HttpsServer
    workdir: Path

    @property
    def issuer(self) -> str:
        return self.broker.http_url

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def audit_file(self) -> Path:
        return self.workdir / "audit.jsonl"

    def publish(
        self, name: str, *keys: ClientKey, host: str = "127.0.0.1", client: Published | None = None
    ) -> Published:
        """Serves (or replaces) the document of client `name` with `keys`."""
        path = f"/clients/{name}.json"
        published = client or Published(self.documents.url(path, host=host), path)
        reply = Reply.json(document(published.url, *keys), cache_control=NO_CACHE)
        self.documents.replies[path] = reply
        published.bodies.append(reply.body)
        return published

    def ask(self, client: Published, key: ClientKey) -> Answer:
        return ask_token(self.token_url, self.issuer, client.url, key)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The `tokenbroker` CLI in its own process, with the broker's settings."""
        command = [sys.executable, "-c", "from tokenbroker.cli import main; main()", *args]
        env = {**os.environ, **self.broker.env}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=False)
        if check:
            assert done.returncode == 0, f"{args}: {done.stderr[-2000:]}"
        return done

    def show(self, client: Published) -> dict[str, Any]:
        shown: dict[str, Any] = json.loads(self.cli("clients", "show", client.url).stdout)
        return shown

    def approve(self, client: Published, by: str, *flags: str) -> None:
        self.cli("clients", "approve", client.url, "--by", by, *flags)
        time.sleep(REGISTRY_RELOAD_SECONDS)  # the broker sees the new registry file from now on

    def events(self, name: str, client: Published, *, wait: float = 3.0) -> list[dict[str, Any]]:
        """The broker log's `name` event lines about `client` (waiting up to `wait` s for one)."""
        deadline = time.monotonic() + wait
        while True:
            found = [
                line
                for line in read_json_lines(self.broker.log)
                if line.get("event") == name and line.get("client_id") == client.url
            ]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def audit(self, **fields: Any) -> list[dict[str, Any]]:
        """The broker's audit lines that have all of `fields`."""
        return [
            line
            for line in read_json_lines(self.audit_file)
            if all(line.get(name) == value for name, value in fields.items())
        ]

    def check_access_token(self, answer: Answer, client: Published) -> dict[str, Any]:
        """The granted token's claims, verified with the broker's published keys."""
        assert answer.status == 200, answer.body
        assert answer.body["token_type"] == "DPoP"
        token = answer.body["access_token"]
        keys = httpx.get(f"{self.issuer}/jwks", timeout=10).json()["keys"]
        kid = jwt.get_unverified_header(token)["kid"]
        key = jwt.PyJWK(next(k for k in keys if k["kid"] == kid))
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=self.issuer, options={"require": ["exp"]}
        )
        assert claims["client_id"] == claims["sub"] == client.url
        assert claims["cnf"] == {"jkt": answer.dpop_jkt}  # bound to the proof's key
        assert claims["scope"] == SCOPE
        return claims


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("cimd-e2e")
    ca = make_test_ca(workdir / "ca")
    cert_file, key_file = ca.issue(dns_names=(TRUSTED_DOMAIN,), ips=("127.0.0.1",))
    Keyring.generate().save(workdir / "keys.json")
    broker = BrokerProcess(workdir, {})
    broker.env = broker_env(
        workdir,
        broker.http_url,
        cimd_allow_loopback="true",
        cimd_ca_file=str(ca.ca_file),
        cimd_default_audiences=json.dumps([AUDIENCE]),
        cimd_default_scopes=json.dumps([SCOPE]),
        cimd_trusted_domains=json.dumps([TRUSTED_DOMAIN]),
    )
    with HttpsServer(cert_file, key_file) as documents:
        broker.start()
        try:
            yield Deployment(broker, documents, workdir)
        finally:
            assert broker.stop() == 0, broker.log.read_text()[-2000:]


@pytest.fixture(autouse=True)
def no_last_good_fallback(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test passes only if every fetch it caused reached the origin: a refused refetch
    answered with the last good copy would have hidden a document change."""
    yield
    if "deployment" in request.fixturenames:
        deployment: Deployment = request.getfixturevalue("deployment")
        stale = [line for line in read_json_lines(deployment.broker.log) if line.get("event") == "cimd_refetch_failed"]
        assert not stale, f"the broker answered a last good copy instead of fetching: {stale}"


# -- approval ---------------------------------------------------------------------------------


def test_unknown_document_is_recorded_pending_and_refused(deployment: Deployment) -> None:
    key = ClientKey()
    client = deployment.publish("unknown", key)

    answer = deployment.ask(client, key)

    assert answer.status == 400, answer.body
    assert answer.body["error"] == "unauthorized_client"
    assert f"tokenbroker clients approve {client.url}" in answer.body["error_description"]
    shown = deployment.show(client)
    assert shown["status"] == "pending"
    assert shown["approver"] is None
    assert shown["pinned_thumbprints"] == [key.thumbprint]
    assert shown["document_domain"] == "127.0.0.1"
    assert shown["document_fingerprint"] == client.fingerprint
    assert shown["binding"] == "dpop"
    [event] = deployment.events("client_pending", client)
    assert event["action"] == "deny"
    assert event["signal"] == "governance"
    assert event["evidence"]["document_fingerprint"] == client.fingerprint
    [refusal] = deployment.audit(client=client.url, decision="refuse")
    assert refusal["rule"] == "client.pending"
    assert deployment.documents.count(client.path) == 1  # the broker fetched it once


def test_pending_client_approved_with_the_cli_gets_dpop_bound_tokens(deployment: Deployment) -> None:
    key = ClientKey()
    client = deployment.publish("approved-later", key)
    assert deployment.ask(client, key).status == 400  # pending first

    deployment.approve(client, by="alice")
    answer = deployment.ask(client, key)

    claims = deployment.check_access_token(answer, client)
    assert claims["sid"] == answer.body["session_id"]
    shown = deployment.show(client)
    assert shown["status"] == "approved"
    assert shown["approver"] == "alice"
    assert shown["approval_rule"] == "manual"
    assert shown["approved_at"] is not None
    assert shown["approved_until"] is not None
    assert shown["pinned_thumbprints"] == [key.thumbprint]
    [grant] = deployment.audit(client=client.url, decision="grant")
    assert grant["session"] == answer.body["session_id"]
    assert grant["approved_by"] == "alice"
    assert grant["approval_rule"] == "manual"


def test_changed_key_set_sends_the_client_back_to_pending(deployment: Deployment) -> None:
    old, new = ClientKey(), ClientKey()
    client = deployment.publish("rotating", old)
    deployment.approve(client, by="alice")  # approved before its first request: pins `old`
    deployment.check_access_token(deployment.ask(client, old), client)

    deployment.publish("rotating", new, client=client)  # the document now lists only `new`
    with_new = deployment.ask(client, new)

    assert with_new.status == 400, with_new.body
    assert with_new.body["error"] == "unauthorized_client"
    assert f"tokenbroker clients approve {client.url}" in with_new.body["error_description"]
    shown = deployment.show(client)
    assert shown["status"] == "pending"
    assert shown["pinned_thumbprints"] == [old.thumbprint]  # what was approved, until approved again
    assert shown["document_fingerprint"] == client.fingerprint
    [event] = deployment.events("client_document_changed", client)
    assert event["action"] == "deny"
    assert event["severity"] == "critical"
    assert event["evidence"]["pinned"] == [old.thumbprint]
    assert event["evidence"]["document"] == [new.thumbprint]
    assert event["evidence"]["document_fingerprint"] == client.fingerprint

    with_old = deployment.ask(client, old)  # the key the document dropped
    assert with_old.status == 401, with_old.body
    assert with_old.body["error"] == "invalid_client"

    # Approving again pins the new key only once the operator says it reviewed the change.
    refused = deployment.cli("clients", "approve", client.url, "--by", "bob", check=False)
    assert refused.returncode != 0
    assert "changed since it was recorded" in refused.stderr
    wrong = deployment.cli("clients", "approve", client.url, "--expect-thumbprint", "A" * 43, check=False)
    assert wrong.returncode != 0
    assert "not the --expect-thumbprint ones" in wrong.stderr
    deployment.approve(client, "bob", "--accept-new-keys")  # the operator looked at the new document
    deployment.check_access_token(deployment.ask(client, new), client)
    assert deployment.show(client)["pinned_thumbprints"] == [new.thumbprint]
    assert deployment.ask(client, old).status == 401  # the dropped key stays refused
    assert len(deployment.events("client_document_changed", client, wait=0)) == 1


def test_trusted_domain_is_approved_automatically_and_still_pinned(deployment: Deployment) -> None:
    key, other = ClientKey(), ClientKey()
    client = deployment.publish("trusted", key, host=TRUSTED_DOMAIN)
    assert client.url.startswith(f"https://{TRUSTED_DOMAIN}:")

    answer = deployment.ask(client, key)  # its first request

    deployment.check_access_token(answer, client)
    shown = deployment.show(client)
    assert shown["status"] == "approved"
    assert shown["approver"] == "policy"
    assert shown["approval_rule"] == f"trusted_domain:{TRUSTED_DOMAIN}"
    assert shown["document_domain"] == TRUSTED_DOMAIN
    assert shown["pinned_thumbprints"] == [key.thumbprint]
    assert deployment.events("client_pending", client, wait=0) == []
    [grant] = deployment.audit(client=client.url, decision="grant")
    assert grant["approved_by"] == "policy"
    assert grant["approval_rule"] == f"trusted_domain:{TRUSTED_DOMAIN}"

    deployment.publish("trusted", other, client=client)  # trusted, yet a key swap is not silent
    swapped = deployment.ask(client, other)
    assert swapped.status == 400, swapped.body
    assert swapped.body["error"] == "unauthorized_client"
    assert deployment.show(client)["status"] == "pending"
    assert len(deployment.events("client_document_changed", client)) == 1


# -- accountability ---------------------------------------------------------------------------


def test_audit_chain_verifies_and_why_names_the_approval_and_document(deployment: Deployment) -> None:
    key = ClientKey()
    client = deployment.publish("audited", key)
    deployment.approve(client, by="alice")
    answer = deployment.ask(client, key)
    deployment.check_access_token(answer, client)
    session_id = answer.body["session_id"]
    assert deployment.ask(client, ClientKey()).status == 401  # one more line after the grant

    verified = deployment.cli("audit", "verify", str(deployment.audit_file))
    assert "chain intact" in verified.stdout

    why = json.loads(deployment.cli("audit", "why", session_id, "--file", str(deployment.audit_file)).stdout)
    assert why["verified"] is True
    assert why["sessions"] == [session_id]
    assert why["clients"] == [client.url]
    [let_in] = [d for d in why["decisions"] if d["role"] == "let_in"]
    assert let_in["client"] == client.url
    assert let_in["approved_by"] == "alice"
    assert let_in["approval_rule"] == "manual"
    assert isinstance(let_in["approved_at"], int)
    assert let_in["document_fingerprint"] == client.fingerprint
    assert let_in["document_domain"] == "127.0.0.1"
    assert let_in["owners"]["approver"] == "alice"

    # One line edited (the grant, which is not the last line): verify names it.
    edited = deployment.workdir / "audit-edited.jsonl"
    lines = deployment.audit_file.read_bytes().splitlines(keepends=True)
    [number] = [i for i, line in enumerate(lines, 1) if session_id.encode() in line and b'"grant"' in line]
    assert number < len(lines)
    lines[number - 1] = lines[number - 1].replace(b'"approved_by":"alice"', b'"approved_by":"mallory"')
    edited.write_bytes(b"".join(lines))
    broken = deployment.cli("audit", "verify", str(edited), check=False)
    assert broken.returncode == 1, broken.stdout
    assert f"line {number}: its hash is not the prev that line {number + 1} records" in broken.stderr, broken.stderr
    refused_why = deployment.cli("audit", "why", session_id, "--file", str(edited), check=False)
    assert refused_why.returncode == 1, refused_why.stdout


# -- SSRF at the door -------------------------------------------------------------------------

# Client ids the door must refuse before any connection; the probe adds a loopback one.
PRIVATE_CLIENT_IDS = (
    "https://10.0.0.1/client.json",
    "https://192.168.1.1:8443/client.json",
    "https://169.254.169.254/latest/meta-data/client.json",
    "https://[fd00:ec2::254]/client.json",
    "https://[::ffff:10.0.0.1]/client.json",
    "https://100.64.0.1/client.json",
)


def _isolation_command() -> list[str] | None:
    """A command prefix running a program in a new network namespace with only loopback
    (up), or None when this machine cannot make one."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return None
    probe = subprocess.run(
        [unshare, "-rn", ip, "link", "set", "lo", "up"], capture_output=True, timeout=10, check=False
    )
    if probe.returncode != 0:
        return None
    return [unshare, "-rn", "sh", "-c", f'"{ip}" link set lo up && exec "$0" "$@"']


def test_private_and_metadata_addresses_are_refused_before_any_connection(tmp_path: Path) -> None:
    isolate = _isolation_command()
    if isolate is None:
        message = "no network namespace (`unshare -rn`): cannot guarantee no packet leaves, so this is not run"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "probe.json"
    command = [*isolate, sys.executable, str(Path(__file__).resolve()), "--ssrf-probe", str(tmp_path), str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBROKER_")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=50, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(out.read_text())

    assert probe["interfaces"] == ["lo"]  # nothing in the namespace leads off the machine
    asked = probe["answers"]
    assert set(asked) == {*PRIVATE_CLIENT_IDS, probe["loopback_client_id"]}
    for client_id, answer in asked.items():
        assert answer["status"] == 401, (client_id, answer)
        assert answer["body"]["error"] == "invalid_client", (client_id, answer)
        assert "could not be fetched" in answer["body"]["error_description"], (client_id, answer)  # not why
        assert answer["rules"] == ["cimd.blocked_address"], (client_id, answer)
    assert probe["document_requests"] == 0  # the server that would have answered saw nothing
    assert probe["tls_handshakes"] == 0


def _ssrf_probe(workdir: Path, out: Path) -> None:
    """Inside the namespace: a broker WITHOUT the loopback allowance, an HTTPS server on
    127.0.0.1 serving a valid document (so a guard that let a fetch through would be seen
    to succeed), and one token request per client id. Nothing is sent unless the namespace
    holds only loopback."""
    interfaces = sorted(name for _, name in socket.if_nameindex())
    if interfaces != ["lo"]:
        out.write_text(json.dumps({"interfaces": interfaces}))
        raise SystemExit(f"not in a network namespace with only loopback ({interfaces}): nothing was sent")
    ca = make_test_ca(workdir / "ca")
    cert_file, key_file = ca.issue(dns_names=("localhost",), ips=("127.0.0.1",))
    Keyring.generate().save(workdir / "keys.json")
    key = ClientKey()
    broker = BrokerProcess(workdir, {})
    broker.env = broker_env(
        workdir,
        broker.http_url,
        cimd_ca_file=str(ca.ca_file),
        cimd_default_audiences=json.dumps([AUDIENCE]),
        cimd_trusted_domains=json.dumps(["localhost"]),  # trust does not open the address guard
    )
    answers: dict[str, Any] = {}
    with HttpsServer(cert_file, key_file) as documents:
        loopback = documents.url("/clients/loopback.json")
        documents.replies["/clients/loopback.json"] = Reply.json(document(loopback, key), cache_control=NO_CACHE)
        broker.start()
        try:
            for client_id in (*PRIVATE_CLIENT_IDS, loopback):
                answer = ask_token(f"{broker.http_url}/token", broker.http_url, client_id, key)
                answers[client_id] = {"status": answer.status, "body": answer.body}
        finally:
            broker.stop()
        seen = {"document_requests": len(documents.requests), "tls_handshakes": len(documents.sni_names)}
    audit = read_json_lines(workdir / "audit.jsonl")
    for client_id, answer in answers.items():
        answer["rules"] = [line.get("rule") for line in audit if line.get("client") == client_id]
    result = {
        "interfaces": interfaces,
        "answers": answers,
        "loopback_client_id": loopback,
        **seen,
    }
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the SSRF probe of test_cimd_e2e.py (run in a network namespace)")
    parser.add_argument("--ssrf-probe", nargs=2, metavar=("WORKDIR", "OUT"), type=Path, required=True)
    arguments = parser.parse_args()
    _ssrf_probe(*arguments.ssrf_probe)
