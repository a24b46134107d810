"""Measures what issue #8 item 4 is about, on the embedded broker (memory store):

- `MemoryStore.open_session` for clients with no history, and for a client whose
  `evict_oldest` limit has already evicted `--dead` sessions;
- one embedded DPoP validation of another client (a fresh proof, signed beforehand; the
  token cached) after that history.

Prints median and p99 in microseconds. Run: `.venv/bin/python benches/client_bounds_costs.py`."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from tokenbroker import Broker, Keyring, LimitPolicy, ProofSigner, SessionLimit
from tokenbroker.store import SessionOpen

AUDIENCE = "https://mcp.bench/mcp"


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1e6:8.1f} us  p99 {p99 * 1e6:8.1f} us  (n={len(ordered)})"


def _time(call: Callable[[], object], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dead", type=int, default=19_000, help="sessions evicted before measuring")
    parser.add_argument("-n", type=int, default=2_000, help="samples per figure")
    args = parser.parse_args()

    limit = SessionLimit(max_sessions=1, policy=LimitPolicy.EVICT_OLDEST)
    broker = Broker(Keyring.generate(), issuer="https://broker.bench", session_limit=limit)
    store = broker.store
    fresh_ids = iter(range(10**9))

    def open_for(client_id: str | None) -> Callable[[], object]:
        def call() -> object:
            cid = client_id or f"fresh-{next(fresh_ids)}"
            now = int(time.time())
            return store.open_session(
                SessionOpen(
                    client_id=cid,
                    audience=AUDIENCE,
                    session_id=None,
                    ttl_seconds=3600,
                    limit=limit,
                    client_ip="",
                    now=now,
                )
            )

        return call

    print(f"open, fresh clients       {_percentiles(_time(open_for(None), args.n))}")
    for _ in range(args.dead):
        open_for("noisy")()
    print(f"open, {args.dead} evicted    {_percentiles(_time(open_for('noisy'), args.n))}")

    signer = ProofSigner()
    token = broker.issue(client_id="neighbour", audience=AUDIENCE, dpop_jkt=signer.jkt).access_token
    proofs = iter([signer.sign("POST", AUDIENCE, token) for _ in range(2 * args.n)])

    def validate() -> object:
        result = broker.validate(
            token, audience=AUDIENCE, dpop_proof=next(proofs), http_method="POST", http_uri=AUDIENCE
        )
        assert result.valid, result.detail
        return result

    print(f"validate, DPoP          {_percentiles(_time(validate, args.n))}")


if __name__ == "__main__":
    main()
