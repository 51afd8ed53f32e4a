"""The one way to Postgres: the pool, and a `Database` handing out connections with a deadline and the
outage mapping, in two shapes. `run` is the hot path's (the circuit breaker, the answer at the deadline,
the connection released in the background); `connect` is the management layer's (one deadline for the
whole call, a transaction if asked). Both turn a Postgres that cannot answer into StoreUnavailable (503)
and leave a wrong call (a bug) what it is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import asyncpg

from gateway import constants as C
from gateway._breaker import Breaker
from gateway.backends import PG_ERRORS, Conn, Pooled, StoreUnavailable, pg_outage
from gateway.config import DatabaseConfig, redact_url
from gateway.errors import GatewayError
from gateway.keys import random_b62

log = logging.getLogger("gateway.db")

T = TypeVar("T")
R = TypeVar("R")

_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*PG_ERRORS, asyncpg.PostgresError)


def new_id(kind: str) -> str:
    return f"{kind}_{random_b62(16)}"


def typed(cls: Callable[..., T], record: asyncpg.Record | None) -> T | None:
    """A row as its dataclass: the query names exactly the dataclass's fields."""
    return None if record is None else cls(**dict(record.items()))


def typed_all(cls: Callable[..., T], records: Iterable[asyncpg.Record]) -> list[T]:
    return [cls(**dict(r.items())) for r in records]


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


async def ping(conn: Conn, timeout_s: float | None = None) -> None:
    await conn.fetchval("SELECT 1", timeout=timeout_s)


async def wal_position(conn: Conn, timeout_s: float | None = None) -> int | None:
    """Where the primary's WAL ends now (its insert position: a commit already made is before it, written to
    disk or not, as with synchronous_commit off); None on a standby."""
    lsn: int | None = await conn.fetchval(
        "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn() END", timeout=timeout_s
    )
    return lsn


async def replayed_position(conn: Conn) -> int | None:
    """How far a standby has replayed its primary's WAL; None on a server that is not a standby."""
    lsn: int | None = await conn.fetchval("SELECT pg_last_wal_replay_lsn()")
    return lsn


async def notify_keys(conn: Conn, key_ids: list[str]) -> None:
    """Every process drops these keys from its caches when the caller's transaction commits."""
    for i in range(0, len(key_ids), C.PG_NOTIFY_BATCH):
        await _notify(conn, {"k": key_ids[i : i + C.PG_NOTIFY_BATCH]})


async def notify(
    conn: Conn, *, users: Sequence[str] = (), families: Sequence[str] = (), signing_keys: bool = False
) -> None:
    """Every process re-reads these users' memberships, these refresh families' state, and (when asked)
    the published signing keys, when the caller's transaction commits."""
    for name, ids in (("u", list(users)), ("f", list(families))):
        for i in range(0, len(ids), C.PG_NOTIFY_BATCH):
            await _notify(conn, {name: ids[i : i + C.PG_NOTIFY_BATCH]})
    if signing_keys:
        await _notify(conn, {"s": True})


async def _notify(conn: Conn, payload: dict[str, object]) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", C.PG_INVALIDATION_CHANNEL, json.dumps(payload))


def _op(fn: Callable[..., Any]) -> str:
    """What a hot-path call is for, as its latency's label: the method that made the query
    (`Store.load_key.<locals>.<lambda>` is `load_key`)."""
    return getattr(fn, "__qualname__", "call").split(".<locals>", 1)[0].rpartition(".")[2]


class Database:
    def __init__(
        self,
        pool: asyncpg.Pool,
        timeout_s: float = C.DEFAULT_MANAGEMENT_TIMEOUT_MS / 1000,
        on_invalidate: Callable[[list[str]], None] | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        # Told the key ids each change invalidates (the CLI drops them from Redis itself): a callback of the
        # caller's, not state kept here, since one Database serves concurrent calls.
        self.on_invalidate = on_invalidate
        self.breaker = breaker or Breaker("postgres")
        self._releasing: set[asyncio.Task[None]] = set()

    async def run(self, fn: Callable[[Pooled], Awaitable[R]], op: str | None = None) -> R:
        """One hot-path query: one deadline, `timeout_s`, for getting a connection and running it
        together. Past it the answer goes at once: the connection, possibly mid-query, is terminated and
        handed back in the background, never awaited by the request. Calls go through the circuit
        breaker, shared by every caller of this Database."""
        if not self.breaker.allow():
            raise StoreUnavailable("recently failed")
        conn: Pooled | None = None
        started = time.perf_counter()
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
        finally:
            self.breaker.timed(op or _op(fn), time.perf_counter() - started)
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

    @contextlib.asynccontextmanager
    async def connect(self, *, transaction: bool = False) -> AsyncIterator[Pooled]:
        """A connection for one management call, in a transaction if asked: the whole call within
        `timeout_s`, and a database that cannot answer in time is StoreUnavailable (503). A connection
        that timed out or failed is closed rather than rolled back: a ROLLBACK to a server that does not
        answer would hang the call (closing it ends the transaction on the server)."""
        conn: Pooled | None = None
        started = time.perf_counter()
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
            self.breaker.timed("management", time.perf_counter() - started)
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
