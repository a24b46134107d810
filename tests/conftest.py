"""Shared fixtures: real redis-server processes (see tests/support/redis_servers.py)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from support.redis_servers import REDIS_CLI, REDIS_SERVER, RedisCluster, RedisServer

# Every `tokenbroker serve` a test starts serves HTTP on a free port unless the test names
# one: with the default (127.0.0.1:8080) brokers started side by side would collide, and
# with a developer's `make run`. A test that checks the default clears it (no_tokenbroker_env).
os.environ.setdefault("TOKENBROKER_HTTP_LISTEN", "127.0.0.1:0")


def _require_redis() -> None:
    if not (shutil.which(REDIS_SERVER) and shutil.which(REDIS_CLI)):
        message = "redis-server and redis-cli are not installed (`make redis` installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI a missing dependency is a failure, never a skip
        pytest.skip(message)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty redis-server of this test alone: kill it, restart it at will."""
    _require_redis()
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A three-master Redis Cluster shared by the whole run: tests isolate by key prefix."""
    _require_redis()
    cluster = RedisCluster(size=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def no_tokenbroker_env(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No TOKENBROKER_* variable of the developer's shell reaches the test, which runs in
    its own temporary directory."""
    for name in list(os.environ):
        if name.startswith("TOKENBROKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
