"""Issuance on the embedded broker: a token continuing a live session (session check in
the MemoryStore, claims, Ed25519 signature). Bloom insert+check is in the Rust criterion
bench (`cargo bench -p tokenbroker-core --bench core`)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.mark.benchmark(group="issue")
def test_issue(benchmark: Any, agent: Any, audience: str) -> None:
    broker = agent.broker
    issued = benchmark(
        broker.issue, client_id=agent.client_id, audience=audience, scopes=["tools:call"], session_id=agent.session_id
    )
    assert issued.session_id == agent.session_id
    assert issued.token_type == "Bearer"
    assert broker.validate(issued.access_token, audience=audience).valid
