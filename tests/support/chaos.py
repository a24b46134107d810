"""The chaos suite's load and its judge: steady mixed traffic on two real `tokenbroker
serve` processes that share Redis, with every answer checked against what the traffic
itself knows, while a test injects one fault.

- `ChaosDeployment`: keys, a registry (several `private_key_jwt` DPoP clients, so a Redis
  Cluster spreads their sessions over its masters; one MCP server; an admin) and two
  brokers behind one public name, on whatever Redis URL the test gives.
- `Traffic`: worker threads, each looping over a mix: IssueToken (gRPC), ValidateToken
  with a fresh DPoP proof on a random broker, the same proof again on the other broker (a
  replay), RevokeSession, OAuth `/token` (HTTP, assertion and DPoP proof) and the same
  assertion again (a replayed assertion). Every answer is an `Answer`.
- `Judge` (inside `Traffic`): the rules every answer must keep, whatever the fault:
  * never valid=true for a session whose revocation was acknowledged before the
    validation was sent;
  * never valid=true for a proof that was already accepted, nor a grant for an assertion
    that was already granted;
  * never valid=true, after a state loss (`Traffic.state_lost`), for a token issued
    before it (tokens of the lost part only, on a cluster);
  * never valid=true while the store is unreachable (`Traffic.store_down` ... `store_up`:
    fail closed);
  * every answer within `answer_bound` seconds, and no answer but a decision or
    UNAVAILABLE (RESOURCE_EXHAUSTED, INTERNAL or a client-side deadline is a failure).
- `Fault`, `measure`: what the README's table reports of one fault: the unavailability
  window (first to last UNAVAILABLE answer, sent after the fault began), the recovery time
  (from the fault's end to the first success of every kind of call sent after it), the
  answers checked, and the brokers' threads and RSS before, during and after.

Plain helpers, no pytest."""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from cryptography.hazmat.primitives.asymmetric import ed25519

from tokenbroker import Keyring, LimitPolicy, ProofSigner, Reason
from tokenbroker.client import BrokerClient
from tokenbroker.client_assertion import make_client_assertion, public_jwk
from tokenbroker.errors import StoreUnavailableError, TokenBrokerError
from tokenbroker.registry import Binding, ClientRecord, ClientStatus, ServerRecord
from tokenbroker.registry_file import FileRegistry, hash_secret
from tokenbroker.status import status_name_of
from tokenbroker.store.redis_keys import tag
from tokenbroker_bench.servers import free_port

from support.broker_process import BrokerProcess, broker_env

ISSUER = "https://broker.chaos.test"
TOKEN_URL = f"{ISSUER}/token"
AUDIENCE = "https://mcp.chaos.test/mcp"
SERVER_KEY = "chaos-server-" + "s" * 40
ADMIN_KEY = "chaos-admin-" + "a" * 40
CLIENTS = tuple(f"agent-{i}" for i in range(6))
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# The broker's Redis timeout is 0.5 s with one immediate retry (RedisStore.from_url), and a
# WAIT adds redis_replica_timeout_ms: an UNAVAILABLE must come within this, with margin
# for two brokers, Redis and the load sharing two cores.
ANSWER_BOUND_SECONDS = 2.5
CLIENT_DEADLINE_SECONDS = 10.0

# gRPC's reconnect backoff starts at 1 s and grows to 120 s: a client of a restarted broker
# would measure its own backoff. Replicas' clients set it short, and so does this one.
RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)

OK, REFUSED, UNAVAILABLE, FAILED = "ok", "refused", "unavailable", "failed"
# An honest first use refused as a replay: the broker's write of its record reached Redis,
# its reply was lost (a reset, a failover), redis-py retried, and the retry found the
# record. Fail closed, never an acceptance; allowed around a fault only (`measure`).
FALSE_REPLAY = "false_replay"
# What an honest validation may be refused for: its session revoked (by the traffic, or
# evicted), lost with a state loss, or its token expired; anything else is a failure.
HONEST_REFUSALS = frozenset({Reason.SESSION_REVOKED, Reason.SESSION_UNKNOWN, Reason.CLIENT_REVOKED, Reason.EXPIRED})
KINDS = ("issue", "validate", "replay", "revoke", "token", "assertion_replay")
# The tokens the traffic validates and revokes: the newest, and some old ones.
LIVE_POOL = 200


