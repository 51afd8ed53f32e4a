"""Audit events.

Management writes insert their event in the same transaction as the change (`write_event`). Denials
(`auth.failed`) arrive at request rate, so they are aggregated per (code, key, address, org) and flushed
in batches, at most `failed_max_per_flush` rows a flush: a flood can neither fill the disk nor slow the
hot path, and whatever is dropped is counted in a row of its own and in a metric.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.backends import Conn, StoreUnavailable
from gateway.formats import iso
from gateway.metrics import Metrics
from gateway.store import Store

if TYPE_CHECKING:  # the management layer's, not imported by the hot path that records denials
    from gateway.db import Database

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
    await conn.execute(
        "INSERT INTO audit_events (type, actor, org_id, user_id, key_id, ip, user_agent, target, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)",
        type_,
        actor.id,
        org_id,
        user_id,
        key_id,
        actor.ip,
        (actor.user_agent or "")[:300] or None,
        target,
        json.dumps({**(detail or {}), **({"via_key": actor.key_id} if actor.key_id else {})}),
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
        rows: list[tuple[Any, ...]] = [
            (now, "auth.failed", None, org, None, key_id, ip, n, json.dumps({"code": code, "endpoint": endpoint}))
            for (code, key_id, ip, org, endpoint), n in kept
        ]
        if dropped:
            rows.append((now, "auth.failed.dropped", None, None, None, None, None, dropped, "{}"))
        try:
            await self.store.insert_audit_rows(rows)
        except StoreUnavailable:
            total = sum(r[7] for r in rows)
            self.metrics.audit_dropped.inc(total)
            log.warning("audit store unreachable: %d auth.failed events not written", total)


class AuditLog:
    """An org's audit, as its admins read it."""

    def __init__(self, db: Database) -> None:
        self.db = db

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
            rows = await conn.fetch(
                "SELECT id, at, type, actor, org_id, user_id, key_id, target, host(ip) AS ip, user_agent, count, detail"
                " FROM audit_events WHERE org_id = $1 AND ($2::text IS NULL OR type = $2)"
                " AND ($3::text IS NULL OR key_id = $3) AND ($4::text IS NULL OR actor = $4)"
                " AND ($5::timestamptz IS NULL OR at >= $5) AND ($6::timestamptz IS NULL OR at < $6)"
                " AND ($7::bigint IS NULL OR id < $7) ORDER BY id DESC LIMIT $8",
                org_id,
                type_,
                key_id,
                actor,
                since,
                until,
                before_id,
                limit,
            )
        return [
            {
                **dict(r),
                "at": iso(r["at"]),
                "detail": json.loads(r["detail"]) if isinstance(r["detail"], str) else r["detail"],
            }
            for r in rows
        ]


AUDIT_LOG = web.AppKey("audit_log", AuditLog)
