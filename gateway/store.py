"""The hot path's reads from Postgres (and the background flushers' writes), each one call of
`Database.run`: one deadline, the circuit breaker, the connection released in the background."""

from __future__ import annotations

import asyncpg

from gateway._breaker import Breaker
from gateway.data import audit, keys, orgs, tokens
from gateway.data.db import Database, ping
from gateway.models import KeyRecord


class Store:
    def __init__(self, pool: asyncpg.Pool, timeout_s: float, breaker: Breaker | None = None) -> None:
        self.db = Database(pool, timeout_s, breaker=breaker)

    @property
    def pool(self) -> asyncpg.Pool:
        return self.db.pool

    @property
    def breaker(self) -> Breaker:
        return self.db.breaker

    async def close(self) -> None:
        """Wait for background releases, then close the pool."""
        await self.db.close()

    async def load_key(self, key_id: str) -> tuple[KeyRecord, str] | None:
        """The key and its owner's memberships, with the argon2 hash; None if there is no such key."""
        return await self.db.run(lambda c: keys.load(c, key_id))

    async def project_org(self, project_id: str) -> str | None:
        return await self.db.run(lambda c: orgs.project_org(c, project_id))

    async def ping(self) -> None:
        await self.db.run(ping)

    async def touch_last_used(self, used: dict[str, float]) -> None:
        await self.db.run(lambda c: keys.touch_last_used(c, used))

    async def insert_audit_rows(self, rows: list[audit.FailureRow]) -> None:
        await self.db.run(lambda c: audit.insert_failures(c, rows))

    async def memberships(self, user_ids: list[str]) -> dict[str, dict[str, str]]:
        """Each user's org -> role (a user in no org, or no user at all: an empty mapping)."""
        rows = await self.db.run(lambda c: orgs.memberships(c, user_ids))
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
