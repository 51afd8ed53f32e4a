"""The hot path's reads from Postgres (and the background flushers' writes), each one call of
`Database.run`: one deadline, the circuit breaker, the connection released in the background.

With a read replica (`database.replica_url`), lookups of keys, memberships and projects go to it, on one
condition that makes replica lag harmless: the replica has replayed the primary's WAL up to the `floor`,
a position on the primary at or past every change this process has been told of. The invalidation
listener moves the floor: on each NOTIFY it turns replica reads off (floor None), applies the change to
the caches, then reads the primary's WAL position, so a read that follows an invalidation sees that
change, on the replica or (when the replica has not replayed that far) on the primary. While the
listener is down, or the position cannot be read, every read goes to the primary, as it does when the
replica is down, slow, refusing or not a standby at all. A key or project the replica does not know is
asked of the primary too: it may have been created a moment ago. Reads that must see a write just made
ask for the primary (`primary=True`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import asyncpg

from gateway._breaker import Breaker
from gateway.backends import Pooled, StoreUnavailable
from gateway.data import audit, keys, orgs, tokens
from gateway.data.db import Database, ping, replayed_position
from gateway.models import KeyRecord

log = logging.getLogger("gateway.store")

T = TypeVar("T")

# The replica had not replayed up to the floor: the read is the primary's.
_BEHIND: Final = object()


class Store:
    def __init__(
        self, pool: asyncpg.Pool, timeout_s: float, breaker: Breaker | None = None, replica: Database | None = None
    ) -> None:
        self.db = Database(pool, timeout_s, breaker=breaker)
        self.replica = replica
        self.floor: int | None = None  # WAL position a replica read needs; None: unknown, no replica reads
        self.replica_reads = 0  # answered by the replica (the rest of the lookups went to the primary)

    def advance(self, lsn: int | None) -> None:
        """The primary's WAL position after the changes this process was told of (None: invalidations do
        not reach us now, so no position is known to be enough)."""
        self.floor = None if lsn is None else max(lsn, self.floor or 0)

    async def _lookup(
        self, op: str, fn: Callable[[Pooled], Awaitable[T]], confirm_none: bool = False, primary: bool = False
    ) -> tuple[T, bool]:
        """A hot-path read, from the replica when it is far enough along (and up), else from the primary;
        and whether the replica answered."""
        floor = self.floor
        replica = self.replica
        if replica is not None and floor is not None and not primary and replica.breaker.available:

            async def on_replica(conn: Pooled) -> object:
                replayed = await replayed_position(conn)  # None: not a standby
                return await fn(conn) if replayed is not None and replayed >= floor else _BEHIND

            try:
                found = await replica.run(on_replica, op)
            except StoreUnavailable:
                found = _BEHIND
            except asyncpg.PostgresError as exc:
                # Refused there but not an outage (a query cancelled by a recovery conflict, a wrong
                # password or database name): the primary answers, and the replica is left alone a while.
                log.warning("replica lookup failed (%s): asking the primary", type(exc).__name__)
                replica.breaker.failed()
                found = _BEHIND
            if found is not _BEHIND and not (confirm_none and found is None):
                self.replica_reads += 1
                return found, True  # type: ignore[return-value]  # what fn returned
        return await self.db.run(fn, op), False

    @property
    def pool(self) -> asyncpg.Pool:
        return self.db.pool

    @property
    def breaker(self) -> Breaker:
        return self.db.breaker

    async def close(self) -> None:
        """Wait for background releases, then close the pools."""
        if self.replica is not None:
            await self.replica.close()
        await self.db.close()

    async def load_key(self, key_id: str, *, primary: bool = False) -> tuple[KeyRecord, str] | None:
        """The key and its owner's memberships, with the argon2 hash; None if there is no such key. With
        `primary`, read there (a caller that must see its own writes)."""
        return (await self.load_key_from(key_id, primary=primary))[0]

    async def load_key_from(self, key_id: str, *, primary: bool = False) -> tuple[tuple[KeyRecord, str] | None, bool]:
        """As load_key, and whether the replica answered (such a read is not shared through Redis: another
        process, told of a change before this one, could take it for newer than the change)."""
        return await self._lookup("load_key", lambda c: keys.load(c, key_id), confirm_none=True, primary=primary)

    async def project_org(self, project_id: str) -> str | None:
        return (await self._lookup("project_org", lambda c: orgs.project_org(c, project_id), confirm_none=True))[0]

    async def ping(self) -> None:
        await self.db.run(ping)

    async def touch_last_used(self, used: dict[str, float]) -> None:
        await self.db.run(lambda c: keys.touch_last_used(c, used))

    async def insert_audit_rows(self, rows: list[audit.FailureRow]) -> None:
        await self.db.run(lambda c: audit.insert_failures(c, rows))

    async def memberships(self, user_ids: list[str], *, primary: bool = False) -> dict[str, dict[str, str]]:
        """Each user's org -> role (a user in no org, or no user at all: an empty mapping); with `primary`,
        read there."""
        rows, _ = await self._lookup("memberships", lambda c: orgs.memberships(c, user_ids), primary=primary)
        found: dict[str, dict[str, str]] = {u: {} for u in user_ids}
        for m in rows:
            found[m.user_id][m.org_id] = m.role
        return found

    async def revoked_families(self, family_ids: list[str]) -> dict[str, bool]:
        """Each refresh family's state: revoked or not (one that does not exist counts as revoked)."""
        found = await self.db.run(lambda c: tokens.revoked_families(c, family_ids))
        return {f: found.get(f, True) for f in family_ids}

    async def key_records(self, key_ids: list[str]) -> dict[str, KeyRecord | None]:
        """Keys by id, without their hashes (None: no such key)."""
        found: dict[str, KeyRecord | None] = {}
        for key_id in key_ids:
            loaded = await self.load_key(key_id)
            found[key_id] = loaded[0] if loaded is not None else None
        return found
