"""audit_events: one row per management change, aggregated rows for denials."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.backends import Conn


@dataclass(frozen=True, slots=True)
class NewEvent:
    type: str
    actor: str | None
    org_id: str | None
    user_id: str | None
    key_id: str | None
    ip: str | None
    user_agent: str | None
    target: str | None
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class FailureRow:
    """Denials of one kind since the last flush (`type` auth.failed), or those dropped (auth.failed.dropped)."""

    at: datetime
    type: str
    org_id: str | None
    key_id: str | None
    ip: str | None
    count: int
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EventRow:
    id: int
    at: datetime
    type: str
    actor: str | None
    org_id: str | None
    user_id: str | None
    key_id: str | None
    target: str | None
    ip: str | None
    user_agent: str | None
    count: int
    detail: dict[str, Any]


async def insert(conn: Conn, event: NewEvent) -> None:
    await conn.execute(
        "INSERT INTO audit_events (type, actor, org_id, user_id, key_id, ip, user_agent, target, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)",
        event.type,
        event.actor,
        event.org_id,
        event.user_id,
        event.key_id,
        event.ip,
        event.user_agent,
        event.target,
        json.dumps(event.detail),
    )


async def insert_failures(conn: Conn, rows: list[FailureRow]) -> None:
    await conn.executemany(
        "INSERT INTO audit_events (at, type, org_id, key_id, ip, count, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)",
        [(r.at, r.type, r.org_id, r.key_id, r.ip, r.count, json.dumps(r.detail)) for r in rows],
    )


async def events(
    conn: Conn,
    org_id: str,
    *,
    type_: str | None,
    key_id: str | None,
    actor: str | None,
    since: datetime | None,
    until: datetime | None,
    before_id: int | None,
    limit: int,
) -> list[EventRow]:
    """An org's events, newest first, before the id cursor."""
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
        EventRow(
            **{**dict(r.items()), "detail": json.loads(r["detail"]) if isinstance(r["detail"], str) else r["detail"]}
        )
        for r in rows
    ]
