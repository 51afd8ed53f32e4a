"""Rate-limit leases: a process takes several tokens of a limit from Redis in one call and spends them here.

Redis stays the one shared truth (GCRA, see `ratelimit`): a lease's tokens are charged there *before* any
is spent, so no limit ever admits more than it allows across all replicas. What a lease costs is the
other way round: tokens a process took and did not spend before the lease ran out are lost, so a limit
can refuse early, by at most (replicas x the largest lease) tokens at any moment.

How many tokens a process asks for adapts to how hot the limited thing is *on this process*: a first
request takes one (so a key used now and then is limited exactly, one Redis call per request), and each
refill asks for what the last lease's pace would spend in half a lease's life, at most twice the last
lease, at most a fraction of the burst (`LEASE_BURST_FRACTION`) and `LEASE_MAX_TOKENS`. A lease lives
`LEASE_S`. A refusal from Redis is remembered until the time Redis named for the next token, since no
token can become free before it; the next lease after a refusal starts again at one token.

Only one refill per limited thing is in flight in a process; concurrent requests wait for it and then
spend from it. `exact: true` on a limit turns all of this off (one Redis call per request).
"""

from __future__ import annotations

import asyncio
import math

from gateway import constants as C


class Lease:
    """The tokens this process holds for one (limit, identity), and what Redis said when it gave them."""

    __slots__ = ("denied_until", "expires", "granted_at", "refill", "remaining", "reset_at", "size", "tokens")

    def __init__(self) -> None:
        self.tokens = 0  # still to spend here
        self.size = 0  # how many the last grant gave (0: none yet)
        self.granted_at = 0.0
        self.expires = 0.0
        self.remaining = 0  # what Redis had left after the grant
        self.reset_at = 0.0  # when the limit is full again, as Redis said at the grant
        self.denied_until = 0.0  # Redis refused: nothing is free before this
        self.refill: asyncio.Future[None] | None = None  # the refill in flight, which others wait for

    def take(self, now: float) -> bool:
        """Spend one leased token; False when none is left or the lease ran out."""
        if self.tokens > 0 and now < self.expires:
            self.tokens -= 1
            return True
        return False

    def denied(self, now: float) -> bool:
        return now < self.denied_until

    def next_size(self, now: float, cap: int) -> int:
        """How many tokens to ask for now: the last lease's pace over half a lease's life, within bounds."""
        if self.size == 0 or cap <= 1:
            return 1
        used = self.size - self.tokens  # a refill comes once the lease is spent, or ran out with these left
        pace = used / max(now - self.granted_at, 1e-3)
        return max(1, min(cap, 2 * self.size, int(pace * C.LEASE_S / 2)))

    def grant(self, now: float, granted: int, remaining: int, reset_us: float, retry_us: float) -> None:
        """Redis's answer to a refill of this lease: `granted` tokens (0: refused)."""
        self.granted_at = now
        self.remaining = remaining
        self.reset_at = now + reset_us / 1e6
        if granted <= 0:
            self.tokens = self.size = 0
            self.denied_until = now + retry_us / 1e6
            return
        self.tokens = self.size = granted
        self.expires = now + C.LEASE_S
        self.denied_until = 0.0


def max_lease(burst: int, exact: bool) -> int:
    """The most tokens one process may hold of a limit with this burst."""
    if exact:
        return 1
    return max(1, min(C.LEASE_MAX_TOKENS, math.floor(burst * C.LEASE_BURST_FRACTION)))


class Leases:
    """Every lease of this process by (limit name, identity), the oldest dropped first past `max_entries`
    (oldest by creation, not use: a busy key dropped only takes a new lease, the cost of a refusal a
    little early at worst, and no per-request reordering)."""

    def __init__(self, max_entries: int = C.DEFAULT_LOCAL_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._leases: dict[tuple[str, str], Lease] = {}

    def get(self, name: str, ident: str) -> Lease:
        key = (name, ident)
        lease = self._leases.get(key)
        if lease is None:
            lease = self._leases[key] = Lease()
            if len(self._leases) > self.max_entries:
                del self._leases[next(iter(self._leases))]
        return lease
