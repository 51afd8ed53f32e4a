"""A circuit breaker per backing store (Postgres, Redis), shared by every caller of that store.

Closed: every call goes through. A failed call opens it: for `cooldown_s` nobody calls the backend and
each caller takes its fallback at once, instead of paying the backend's timeout on every request. Then
it is half-open: exactly one call (the probe) goes through while the others keep their fallback; the
probe's success closes it, its failure opens it again. A probe that neither succeeds nor fails within
another cooldown (stuck on a hung backend, or its caller cancelled) hands the turn to the next caller,
so a stuck probe cannot hold the backend's recovery back by a whole query timeout.

Only the outcome of calls is recorded: being skipped is not a failure, so the breaker never re-trips
itself while traffic keeps arriving.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway import constants as C

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

T = TypeVar("T")


class Breaker:
    def __init__(
        self,
        name: str,
        cooldown_s: float = C.BREAKER_COOLDOWN_S,
        on_change: Callable[[str, str], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
        on_latency: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.name = name
        self._on_latency = on_latency  # (backend, op, seconds) of every call, failed ones included
        self.cooldown_s = cooldown_s
        self.state = CLOSED
        self._next_probe = 0.0  # monotonic: when the next probe may start
        self._on_change = on_change
        self._on_failure = on_failure  # every failed call of the store, whoever made it

    def allow(self) -> bool:
        """May this caller use the backend now? In half-open state only the probe may."""
        if self.state == CLOSED:
            return True
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + self.cooldown_s
        self._set(HALF_OPEN)
        return True

    def succeeded(self) -> None:
        if self.state != CLOSED:
            self._set(CLOSED)

    def failed(self) -> None:
        self._next_probe = time.monotonic() + self.cooldown_s
        self._set(OPEN)
        if self._on_failure is not None:
            self._on_failure(self.name)

    def timed(self, op: str, seconds: float) -> None:
        """How long one call to the backend took (`op`: what it was for)."""
        if self._on_latency is not None:
            self._on_latency(self.name, op, seconds)

    @property
    def available(self) -> bool:
        """As last seen: closed means the last call to the backend worked."""
        return self.state == CLOSED

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(self.name, state)


class BreakerOpen(Exception):
    """The backend is being skipped after a recent failure: take the fallback."""


async def guarded(
    breaker: Breaker, fn: Callable[[], Awaitable[T]], errors: tuple[type[BaseException], ...], op: str
) -> T:
    """Call the backend through its breaker: raises BreakerOpen when skipped; `errors` trip it. The
    call's time is the breaker's to report, as `op`."""
    if not breaker.allow():
        raise BreakerOpen(breaker.name)
    started = time.perf_counter()
    try:
        result = await fn()
    except errors:
        breaker.failed()
        raise
    finally:
        breaker.timed(op, time.perf_counter() - started)
    breaker.succeeded()
    return result
