"""Values read from Postgres that every decision needs current, kept in-process while invalidations reach
this process: a user's memberships (for sessions and tokens, whose role is the membership's, computed
fresh) and whether a refresh family is revoked (for access tokens). A change is pushed by NOTIFY (see
`gateway.listener.Change`); `ttl_s` is the backstop. While the LISTEN connection is down nothing counts as
fresh (each use re-reads), and after a gap nothing read before it does. Postgres down: a value read within
`ttl_s + stale_s` is used, else 503 auth_unavailable."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway.backends import StoreUnavailable
from gateway.cache import LocalCache
from gateway.errors import AuthUnavailable

V = TypeVar("V")


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    loaded_at: float  # wall clock, compared with LocalCache.trusted_since
    fresh_until: float  # monotonic


class FreshMap(Generic[V]):
    def __init__(
        self,
        local: LocalCache,
        load: Callable[[list[str]], Awaitable[dict[str, V]]],
        ttl_s: float,
        stale_s: float,
        max_entries: int,
    ) -> None:
        self.local = local  # whose `listening` and `trusted_since` say whether invalidations reach us
        self.load = load
        self.ttl_s = ttl_s
        self.stale_s = stale_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()
        self._epoch = 0  # bumped by every invalidation: a read that began before one is not kept
        self._inflight: dict[str, asyncio.Future[V]] = {}

    def fresh(self, key: str) -> V | None:
        """The value, when it is fresh (no I/O)."""
        entry = self._entries.get(key)
        if (
            entry is not None
            and self.local.listening
            and entry.loaded_at >= self.local.trusted_since
            and time.monotonic() < entry.fresh_until
        ):
            return entry.value
        return None

    async def get(self, key: str) -> V:
        value = self.fresh(key)
        if value is not None:
            return value
        fut = self._inflight.get(key)
        if fut is None:  # concurrent misses share one read
            # The epoch is taken now, not when the read starts: an invalidation in between must win.
            fut = asyncio.ensure_future(self._read(key, self._epoch, time.time()))
            self._inflight[key] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(fut)

    async def _read(self, key: str, epoch: int, read_at: float) -> V:
        try:
            value = (await self.load([key]))[key]
        except StoreUnavailable:
            entry = self._entries.get(key)
            if entry is not None and time.time() - entry.loaded_at < self.ttl_s + self.stale_s:
                return entry.value
            raise AuthUnavailable("the database is unreachable") from None
        if epoch == self._epoch:
            self.put(key, value, read_at)
        return value

    def put(self, key: str, value: V, read_at: float | None = None) -> None:
        self._entries[key] = _Entry(value, time.time() if read_at is None else read_at, time.monotonic() + self.ttl_s)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def invalidate(self, keys: tuple[str, ...] | list[str]) -> None:
        self._epoch += 1
        for key in keys:
            self._entries.pop(key, None)
            self._inflight.pop(key, None)  # its waiters get what it read; new requests read again
