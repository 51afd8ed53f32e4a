"""Who is who: orgs, users, memberships, projects and service accounts.

Every change of access (a membership, a deleted project's keys) records its audit event and its cache
invalidation in the same transaction as the change."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aiohttp import web

from gateway.audit import CLI, Actor, write_event
from gateway.backends import Conn
from gateway.config import RolesConfig
from gateway.data import keys, orgs, users
from gateway.data.db import Database, new_id, notify
from gateway.data.orgs import ProjectRow
from gateway.errors import Conflict, InsufficientPermissions, NotFound
from gateway.formats import iso, valid_email, valid_name
from gateway.keyring import block


class Directory:
    def __init__(self, db: Database, roles: RolesConfig) -> None:
        self.db = db
        self.roles = roles

    async def create_org(self, name: str, actor: Actor = CLI, owner: str | None = None) -> dict[str, Any]:
        """A new org; with `owner`, that user is its owner (the highest role), in the same transaction."""
        org_id = new_id("org")
        async with self.db.connect(transaction=True) as conn:
            await orgs.insert_org(conn, org_id, valid_name(name))
            await write_event(conn, "org.created", actor=actor, org_id=org_id, target=org_id, detail={"name": name})
            if owner is not None:
                role = self.roles.order[-1]
                await orgs.add_member(conn, org_id, owner, role)
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
            found = await users.by_email(conn, email) or await self._insert_user(conn, email, actor)
            if found is None:  # made by a concurrent call since we looked
                found = await users.by_email(conn, email)
        if found is None:
            raise Conflict(f"the user with email {email} could not be read back")
        return found

    async def role_of(self, org_id: str, user_id: str) -> str | None:
        """The user's membership role in the org, or None."""
        async with self.db.connect() as conn:
            return await orgs.role(conn, org_id, user_id)

    async def _insert_user(self, conn: Conn, email: str, actor: Actor) -> str | None:
        """The new user's id; None when the email is taken (nothing written)."""
        user_id = new_id("usr")
        if not await users.insert_person(conn, user_id, email):
            return None
        await write_event(conn, "user.created", actor=actor, user_id=user_id, target=user_id)
        return user_id

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
        await self.db.invalidate(conn, await keys.ids_of_user(conn, user_id))
        await notify(conn, users=[user_id])  # its sessions' and tokens' role is the membership's, read fresh

    async def _keep_an_owner(self, conn: Conn, org_id: str, user_id: str, new: str | None) -> None:
        """An org always keeps an owner: the last one can be neither removed nor demoted. The org row is
        locked first, so two owners demoting each other at once cannot both succeed."""
        owner = self.roles.order[-1]
        await orgs.org_exists(conn, org_id, lock=True)
        old = await orgs.role(conn, org_id, user_id)
        if old != owner or new == owner:
            return
        if await orgs.others_with_role(conn, org_id, owner, user_id) == 0:
            raise Conflict(f"org {org_id} must keep an owner: make another member {owner} first")

    async def set_member(self, org_id: str, user_id: str, role: str, actor: Actor = CLI) -> dict[str, Any]:
        role = self.roles.named(role)
        async with self.db.connect(transaction=True) as conn:
            await _org_must_exist(conn, org_id)
            if not await users.exists(conn, user_id):
                raise NotFound(f"no user {user_id}")
            await self._keep_an_owner(conn, org_id, user_id, role)
            old = await orgs.role(conn, org_id, user_id, lock=True)
            await orgs.set_member(conn, org_id, user_id, role)
            await self._membership_changed(conn, org_id, user_id, old, role, actor)
        return {"org_id": org_id, "user_id": user_id, "role": role}

    async def join(self, conn: Conn, org_id: str, user_id: str, role: str, actor: Actor) -> None:
        """Make the user a member with `role` (an accepted invitation), inside the caller's transaction. A
        member already keeps their role: an old invitation never changes it."""
        if await orgs.join(conn, org_id, user_id, role):
            await self._membership_changed(conn, org_id, user_id, None, role, actor)

    async def remove_member(self, org_id: str, user_id: str, actor: Actor = CLI) -> dict[str, Any]:
        async with self.db.connect(transaction=True) as conn:
            await self._keep_an_owner(conn, org_id, user_id, None)
            old = await orgs.remove_member(conn, org_id, user_id)
            if old is None:
                raise NotFound(f"user {user_id} is not a member of org {org_id}")
            await self._membership_changed(conn, org_id, user_id, old, None, actor)
        return {"org_id": org_id, "user_id": user_id, "removed": True}

    async def create_project(self, org_id: str, name: str, actor: Actor = CLI) -> dict[str, Any]:
        project_id = new_id("prj")
        async with self.db.connect(transaction=True) as conn:
            await _org_must_exist(conn, org_id)
            if not await orgs.insert_project(conn, ProjectRow(project_id, org_id, valid_name(name))):
                raise Conflict(f"org {org_id} already has a project named {name}")
            await write_event(conn, "project.created", actor=actor, org_id=org_id, detail={"project": project_id})
        return {"id": project_id, "org_id": org_id, "name": name.strip()}

    async def member_roles(self, user_id: str) -> dict[str, str]:
        """The user's role in each org they belong to."""
        return (await self.member_roles_of([user_id]))[user_id]

    async def member_roles_of(self, user_ids: list[str]) -> dict[str, dict[str, str]]:
        """`member_roles` of several users at once (one query for a page of keys)."""
        roles: dict[str, dict[str, str]] = {u: {} for u in user_ids}
        async with self.db.connect() as conn:
            found = await orgs.memberships(conn, user_ids)
        for m in found:
            roles[m.user_id][m.org_id] = m.role
        return roles

    async def people(self, user_ids: list[str]) -> dict[str, dict[str, Any]]:
        """How each user is shown: `{"kind", "name"}`, a person's name their email, a service account's
        its own. Users that do not exist are absent."""
        async with self.db.connect() as conn:
            found = await users.names(conn, user_ids)
        return {u.id: {"kind": u.kind, "name": u.email if u.kind == "human" else u.name} for u in found}

    async def project_names(self, project_ids: list[str]) -> dict[str, str]:
        """The name of each of these projects that exists."""
        async with self.db.connect() as conn:
            return await orgs.project_names(conn, project_ids)

    async def projects_in(self, project_ids: list[str], org_ids: list[str]) -> list[str]:
        """Those of `project_ids` that belong to one of `org_ids`."""
        async with self.db.connect() as conn:
            owners = await orgs.project_orgs(conn, project_ids)
        return sorted(p for p, org in owners.items() if org in org_ids)

    async def orgs(self, org_ids: list[str]) -> list[dict[str, Any]]:
        async with self.db.connect() as conn:
            return [asdict(o) for o in await orgs.orgs(conn, org_ids)]

    async def members(self, org_id: str) -> list[dict[str, Any]]:
        async with self.db.connect() as conn:
            return [asdict(m) for m in await orgs.members(conn, org_id)]

    async def member_role(self, org_id: str, user_id: str) -> str | None:
        async with self.db.connect() as conn:
            return await orgs.role(conn, org_id, user_id)

    async def create_service_account(self, org_id: str, name: str, role: str, actor: Actor) -> dict[str, Any]:
        """A non-human member of one org: its keys are the org's, and outlive whoever made them."""
        self.roles.named(role)
        user_id = new_id("svc")
        async with self.db.connect(transaction=True) as conn:
            await _org_must_exist(conn, org_id)
            await users.insert_service_account(conn, user_id, valid_name(name), org_id)
            await orgs.add_member(conn, org_id, user_id, role)
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
            return await users.service_org(conn, user_id)

    async def service_accounts(self, org_id: str) -> list[dict[str, Any]]:
        async with self.db.connect() as conn:
            rows = await users.service_accounts(conn, org_id)
        return [{**asdict(r), "org_id": org_id} for r in rows]

    async def service_account(self, org_id: str, user_id: str) -> dict[str, Any] | None:
        return next((sa for sa in await self.service_accounts(org_id) if sa["id"] == user_id), None)

    async def projects(self, org_id: str) -> list[dict[str, Any]]:
        async with self.db.connect() as conn:
            return [asdict(p) for p in await orgs.projects(conn, org_id)]

    async def all_orgs(self) -> list[dict[str, Any]]:
        async with self.db.connect() as conn:
            return [{**asdict(o), "created_at": iso(o.created_at)} for o in await orgs.all_orgs(conn)]

    async def all_users(self, org_id: str | None = None) -> list[dict[str, Any]]:
        """Every user, or every member of `org_id` (NotFound when there is no such org)."""
        async with self.db.connect() as conn:
            if org_id is not None:
                await _org_must_exist(conn, org_id)
            return [{**asdict(u), "created_at": iso(u.created_at)} for u in await users.all_users(conn, org_id)]

    async def require_org(self, org_id: str) -> None:
        """NotFound when there is no such org (the listings by org say nothing of it)."""
        async with self.db.connect() as conn:
            await _org_must_exist(conn, org_id)

    async def delete_project(
        self, org_id: str, project_id: str, revoke_keys: bool, actor: Actor, max_owner_role: str | None = None
    ) -> dict[str, Any]:
        """Refuses while live keys name the project, unless `revoke_keys` stops them in the same transaction:
        a key that can act only in this org is revoked, any other is stopped in this org only (its owner's
        other orgs are not this org's to touch). `max_owner_role`: the caller's role; keys of members above
        it are refused (None: the operator's command line)."""
        async with self.db.connect(transaction=True) as conn:
            if not await orgs.lock_project(conn, org_id, project_id):
                raise NotFound(f"no project {project_id}")
            rows = await keys.naming_project(conn, project_id, org_id)
            naming = [r.id for r in rows]
            if naming and not revoke_keys:
                raise Conflict(f"{len(naming)} active keys name this project: revoke them, or pass revoke_keys=true")
            if max_owner_role is not None and any(
                r.owner_role in self.roles.order and self.roles.rank(r.owner_role) > self.roles.rank(max_owner_role)
                for r in rows
            ):
                raise InsufficientPermissions("a key of a member above your role names this project")
            whole = [r.id for r in rows if not r.all_orgs and set(r.org_ids) <= {org_id}]
            if whole:
                await keys.revoke_all(conn, whole)
            for r in rows:
                if r.id not in whole:
                    await block(conn, r.id, org_id, actor)
                await write_event(
                    conn,
                    "api_key.revoked",
                    actor=actor,
                    org_id=org_id,
                    key_id=r.id,
                    target=r.id,
                    detail={"reason": "project deleted", "scope": "key" if r.id in whole else "org"},
                )
            if naming:
                await self.db.invalidate(conn, naming)
            await orgs.delete_project(conn, project_id)
            await write_event(
                conn, "project.deleted", actor=actor, org_id=org_id, target=project_id, detail={"revoked_keys": naming}
            )
        return {"id": project_id, "deleted": True, "revoked_keys": naming}


DIRECTORY = web.AppKey("directory", Directory)


async def _org_must_exist(conn: Conn, org_id: str) -> None:
    if not await orgs.org_exists(conn, org_id):
        raise NotFound(f"no org {org_id}")
