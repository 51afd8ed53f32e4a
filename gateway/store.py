"""Postgres access: the pool, migrations and the hot path's queries."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib import resources
from typing import Any

import asyncpg

from gateway import constants as C
from gateway._breaker import Breaker
from gateway.backends import PG_ERRORS, Conn, Pooled, StoreUnavailable, pg_outage
from gateway.config import DatabaseConfig, redact_url
from gateway.models import KeyRecord

log = logging.getLogger("gateway.store")


def ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def fingerprint(secret_hash: str) -> str:
    return hashlib.sha256(secret_hash.encode()).hexdigest()[:16]


_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*PG_ERRORS, asyncpg.PostgresError)


async def connect_pool(cfg: DatabaseConfig) -> asyncpg.Pool:
    """Create the pool, retrying a bounded number of times, then failing loudly."""
    delay = 0.2
    for attempt in range(1, cfg.connect_retries + 1):
        try:
            pool: asyncpg.Pool = await asyncpg.create_pool(
                cfg.url.get(),
                min_size=cfg.pool_min,
                max_size=cfg.pool_max,
                timeout=cfg.timeout_ms / 1000,
                command_timeout=cfg.timeout_ms / 1000,
            )
            return pool
        except _CONNECT_ERRORS as exc:
            if attempt == cfg.connect_retries:
                raise StoreUnavailable(
                    f"cannot connect to Postgres at {redact_url(cfg.url.get())}: {exc.__class__.__name__}: {exc}"
                ) from None
            log.warning(
                "postgres not reachable (attempt %d/%d): %s", attempt, cfg.connect_retries, exc.__class__.__name__
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")  # pragma: no cover


def migration_files() -> list[tuple[int, str, str]]:
    out = []
    for item in resources.files("gateway.migrations").iterdir():
        if item.name.endswith(".sql"):
            version = int(item.name.split("_", 1)[0])
            out.append((version, item.name, item.read_text(encoding="utf-8")))
    return sorted(out)


async def migrate(conn: Conn) -> list[str]:
    """Apply pending migrations; an advisory lock makes concurrent runs from several replicas safe."""
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", C.MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied_now.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", C.MIGRATION_LOCK_ID)
    return applied_now


# The owner's memberships, less the orgs whose admins stopped this key there: it cannot act in those.
_LOAD_KEY = """
SELECT k.id, k.user_id, k.name, k.role, k.env, k.secret_hash, k.scopes, k.all_orgs, k.org_ids,
       k.all_projects, k.project_ids, k.allowed_cidrs::text[] AS allowed_cidrs, k.rate_limit,
       k.expires_at, k.revoked_at,
       COALESCE((SELECT json_object_agg(m.org_id, m.role) FROM memberships m WHERE m.user_id = k.user_id
                 AND NOT EXISTS (SELECT 1 FROM key_org_blocks b WHERE b.key_id = k.id AND b.org_id = m.org_id)),
                '{}'::json) AS memberships
