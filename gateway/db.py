"""The management layer's way to Postgres: one connection per call with one deadline and the outage
mapping (`Database.connect`), and the invalidation every change of access sends in its transaction.
The hot path's key lookups have their own (`gateway.store`); the rooms over this are `gateway.keyring`,
`gateway.directory` and the audit queries of `gateway.audit`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

import asyncpg

from gateway import constants as C
from gateway.backends import PG_ERRORS, Conn, Pooled, StoreUnavailable, pg_outage
from gateway.errors import GatewayError, NotFound
from gateway.keys import random_b62

log = logging.getLogger("gateway.db")


def new_id(kind: str) -> str:
    return f"{kind}_{random_b62(16)}"


async def notify_keys(conn: Conn, key_ids: list[str]) -> None:
    for i in range(0, len(key_ids), C.PG_NOTIFY_BATCH):
        payload = json.dumps({"k": key_ids[i : i + C.PG_NOTIFY_BATCH]})
        await conn.execute("SELECT pg_notify($1, $2)", C.PG_INVALIDATION_CHANNEL, payload)


_EXISTS = {"orgs": "SELECT 1 FROM orgs WHERE id = $1", "users": "SELECT 1 FROM users WHERE id = $1"}


async def must_exist(conn: Conn, table: str, id_: str) -> None:
    if await conn.fetchval(_EXISTS[table], id_) is None:
        raise NotFound(f"no {table[:-1]} {id_}")


class Database:
    def __init__(
        self,
        pool: asyncpg.Pool,
        timeout_s: float = C.DEFAULT_MANAGEMENT_TIMEOUT_MS / 1000,
        on_invalidate: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        # Told the key ids each change invalidates (the CLI drops them from Redis itself): a callback of the
        # caller's, not state kept here, since one Database serves concurrent calls.
        self.on_invalidate = on_invalidate

    @contextlib.asynccontextmanager
    async def connect(self, *, transaction: bool = False) -> AsyncIterator[Pooled]:
        """A connection for one management call, in a transaction if asked: the whole call within
        `timeout_s`, and a database that cannot answer in time is StoreUnavailable (503). A connection
        that timed out or failed is closed rather than rolled back: a ROLLBACK to a server that does not
        answer would hang the call (closing it ends the transaction on the server)."""
        conn: Pooled | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                conn = await self.pool.acquire()
                tx = conn.transaction() if transaction else None
                if tx is not None:
                    await tx.start()
                try:
                    yield conn
                except (GatewayError, asyncpg.PostgresError):
                    # Refused by the call or by the server, which answered: undo, keep the connection.
                    if tx is not None:
                        await tx.rollback()
                    raise
                if tx is not None:
                    await tx.commit()
        except BaseException as exc:
            if conn is not None and not isinstance(exc, GatewayError | asyncpg.PostgresError):
                conn.terminate()
            if pg_outage(exc):
                log.warning("management call: Postgres unavailable (%s)", type(exc).__name__)
                raise StoreUnavailable("the database is unavailable") from None
            raise
        finally:
            if conn is not None:
                # The call's outcome stands (a commit is done): a failed reset only costs this connection,
                # which asyncpg then closes itself.
                with contextlib.suppress(*PG_ERRORS, asyncpg.PostgresError):
                    await self.pool.release(conn, timeout=self.timeout_s)

    async def invalidate(self, conn: Conn, key_ids: list[str]) -> None:
        """Every process drops these keys when the caller's transaction commits (NOTIFY)."""
        await notify_keys(conn, key_ids)
        if self.on_invalidate is not None:
            self.on_invalidate(key_ids)
