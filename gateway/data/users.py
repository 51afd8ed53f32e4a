"""users: people (by email) and service accounts (named members of one org)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.backends import Conn
from gateway.data.db import typed_all


@dataclass(frozen=True, slots=True)
class UserSummary:
    id: str
    email: str | None  # None for a service account
    kind: str  # human or service
    name: str | None
    orgs: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ServiceAccountRow:
    id: str
    name: str
    role: str


async def exists(conn: Conn, user_id: str) -> bool:
    return await conn.fetchval("SELECT 1 FROM users WHERE id = $1", user_id) is not None


async def insert_person(conn: Conn, user_id: str, email: str) -> bool:
    """False when the email is taken (nothing written)."""
    added = await conn.fetchval(
        "INSERT INTO users (id, email) VALUES ($1, $2) ON CONFLICT (email) DO NOTHING RETURNING id", user_id, email
    )
    return added is not None


async def by_email(conn: Conn, email: str) -> str | None:
    found: str | None = await conn.fetchval("SELECT id FROM users WHERE email = $1", email)
    return found


async def insert_service_account(conn: Conn, user_id: str, name: str, org_id: str) -> None:
    await conn.execute(
        "INSERT INTO users (id, kind, name, service_org) VALUES ($1, 'service', $2, $3)", user_id, name, org_id
    )


async def service_org(conn: Conn, user_id: str) -> str | None:
    """The org a service account belongs to; None for a person."""
    org: str | None = await conn.fetchval("SELECT service_org FROM users WHERE id = $1", user_id)
    return org


async def service_accounts(conn: Conn, org_id: str) -> list[ServiceAccountRow]:
    rows = await conn.fetch(
        "SELECT u.id, u.name, m.role FROM users u JOIN memberships m ON m.user_id = u.id AND m.org_id = $1"
        " WHERE u.kind = 'service' AND u.service_org = $1 ORDER BY u.name, u.id",
        org_id,
    )
    return typed_all(ServiceAccountRow, rows)


async def all_users(conn: Conn, org_id: str | None = None) -> list[UserSummary]:
    """Every user (or every member of `org_id`) with how many orgs each belongs to."""
    rows = await conn.fetch(
        "SELECT u.id, u.email, u.kind, u.name, (SELECT count(*)::int FROM memberships m WHERE m.user_id = u.id)"
        " AS orgs, u.created_at FROM users u WHERE $1::text IS NULL"
        " OR EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = u.id AND m.org_id = $1)"
        " ORDER BY u.kind, coalesce(u.email, u.name), u.id",
        org_id,
    )
    return typed_all(UserSummary, rows)


@dataclass(frozen=True, slots=True)
class UserName:
    """How a user is shown: a person by email, a service account by its name."""

    id: str
    kind: str  # human or service
    email: str | None
    name: str | None


async def names(conn: Conn, user_ids: list[str]) -> list[UserName]:
    rows = await conn.fetch("SELECT id, kind, email, name FROM users WHERE id = ANY($1::text[]) ORDER BY id", user_ids)
    return typed_all(UserName, rows)
