"""Fixtures of the embedded benchmarks: brokers, pools of fresh tokens and DPoP proofs, a
real redis-server, and `Fresh`, which runs a benchmark that must use a new input per call.

Pools are built in fixtures (never timed). With `--benchmark-disable` every benchmark body
runs once as a plain test, so pools then hold just what that one call needs."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis

from tokenbroker import Broker, Keyring, ProofSigner, RedisStore

ISSUER = "https://broker.example"
AUDIENCE = "https://mcp.example.com/mcp"
CLIENT = "bench-agent"
SCOPES = ("tools:call",)
TOKEN_CACHE_CAPACITY = 100_000  # the default; every pool below fits in it, so no eviction


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    # The machine's load belongs next to the numbers it distorts.
    machine_info["loadavg"] = list(os.getloadavg())
    machine_info["cpu_count"] = os.cpu_count()


# -- running benchmarks that need a fresh input per call ------------------------------


@dataclass(frozen=True)
class Plan:
    """Fixed pedantic rounds, so the number of fresh inputs to prepare is known up front
    (pytest-benchmark's own calibration would pick a count we cannot pre-build for)."""

    rounds: int
    iterations: int
    warmup_rounds: int
    enabled: bool

    @property
    def calls(self) -> int:
        if not self.enabled:
            return 1  # --benchmark-disable: the body runs once
        # With iterations > 1 pytest-benchmark makes one extra call to return its result.
        return (self.warmup_rounds + self.rounds) * self.iterations + (self.iterations > 1)


@dataclass
class Fresh:
    """Inputs used once each (tokens never validated, proofs never seen). `bench` times
    `call(input)`: with one iteration per round the input is handed over untimed (setup);
    with more, the `next()` is inside the timed loop (tens of nanoseconds against tens of
    microseconds). Every input is consumed exactly once; `call` must raise on a wrong answer."""

    items: list[Any]
    plan: Plan

    def __len__(self) -> int:
        return len(self.items)

    def bench(self, benchmark: Any, call: Callable[[Any], Any]) -> Any:
        it = iter(self.items)
        plan = self.plan
        if plan.iterations == 1:
            result = benchmark.pedantic(
                call, setup=lambda: ((next(it),), {}), rounds=plan.rounds, warmup_rounds=plan.warmup_rounds
            )
        else:
            result = benchmark.pedantic(
                lambda: call(next(it)),
                rounds=plan.rounds,
                iterations=plan.iterations,
                warmup_rounds=plan.warmup_rounds,
            )
        assert next(it, None) is None, "every fresh input is used exactly once"
        benchmark.extra_info["fresh_inputs"] = len(self.items)
        return result


@pytest.fixture(scope="session")
def enabled(request: pytest.FixtureRequest) -> bool:
    """True when benchmarks are timed, False under --benchmark-disable."""
    config = request.config
    return not (config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))


@pytest.fixture(scope="session")
def fresh(enabled: bool) -> Callable[..., Fresh]:
    """`fresh(make, rounds=R, iterations=I)`: a `Fresh` of `make()` results, as many as
    R (+1 warm-up) rounds of I calls use; one under --benchmark-disable."""

    def build(make: Callable[[], Any], *, rounds: int, iterations: int = 1, warmup_rounds: int = 1) -> Fresh:
        plan = Plan(rounds, iterations, warmup_rounds, enabled)
        return Fresh([make() for _ in range(plan.calls)], plan)

    return build


# -- brokers, clients, tokens, proofs -------------------------------------------------------


@pytest.fixture(scope="session")
def audience() -> str:
    """The MCP server's resource URI: every token's `aud`, every proof's `htu`."""
    return AUDIENCE


@pytest.fixture(scope="session")
def issuer() -> str:
    return ISSUER


