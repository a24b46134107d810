"""The registry's dynamic client state shared through Redis (issue 11, "Shared state";
DESIGN "Clients"): with `redis_url` set, pending clients, approvals and pinned documents
are shared by every replica, and an approval made on one takes effect on all of them
within a second; the TOML file stays the embedded default.

Every test runs real redis-server processes (one of its own, or the session's three-master
Cluster under a prefix of its own) and real registry files: each replica is a
`SharedRegistry` on its own TOML file, built the way `serve` builds it (on a
`RedisStore`). The operator's side is the real CLI (CliRunner) with the settings of
replica A. CIMD approvals fetch a real document from a local HTTPS server with a
throwaway CA. The end-to-end test runs two `tokenbroker serve` processes on one Redis."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric import ed25519
from redis.crc import key_slot

from tokenbroker import Keyring, ProofSigner, registry_shared
from tokenbroker.cimd import jwk_thumbprint
from tokenbroker.cli import main
from tokenbroker.client import BrokerClient
from tokenbroker.client_assertion import make_client_assertion, public_jwk
from tokenbroker.errors import InvalidArgumentError, StoreUnavailableError, TokenBrokerError
from tokenbroker.registry import ClientRecord, ClientStatus, ServerRecord
from tokenbroker.registry_file import FileRegistry, hash_secret
from tokenbroker.registry_shared import DYNAMIC_FIELDS, SharedRegistry, registry_keys
from tokenbroker.store.redis import RedisStore

from support.broker_process import BrokerProcess, broker_env
from support.https_servers import HttpsServer, Reply, make_test_ca
from support.redis_servers import RedisCluster, RedisServer

pytestmark = pytest.mark.timeout(120)

ISSUER = "https://broker.shared.test"
AUDIENCE = "https://mcp.shared.test/mcp"
PROPAGATION_SECONDS = 1.0  # the issue's promise: an approval applies everywhere within a second
THUMBPRINT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
OTHER_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
CIMD_ID = "https://agents.example.com/clients/a.json"


# -- helpers ----------------------------------------------------------------------------------


def key_client(client_id: str = "agent", key: ed25519.Ed25519PrivateKey | None = None, **fields: Any) -> ClientRecord:
    """A client with an Ed25519 key, defined in a registry file (pending unless told)."""
    return ClientRecord(
        client_id,
        public_jwk=public_jwk(key or ed25519.Ed25519PrivateKey.generate()),
        allowed_audiences=(AUDIENCE,),
        allowed_scopes=("tools:call",),
        **fields,
    )


def cimd_record(client_id: str = CIMD_ID, **fields: Any) -> ClientRecord:
    """What `CimdClients` records when it first sees a CIMD client: pending, pinned."""
    values: dict[str, Any] = {
        "pinned_thumbprints": (THUMBPRINT,),
        "document_fingerprint": "3f" * 32,
        "document_domain": "agents.example.com",
        "allowed_audiences": (AUDIENCE,),
        "allowed_scopes": ("tools:call",),
    }
    values.update(fields)
    return ClientRecord(client_id, **values)


def eventually(check: Callable[[], bool], within: float, *, what: str) -> float:
    """Seconds until `check()` held; fails when it did not within `within` seconds."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            pytest.fail(f"{what}: not within {within} s")
        time.sleep(0.01)
    return time.monotonic() - start


def status_of(registry: SharedRegistry, client_id: str = "agent") -> str | None:
    record = registry.client(client_id)
    return None if record is None else record.status.value


@dataclass
class Replicas:
    """Two replicas (each its own registry file, its own store client) on one Redis."""

    url: str
    a_file: Path
    b_file: Path
    a: SharedRegistry
    b: SharedRegistry
    stores: list[RedisStore]

    def env(self, registry_file: Path | None = None, **extra: str) -> dict[str, str]:
        """The CLI's settings on replica A's machine (or another registry file)."""
        return {
            "TOKENBROKER_REGISTRY_FILE": str(registry_file or self.a_file),
            "TOKENBROKER_REDIS_URL": self.url,
            "TOKENBROKER_ISSUER": ISSUER,
            **extra,
        }


def replica(path: Path, url: str, *, prefix: str = "tb", cluster: bool = False, **options: Any) -> Any:
    """A replica's registry as `serve` builds it: on the Redis store's client."""
    store = RedisStore.from_url(url, cluster=cluster, prefix=prefix)
    return SharedRegistry.for_store(path, store, **options), store


