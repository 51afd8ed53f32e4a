"""The invalidation listener: LISTEN on Postgres for changes of access, and background-task supervision.

Every process keeps one connection that LISTENs on the invalidation channel. Whatever goes wrong on it
(a reset, a hung server, asyncpg refusing an operation in an odd state, a bug in a handler) is logged
and the connection is made again; only cancellation ends it. While it is down the in-process cache is
not trusted as fresh (each cached key is revalidated on use), and once it is back nothing read before
counts as fresh until revalidated, since notifications sent in between are lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from gateway import constants as C
from gateway.backends import PG_ERRORS
from gateway.cache import LocalCache
from gateway.data.db import ping, wal_position

log = logging.getLogger("gateway.listener")

# A failed read of the primary's WAL position: the position stays unknown (see InvalidationListener._position).
_POSITION_ERRORS: tuple[type[BaseException], ...] = (*PG_ERRORS, asyncpg.PostgresError)

# Sent through the queue when asyncpg reports the connection closed, so the loop notices at once.
_LOST = object()


@dataclass(frozen=True)
class Change:
    """A notification other than keys (see `gateway.data.db.notify`): users whose memberships changed,
    refresh families revoked, or the signing keys."""

    users: tuple[str, ...] = ()
    families: tuple[str, ...] = ()
    signing_keys: bool = False


class InvalidationListener:
    def __init__(
        self,
        dsn: str,
        local: LocalCache,
        on_keys: Callable[[list[str]], Awaitable[None]],
        timeout_s: float,
        ping_interval_s: float = C.LISTENER_PING_S,
        on_change: Callable[[Change], Awaitable[None]] | None = None,
        on_position: Callable[[int | None], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.local = local
        self.on_keys = on_keys
        self.on_change = on_change
        # Told None before notifications are acted on (and when the connection is lost), then the primary's
        # WAL position read after them: how far a read replica must have replayed (see gateway/store.py).
        self.on_position = on_position
        self.position_known = False
        self.timeout_s = timeout_s
        self.ping_interval_s = ping_interval_s
        self.reconnects = 0
        self.failures = 0  # in a row, since it was last connected
        self.backend_pid: int | None = None  # of the LISTEN connection, while connected

    @property
    def connected(self) -> bool:
        return self.local.listening

    async def run(self) -> None:
        """Listen forever, reconnecting after any failure; returns only by cancellation."""
        first = True
        while True:
            try:
                await self._listen(first)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # anything else: the connection is gone, make a new one
                if _cancelled():
                    raise asyncio.CancelledError from exc
                level = logging.WARNING if first or self.reconnects % 20 == 0 else logging.DEBUG
                log.log(
                    level, "invalidation listener lost its connection (%s: %s); reconnecting", type(exc).__name__, exc
                )
            finally:
                self.local.listening = False
                self.backend_pid = None
                if self.on_position is not None:
                    self.on_position(None)
            first = False
            await asyncio.sleep(self.ping_interval_s)

    async def _listen(self, first: bool) -> None:
        queue: asyncio.Queue[object] = asyncio.Queue()

        def on_notify(_c: Any, _pid: int, _channel: str, payload: object) -> None:
            queue.put_nowait(payload)

        conn: asyncpg.Connection | None = None
        try:
            # Every step has a deadline: a server that stops answering mid-way must not hang us silently.
            async with asyncio.timeout(self.timeout_s):
                conn = await asyncpg.connect(self.dsn, server_settings={"application_name": "gateway-listener"})
                conn.add_termination_listener(lambda _c: queue.put_nowait(_LOST))
                await conn.add_listener(C.PG_INVALIDATION_CHANNEL, on_notify)
            self.backend_pid = conn.get_server_pid()
            await self._position(conn)
            if not first:
                self.reconnects += 1
                log.warning("invalidation listener reconnected: every cached key is revalidated on its next use")
                self.local.gap_ended()
            self.local.listening = True
            self.failures = 0
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self.ping_interval_s)
                except TimeoutError:
                    await ping(conn, self.timeout_s)
                    if not self.position_known:
                        await self._position(conn)  # a read that failed before: try again
                    continue
                await self._apply([item, *_drain(queue)], conn)
        finally:
            if conn is not None:
                conn.terminate()

    async def _apply(self, items: list[object], conn: asyncpg.Connection) -> None:
        """Act on notifications taken together (a burst), then read the position past all of them."""
        if self.on_position is not None:
            self.on_position(None)  # until the position past these changes is known: no replica reads
        for item in items:
            if item is _LOST:
                raise ConnectionError("the LISTEN connection was closed")
            found = _parse(item)
            if isinstance(found, list):
                await self.on_keys(found)
            elif found is not None and self.on_change is not None:
                await self.on_change(found)
        await self._position(conn)

    async def _position(self, conn: asyncpg.Connection) -> None:
        """Tell `on_position` the primary's WAL position, read after every change applied so far. A failed
        read leaves it unknown (no replica reads) and never costs a notification; a dead connection is
        found by the next ping."""
        if self.on_position is None:
            return
        try:
            lsn = await wal_position(conn, self.timeout_s)  # None on a standby (the url is not the primary)
        except _POSITION_ERRORS as exc:
            log.debug("cannot read the primary's WAL position: %s", type(exc).__name__)
            lsn = None
        self.position_known = lsn is not None
        self.on_position(lsn)


def _cancelled() -> bool:
    """Was this task asked to stop? Python 3.11's wait_for (which asyncpg's connect uses) can turn a
    cancellation that meets a failure at the same moment into that failure: the loop must stop anyway."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _drain(queue: asyncio.Queue[object]) -> list[object]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _parse(payload: object) -> list[str] | Change | None:
    """Key ids, or another change; None for a malformed payload."""
    try:
        data = json.loads(str(payload))
        if "k" in data:
            return [str(k) for k in data["k"]]
        change = Change(
            tuple(str(u) for u in data.get("u", ())),
            tuple(str(f) for f in data.get("f", ())),
            data.get("s") is True,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        change = None
    if change is None or change == Change():
        log.error("ignoring malformed invalidation payload")
        return None
    return change


async def supervise(name: str, run: Callable[[], Awaitable[None]], restart_delay_s: float = 1.0) -> None:
    """Run a background task forever: if it ever returns or raises, log it and start it again."""
    while True:
        try:
            await run()
            log.error("background task %s stopped; restarting it", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            if _cancelled():
                raise asyncio.CancelledError from None
            log.exception("background task %s crashed; restarting it", name)
        await asyncio.sleep(restart_delay_s)
