"""api_keys and key_org_blocks: every statement about keys, for the hot path's lookups and the keyring."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.backends import Conn
from gateway.data.db import typed, typed_all
from gateway.models import KeyRecord


@dataclass(frozen=True, slots=True)
class KeyRow:
    """A key as management sees it: everything but its hash."""

    id: str
    user_id: str
    name: str
    role: str
    env: str
    start: str
    scopes: list[str] | None
    all_orgs: bool
    org_ids: list[str]
    all_projects: bool
    project_ids: list[str]
    allowed_cidrs: list[str] | None  # normalised networks, None: any address
    rate_limit: str | None
    expires_at: datetime | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    rotated_to: str | None


@dataclass(frozen=True, slots=True)
class NewKey:
    id: str
    user_id: str
    name: str
    role: str
    env: str
    secret_hash: str
    start: str
    scopes: list[str] | None
    orgs: list[str]  # empty: all the owner's orgs
    projects: list[str]  # empty: all projects
    allowed_cidrs: list[str] | None
    rate_limit: str | None
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Reach:
    """Whose a key is and the orgs it can act in now (its owner's, for an all-orgs key)."""

    user_id: str
    orgs: list[str]


@dataclass(frozen=True, slots=True)
class Block:
    key_id: str
    org_id: str


@dataclass(frozen=True, slots=True)
class NamingKey:
    """A live key naming a project, and its owner's role in the project's org (None: not a member)."""

    id: str
    all_orgs: bool
    org_ids: list[str]
    owner_role: str | None


_COLUMNS = ", ".join(
    "k.allowed_cidrs::text[] AS allowed_cidrs" if name == "allowed_cidrs" else f"k.{name}"
    for name in KeyRow.__dataclass_fields__
)
_BY_ID = f"SELECT {_COLUMNS} FROM api_keys k WHERE k.id = $1"

# The owner's memberships, less the orgs whose admins stopped this key there: it cannot act in those.
_LOAD = """
SELECT k.id, k.user_id, k.name, k.role, k.env, k.secret_hash, k.scopes, k.all_orgs, k.org_ids,
       k.all_projects, k.project_ids, k.allowed_cidrs::text[] AS allowed_cidrs, k.rate_limit,
       k.expires_at, k.revoked_at,
       COALESCE((SELECT json_object_agg(m.org_id, m.role) FROM memberships m WHERE m.user_id = k.user_id
                 AND NOT EXISTS (SELECT 1 FROM key_org_blocks b WHERE b.key_id = k.id AND b.org_id = m.org_id)),
                '{}'::json) AS memberships
FROM api_keys k WHERE k.id = $1
"""


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _optional_tuple(value: list[str] | None) -> tuple[str, ...] | None:
    return tuple(value) if value is not None else None


def fingerprint(secret_hash: str) -> str:
    return hashlib.sha256(secret_hash.encode()).hexdigest()[:16]


async def load(conn: Conn, key_id: str) -> tuple[KeyRecord, str] | None:
    """The hot path's lookup: the key and its owner's memberships, with the argon2 hash."""
    row = await conn.fetchrow(_LOAD, key_id)
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
        expires_at=_ts(row["expires_at"]),
        revoked_at=_ts(row["revoked_at"]),
        memberships=dict(memberships),
        hash_fingerprint=fingerprint(row["secret_hash"]),
    )
    return record, row["secret_hash"]


async def touch_last_used(conn: Conn, used: dict[str, float]) -> None:
    ids = list(used)
    times = [datetime.fromtimestamp(used[i]).astimezone() for i in ids]
    await conn.execute(
        "UPDATE api_keys k SET last_used_at = GREATEST(k.last_used_at, v.t)"
        " FROM unnest($1::text[], $2::timestamptz[]) AS v(id, t) WHERE k.id = v.id",
        ids,
        times,
    )


async def get(conn: Conn, key_id: str, *, lock: bool = False) -> KeyRow | None:
    """A key; with `lock`, its row held until the transaction ends (FOR UPDATE)."""
    return typed(KeyRow, await conn.fetchrow(_BY_ID + (" FOR UPDATE" if lock else ""), key_id))


async def insert(conn: Conn, key: NewKey) -> None:
    await conn.execute(
        "INSERT INTO api_keys (id, user_id, name, role, env, secret_hash, start, scopes, all_orgs, org_ids,"
        " all_projects, project_ids, allowed_cidrs, rate_limit, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::cidr[], $14, $15)",
        key.id,
        key.user_id,
        key.name,
        key.role,
        key.env,
        key.secret_hash,
        key.start,
        key.scopes,
        not key.orgs,
        key.orgs,
        not key.projects,
        key.projects,
        key.allowed_cidrs,
        key.rate_limit,
        key.expires_at,
    )


async def reach(conn: Conn, key_id: str) -> Reach | None:
    return typed(
        Reach,
        await conn.fetchrow(
            "SELECT k.user_id, CASE WHEN k.all_orgs THEN ARRAY(SELECT m.org_id FROM memberships m"
            " WHERE m.user_id = k.user_id ORDER BY m.org_id) ELSE k.org_ids END AS orgs FROM api_keys k"
            " WHERE k.id = $1",
            key_id,
        ),
    )