def start_replicas(tmp_path: Path, url: str, **options: Any) -> Replicas:
    a_file, b_file = tmp_path / "a" / "registry.toml", tmp_path / "b" / "registry.toml"
    key = ed25519.Ed25519PrivateKey.generate()
    for path in (a_file, b_file):  # the same static client in both files (config management)
        FileRegistry(path).add_client(key_client(key=key))
    a, store_a = replica(a_file, url, **options)
    b, store_b = replica(b_file, url, **options)
    return Replicas(url, a_file, b_file, a, b, [store_a, store_b])


@pytest.fixture
def replicas(tmp_path: Path, redis_server: RedisServer, no_tokenbroker_env: None) -> Iterator[Replicas]:
    pair = start_replicas(tmp_path, redis_server.url, poll_seconds=0.1, stale_after_seconds=1.0)
    try:
        yield pair
    finally:
        for registry in (pair.a, pair.b):
            registry.close()
        for store in pair.stores:
            store.close()


def cli(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def ok(env: dict[str, str], *args: str) -> Result:
    result = cli(env, *args)
    assert result.exit_code == 0, result.output
    return result


def file_status(path: Path, client_id: str = "agent") -> str | None:
    record = FileRegistry(path).client(client_id)
    return None if record is None else record.status.value


# -- replicas see each other's state ----------------------------------------------------------


def test_a_pending_cimd_client_recorded_by_one_replica_is_seen_by_the_other(replicas: Replicas) -> None:
    record = cimd_record()
    replicas.a.put_client(record)  # what CimdClients does when it first sees the client
    eventually(lambda: replicas.b.client(CIMD_ID) is not None, PROPAGATION_SECONDS, what="B sees the pending client")
    assert replicas.b.client(CIMD_ID) == record
    assert [r.client_id for r in replicas.b.clients()] == ["agent", CIMD_ID]
    # It lives in Redis alone: neither file holds it.
    assert FileRegistry(replicas.a_file).client(CIMD_ID) is None
    assert FileRegistry(replicas.b_file).client(CIMD_ID) is None


def test_cli_approve_with_replica_a_settings_approves_on_replica_b_within_a_second(replicas: Replicas) -> None:
    assert status_of(replicas.b) == "pending"
    started = time.time()
    ok(replicas.env(), "clients", "approve", "agent", "--by", "alice", "--for-days", "30")
    took = eventually(
        lambda: status_of(replicas.b) == "approved", PROPAGATION_SECONDS, what="B sees the approval made through A"
    )
    record = replicas.b.client("agent")
    assert record is not None
    assert (record.approved_by, record.approval_rule) == ("alice", "manual")
    assert record.approved_at is not None
    assert started - 1 <= record.approved_at <= time.time()
    assert record.approved_until == record.approved_at + 30 * 86_400
    assert record.public_jwk is not None  # its key still comes from B's own file
    # The approval went through Redis: neither file changed.
    assert file_status(replicas.a_file) == file_status(replicas.b_file) == "pending"
    assert took <= PROPAGATION_SECONDS

    ok(replicas.env(), "clients", "disable", "agent")
    eventually(lambda: status_of(replicas.b) == "disabled", PROPAGATION_SECONDS, what="B sees the disable")
    # An operator on B's machine reads the same shared state.
    shown = json.loads(ok(replicas.env(replicas.b_file), "clients", "show", "agent").stdout)
    assert (shown["status"], shown["approver"]) == ("disabled", "alice")
    listed = json.loads(ok(replicas.env(replicas.b_file), "clients", "list", "--json").stdout)
    assert [(c["client_id"], c["status"]) for c in listed] == [("agent", "disabled")]


def test_without_redis_url_the_cli_changes_the_file_and_not_the_shared_state(replicas: Replicas) -> None:
    env = replicas.env()
    del env["TOKENBROKER_REDIS_URL"]
    ok(env, "clients", "approve", "agent", "--by", "bob")
    assert file_status(replicas.a_file) == "approved"  # the embedded default: the file
    # Redis holds no state for the client, so replica A follows its file once it re-reads
    # it (at most once a second); B's file still says pending, and so does B.
    eventually(lambda: status_of(replicas.a) == "approved", 2.0, what="A follows its own file")
    assert status_of(replicas.b) == "pending"
    raw = redis.Redis.from_url(replicas.url, decode_responses=True)
    assert raw.hlen(registry_keys("tb")[3]) == 0
    raw.close()


def test_static_edits_go_to_the_file_and_dynamic_state_to_redis(replicas: Replicas) -> None:
    ok(replicas.env(), "clients", "update", "agent", "--audience", "https://other.test/mcp", "--owner", "team-x")
    on_file = FileRegistry(replicas.a_file).client("agent")
    assert on_file is not None
    assert on_file.allowed_audiences == ("https://other.test/mcp",)
    assert on_file.owner == "team-x"
    # B's own file (its static configuration) is B's: the edit does not travel.
    time.sleep(0.3)
    record_b = replicas.b.client("agent")
    assert record_b is not None
    assert record_b.allowed_audiences == (AUDIENCE,)
    # A dynamic change keeps A's static edit and reaches B.
    updated = replicas.a.update_client("agent", status=ClientStatus.APPROVED, approved_by="carol")
    assert updated.allowed_audiences == ("https://other.test/mcp",)
    assert updated.status is ClientStatus.APPROVED
    eventually(lambda: status_of(replicas.b) == "approved", PROPAGATION_SECONDS, what="B sees the approval")


def test_pinned_thumbprints_and_the_document_version_travel(replicas: Replicas) -> None:
    replicas.b.put_client(cimd_record())
    eventually(lambda: replicas.a.client(CIMD_ID) is not None, PROPAGATION_SECONDS, what="A sees the record")
    replicas.a.update_client(
        CIMD_ID,
        status=ClientStatus.APPROVED,
        approved_by="alice",
        approved_at=int(time.time()),
        approved_until=int(time.time()) + 86_400,
        approval_rule="manual",
        pinned_thumbprints=(OTHER_THUMBPRINT, THUMBPRINT),
        document_fingerprint="ab" * 32,
    )

    def pinned_on_b() -> bool:
        record = replicas.b.client(CIMD_ID)
        return record is not None and record.pinned_thumbprints == (OTHER_THUMBPRINT, THUMBPRINT)

    eventually(pinned_on_b, PROPAGATION_SECONDS, what="B sees the new pins")
    record = replicas.b.client(CIMD_ID)
    assert record is not None
    assert (record.status, record.document_fingerprint, record.document_domain) == (
        ClientStatus.APPROVED,
        "ab" * 32,
        "agents.example.com",
    )


def test_cli_approval_of_cimd_clients_pins_their_document_on_every_replica(replicas: Replicas, tmp_path: Path) -> None:
    ca = make_test_ca(tmp_path / "ca")
    cert_file, key_file = ca.issue(dns_names=("localhost",), ips=("127.0.0.1",))
    keys = [ed25519.Ed25519PrivateKey.generate() for _ in range(2)]
    with HttpsServer(cert_file, key_file) as documents:
        urls = {name: documents.url(f"/clients/{name}.json") for name in ("seen", "unseen")}
        for name, url in urls.items():
            body = {
                "client_id": url,
                "token_endpoint_auth_method": "private_key_jwt",
                "jwks": {"keys": [public_jwk(key) for key in keys]},
            }
            documents.replies[f"/clients/{name}.json"] = Reply.json(body, cache_control="max-age=0")
        env = replicas.env(TOKENBROKER_CIMD_CA_FILE=str(ca.ca_file), TOKENBROKER_CIMD_ALLOW_LOOPBACK="true")
        # "seen": replica B recorded it pending (first request, before approval), unpinned;
        # "unseen": approved before its first request.
        replicas.b.put_client(cimd_record(urls["seen"], pinned_thumbprints=(), document_domain="127.0.0.1"))
        for url in urls.values():
            ok(env, "clients", "approve", url, "--by", "alice")
    pins = tuple(sorted(jwk_thumbprint(public_jwk(key)) for key in keys))
    for url in urls.values():

        def approved_on_b(url: str = url) -> bool:
            record = replicas.b.client(url)
            return record is not None and record.status is ClientStatus.APPROVED

        eventually(approved_on_b, PROPAGATION_SECONDS, what=f"B sees the approval of {url}")
        record = replicas.b.client(url)
        assert record is not None
        assert (record.pinned_thumbprints, record.approved_by, record.document_domain) == (pins, "alice", "127.0.0.1")
        assert FileRegistry(replicas.a_file).client(url) is None  # in Redis only


def test_two_replicas_changing_one_client_at_once_lose_neither_change(replicas: Replicas) -> None:
    rounds = 25
    start = threading.Barrier(2)
    failures: list[BaseException] = []

    def change(registry: SharedRegistry, field: str, tag: str) -> None:
        try:
            start.wait()
            for i in range(rounds):
                registry.update_client("agent", **{field: f"{tag}{i}"})
        except BaseException as exc:  # reported below: a thread's failure must fail the test
            failures.append(exc)

    threads = [
        threading.Thread(target=change, args=(replicas.a, "approved_by", "a")),
        threading.Thread(target=change, args=(replicas.b, "document_fingerprint", "b")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    replicas.a.refresh()
    record = replicas.a.client("agent")
    assert record is not None
    assert (record.approved_by, record.document_fingerprint) == (f"a{rounds - 1}", f"b{rounds - 1}")


# -- Redis down: fail closed --------------------------------------------------------------------


def test_writes_fail_closed_with_a_clear_message_when_redis_is_down(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    before = replicas.a_file.read_bytes()
    redis_server.kill()
    with pytest.raises(StoreUnavailableError, match=r"Redis .*writing the shared client registry.*reachable"):
        replicas.a.put_client(cimd_record())
    with pytest.raises(StoreUnavailableError, match="shared client registry"):
        replicas.a.update_client("agent", status=ClientStatus.APPROVED)
    with pytest.raises(StoreUnavailableError, match="shared client registry"):
        replicas.a.add_client(key_client("newcomer"))
    result = cli(replicas.env(), "clients", "approve", "agent", "--by", "alice")
    assert result.exit_code == 1
    message = result.stderr.strip()
    assert "\n" not in message, message
    assert "Redis" in message, message
    assert "reachable" in message, message
    assert "Traceback" not in result.output
    assert replicas.a_file.read_bytes() == before  # nothing half-written


def test_reads_use_the_last_copy_for_the_grace_then_refuse_and_recover(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    replicas.a.update_client("agent", status=ClientStatus.APPROVED, approved_by="alice")
    eventually(lambda: status_of(replicas.b) == "approved", PROPAGATION_SECONDS, what="B sees the approval")
    redis_server.pause()  # a hung Redis: connections stay open, nothing answers
    try:
        paused = time.monotonic()
        # Within the grace the last copy answers at once: the door never waits for Redis.
        while time.monotonic() - paused < 0.5:
            asked = time.monotonic()
            assert status_of(replicas.b) == "approved"
            assert time.monotonic() - asked < 0.05
            time.sleep(0.05)

        def refused() -> bool:
            try:
                replicas.b.client("agent")
            except StoreUnavailableError:
                return True
            return False

        eventually(refused, 1.5, what="B refuses once its copy is older than the grace (1 s)")
        with pytest.raises(StoreUnavailableError, match="no client gets a token until Redis answers"):
            replicas.b.clients()
    finally:
        redis_server.resume()
    eventually(lambda: not _raises(replicas.b.client, "agent"), 3.0, what="B reads again once Redis answers")
    assert status_of(replicas.b) == "approved"


def _raises(call: Callable[..., object], *args: object) -> bool:
    try:
        call(*args)
    except StoreUnavailableError:
        return True
    return False


def test_a_replica_started_while_redis_is_down_lets_nobody_in(tmp_path: Path, redis_server: RedisServer) -> None:
    path = tmp_path / "registry.toml"
    FileRegistry(path).add_client(key_client(status=ClientStatus.APPROVED))
    redis_server.kill()
    registry, store = replica(path, redis_server.url, poll_seconds=0.1, stale_after_seconds=1.0)
    try:
        with pytest.raises(StoreUnavailableError, match="has not been read"):
            registry.client("agent")  # even a client its file approves: Redis may have disabled it
        redis_server.start()
        eventually(lambda: not _raises(registry.client, "agent"), 3.0, what="reads once Redis answers")
        assert status_of(registry) == "approved"  # no shared state: as its file says
    finally:
        registry.close()
        store.close()


def test_lost_redis_state_refuses_cimd_clients_and_falls_back_to_the_file(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    replicas.a.put_client(cimd_record(status=ClientStatus.APPROVED, approved_by="alice", approval_rule="manual"))
    replicas.a.update_client("agent", status=ClientStatus.DISABLED)
    eventually(lambda: status_of(replicas.b) == "disabled", PROPAGATION_SECONDS, what="B sees the state")
    redis_server.restart()  # the same port, empty: the shared state is gone
    eventually(lambda: replicas.b.client(CIMD_ID) is None, 3.0, what="B forgets the lost CIMD approval")
    assert status_of(replicas.b) == "pending"  # as its file says


# -- bounds and bad entries -------------------------------------------------------------------


def test_the_shared_registry_is_bounded_and_says_how_to_make_room(tmp_path: Path, redis_server: RedisServer) -> None:
    registry, store = replica(tmp_path / "registry.toml", redis_server.url, max_clients=3)
    try:
        for i in range(3):
            registry.put_client(cimd_record(f"https://agents.example.com/{i}.json"))
        with pytest.raises(InvalidArgumentError, match=r"maximum of 3 clients.*tokenbroker clients remove"):
            registry.put_client(cimd_record("https://agents.example.com/3.json"))
        registry.update_client("https://agents.example.com/0.json", status=ClientStatus.DISABLED)  # no new entry
        registry.remove_client("https://agents.example.com/1.json")
        registry.put_client(cimd_record("https://agents.example.com/3.json"))  # room again
        huge = cimd_record(
            "https://agents.example.com/big.json",
            allowed_audiences=tuple(f"https://mcp{i}.example.com/{'x' * 60}" for i in range(300)),
        )
        registry.remove_client("https://agents.example.com/2.json")
        with pytest.raises(InvalidArgumentError, match="too large for the shared registry"):
            registry.put_client(huge)
        assert [r.client_id for r in registry.clients()] == [
            "https://agents.example.com/0.json",
            "https://agents.example.com/3.json",
        ]
    finally:
        registry.close()
        store.close()


def test_a_replica_behind_forgotten_removals_reloads_everything(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_shared, "MAX_REMOVED", 2)  # keep the last 2 removals only
    writer, store_a = replica(tmp_path / "a.toml", redis_server.url, follow=False)
    reader, store_b = replica(tmp_path / "b.toml", redis_server.url, follow=False)  # reads when told
    ids = [f"https://agents.example.com/{i}.json" for i in range(4)]
    try:
        for client_id in ids:
            writer.put_client(cimd_record(client_id))
        reader.refresh()
        assert [r.client_id for r in reader.clients()] == ids
        for client_id in ids[:3]:  # the first removal is forgotten by the time the reader looks
            writer.remove_client(client_id)
        reader.refresh()
        assert [r.client_id for r in reader.clients()] == ids[3:]
    finally:
        for registry, store in ((writer, store_a), (reader, store_b)):
            registry.close()
            store.close()


def test_many_changes_are_read_over_several_polls(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_shared, "_POLL_LIMIT", 2)  # at most 2 changes per read
    ids = [f"https://agents.example.com/{i}.json" for i in range(5)]
    writer, store_a = replica(tmp_path / "a.toml", redis_server.url, follow=False)
    writer.put_client(cimd_record(ids[0]))
    reader, store_b = replica(tmp_path / "b.toml", redis_server.url, follow=False)  # has read ids[0]
    try:
        for client_id in ids[1:]:
            writer.put_client(cimd_record(client_id))
        writer.remove_client(ids[0])
        seen = []
        for _ in range(4):
            reader.refresh()
            seen.append(len(reader._copy.entries))
        assert seen[0] == 2  # cut at the limit ...
        assert [r.client_id for r in reader.clients()] == ids[1:]  # ... and complete after a few reads
    finally:
        for registry, store in ((writer, store_a), (reader, store_b)):
            registry.close()
            store.close()


def test_an_unreadable_entry_refuses_its_client_until_written_again(replicas: Replicas) -> None:
    replicas.a.update_client("agent", status=ClientStatus.APPROVED)
    eventually(lambda: status_of(replicas.b) == "approved", PROPAGATION_SECONDS, what="B sees the approval")
    raw = redis.Redis.from_url(replicas.url, decode_responses=True)
    meta, changes, _, clients = registry_keys("tb")
    version = raw.hincrby(meta, "version", 1)
    raw.hset(clients, "agent", '{"v": 1, "kind": "state", "record": {"status": "approved", "public_jwk": {}}}')
    raw.zadd(changes, {"agent": version})
    eventually(lambda: replicas.b.client("agent") is None, PROPAGATION_SECONDS, what="B refuses the bad entry")
    raw.close()
    replicas.a.update_client("agent", status=ClientStatus.APPROVED, approved_by="alice")
    eventually(lambda: status_of(replicas.b) == "approved", PROPAGATION_SECONDS, what="B accepts the rewritten entry")


def test_every_key_lives_in_one_cluster_slot() -> None:
    slots = {key_slot(key.encode()) for prefix in ("tb", "other") for key in registry_keys(prefix)}
    assert len(slots) == 1


def test_replicas_share_state_on_a_redis_cluster(
    tmp_path: Path, redis_cluster: RedisCluster, no_tokenbroker_env: None
) -> None:
    prefix = f"tbtest{time.monotonic_ns()}"
    pair = start_replicas(tmp_path, redis_cluster.url, cluster=True, prefix=prefix, poll_seconds=0.1)
    try:
        pair.a.put_client(cimd_record())
        pair.a.update_client("agent", status=ClientStatus.APPROVED, approved_by="alice")
        eventually(lambda: status_of(pair.b) == "approved", PROPAGATION_SECONDS, what="B sees the approval")
        assert pair.b.client(CIMD_ID) == cimd_record()
        pair.a.remove_client(CIMD_ID)
        eventually(lambda: pair.b.client(CIMD_ID) is None, PROPAGATION_SECONDS, what="B sees the removal")
    finally:
        for registry in (pair.a, pair.b):
            registry.close()
        for store in pair.stores:
            store.close()


def test_only_the_dynamic_fields_are_shared() -> None:
    assert set(DYNAMIC_FIELDS) <= set(ClientRecord.__dataclass_fields__)
    static_governance = {"owner", "key_created_at", "key_not_after", "spiffe_id", "require_attestation"}
    assert not static_governance & set(DYNAMIC_FIELDS)


# -- end to end: two `tokenbroker serve` processes on one Redis -------------------------------


def test_an_approval_through_the_cli_makes_both_serve_processes_grant(
    tmp_path: Path, redis_server: RedisServer, no_tokenbroker_env: None
) -> None:
    client_key = ed25519.Ed25519PrivateKey.generate()
    brokers = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        Keyring.generate().save(workdir / "keys.json")
        registry = FileRegistry(workdir / "registry.toml")
        registry.add_client(key_client(key=client_key))  # pending in both files
        registry.add_server(ServerRecord("mcp", audiences=(AUDIENCE,), api_key_hash=hash_secret("k" * 40)))
        env = {**broker_env(workdir, ISSUER, audit=False), "TOKENBROKER_REDIS_URL": redis_server.url}
        brokers.append(BrokerProcess(workdir, env))
    try:
        for broker in brokers:
            broker.start()

        def issue(broker: BrokerProcess) -> str:
            signer = ProofSigner()
            try:
                with BrokerClient(broker.target, timeout=5) as client:
                    client.issue(
                        client_id="agent",
                        client_assertion=make_client_assertion(client_key, "agent", ISSUER),
                        audience=AUDIENCE,
                        scopes=["tools:call"],
                        dpop_jkt=signer.jkt,
                    )
            except TokenBrokerError as exc:
                return str(exc)
            return "granted"

        def answers(broker: BrokerProcess, fragment: str) -> Callable[[], bool]:
            return lambda: fragment in issue(broker)

        assert all("pending approval" in issue(broker) for broker in brokers)
        # The operator approves with broker A's settings, then disables with B's.
        ok({**brokers[0].env}, "clients", "approve", "agent", "--by", "alice")
        for broker in brokers:
            eventually(answers(broker, "granted"), 2.0, what=f"{broker.target} grants")
        ok({**brokers[1].env}, "clients", "disable", "agent")
        for broker in brokers:
            eventually(answers(broker, "disabled"), 2.0, what=f"{broker.target} refuses")
    finally:
        for broker in brokers:
            assert broker.stop() == 0, broker.log.read_text()[-2000:]