@dataclass
class Agent:
    """One client with one session on a broker: `issue()` continues the session, so the
    session limit never bites however many tokens a pool needs."""

    broker: Broker
    client_id: str
    session_id: str
    dpop_jkt: str | None

    @classmethod
    def open(cls, broker: Broker, client_id: str, dpop_jkt: str | None = None) -> Agent:
        first = broker.issue(client_id=client_id, audience=AUDIENCE, scopes=SCOPES, dpop_jkt=dpop_jkt)
        return cls(broker, client_id, first.session_id, dpop_jkt)

    def issue(self) -> str:
        return self.broker.issue(
            client_id=self.client_id,
            audience=AUDIENCE,
            scopes=SCOPES,
            session_id=self.session_id,
            dpop_jkt=self.dpop_jkt,
        ).access_token

    def cached_tokens(self) -> int:
        """How many tokens the broker's verified-token cache holds (each miss adds one)."""
        return int(self.broker.engine.stats().cached_tokens)


def _broker(keyring: Keyring, **options: Any) -> Broker:
    return Broker(keyring, issuer=ISSUER, token_cache_capacity=TOKEN_CACHE_CAPACITY, **options)


@pytest.fixture(scope="session")
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture(scope="session")
def public_key(keyring: Keyring) -> Any:
    """The broker's public key as a `cryptography` key object, loaded once from the JWKS
    as a PyJWT user would (PyJWKClient does the same)."""
    return jwt.PyJWKSet.from_dict(keyring.jwks())[keyring.active_kid].key


@pytest.fixture(scope="session")
def broker(keyring: Keyring) -> Broker:
    """The embedded broker (MemoryStore) of the warm, DPoP and issue benchmarks."""
    return _broker(keyring)


@pytest.fixture(scope="session")
def signer() -> ProofSigner:
    """The client's DPoP key."""
    return ProofSigner()


@pytest.fixture(scope="session")
def agent(broker: Broker) -> Agent:
    return Agent.open(broker, CLIENT)


@pytest.fixture(scope="session")
def dpop_agent(broker: Broker, signer: ProofSigner) -> Agent:
    return Agent.open(broker, CLIENT + "-dpop", signer.jkt)


@pytest.fixture
def cold_agent(keyring: Keyring) -> Agent:
    """A client of a broker of its own (MemoryStore), so its verified-token cache starts
    empty: one per benchmark that must never hit the cache."""
    return Agent.open(_broker(keyring), CLIENT)


@pytest.fixture(scope="session")
def token(agent: Agent) -> str:
    """A bearer token of the shared broker."""
    return agent.issue()


@pytest.fixture(scope="session")
def dpop_token(dpop_agent: Agent) -> str:
    """A DPoP-bound token of the shared broker (`cnf.jkt` = the signer's thumbprint)."""
    return dpop_agent.issue()


@pytest.fixture(scope="session")
def sign_proof(signer: ProofSigner) -> Callable[[str], str]:
    """`sign_proof(token)`: a new proof for POST to the audience, unique jti, iat now.
    Proof pools are built in function-scoped fixtures or test bodies so they never age
    past the broker's 60 s proof window."""
    jtis = itertools.count()

    def sign(token: str) -> str:
        return signer.sign("POST", AUDIENCE, token, iat=int(time.time()), jti=f"bench-{next(jtis)}")

    return sign


# -- a real redis-server ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A redis-server of this run alone on a free loopback port, no persistence."""
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(server).exists():
        message = "redis-server is not installed (`make redis` installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="tb-bench-redis-")
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--daemonize", "no", "--dir", workdir]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        probe = redis.Redis.from_url(url, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {port} did not start") from None
                time.sleep(0.02)
        probe.close()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client (hiredis parser), as a pure-Python pipeline would use."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_broker(keyring: Keyring, redis_url: str) -> Iterator[Broker]:
    """The broker with the shared state store (RedisStore)."""
    store = RedisStore.from_url(redis_url)
    try:
        yield _broker(keyring, store=store)
    finally:
        store.close()


@pytest.fixture(scope="session")
def redis_agent(redis_broker: Broker) -> Agent:
    return Agent.open(redis_broker, CLIENT)


@pytest.fixture(scope="session")
def redis_dpop_agent(redis_broker: Broker, signer: ProofSigner) -> Agent:
    return Agent.open(redis_broker, CLIENT + "-dpop", signer.jkt)