FROM api_keys k WHERE k.id = $1
"""


def _optional_tuple(value: list[str] | None) -> tuple[str, ...] | None:
    return tuple(value) if value is not None else None


class Store:
    """The hot path's reads (and the background flushers' writes) against Postgres.

    Each call has one deadline, `timeout_s`, for getting a connection and running the query together.
    Past it the answer goes at once: the connection, possibly mid-query, is terminated and handed back
    to the pool in the background, never awaited by the request. Calls go through the Postgres circuit
    breaker, shared by every caller in this process.
    """

    def __init__(self, pool: asyncpg.Pool, timeout_s: float, breaker: Breaker | None = None) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        self.breaker = breaker or Breaker("postgres")
        self._releasing: set[asyncio.Task[None]] = set()

    async def _run(self, fn: Callable[[Pooled], Awaitable[Any]]) -> Any:
        if not self.breaker.allow():
            raise StoreUnavailable("recently failed")
        conn: Pooled | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                conn = await self.pool.acquire()
                result = await fn(conn)
        except PG_ERRORS as exc:
            if not pg_outage(exc):  # our call was wrong (a bug): no outage, no breaker
                self._release_later(conn, broken=True)
                raise
            self.breaker.failed()
            if isinstance(exc, TimeoutError) and conn is not None:
                # The server did not answer on a connection: the idle ones may be as dead without knowing
                # it, so replace them all. (Waiting for a free connection is not that: they are busy.)
                await self.pool.expire_connections()
            self._release_later(conn, broken=True)
            raise StoreUnavailable(exc.__class__.__name__) from None
        except BaseException:
            # Cancelled, or an error of the query itself: the connection may be mid-query.
            self._release_later(conn, broken=True)
            raise
        self.breaker.succeeded()
        self._release_later(conn, broken=False)
        return result

    def _release_later(self, conn: Pooled | None, *, broken: bool) -> None:
        """Give the connection back without making the request wait: a release resets the session,
        which is a round trip to a server that may be slow."""
        if conn is None:
            return
        if broken:
            # asyncpg may already have taken back a connection that died under us; nothing to end then.
            with contextlib.suppress(asyncpg.exceptions.InterfaceError):
                conn.terminate()
        task = asyncio.get_running_loop().create_task(self._release(conn))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, conn: Pooled) -> None:
        # asyncpg bounds the reset by `timeout` and terminates the connection itself when it fails (an
        # outer timeout would leave its shielded release running, its error never retrieved).
        with contextlib.suppress(*PG_ERRORS, asyncpg.PostgresError):
            await self.pool.release(conn, timeout=self.timeout_s)

    async def close(self) -> None:
        """Wait for background releases, then close the pool."""
        if self._releasing:
            await asyncio.wait(set(self._releasing), timeout=self.timeout_s)
        await self.pool.close()

    async def load_key(self, key_id: str) -> tuple[KeyRecord, str] | None:
        """The key and its owner's memberships, with the argon2 hash; None if there is no such key."""
        row = await self._run(lambda c: c.fetchrow(_LOAD_KEY, key_id))
        if row is None:
            return None
        memberships = row["memberships"]
        if isinstance(memberships, str):
            memberships = json.loads(memberships)
        record = KeyRecord(
            id=row["id"],
            user_id=row["user_id"],
            name=row["name"],
            role=row["role"],
            env=row["env"],
            scopes=_optional_tuple(row["scopes"]),
            all_orgs=row["all_orgs"],
            org_ids=tuple(row["org_ids"]),
            all_projects=row["all_projects"],
            project_ids=tuple(row["project_ids"]),
            allowed_cidrs=_optional_tuple(row["allowed_cidrs"]),
            rate_limit=row["rate_limit"],
            expires_at=ts(row["expires_at"]),
            revoked_at=ts(row["revoked_at"]),
            memberships=dict(memberships),
            hash_fingerprint=fingerprint(row["secret_hash"]),
        )
        return record, row["secret_hash"]

    async def project_org(self, project_id: str) -> str | None:
        org: str | None = await self._run(lambda c: c.fetchval("SELECT org_id FROM projects WHERE id = $1", project_id))
        return org

    async def ping(self) -> None:
        await self._run(lambda c: c.fetchval("SELECT 1"))

    async def touch_last_used(self, used: dict[str, float]) -> None:
        ids = list(used)
        times = [datetime.fromtimestamp(used[i]).astimezone() for i in ids]
        await self._run(
            lambda c: c.execute(
                "UPDATE api_keys k SET last_used_at = GREATEST(k.last_used_at, v.t)"
                " FROM unnest($1::text[], $2::timestamptz[]) AS v(id, t) WHERE k.id = v.id",
                ids,
                times,
            )
        )

    async def insert_audit_rows(self, rows: list[tuple[Any, ...]]) -> None:
        await self._run(
            lambda c: c.executemany(
                "INSERT INTO audit_events (at, type, actor, org_id, user_id, key_id, ip, count, detail)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)",
                rows,
            )
        )
