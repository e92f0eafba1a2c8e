"""Reconnect delays, as in gRPC's connection-backoff spec: 1 s, x1.6, +/-20 % jitter, capped.

The supervisor resets it only after a session made real progress (its connection delivered
data, or stayed up a while), so a server that accepts and then closes at once cannot cause a
reconnect storm (`bridge.supervisor`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

INITIAL_S = 1.0
MULTIPLIER = 1.6
JITTER = 0.2
CAP_S = 120.0
#: The cap for retrying Kafka, the service's own cluster (not a vendor's rate-limited API):
#: an attempt costs little, and a long cap would hold everything up after Kafka is back.
KAFKA_CAP_S = 5.0


@dataclass
class Backoff:
    initial: float = INITIAL_S
    multiplier: float = MULTIPLIER
    jitter: float = JITTER
    cap: float = CAP_S
    _current: float = field(default=0.0, init=False)

    def next_delay(self) -> float:
        """The delay before the next attempt; each call grows it until the cap."""
        self._current = (
            self.initial if self._current == 0 else min(self._current * self.multiplier, self.cap)
        )
        return self._current * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self._current = 0.0
