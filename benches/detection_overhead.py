"""What detection costs an embedded validation: the same `Broker.validate` calls with
detection off (`Broker(detection=False)`) and on (the default: every signal watched, every
action `alert`), side by side in one run, on the memory store and on a real Redis.

    .venv/bin/python benches/detection_overhead.py [--rounds 15] [--calls 2000] [--json PATH]

Each call names the client's address (one network, as a steady client has) and a resource
(one of eight tools), as `BrokerAuthMiddleware` relays them. Rows: a warm bearer token (the
cheapest validation, so the largest relative cost) and a cached DPoP token with a fresh
proof per call. Rounds alternate off/on; the table gives the median microseconds per call
and the overhead (on / off - 1). Every answer must be valid. Markdown on stdout, progress on
stderr. (gRPC unary: `benches/cpu_per_request.py` has the same rows with detection off.)"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenbroker import Broker, Keyring, ProofSigner
from tokenbroker.detection.detector import Detection
from tokenbroker.store.base import Store
from tokenbroker.store.memory import MemoryStore

AUDIENCE = "https://mcp.bench.test/mcp"
ISSUER = "https://broker.bench.test"
CLIENT_IP = "198.51.100.7"
URI = AUDIENCE
TARGET_EMBEDDED = 0.10  # the issue's target: <= 10 % on embedded validate
# Past the default 10 s burst window; inside the token's 300 s and, for a proof signed on
# the real clock, the broker's 60 s proof age.
SESSION_AGE_SECONDS = 15


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Clock:
    """The broker's clock, moved on once the session is opened: the measured session is
    past its burst window (`detection_burst_window_seconds`) from its first measured call,
    as a steady client's session is. Measured inside that window, `burst_after_auth` would
    fire on every call and the bench would time the alert path, not the common one."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _calls(broker: Broker, clock: _Clock, dpop: bool, calls: int) -> Callable[[], None]:
    """One round's body: `calls` validations of one token (fresh proofs pre-signed)."""
    signer = ProofSigner() if dpop else None
    clock.offset = 0.0
    issued = broker.issue(
        client_id="bench-client", audience=AUDIENCE, scopes=["tools:call"], dpop_jkt=signer.jkt if signer else None
    )
    clock.offset = float(SESSION_AGE_SECONDS)
    token = issued.access_token

    def body() -> None:
        proofs = [signer.sign("POST", URI, token) for _ in range(calls)] if signer else [None] * calls
        started = time.perf_counter()
        for n, proof in enumerate(proofs):
            answer = broker.validate(
                token,
                audience=AUDIENCE,
                dpop_proof=proof,
                http_method="POST" if proof else None,
                http_uri=URI if proof else None,
                client_ip=CLIENT_IP,
                resource=f"tools/call tool-{n % 8}",
            )
            if not answer.valid:
                raise SystemExit(f"bench answer invalid: {answer.reason.name} {answer.detail}")
        body.elapsed = time.perf_counter() - started  # type: ignore[attr-defined]

    return body


def _row(store_of: Callable[[], Store], dpop: bool, rounds: int, calls: int) -> dict[str, Any]:
    keyring = Keyring.generate()
    clock = _Clock()
    findings: list[tuple[str, str]] = []
    watching = Detection(on_finding=lambda signal, action: findings.append((signal, action)))
    bodies = {
        watched: _calls(
            Broker(keyring, issuer=ISSUER, store=store_of(), detection=watching if watched else False, clock=clock),
            clock,
            dpop,
            calls,
        )
        for watched in (False, True)
    }
    for body in bodies.values():  # warm: caches, the session's resources, the network known
        body()
    findings.clear()
    per_call: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for watched in (False, True):
            body = bodies[watched]
            body()
            per_call[watched].append(body.elapsed / calls * 1e6)  # type: ignore[attr-defined]
    if findings:  # then the rows would time the alert path, not the common one
        raise SystemExit(f"detection found something during the measured rounds: {sorted(set(findings))}")
    off, on = statistics.median(per_call[False]), statistics.median(per_call[True])
    return {"off_us": round(off, 2), "on_us": round(on, 2), "overhead": round(on / off - 1, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per row (default 15)")
    parser.add_argument("--calls", type=int, default=2000, help="validations per round (default 2000)")
    parser.add_argument("--redis-url", help="also measure on this Redis (default: start a redis-server)")
    parser.add_argument("--no-redis", action="store_true", help="measure the memory store only")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        parser.error("--rounds and --calls must be at least 1")
    from tokenbroker.store.redis import RedisStore
    from tokenbroker_bench.servers import ProcessSet, RedisProcess

    stores: dict[str, Callable[[], Store]] = {"memory": MemoryStore}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tb-detection-bench-") as workdir, ProcessSet() as processes:
        if not args.no_redis:
            url = args.redis_url or RedisProcess.start(processes, Path(workdir)).url
            stores["redis"] = lambda: RedisStore.from_url(url)
        for store_name, store_of in stores.items():
            for dpop in (False, True):
                kind = "DPoP token (cached), fresh proof" if dpop else "bearer token (warm)"
                _say(f"measuring {kind} on the {store_name} store: {args.rounds} rounds of {args.calls} calls, off/on")
                rows.append({"store": store_name, "token": kind, **_row(store_of, dpop, args.rounds, args.calls)})
    print("| store | validation | detection off | detection on | overhead |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['store']} | {row['token']} | {row['off_us']:.1f} µs | {row['on_us']:.1f} µs "
            f"| **{row['overhead'] * 100:+.1f} %** |"
        )
    print(f"\nTarget: <= {TARGET_EMBEDDED * 100:.0f} % on embedded validate. Median of {args.rounds} rounds each.")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "calls": args.calls, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
