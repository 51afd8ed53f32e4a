"""audit_events: one row per management change, aggregated rows for denials."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime
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


@dataclass(frozen=True, slots=True)
class LastUse:
    """A key's latest `api_key.used` row (in one org, or in any when `org_id` was asked as None)."""

    key_id: str
    org_id: str | None
    at: datetime
    ip: str | None


@dataclass(frozen=True, slots=True)
class DayUsage:
    day: date
    requests: int


async def last_uses(conn: Conn, wanted: list[tuple[str, str | None]]) -> list[LastUse]:
    """For each (key, org) pair, the key's latest use in that org (org None: in any org), if it has one.
    Each pair reads the (key_id, at) index backwards and stops at its first row."""
    rows = await conn.fetch(
        "SELECT v.key_id, v.org_id, u.at, u.ip FROM unnest($1::text[], $2::text[]) AS v(key_id, org_id)"
        " CROSS JOIN LATERAL (SELECT e.at, host(e.ip) AS ip FROM audit_events e"
        "   WHERE e.key_id = v.key_id AND e.type = 'api_key.used' AND (v.org_id IS NULL OR e.org_id = v.org_id)"
        "   ORDER BY e.at DESC LIMIT 1) AS u",
        [k for k, _ in wanted],
        [o for _, o in wanted],
    )
    return [LastUse(r["key_id"], r["org_id"], r["at"], r["ip"]) for r in rows]


async def daily_usage(conn: Conn, key_id: str, org_ids: list[str] | None, first: date, last: date) -> list[DayUsage]:
    """A key's requests per UTC day from `first` to `last` (every day, 0 when unused), summed from its
    aggregated `api_key.used` rows; only those in `org_ids` unless it is None."""
    rows = await conn.fetch(
        "SELECT d::date AS day, COALESCE(u.requests, 0)::bigint AS requests"
        " FROM generate_series($3::date, $4::date, interval '1 day') AS d"
        " LEFT JOIN (SELECT (e.at AT TIME ZONE 'UTC')::date AS day, sum(e.count) AS requests FROM audit_events e"
        "   WHERE e.key_id = $1 AND e.type = 'api_key.used' AND ($2::text[] IS NULL OR e.org_id = ANY($2))"
        "   AND e.at >= ($3::date)::timestamp AT TIME ZONE 'UTC'"
        "   AND e.at < ($4::date + 1)::timestamp AT TIME ZONE 'UTC' GROUP BY 1) AS u ON u.day = d::date"
        " ORDER BY d",
        key_id,
        org_ids,
        first,
        last,
    )
    return [DayUsage(r["day"], r["requests"]) for r in rows]
