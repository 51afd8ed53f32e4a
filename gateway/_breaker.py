"""A tiny circuit breaker shared by the Postgres, Redis cache and rate-limit paths."""

from __future__ import annotations

import time


class Breaker:
    """After a backend fails, skip it for a moment instead of paying its timeout on every request."""

    def __init__(self, cooldown_s: float = 1.0) -> None:
        self.cooldown_s = cooldown_s
        self._until = 0.0

    def is_open(self) -> bool:
        return time.monotonic() < self._until

    def trip(self) -> None:
        self._until = time.monotonic() + self.cooldown_s
