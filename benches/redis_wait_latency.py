"""Latency cost of `redis_min_replicas` (WAIT after security writes): one RedisStore
`check_token` per validation, each recording one fresh replay record, against a real
redis-server master with one real replica (`--replicaof`) on loopback.

    .venv/bin/python benches/redis_wait_latency.py [validations]

Prints p50/p99 per validation for min_replicas = 0 and 1."""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tokenbroker import SessionLimit
from tokenbroker.store import SessionOpen, TokenCheck
from tokenbroker.store.redis import RedisStore

from support.redis_servers import HOST, RedisServer


def measure(url: str, min_replicas: int, count: int) -> list[float]:
    store = RedisStore.from_url(url, prefix=f"w{uuid.uuid4().hex[:8]}", min_replicas=min_replicas)
    now = int(time.time())
    session = store.open_session(
        SessionOpen(
            client_id="c", audience="a", session_id=None, ttl_seconds=600, limit=SessionLimit(), client_ip="", now=now
        )
    )
    took = []
    for i in range(count + 200):  # the first 200 warm up
        started = time.perf_counter()
        store.check_token(TokenCheck("c", session.session_id, "a", f"j{i}", now, "", ((f"proof-{i}", now + 60),), now))
        took.append(time.perf_counter() - started)
    store.close()
    return took[200:]


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    master = RedisServer().start()
    replica = RedisServer(extra_args=("--replicaof", HOST, str(master.port))).start()
    try:
        while replica.info("replication").get("master_link_status") != "up":
            time.sleep(0.05)
        for n in (0, 1):
            took = sorted(measure(master.url, n, count))
            p50 = statistics.median(took) * 1e6
            p99 = took[int(len(took) * 0.99)] * 1e6
            print(f"min_replicas={n}: p50 {p50:.0f} us, p99 {p99:.0f} us per validation ({count} validations)")
    finally:
        replica.stop()
        master.stop()


if __name__ == "__main__":
    main()