@dataclass
class Answer:
    kind: str
    broker: int
    sent: float  # time.monotonic() when the call was made
    done: float
    outcome: str  # OK, REFUSED (a correct refusal), UNAVAILABLE, FAILED
    detail: str = ""
    client: str = ""  # the client id the call was for

    @property
    def latency(self) -> float:
        return self.done - self.sent


@dataclass
class Live:
    """A token the traffic holds: whom it belongs to and when its issue was acknowledged."""

    token: str
    client_id: str
    session_id: str
    signer: ProofSigner
    issued: float
    revoked: float | None = None  # when its session's revocation was acknowledged


@dataclass
class Loss:
    """A state loss: from `at` on, tokens acknowledged before it (of `clients`, or every
    client when None) must never be valid again."""

    at: float
    clients: frozenset[str] | None = None

    def covers(self, live: Live) -> bool:
        return live.issued < self.at and (self.clients is None or live.client_id in self.clients)


class ChaosDeployment:
    """The files and brokers of one chaos test, in `workdir`; `store_env` names the store."""

    def __init__(self, workdir: Path, store_env: dict[str, str]):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        Keyring.generate().save(workdir / "keys.json")
        self.keys = {c: ed25519.Ed25519PrivateKey.generate() for c in CLIENTS}
        registry = FileRegistry(workdir / "registry.toml")
        for client_id, key in self.keys.items():
            registry.add_client(
                ClientRecord(
                    client_id,
                    status=ClientStatus.APPROVED,
                    public_jwk=public_jwk(key),
                    allowed_audiences=(AUDIENCE,),
                    allowed_scopes=("tools:call",),
                    binding=Binding.DPOP,
                    max_sessions=100_000,
                    limit_policy=LimitPolicy.REJECT,
                )
            )
        registry.add_server(ServerRecord("chaos-server", audiences=(AUDIENCE,), api_key_hash=hash_secret(SERVER_KEY)))
        registry.add_server(ServerRecord("chaos-admin", admin=True, api_key_hash=hash_secret(ADMIN_KEY)))
        # The traffic replays assertions on purpose, from the honest clients' own address:
        # each is a failed authentication, which the default limits would answer by locking
        # 127.0.0.1 out for a minute (as they must an attacker's address).
        limits = {
            "TOKENBROKER_CLIENT_AUTH_FAILURE_BURST": "1000000",
            "TOKENBROKER_CLIENT_AUTH_FAILURES_PER_MINUTE": "1000000",
            "TOKENBROKER_SOURCE_AUTH_FAILURE_BURST": "1000000",
            "TOKENBROKER_SOURCE_AUTH_FAILURES_PER_MINUTE": "1000000",
        }
        self.env = {**broker_env(workdir, ISSUER), **store_env, **limits, "TOKENBROKER_LOG_LEVEL": "warning"}
        self.brokers: list[BrokerProcess] = []

    def start_brokers(self, count: int = 2) -> list[BrokerProcess]:
        for _ in range(count):
            self.brokers.append(BrokerProcess(self.workdir, dict(self.env)).start())
        return self.brokers

    def restart_broker(self, index: int) -> BrokerProcess:
        """A new process on the killed one's ports (as a supervisor restarts a replica)."""
        old = self.brokers[index]
        fresh = BrokerProcess(self.workdir, dict(self.env), port=old.port, http_port=old.http_port)
        self.brokers[index] = fresh.start()
        return fresh

    def assertion(self, client_id: str) -> str:
        return make_client_assertion(self.keys[client_id], client_id, ISSUER)

    def stop(self) -> list[int | None]:
        codes = [b.stop() for b in self.brokers]
        self.brokers.clear()
        return codes


