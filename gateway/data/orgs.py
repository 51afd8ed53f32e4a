"""orgs, memberships and projects: every statement about who belongs where."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from gateway.backends import Conn
from gateway.data.db import typed_all


@dataclass(frozen=True, slots=True)
class OrgRow:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class OrgSummary:
    id: str
    name: str
    members: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Membership:
    user_id: str
    org_id: str
    role: str


@dataclass(frozen=True, slots=True)
class MemberRow:
    user_id: str
    email: str | None  # None for a service account
    kind: str  # human or service
    name: str | None
    role: str


@dataclass(frozen=True, slots=True)
class ProjectRow:
    id: str
    org_id: str
    name: str


async def insert_org(conn: Conn, org_id: str, name: str) -> None:
    await conn.execute("INSERT INTO orgs (id, name) VALUES ($1, $2)", org_id, name)


async def org_exists(conn: Conn, org_id: str, *, lock: bool = False) -> bool:
    """With `lock`, the org's row is held until the transaction ends: changes of its owners queue."""
    query = "SELECT 1 FROM orgs WHERE id = $1" + (" FOR UPDATE" if lock else "")
    return await conn.fetchval(query, org_id) is not None


async def orgs(conn: Conn, org_ids: list[str]) -> list[OrgRow]:
    rows = await conn.fetch("SELECT id, name FROM orgs WHERE id = ANY($1::text[]) ORDER BY name, id", org_ids)
    return typed_all(OrgRow, rows)


async def role(conn: Conn, org_id: str, user_id: str, *, lock: bool = False) -> str | None:
    query = "SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2" + (" FOR UPDATE" if lock else "")
    found: str | None = await conn.fetchval(query, org_id, user_id)
    return found


async def add_member(conn: Conn, org_id: str, user_id: str, role: str) -> None:
    await conn.execute("INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)", org_id, user_id, role)


async def set_member(conn: Conn, org_id: str, user_id: str, role: str) -> None:
    await conn.execute(
        "INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)"
        " ON CONFLICT (org_id, user_id) DO UPDATE SET role = EXCLUDED.role, updated_at = now()",
        org_id,
        user_id,
        role,
    )


async def join(conn: Conn, org_id: str, user_id: str, role: str) -> bool:
    """Add the member unless they are one already (then nothing changes); whether they were added."""
    added = await conn.fetchval(
        "INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)"
        " ON CONFLICT (org_id, user_id) DO NOTHING RETURNING role",
        org_id,
        user_id,
        role,
    )
    return added is not None


async def remove_member(conn: Conn, org_id: str, user_id: str) -> str | None:
    """The role the member had; None if they were none."""
    old: str | None = await conn.fetchval(
        "DELETE FROM memberships WHERE org_id = $1 AND user_id = $2 RETURNING role", org_id, user_id
    )
    return old


async def others_with_role(conn: Conn, org_id: str, role: str, user_id: str) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM memberships WHERE org_id = $1 AND role = $2 AND user_id <> $3", org_id, role, user_id
    )
    return count


async def memberships(conn: Conn, user_ids: list[str]) -> list[Membership]:
    rows = await conn.fetch(
        "SELECT user_id, org_id, role FROM memberships WHERE user_id = ANY($1::text[]) ORDER BY user_id, org_id",
        user_ids,
    )
    return typed_all(Membership, rows)


async def members(conn: Conn, org_id: str) -> list[MemberRow]:
    rows = await conn.fetch(
        "SELECT u.id AS user_id, u.email, u.kind, u.name, m.role FROM memberships m"
        " JOIN users u ON u.id = m.user_id WHERE m.org_id = $1 ORDER BY u.kind, u.email, u.name, u.id",
        org_id,
    )
    return typed_all(MemberRow, rows)


async def insert_project(conn: Conn, project: ProjectRow) -> bool:
    """False when the org has a project of that name already (nothing written)."""
    try:
        await conn.execute(
            "INSERT INTO projects (id, org_id, name) VALUES ($1, $2, $3)", project.id, project.org_id, project.name
        )
    except asyncpg.UniqueViolationError:
        return False
    return True


async def project_org(conn: Conn, project_id: str) -> str | None:
    org: str | None = await conn.fetchval("SELECT org_id FROM projects WHERE id = $1", project_id)
    return org


async def project_orgs(conn: Conn, project_ids: list[str]) -> dict[str, str]:
    rows = await conn.fetch("SELECT id, org_id FROM projects WHERE id = ANY($1::text[])", project_ids)
    return {r["id"]: r["org_id"] for r in rows}


async def projects(conn: Conn, org_id: str) -> list[ProjectRow]:
    rows = await conn.fetch("SELECT id, org_id, name FROM projects WHERE org_id = $1 ORDER BY name, id", org_id)
    return typed_all(ProjectRow, rows)


async def lock_project(conn: Conn, org_id: str, project_id: str) -> bool:
    """Hold the org's project until the transaction ends; False if the org has no such project."""
    found = await conn.fetchval("SELECT 1 FROM projects WHERE id = $1 AND org_id = $2 FOR UPDATE", project_id, org_id)
    return found is not None


async def delete_project(conn: Conn, project_id: str) -> None:
    await conn.execute("DELETE FROM projects WHERE id = $1", project_id)


async def all_orgs(conn: Conn) -> list[OrgSummary]:
    """Every org with its member count (people and service accounts), for the operator's command line."""
    rows = await conn.fetch(
        "SELECT o.id, o.name, count(m.user_id)::int AS members, o.created_at FROM orgs o"
        " LEFT JOIN memberships m ON m.org_id = o.id GROUP BY o.id ORDER BY o.name, o.id"
    )
    return typed_all(OrgSummary, rows)


async def project_names(conn: Conn, project_ids: list[str]) -> dict[str, str]:
    rows = await conn.fetch("SELECT id, name FROM projects WHERE id = ANY($1::text[])", project_ids)
    return {r["id"]: r["name"] for r in rows}
