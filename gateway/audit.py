"""Audit events.

Management writes insert their event in the same transaction as the change (`write_event`). Denials
(`auth.failed`) arrive at request rate, so they are aggregated per (code, key, address, org) and flushed
in batches, at most `failed_max_per_flush` rows a flush: a flood can neither fill the disk nor slow the
hot path, and whatever is dropped is counted in a row of its own and in a metric.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from gateway import constants as C
from gateway.backends import Conn, StoreUnavailable
from gateway.data import audit as data_audit
from gateway.data.audit import FailureRow, NewEvent
from gateway.data.db import Database
from gateway.formats import iso
from gateway.metrics import Metrics
from gateway.store import Store

log = logging.getLogger("gateway.audit")

FailureKey = tuple[str, str | None, str | None, str | None, str]  # code, key id, ip, org, endpoint


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a management change, and from where: recorded with every audit event."""

    id: str  # a user id, or "cli" for the server's command line
    ip: str | None = None
    user_agent: str | None = None
    key_id: str | None = None  # the key the change was made with


CLI = Actor("cli")


async def write_event(
    conn: Conn,
    type_: str,
    *,
    actor: Actor = CLI,
    org_id: str | None = None,
    user_id: str | None = None,
    key_id: str | None = None,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Insert one audit event; call it inside the transaction that makes the change. Never key material."""
    await data_audit.insert(
        conn,
        NewEvent(
            type=type_,
            actor=actor.id,
            org_id=org_id,
            user_id=user_id,
            key_id=key_id,
            ip=actor.ip,
            user_agent=(actor.user_agent or "")[:300] or None,
            target=target,
            detail={**(detail or {}), **({"via_key": actor.key_id} if actor.key_id else {})},
        ),
    )


class FailureAuditor:
    def __init__(self, store: Store, max_rows_per_flush: int, metrics: Metrics) -> None:
        self.store = store
        self.max_rows = max_rows_per_flush
        self.metrics = metrics
        self._pending: Counter[FailureKey] = Counter()
        self._max_groups = max(1000, max_rows_per_flush * 10)
        self._dropped = 0

    def record(self, code: str, key_id: str | None, ip: str | None, org: str | None, endpoint: str) -> None:
        group = (code, key_id, ip, org, endpoint)
        if group in self._pending or len(self._pending) < self._max_groups:
            self._pending[group] += 1
        else:
            self._dropped += 1
            self.metrics.audit_dropped.inc()

    async def flush(self) -> None:
        if not self._pending and not self._dropped:
            return
        groups = self._pending.most_common()
        self._pending = Counter()
        kept, rest = groups[: self.max_rows], groups[self.max_rows :]
        dropped = self._dropped + sum(n for _, n in rest)
        self._dropped = 0
        if rest:
            self.metrics.audit_dropped.inc(sum(n for _, n in rest))
        now = datetime.now(UTC)
        rows = [
            FailureRow(now, "auth.failed", org, key_id, ip, n, {"code": code, "endpoint": endpoint})
            for (code, key_id, ip, org, endpoint), n in kept
        ]
        if dropped:
            rows.append(FailureRow(now, "auth.failed.dropped", None, None, None, dropped, {}))
        await _write(self.store, self.metrics, rows, "auth.failed events")


class UsageAuditor:
    """`api_key.used`: one row per key per minute (count, last address, last route), written in the
    background once the minute is over; never a row per request. Past `max_keys` keys in a minute the
    rest are dropped and counted (`api_key.used.dropped`, and the metric)."""

    def __init__(self, store: Store, metrics: Metrics, max_keys: int = C.USAGE_MAX_KEYS) -> None:
        self.store = store
        self.metrics = metrics
        self.max_keys = max_keys
        # (key, minute) -> [count, org, address, method, path]
        self._pending: dict[tuple[str, int], list[Any]] = {}
        self._dropped: dict[int, int] = {}  # minute -> uses not kept

    def record(self, key_id: str, org: str | None, address: str | None, method: str, path: str) -> None:
        """One allowed request of the key (its route is made into text at the flush, not here)."""
        minute = int(time.time() // 60)
        used = self._pending.get((key_id, minute))
        if used is None:
            if len(self._pending) >= self.max_keys:
                self._dropped[minute] = self._dropped.get(minute, 0) + 1
                self.metrics.audit_dropped.inc()
                return
            used = self._pending[(key_id, minute)] = [0, org, address, method, path]
        used[0] += 1
        used[1], used[2], used[3], used[4] = org, address, method, path

    async def flush(self, final: bool = False) -> None:
        """Write the minutes that are over (all of them when `final`, at shutdown)."""
        now = int(time.time() // 60)
        done = [k for k in self._pending if final or k[1] < now]
        dropped = [m for m in self._dropped if final or m < now]
        if not done and not dropped:
            return
        rows = []
        for key in done:
            (key_id, minute), (count, org, address, method, path) = key, self._pending.pop(key)
            at = datetime.fromtimestamp(minute * 60, UTC)
            route = f"{method} {path}"[:200]
            rows.append(FailureRow(at, "api_key.used", org, key_id, address, count, {"last_route": route}))
        for minute in dropped:
            at = datetime.fromtimestamp(minute * 60, UTC)
            rows.append(FailureRow(at, "api_key.used.dropped", None, None, None, self._dropped.pop(minute), {}))
        await _write(self.store, self.metrics, rows, "api_key.used uses")


async def _write(store: Store, metrics: Metrics, rows: list[FailureRow], what: str) -> None:
    """Aggregated rows, written in the background: Postgres down, they are counted as dropped."""
    try:
        await store.insert_audit_rows(rows)
    except StoreUnavailable:
        total = sum(r.count for r in rows)
        metrics.audit_dropped.inc(total)
        log.warning("audit store unreachable: %d %s not written", total, what)


class AuditLog:
    """An org's audit, as its admins read it."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(
        self,
        type_: str,
        actor: Actor,
        *,
        org_id: str | None = None,
        user_id: str | None = None,
        target: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """One event on its own (a change made outside Postgres: a session's)."""
        async with self.db.connect() as conn:
            await write_event(conn, type_, actor=actor, org_id=org_id, user_id=user_id, target=target, detail=detail)

    async def events(
        self,
        org_id: str,
        *,
        type_: str | None = None,
        key_id: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """An org's audit events, newest first."""
        async with self.db.connect() as conn:
            rows = await data_audit.events(
                conn,
                org_id,
                type_=type_,
                key_id=key_id,
                actor=actor,
                since=since,
                until=until,
                before_id=before_id,
                limit=limit,
            )
        return [{**asdict(r), "at": iso(r.at)} for r in rows]

    async def last_uses(self, wanted: list[tuple[str, str | None]]) -> list[data_audit.LastUse]:
        """Each (key, org) pair's latest use (org None: in any org), from the `api_key.used` rows."""
        if not wanted:
            return []
        async with self.db.connect() as conn:
            return await data_audit.last_uses(conn, wanted)

    async def daily_usage(self, key_id: str, org_ids: list[str] | None, days: int) -> list[dict[str, Any]]:
        """A key's requests on each of the last `days` UTC days, today included (only in `org_ids` unless
        it is None), oldest first."""
        last = datetime.now(UTC).date()
        first = last - timedelta(days=days - 1)
        async with self.db.connect() as conn:
            rows = await data_audit.daily_usage(conn, key_id, org_ids, first, last)
        return [{"day": r.day.isoformat(), "requests": r.requests} for r in rows]


AUDIT_LOG = web.AppKey("audit_log", AuditLog)