def process_stats(broker: BrokerProcess) -> tuple[int, int]:
    """The broker process's threads and resident memory (KiB), from /proc."""
    if broker.process is None or broker.process.poll() is not None:
        return 0, 0
    threads = rss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{broker.process.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return threads, rss


class Traffic:
    """`workers` threads of mixed calls on the deployment's brokers, judged as they come."""

    def __init__(self, deployment: ChaosDeployment, *, workers: int = 4, seed: int = 7):
        self.d = deployment
        self.workers = workers
        self.answers: list[Answer] = []
        self.violations: list[str] = []
        self.losses: list[Loss] = []
        self.down: list[list[float]] = []  # [start, end] of store outages (end: inf while down)
        self.samples: list[tuple[float, list[tuple[int, int]]]] = []
        self._live: list[Live] = []
        # SHA-256 digests, not the proofs and assertions themselves: a soak accepts
        # millions, and the judge must not slow the load it judges by its own growth.
        self._accepted_proofs: set[bytes] = set()
        self._granted_assertions: set[bytes] = set()
        # How often each rule was put to the test and held: an answer that had to be a
        # refusal (or UNAVAILABLE) and was. A fault whose rule was never tested proves nothing.
        self.rules_held: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._random = random.Random(seed)

    # -- what the test tells the judge ---------------------------------------------------

    def state_lost(self, clients: frozenset[str] | None = None) -> None:
        """Call once the state is certainly lost (the kill returned): from now on no token
        acknowledged before now (of `clients`, or every client) may be valid. Called
        before the kill, a validation sent in between could rightly be answered valid by
        the Redis still alive, and be judged a violation."""
        with self._lock:
            self.losses.append(Loss(time.monotonic(), clients))

    def store_down(self) -> None:
        """Call once the store is certainly unreachable (after the kill returned), and
        `store_up` before it can be reached again: no call that lies wholly between may
        be answered valid=true or granted."""
        with self._lock:
            self.down.append([time.monotonic(), float("inf")])

    def store_up(self) -> None:
        with self._lock:
            self.down[-1][1] = time.monotonic()

    # -- running ----------------------------------------------------------------------------

    def start(self) -> Traffic:
        for i in range(self.workers):
            thread = threading.Thread(target=self._worker, args=(i,), name=f"chaos-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        threading.Thread(target=self._sampler, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=CLIENT_DEADLINE_SECONDS + 5)
            assert not thread.is_alive(), "a traffic thread is stuck"

    def run_for(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _sampler(self) -> None:
        while not self._stop.wait(0.25):
            self.samples.append((time.monotonic(), [process_stats(b) for b in self.d.brokers]))

    def _worker(self, index: int) -> None:
        rng = random.Random(index * 7919 + 1)
        grpc_clients: dict[tuple[int, str], BrokerClient] = {}
        http = httpx.Client(trust_env=False, timeout=CLIENT_DEADLINE_SECONDS)

        def client(broker: int, key: str | None) -> BrokerClient:
            target = self.d.brokers[broker].target
            cached = grpc_clients.get((broker, target + str(key)))
            if cached is None:
                cached = BrokerClient(target, api_key=key, timeout=CLIENT_DEADLINE_SECONDS, options=RECONNECT)
                grpc_clients[(broker, target + str(key))] = cached
            return cached

        try:
            while not self._stop.is_set():
                step = rng.random()
                broker = rng.randrange(len(self.d.brokers))
                if step < 0.25 or not self._live:
                    self._issue(client(broker, None), broker, rng)
                elif step < 0.75:
                    self._validate(client, broker, rng)
                elif step < 0.82:
                    self._revoke(client(broker, ADMIN_KEY), broker, rng)
                else:
                    self._token(http, broker, rng)
        finally:
            http.close()
            for c in grpc_clients.values():
                c.close()

    # -- the calls --------------------------------------------------------------------------

    def _record(self, answer: Answer, violation: str = "") -> None:
        with self._lock:
            self.answers.append(answer)
            if violation:
                self.violations.append(
                    f"{answer.kind} on broker {answer.broker} for {answer.client or '-'} (sent {answer.sent:.3f}, "
                    f"answered {answer.done:.3f}; store down {self.down}): {violation}"
                )

    def _failure(self, exc: BaseException) -> tuple[str, str]:
        """UNAVAILABLE (the store, or a broker that is down) or a failure."""
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        name = status_name_of(cause) if not isinstance(cause, TokenBrokerError) else type(cause).__name__
        if isinstance(exc, StoreUnavailableError) and name == "UNAVAILABLE":
            return UNAVAILABLE, ""
        return FAILED, f"{type(exc).__name__}: {name}: {str(exc)[:200]}"

    def _check_bound(self, answer: Answer) -> str:
        if answer.latency > ANSWER_BOUND_SECONDS:
            return f"answered {answer.outcome} after {answer.latency:.2f} s (bound {ANSWER_BOUND_SECONDS} s)"
        return ""

    def _issue(self, c: BrokerClient, broker: int, rng: random.Random) -> None:
        client_id = rng.choice(CLIENTS)
        signer = ProofSigner()
        sent = time.monotonic()
        try:
            issued = c.issue(
                client_id=client_id,
                client_assertion=self.d.assertion(client_id),
                audience=AUDIENCE,
                scopes=["tools:call"],
                dpop_jkt=signer.jkt,
            )
        except TokenBrokerError as exc:
            outcome, detail = self._failure(exc)
            answer = Answer("issue", broker, sent, time.monotonic(), outcome, detail, client_id)
            self._record(answer, detail or self._check_bound(answer))
            return
        answer = Answer("issue", broker, sent, time.monotonic(), OK, client=client_id)
        self._add_live(Live(issued.access_token, client_id, issued.session_id, signer, answer.done), rng)
        self._record(answer, self._check_bound(answer))

    def _add_live(self, live: Live, rng: random.Random) -> None:
        """Into the pool the other calls pick from: bounded (the newest tokens, and some
        old ones), or picking and revoking slow down as it grows, and the load with them."""
        with self._lock:
            self._live.append(live)
            if len(self._live) > LIVE_POOL:
                del self._live[self._evictable(rng)]

    def _evictable(self, rng: random.Random) -> int:
        """An index among the oldest half of the pool to drop (under the lock): one that no
        state loss covers, while any of them is not. Tokens from before a loss are what
        the state_loss rule is judged on, and none can be issued again: while the store is
        out, the other masters' clients' grants would otherwise push them all out before
        a validation after recovery picks one (the rule then goes untested)."""
        half = LIVE_POOL // 2
        start = rng.randrange(half)
        if self.losses:
            for step in range(half):
                index = (start + step) % half
                if not any(loss.covers(self._live[index]) for loss in self.losses):
                    return index
        return start

    def _expected_invalid(self, live: Live, sent: float) -> tuple[str, str]:
        """The rule by which a validation sent at `sent` must not be valid, and why
        (("", "") when it may be)."""
        with self._lock:
            if live.revoked is not None and live.revoked < sent:
                return "revoked", "its session's revocation was acknowledged before"
            for loss in self.losses:
                if loss.at <= sent and loss.covers(live):
                    return "state_loss", (
                        f"it was issued (at {live.issued:.3f}) before a state loss (at {loss.at:.3f})"
                    )
        return "", ""

    def _held(self, rule: str) -> None:
        if rule:
            with self._lock:
                self.rules_held[rule] += 1

    def _down_during(self, sent: float, done: float) -> bool:
        """Whether the whole call lay inside an outage (one sent during an outage may be
        answered by a Redis that came back before the broker's timeout)."""
        with self._lock:
            return any(start + 0.05 < sent and done < end for start, end in self.down)

    def _validate(self, client: Callable[[int, str | None], BrokerClient], broker: int, rng: random.Random) -> None:
        with self._lock:
            live = rng.choice(self._live)
        proof = live.signer.sign("POST", AUDIENCE, live.token)
        sent = time.monotonic()
        valid = self._validate_once(client(broker, SERVER_KEY), broker, live, proof, "validate", sent)
        if valid and len(self.d.brokers) > 1:
            other = (broker + 1) % len(self.d.brokers)
            self._validate_once(client(other, SERVER_KEY), other, live, proof, "replay", time.monotonic())

    def _validate_once(self, c: BrokerClient, broker: int, live: Live, proof: str, kind: str, sent: float) -> bool:
        try:
            v = c.validate(live.token, audience=AUDIENCE, dpop_proof=proof, http_method="POST", http_uri=AUDIENCE)
        except TokenBrokerError as exc:
            outcome, detail = self._failure(exc)
            answer = Answer(kind, broker, sent, time.monotonic(), outcome, detail, live.client_id)
            if outcome == UNAVAILABLE and self._down_during(sent, answer.done):
                self._held("fail_closed")
            self._record(answer, detail or self._check_bound(answer))
            return False
        outcome = OK if v.valid else REFUSED
        answer = Answer(kind, broker, sent, time.monotonic(), outcome, v.reason.name, live.client_id)
        violation = self._check_bound(answer)
        rule, why = self._expected_invalid(live, sent)
        if v.valid:
            with self._lock:
                digest = hashlib.sha256(proof.encode()).digest()
                if digest in self._accepted_proofs:
                    why = "its proof was already accepted (a replay)"
                self._accepted_proofs.add(digest)
            if not why and self._down_during(sent, answer.done):
                why = "the store was down for the whole call (fail closed)"
            if why:
                violation = f"valid=true although {why}"
        elif kind == "replay":
            self._held("replay")
            if v.reason is Reason.REPLAYED:
                answer.outcome = OK  # the expected answer
        elif rule:
            self._held(rule)
        elif v.reason is Reason.REPLAYED:
            answer.outcome = FALSE_REPLAY
        elif v.reason not in HONEST_REFUSALS:
            answer.outcome = FAILED
            violation = violation or f"an honest validation was refused as {v.reason.name}: {v.detail[:200]}"
        self._record(answer, violation)
        return v.valid

    def _revoke(self, c: BrokerClient, broker: int, rng: random.Random) -> None:
        with self._lock:
            candidates = [x for x in self._live if x.revoked is None]
        if not candidates:
            return
        live = rng.choice(candidates)
        sent = time.monotonic()
        try:
            c.revoke_session(live.session_id)
        except TokenBrokerError as exc:
            outcome, detail = self._failure(exc)
            if "SessionNotFoundError" in detail:  # lost with a state loss: nothing to revoke
                outcome, detail = REFUSED, ""
            answer = Answer("revoke", broker, sent, time.monotonic(), outcome, detail, live.client_id)
            self._record(answer, detail or self._check_bound(answer))
            return
        answer = Answer("revoke", broker, sent, time.monotonic(), OK, client=live.client_id)
        with self._lock:
            live.revoked = answer.done
        self._record(answer, self._check_bound(answer))

    def _token(self, http: httpx.Client, broker: int, rng: random.Random) -> None:
        client_id = rng.choice(CLIENTS)
        signer = ProofSigner()
        assertion = self.d.assertion(client_id)
        form = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion,
            "resource": AUDIENCE,
            "scope": "tools:call",
        }
        granted = self._post_token(http, broker, form, signer, "token")
        if granted is not None:
            claims = _claims(granted)
            self._add_live(Live(granted, client_id, str(claims["sid"]), signer, time.monotonic()), rng)
            other = (broker + 1) % len(self.d.brokers)
            self._post_token(http, other, form, ProofSigner(), "assertion_replay")

    def _post_token(
        self, http: httpx.Client, broker: int, form: dict[str, str], signer: ProofSigner, kind: str
    ) -> str | None:
        url = f"{self.d.brokers[broker].http_url}/token"
        sent = time.monotonic()
        try:
            response = http.post(url, data=form, headers={"DPoP": signer.sign("POST", TOKEN_URL)})
        except httpx.TransportError as exc:
            answer = Answer(kind, broker, sent, time.monotonic(), UNAVAILABLE, type(exc).__name__, form["client_id"])
            self._record(answer, self._check_bound(answer))
            return None
        answer = Answer(kind, broker, sent, time.monotonic(), REFUSED, str(response.status_code), form["client_id"])
        violation = self._check_bound(answer)
        if response.status_code == 200:
            answer.outcome = OK
            with self._lock:
                digest = hashlib.sha256(form["client_assertion"].encode()).digest()
                replayed = digest in self._granted_assertions
                self._granted_assertions.add(digest)
                down = any(start + 0.05 < sent and answer.done < end for start, end in self.down)
            if replayed:
                violation = "a token was granted for an assertion that was already granted"
            elif down:
                violation = "a token was granted while the store was down (fail closed)"
            elif kind == "assertion_replay":
                violation = "a token was granted for a replayed assertion"
        elif response.status_code == 503:
            answer.outcome = UNAVAILABLE
        elif kind == "assertion_replay" and response.status_code in (400, 401):
            answer.outcome = OK  # refused, as it must be
            self._held("assertion_replay")
        elif kind == "token" and response.status_code in (400, 401) and "already used" in response.text:
            answer.outcome = FALSE_REPLAY
        elif kind == "token":
            answer.outcome = FAILED
            violation = violation or f"/token answered {response.status_code}: {response.text[:200]}"
        self._record(answer, violation)
        return str(response.json()["access_token"]) if response.status_code == 200 and kind == "token" else None


def _claims(token: str) -> dict[str, Any]:
    import base64
    import json

    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert isinstance(claims, dict)
    return claims


def client_slot_owner(cluster_port: int) -> dict[str, str]:
    """Which master (its node id) serves each chaos client's sessions, on a Redis Cluster."""
    from redis.crc import key_slot

    node = redis.Redis(host="127.0.0.1", port=cluster_port, socket_timeout=2)
    try:
        shards: Any = node.execute_command("CLUSTER", "SLOTS")
    finally:
        node.close()
    owners: dict[str, str] = {}
    for client_id in CLIENTS:
        slot = key_slot(f"tb:{{{tag(client_id)}}}:sessions".encode())
        for start, end, master, *_ in shards:
            if start <= slot <= end:
                owners[client_id] = f"{master[0].decode() if isinstance(master[0], bytes) else master[0]}:{master[1]}"
    return owners


# -- what a fault's row in the README reports -------------------------------------------------


@dataclass
class Measured:
    fault: str
    answers: int
    unavailable: int
    false_replays: int
    window_seconds: float
    recovery_seconds: float
    max_unavailable_latency: float
    threads_before: int
    threads_peak: int
    threads_after: int
    rss_before_mib: float
    rss_after_mib: float
    violations: list[str] = field(default_factory=list)
    rules_held: dict[str, int] = field(default_factory=dict)

    def row(self) -> str:
        cells = [
            self.fault,
            f"{self.window_seconds:.2f} s",
            f"{self.recovery_seconds:.2f} s",
            f"{self.answers:,}",
            f"{self.unavailable:,}",
            str(self.false_replays),
            f"{self.max_unavailable_latency:.2f} s",
            f"{self.threads_before} / {self.threads_peak} / {self.threads_after}",
            f"{self.rss_before_mib:.0f} / {self.rss_after_mib:.0f} MiB",
            str(len(self.violations)),
        ]
        return "| " + " | ".join(cells) + " |"


TABLE_HEADER = (
    "| fault | unavailability window | recovery | answers checked | UNAVAILABLE answers | honest calls refused "
    "as replays | slowest UNAVAILABLE | threads of both brokers before / peak / after | RSS of both brokers "
    "before / after "
    "| violations |\n"
    "|---|---:|---:|---:|---:|---:|---:|---|---|---:|"
)


def measure(traffic: Traffic, fault: str, injected: float, healed: float) -> Measured:
    """The figures of one fault from the answers: `injected` and `healed` are when the fault
    began and ended (monotonic)."""
    answers = list(traffic.answers)
    unavailable = [a for a in answers if a.outcome == UNAVAILABLE and a.sent >= injected - 0.01]
    window = (max(a.done for a in unavailable) - min(a.sent for a in unavailable)) if unavailable else 0.0
    violations = list(traffic.violations)
    false_replays = [a for a in answers if a.outcome == FALSE_REPLAY]
    for a in false_replays:
        if not injected - 1 <= a.sent <= healed + 2:
            violations.append(f"{a.kind} for {a.client}: an honest first use refused as a replay, away from the fault")
    firsts = []
    for kind in ("issue", "validate", "token"):
        after = [a.done for a in answers if a.kind == kind and a.outcome == OK and a.sent >= healed]
        firsts.append(min(after) - healed if after else float("inf"))
    samples = traffic.samples

    def total(column: int, start: float, end: float) -> list[int]:
        """Both brokers' threads (column 0) or RSS in KiB (1), per sample taken in [start, end)."""
        return [sum(s[column] for s in stats) for t, stats in samples if start <= t < end] or [0]

    before, during, after_t = total(0, 0, injected), total(0, injected, healed + 1), total(0, healed + 1, float("inf"))
    rss_before, rss_after = total(1, 0, injected), total(1, healed + 1, float("inf"))
    return Measured(
        fault=fault,
        answers=len(answers),
        unavailable=len(unavailable),
        false_replays=len(false_replays),
        window_seconds=window,
        recovery_seconds=max(firsts),
        max_unavailable_latency=max((a.latency for a in unavailable), default=0.0),
        threads_before=max(before),
        threads_peak=max(during + after_t),
        threads_after=after_t[-1],
        rss_before_mib=rss_before[-1] / 1024,
        rss_after_mib=rss_after[-1] / 1024,
        violations=violations,
        rules_held=dict(traffic.rules_held),
    )


@contextlib.contextmanager
def running(traffic: Traffic) -> Iterator[Traffic]:
    traffic.start()
    try:
        yield traffic
    finally:
        traffic.stop()


def report(path: str | None, measured: Measured) -> None:
    """Appends the fault's row to the table file `path` (the README's table: `make chaos`)."""
    if not path:
        return
    target = Path(path)
    if not target.exists():
        target.write_text(TABLE_HEADER + "\n")
    with target.open("a") as out:
        out.write(measured.row() + "\n")


__all__ = [
    "ADMIN_KEY",
    "AUDIENCE",
    "CLIENTS",
    "ISSUER",
    "SERVER_KEY",
    "TABLE_HEADER",
    "ChaosDeployment",
    "Measured",
    "Traffic",
    "client_slot_owner",
    "free_port",
    "measure",
    "process_stats",
    "report",
    "running",
]
