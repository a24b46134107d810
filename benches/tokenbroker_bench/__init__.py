"""`tokenbroker bench`: the gRPC load generator of the "measured speed" issue, a
distribution of its own (`tokenbroker-bench`, from benches/ in a checkout) so that the
tokenbroker wheel does not ship it.

- `servers`: the processes under test (`tokenbroker serve` on the memory store or on a
  redis-server the bench starts; the two reference servers) and the tokens they validate;
- `loadgen`: the grpc.aio load generator (closed and open loop, pre-signed DPoP proofs);
- `report`: CPU/RSS sampling, the targets, JSON, Markdown and PNG;
- `runner`: one whole run; `reference_noop`, `reference_pyjwt`: the reference servers.

Needs matplotlib and psutil (the `bench` extra of tokenbroker)."""
