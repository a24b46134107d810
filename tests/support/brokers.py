"""Builders shared by the embedded-broker tests: a settable clock and a broker on it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tokenbroker import Broker, Keyring, SessionLimit

ISSUER = "https://broker.test"
AUDIENCE = "https://mcp.test/mcp"
OTHER_AUDIENCE = "https://other-mcp.test/mcp"


@dataclass
class FakeClock:
    """A clock the test moves by hand."""

    now: float = field(default_factory=lambda: float(int(time.time())))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_broker(
    keyring: Keyring | None = None, clock: FakeClock | None = None, **kwargs: object
) -> tuple[Broker, FakeClock]:
    clock = clock or FakeClock()
    kwargs.setdefault("session_limit", SessionLimit(max_sessions=3))
    broker = Broker(keyring or Keyring.generate(), issuer=ISSUER, clock=clock, **kwargs)  # type: ignore[arg-type]
    return broker, clock