async def listing(
    conn: Conn,
    *,
    owner: str | None,
    org: str | None,
    status: str | None,
    now: datetime,
    after: tuple[datetime, str] | None,
    limit: int | None,
    search: str | None = None,
    expires_before: datetime | None = None,
) -> list[KeyRow]:
    """Keys of `owner` and/or acting in `org` (not stopped there), in `status` as of `now`, oldest first,
    after the (created_at, id) cursor; with `search`, those whose name (any case) or id holds that text;
    with `expires_before`, those expiring before then."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM api_keys k WHERE ($1::text IS NULL OR k.user_id = $1)"
        " AND ($2::text IS NULL OR (($2 = ANY(k.org_ids) OR (k.all_orgs AND EXISTS ("
        "      SELECT 1 FROM memberships m WHERE m.user_id = k.user_id AND m.org_id = $2)))"
        "      AND NOT EXISTS (SELECT 1 FROM key_org_blocks b WHERE b.key_id = k.id AND b.org_id = $2)))"
        " AND ($3::text IS NULL"
        "      OR ($3 = 'revoked' AND k.revoked_at IS NOT NULL)"
        "      OR ($3 = 'expired' AND k.revoked_at IS NULL AND k.expires_at <= $4)"
        "      OR ($3 = 'active' AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > $4)))"
        " AND ($5::timestamptz IS NULL OR (k.created_at, k.id) > ($5, $6::text))"
        # strpos, not LIKE: a % or _ in the search is text to find, not a wildcard.
        " AND ($8::text IS NULL OR strpos(lower(k.name), lower($8)) > 0 OR strpos(k.id, $8) > 0)"
        " AND ($9::timestamptz IS NULL OR k.expires_at < $9)"
        " ORDER BY k.created_at, k.id LIMIT $7",
        owner,
        org,
        status,
        now,
        after[0] if after else None,
        after[1] if after else None,
        limit,
        search,
        expires_before,
    )
    return typed_all(KeyRow, rows)


async def revoke(conn: Conn, key_id: str) -> KeyRow | None:
    """Revoked now, or kept revoked since its first revocation; None if there is no such key."""
    return typed(
        KeyRow,
        await conn.fetchrow(
            f"UPDATE api_keys k SET revoked_at = COALESCE(k.revoked_at, now()) WHERE k.id = $1 RETURNING {_COLUMNS}",
            key_id,
        ),
    )


async def revoke_all(conn: Conn, key_ids: list[str]) -> None:
    await conn.execute(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = ANY($1::text[])", key_ids
    )


async def mark_rotated(conn: Conn, key_id: str, new_key_id: str, grace: timedelta) -> None:
    """The old key points at its successor and expires after `grace` (sooner if it did already)."""
    await conn.execute(
        "UPDATE api_keys SET rotated_to = $2,"
        " expires_at = LEAST(COALESCE(expires_at, 'infinity'), now() + $3::interval) WHERE id = $1",
        key_id,
        new_key_id,
        grace,
    )


async def ids_of_user(conn: Conn, user_id: str) -> list[str]:
    return [r["id"] for r in await conn.fetch("SELECT id FROM api_keys WHERE user_id = $1", user_id)]


async def naming_project(conn: Conn, project_id: str, org_id: str) -> list[NamingKey]:
    """The live keys that name a project and are not stopped in its org."""
    rows = await conn.fetch(
        "SELECT k.id, k.all_orgs, k.org_ids, m.role AS owner_role FROM api_keys k"
        " LEFT JOIN memberships m ON m.user_id = k.user_id AND m.org_id = $2"
        " WHERE $1 = ANY(k.project_ids) AND k.revoked_at IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM key_org_blocks b WHERE b.key_id = k.id AND b.org_id = $2)"
        " ORDER BY k.id",
        project_id,
        org_id,
    )
    return typed_all(NamingKey, rows)


async def block(conn: Conn, key_id: str, org_id: str, blocked_by: str) -> None:
    """Stop a key acting in one org."""
    await conn.execute(
        "INSERT INTO key_org_blocks (key_id, org_id, blocked_by) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        key_id,
        org_id,
        blocked_by,
    )


async def copy_blocks(conn: Conn, from_key: str, to_key: str) -> None:
    await conn.execute(
        "INSERT INTO key_org_blocks (key_id, org_id, blocked_by)"
        " SELECT $2, org_id, blocked_by FROM key_org_blocks WHERE key_id = $1",
        from_key,
        to_key,
    )


async def blocks(conn: Conn, key_ids: list[str]) -> list[Block]:
    rows = await conn.fetch(
        "SELECT key_id, org_id FROM key_org_blocks WHERE key_id = ANY($1::text[]) ORDER BY key_id, org_id", key_ids
    )
    return typed_all(Block, rows)


async def names(conn: Conn, key_ids: list[str]) -> dict[str, str]:
    rows = await conn.fetch("SELECT id, name FROM api_keys WHERE id = ANY($1::text[])", key_ids)
    return {r["id"]: r["name"] for r in rows}
