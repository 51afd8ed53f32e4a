"""Who is who: orgs, users, memberships, projects and service accounts.

Every change of access (a membership, a deleted project's keys) records its audit event and its cache
invalidation in the same transaction as the change."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from gateway.audit import CLI, Actor, write_event
from gateway.backends import Conn
from gateway.config import RolesConfig
from gateway.db import Database, must_exist, new_id
from gateway.errors import Conflict, InsufficientPermissions, NotFound
from gateway.formats import valid_email, valid_name
from gateway.keyring import block


class Directory:
    def __init__(self, db: Database, roles: RolesConfig) -> None:
        self.db = db
        self.roles = roles

    async def create_org(self, name: str, actor: Actor = CLI, owner: str | None = None) -> dict[str, Any]:
        """A new org; with `owner`, that user is its owner (the highest role), in the same transaction."""
        org_id = new_id("org")
        async with self.db.connect(transaction=True) as conn:
            await conn.execute("INSERT INTO orgs (id, name) VALUES ($1, $2)", org_id, valid_name(name))
            await write_event(conn, "org.created", actor=actor, org_id=org_id, target=org_id, detail={"name": name})
            if owner is not None:
                role = self.roles.order[-1]
                await conn.execute(
                    "INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)", org_id, owner, role
                )
                await self._membership_changed(conn, org_id, owner, None, role, actor)
        return {"id": org_id, "name": name.strip()}

    async def create_user(self, email: str, actor: Actor = CLI) -> dict[str, Any]:
        """A new user; Conflict when one has this email (see `user_by_email` to reuse it)."""
        email = valid_email(email)
        async with self.db.connect(transaction=True) as conn:
            user_id = await self._insert_user(conn, email, actor)
        if user_id is None:
            raise Conflict(f"a user with email {email} exists")
        return {"id": user_id, "email": email}

    async def user_by_email(self, email: str, actor: Actor) -> str:
        """The id of the user with this email, created if there is none."""
        email = valid_email(email)
        async with self.db.connect(transaction=True) as conn:
            query = "SELECT id FROM users WHERE email = $1"
            found: str | None = await conn.fetchval(query, email) or await self._insert_user(conn, email, actor)
            if found is None:  # made by a concurrent call since we looked
                found = await conn.fetchval(query, email)
        if found is None:
            raise Conflict(f"the user with email {email} could not be read back")
        return found

    async def _insert_user(self, conn: Conn, email: str, actor: Actor) -> str | None:
        """The new user's id; None when the email is taken (nothing written)."""
        user_id = new_id("usr")
        added = await conn.fetchval(
            "INSERT INTO users (id, email) VALUES ($1, $2) ON CONFLICT (email) DO NOTHING RETURNING id", user_id, email
        )
        if added is None:
            return None
        await write_event(conn, "user.created", actor=actor, user_id=user_id, target=user_id)
        return user_id

    async def _user_keys(self, conn: Conn, user_id: str) -> list[str]:
        return [r["id"] for r in await conn.fetch("SELECT id FROM api_keys WHERE user_id = $1", user_id)]

    async def _membership_changed(
        self, conn: Conn, org_id: str, user_id: str, old: str | None, new: str | None, actor: Actor
    ) -> None:
        """Audit the change and invalidate every key of the user, inside the caller's transaction."""
        await write_event(
            conn,
            "membership.changed",
            actor=actor,
            org_id=org_id,
            user_id=user_id,
            target=user_id,
            detail={"from": old, "to": new},
        )
        await self.db.invalidate(conn, await self._user_keys(conn, user_id))

    async def _keep_an_owner(self, conn: Conn, org_id: str, user_id: str, new: str | None) -> None:
        """An org always keeps an owner: the last one can be neither removed nor demoted. The org row is
        locked first, so two owners demoting each other at once cannot both succeed."""
        owner = self.roles.order[-1]
        await conn.execute("SELECT 1 FROM orgs WHERE id = $1 FOR UPDATE", org_id)
        old = await conn.fetchval("SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2", org_id, user_id)
        if old != owner or new == owner:
            return
        others = await conn.fetchval(
            "SELECT count(*) FROM memberships WHERE org_id = $1 AND role = $2 AND user_id <> $3", org_id, owner, user_id
        )
        if others == 0:
            raise Conflict(f"org {org_id} must keep an owner: make another member {owner} first")

    async def set_member(self, org_id: str, user_id: str, role: str, actor: Actor = CLI) -> dict[str, Any]:
        role = self.roles.named(role)
        async with self.db.connect(transaction=True) as conn:
            await must_exist(conn, "orgs", org_id)
            await must_exist(conn, "users", user_id)
            await self._keep_an_owner(conn, org_id, user_id, role)
            old = await conn.fetchval(
                "SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2 FOR UPDATE", org_id, user_id
            )
            await conn.execute(
                "INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)"
                " ON CONFLICT (org_id, user_id) DO UPDATE SET role = EXCLUDED.role, updated_at = now()",
                org_id,
                user_id,
                role,
            )
            await self._membership_changed(conn, org_id, user_id, old, role, actor)
        return {"org_id": org_id, "user_id": user_id, "role": role}

    async def join(self, conn: Conn, org_id: str, user_id: str, role: str, actor: Actor) -> None:
        """Make the user a member with `role` (an accepted invitation), inside the caller's transaction. A
        member already keeps their role: an old invitation never changes it."""
        added = await conn.fetchval(
            "INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)"
            " ON CONFLICT (org_id, user_id) DO NOTHING RETURNING role",
            org_id,
            user_id,
            role,
        )
        if added is not None:
            await self._membership_changed(conn, org_id, user_id, None, role, actor)

    async def remove_member(self, org_id: str, user_id: str, actor: Actor = CLI) -> dict[str, Any]:
        async with self.db.connect(transaction=True) as conn:
            await self._keep_an_owner(conn, org_id, user_id, None)
            old = await conn.fetchval(
                "DELETE FROM memberships WHERE org_id = $1 AND user_id = $2 RETURNING role", org_id, user_id
            )
            if old is None:
                raise NotFound(f"user {user_id} is not a member of org {org_id}")
            await self._membership_changed(conn, org_id, user_id, old, None, actor)
        return {"org_id": org_id, "user_id": user_id, "removed": True}

    async def create_project(self, org_id: str, name: str, actor: Actor = CLI) -> dict[str, Any]:
        project_id = new_id("prj")
        async with self.db.connect(transaction=True) as conn:
            await must_exist(conn, "orgs", org_id)
            try:
                await conn.execute(
                    "INSERT INTO projects (id, org_id, name) VALUES ($1, $2, $3)", project_id, org_id, valid_name(name)
                )
            except asyncpg.UniqueViolationError:
                raise Conflict(f"org {org_id} already has a project named {name}") from None
            await write_event(conn, "project.created", actor=actor, org_id=org_id, detail={"project": project_id})
        return {"id": project_id, "org_id": org_id, "name": name.strip()}

    async def member_roles(self, user_id: str) -> dict[str, str]:
        """The user's role in each org they belong to."""
        return (await self.member_roles_of([user_id]))[user_id]

    async def member_roles_of(self, user_ids: list[str]) -> dict[str, dict[str, str]]:
        """`member_roles` of several users at once (one query for a page of keys)."""
        roles: dict[str, dict[str, str]] = {u: {} for u in user_ids}
        async with self.db.connect() as conn:
            rows = await conn.fetch(
                "SELECT user_id, org_id, role FROM memberships WHERE user_id = ANY($1::text[])", user_ids
            )
        for r in rows:
            roles[r["user_id"]][r["org_id"]] = r["role"]
        return roles

    async def projects_in(self, project_ids: list[str], org_ids: list[str]) -> list[str]:
        """Those of `project_ids` that belong to one of `org_ids`."""
        async with self.db.connect() as conn:
            rows = await conn.fetch(
                "SELECT id FROM projects WHERE id = ANY($1::text[]) AND org_id = ANY($2::text[]) ORDER BY id",
                project_ids,
                org_ids,
            )
        return [r["id"] for r in rows]

    async def orgs(self, org_ids: list[str]) -> list[dict[str, Any]]:
        async with self.db.connect() as conn:
            rows = await conn.fetch("SELECT id, name FROM orgs WHERE id = ANY($1::text[]) ORDER BY name, id", org_ids)
        return [dict(r) for r in rows]

    async def members(self, org_id: str) -> list[dict[str, Any]]:
        async with self.db.connect() as conn:
            rows = await conn.fetch(
                "SELECT u.id AS user_id, u.email, u.kind, u.name, m.role FROM memberships m"
                " JOIN users u ON u.id = m.user_id WHERE m.org_id = $1 ORDER BY u.kind, u.email, u.name, u.id",
                org_id,
            )
        return [dict(r) for r in rows]

    async def member_role(self, org_id: str, user_id: str) -> str | None:
        async with self.db.connect() as conn:
            role: str | None = await conn.fetchval(
                "SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2", org_id, user_id
            )
        return role

    async def create_service_account(self, org_id: str, name: str, role: str, actor: Actor) -> dict[str, Any]:
        """A non-human member of one org: its keys are the org's, and outlive whoever made them."""
        self.roles.named(role)
        user_id = new_id("svc")
        async with self.db.connect(transaction=True) as conn:
            await must_exist(conn, "orgs", org_id)
            await conn.execute(
                "INSERT INTO users (id, kind, name, service_org) VALUES ($1, 'service', $2, $3)",
                user_id,
                valid_name(name),
                org_id,
            )
            await conn.execute(
                "INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)", org_id, user_id, role
            )
            await write_event(
                conn,
                "service_account.created",
                actor=actor,
                org_id=org_id,
                user_id=user_id,
                target=user_id,
                detail={"name": name, "role": role},
            )
        return {"id": user_id, "org_id": org_id, "name": name.strip(), "role": role}

    async def service_org(self, user_id: str) -> str | None:
        """The org a service account belongs to; None for a person."""
        async with self.db.connect() as conn:
            org: str | None = await conn.fetchval("SELECT service_org FROM users WHERE id = $1", user_id)
        return org

    async def service_accounts(self, org_id: str) -> list[dict[str, Any]]:
        async with self.db.connect() as conn:
            rows = await conn.fetch(
                "SELECT u.id, u.name, m.role FROM users u JOIN memberships m ON m.user_id = u.id AND m.org_id = $1"
                " WHERE u.kind = 'service' AND u.service_org = $1 ORDER BY u.name, u.id",
                org_id,
            )
        return [{**dict(r), "org_id": org_id} for r in rows]

    async def service_account(self, org_id: str, user_id: str) -> dict[str, Any] | None:
        return next((sa for sa in await self.service_accounts(org_id) if sa["id"] == user_id), None)

    async def projects(self, org_id: str) -> list[dict[str, Any]]:
        async with self.db.connect() as conn:
            rows = await conn.fetch("SELECT id, org_id, name FROM projects WHERE org_id = $1 ORDER BY name", org_id)
        return [dict(r) for r in rows]

    async def delete_project(
        self, org_id: str, project_id: str, revoke_keys: bool, actor: Actor, max_owner_role: str | None = None
    ) -> dict[str, Any]:
        """Refuses while live keys name the project, unless `revoke_keys` stops them in the same transaction:
        a key that can act only in this org is revoked, any other is stopped in this org only (its owner's
        other orgs are not this org's to touch). `max_owner_role`: the caller's role; keys of members above
        it are refused (None: the operator's command line)."""
        async with self.db.connect(transaction=True) as conn:
            found = await conn.fetchval(
                "SELECT 1 FROM projects WHERE id = $1 AND org_id = $2 FOR UPDATE", project_id, org_id
            )
            if found is None:
                raise NotFound(f"no project {project_id}")
            rows = await conn.fetch(
                "SELECT k.id, k.all_orgs, k.org_ids, m.role AS owner_role FROM api_keys k"
                " LEFT JOIN memberships m ON m.user_id = k.user_id AND m.org_id = $2"
                " WHERE $1 = ANY(k.project_ids) AND k.revoked_at IS NULL"
                " AND NOT EXISTS (SELECT 1 FROM key_org_blocks b WHERE b.key_id = k.id AND b.org_id = $2)"
                " ORDER BY k.id",
                project_id,
                org_id,
            )
            naming = [r["id"] for r in rows]
            if naming and not revoke_keys:
                raise Conflict(f"{len(naming)} active keys name this project: revoke them, or pass revoke_keys=true")
            if max_owner_role is not None and any(
                r["owner_role"] in self.roles.order
                and self.roles.rank(r["owner_role"]) > self.roles.rank(max_owner_role)
                for r in rows
            ):
                raise InsufficientPermissions("a key of a member above your role names this project")
            whole = [r["id"] for r in rows if not r["all_orgs"] and set(r["org_ids"]) <= {org_id}]
            if whole:
                await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = ANY($1::text[])", whole)
            for r in rows:
                if r["id"] not in whole:
                    await block(conn, r["id"], org_id, actor)
                await write_event(
                    conn,
                    "api_key.revoked",
                    actor=actor,
                    org_id=org_id,
                    key_id=r["id"],
                    target=r["id"],
                    detail={"reason": "project deleted", "scope": "key" if r["id"] in whole else "org"},
                )
            if naming:
                await self.db.invalidate(conn, naming)
            await conn.execute("DELETE FROM projects WHERE id = $1", project_id)
            await write_event(
                conn, "project.deleted", actor=actor, org_id=org_id, target=project_id, detail={"revoked_keys": naming}
            )
        return {"id": project_id, "deleted": True, "revoked_keys": naming}


DIRECTORY = web.AppKey("directory", Directory)
