"""The two cache tiers in front of Postgres: in-process and Redis.

Both are keyed by the HMAC digest of the whole key. Positive entries (a key whose secret verified, with
its state and its owner's memberships) and negative entries (unknown key id, wrong secret) are kept
apart. Redis entries carry the key's generation at fill time; invalidation bumps the generation, so an
entry written by a fill that raced a revocation is never read back as valid.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from gateway import constants as C
from gateway._breaker import Breaker, guarded
from gateway.backends import REDIS_ERRORS
from gateway.models import KeyRecord
from gateway.redis_client import RedisClient


@dataclass(slots=True)
class Entry:
    record: KeyRecord
    loaded_at: float  # wall-clock time the record was read from Postgres
    local_fresh_until: float = 0.0  # monotonic
    revalidate_after: float = 0.0  # monotonic: no new background revalidation before (backs off in outages)


@dataclass(slots=True)
class _Negative:
    code: str
    until: float  # monotonic


class LocalCache:
    """Bounded in-process LRU of positive and negative entries, with a key-id index for invalidation."""

    def __init__(self, max_entries: int, ttl_s: float, negative_ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._negative: OrderedDict[str, _Negative] = OrderedDict()
        self._by_key: dict[str, set[str]] = {}
        # Bumped by every invalidation: a fill that started under an older epoch is not stored.
        self.epoch = 0
        # Whether invalidations currently reach this process (its LISTEN connection is up). While they
        # do not, no entry counts as fresh: each use is revalidated, so a missed revocation is caught.
        self.listening = False
        # Wall-clock end of the last gap in listening (the process's start is the end of the first: nothing
        # before it reached us). A record read from Postgres before it may have missed an invalidation that
        # no process applied to Redis either, or that Redis lost (a failover): it is revalidated from Postgres.
        self.trusted_since = time.time()
        # Key id -> wall time an invalidation of it reached this process, the latest `max_entries` of them,
        # and the floor the older ones left: Redis may lose an invalidation this process applied (a Sentinel
        # failover to a replica it had not reached, a restart from a snapshot), and its stale entry must not
        # come back from there (see `shared_trusts`).
        self._invalidated: OrderedDict[str, float] = OrderedDict()
        self.shared_floor = 0.0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> Entry | None:
        entry = self._entries.get(digest)
        if entry is not None:
            self._entries.move_to_end(digest)
        return entry

    def put(self, digest: str, entry: Entry, epoch: int) -> bool:
        if epoch != self.epoch:
            return False
        entry.local_fresh_until = time.monotonic() + self.ttl_s
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        self._by_key.setdefault(entry.record.id, set()).add(digest)
        while len(self._entries) > self.max_entries:
            old_digest, old = self._entries.popitem(last=False)
            self._unindex(old.record.id, old_digest)
        return True

    def record_of(self, key_id: str) -> KeyRecord | None:
        """A fresh record of this key id (under any of its digests), or None."""
        for digest in self._by_key.get(key_id, ()):
            entry = self._entries.get(digest)
            if entry is not None and self.fresh(entry):
                return entry.record
        return None

    def trusts(self, entry: Entry) -> bool:
        """Was the entry read from Postgres since invalidations last (re)started reaching us?"""
        return entry.loaded_at >= self.trusted_since

    def shared_trusts(self, entry: Entry) -> bool:
        """May an entry found in Redis be used? Read since invalidations reach us, and not possibly before
        an invalidation of its key that Redis may have lost."""
        return self.trusts(entry) and not self.maybe_invalidated(entry)

    def maybe_invalidated(self, entry: Entry) -> bool:
        """Was the entry read before (or within the clock skew allowed between replicas of) the last
        invalidation of its key this process was told of? Then it may predate that change, whatever Redis
        kept of the invalidation."""
        if entry.loaded_at <= self.shared_floor:
            return True
        invalidated = self._invalidated.get(entry.record.id)
        return invalidated is not None and entry.loaded_at <= invalidated + C.CLOCK_SKEW_S

    def fresh(self, entry: Entry) -> bool:
        return self.listening and self.trusts(entry) and time.monotonic() < entry.local_fresh_until

    def gap_ended(self) -> None:
        """Invalidations reach us again after a gap, and those sent meanwhile are lost: nothing read before
        now counts as fresh (each entry is revalidated on its next use), nor is a Redis entry read before."""
        self.epoch += 1  # a fill still in flight read before now: not stored
        self.trusted_since = time.time()

    def drop(self, digest: str) -> None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self._unindex(entry.record.id, digest)

    def get_negative(self, digest: str) -> str | None:
        neg = self._negative.get(digest)
        if neg is None:
            return None
        if neg.until <= time.monotonic():
            del self._negative[digest]
            return None
        return neg.code

    def put_negative(self, digest: str, code: str, epoch: int) -> None:
        if epoch != self.epoch or self.negative_ttl_s <= 0:
            return
        self._negative[digest] = _Negative(code, time.monotonic() + self.negative_ttl_s)
        self._negative.move_to_end(digest)
        while len(self._negative) > self.max_entries:
            self._negative.popitem(last=False)

    def _unindex(self, key_id: str, digest: str) -> None:
        digests = self._by_key.get(key_id)
        if digests is not None:
            digests.discard(digest)
            if not digests:
                del self._by_key[key_id]

    def invalidate(self, key_ids: list[str]) -> int:
        self.epoch += 1
        now = time.time()
        for key_id in key_ids:
            self._invalidated[key_id] = now
            self._invalidated.move_to_end(key_id)
        while len(self._invalidated) > self.max_entries:
            _, forgotten = self._invalidated.popitem(last=False)
            self.shared_floor = max(self.shared_floor, forgotten + C.CLOCK_SKEW_S)
        dropped = 0
        for key_id in key_ids:
            for digest in self._by_key.pop(key_id, ()):
                if self._entries.pop(digest, None) is not None:
                    dropped += 1
        return dropped

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()
        self._negative.clear()
        self._by_key.clear()


@dataclass(frozen=True, slots=True)
class RedisLookup:
    entry: Entry | None
    negative: str | None
    generation: str  # to embed in a later fill


class RedisCache:
    """The shared tier. Every call goes through the Redis breaker and raises one of REDIS_UNAVAILABLE
    on trouble; callers fall back."""

    def __init__(
        self,
        client: RedisClient,
        ttl_s: float,
        negative_ttl_s: float,
        stale_s: float,
        breaker: Breaker | None = None,
    ) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.stale_s = stale_s
        self.breaker = breaker or Breaker("redis")

    async def lookup(self, key_id: str, digest: str) -> RedisLookup:
        entry_key = C.REDIS_KEY_ENTRY.format(key_id=key_id, digest=digest)
        gen_key = C.REDIS_KEY_GENERATION.format(key_id=key_id)
        neg_key = C.REDIS_NEGATIVE_ENTRY.format(key_id=key_id, digest=digest)
        raw_entry, raw_gen, raw_neg = await guarded(
            self.breaker, lambda: self.client.mget(entry_key, gen_key, neg_key), REDIS_ERRORS, "cache_get"
        )
        gen = _text(raw_gen) or "0"
        entry = None
        if raw_entry is not None:
            entry = _entry(raw_entry, gen)
        return RedisLookup(entry, _text(raw_neg) if raw_neg is not None else None, gen)

    async def put(self, digest: str, entry: Entry, generation: str) -> None:
        key_id = entry.record.id
        payload = json.dumps({"gen": generation, "loaded_at": entry.loaded_at, "record": entry.record.to_json()})
        # Kept past its freshness so it can serve while Postgres is down.
        ttl_ms = int((self.ttl_s + self.stale_s) * 1000) or 1
        index = C.REDIS_KEY_INDEX.format(key_id=key_id)

        async def fill() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(C.REDIS_KEY_ENTRY.format(key_id=key_id, digest=digest), payload, px=ttl_ms)
                pipe.sadd(index, digest)
                pipe.pexpire(index, ttl_ms)
                await pipe.execute()

        await guarded(self.breaker, fill, REDIS_ERRORS, "cache_put")

    async def put_negative(self, key_id: str, digest: str, code: str) -> None:
        if self.negative_ttl_s <= 0:
            return
        key = C.REDIS_NEGATIVE_ENTRY.format(key_id=key_id, digest=digest)
        ttl_ms = int(self.negative_ttl_s * 1000)
        await guarded(self.breaker, lambda: self.client.set(key, code, px=ttl_ms), REDIS_ERRORS, "cache_put_negative")

    async def invalidate(self, key_ids: list[str]) -> None:
        await guarded(self.breaker, lambda: self._invalidate(key_ids), REDIS_ERRORS, "cache_invalidate")

    async def _invalidate(self, key_ids: list[str]) -> None:
        # The generation bump alone makes old entries unreadable; deleting them too keeps a revoked
        # key's entry from resurfacing should the generation counter ever be evicted.
        async with self.client.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.incr(C.REDIS_KEY_GENERATION.format(key_id=key_id))
                pipe.smembers(C.REDIS_KEY_INDEX.format(key_id=key_id))
            results = await pipe.execute()
        async with self.client.pipeline(transaction=False) as pipe:
            for key_id, members in zip(key_ids, results[1::2], strict=True):
                # One DEL per key id: its keys share a hash slot, as Redis Cluster requires.
                doomed = [C.REDIS_KEY_ENTRY.format(key_id=key_id, digest=_text(d)) for d in members]
                pipe.delete(C.REDIS_KEY_INDEX.format(key_id=key_id), *doomed)
            await pipe.execute()


def _entry(raw: Any, generation: str) -> Entry | None:
    """A cached entry filled under `generation`; anything else (stale, or unreadable) is a miss."""
    try:
        payload = json.loads(raw)
        if payload.get("gen") != generation:
            return None
        return Entry(KeyRecord.from_json(payload["record"]), float(payload["loaded_at"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
