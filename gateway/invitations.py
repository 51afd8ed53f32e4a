"""Invitations: how a user joins an org through the API, the CLI or the web page.

Adding a member by email never changes that user's memberships by itself: it records an invitation,
which only the invited user accepts (or declines), before it lapses. Until then the user's keys act
exactly as before, everywhere. An org's admins see and withdraw their own org's pending invitations.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from gateway import constants as C
from gateway.audit import CLI, Actor, write_event
from gateway.backends import Conn
from gateway.data import invitations, orgs
from gateway.data.db import new_id
from gateway.data.invitations import InvitationRow
from gateway.directory import Directory
from gateway.errors import Conflict, NotFound
from gateway.formats import iso


def _view(row: InvitationRow, now: datetime) -> dict[str, Any]:
    return {
        "id": row.id,
        "org_id": row.org_id,
        "org_name": row.org_name,
        "user_id": row.user_id,
        "email": row.email,
        "role": row.role,
        "invited_by": row.invited_by,
        "status": row.status(now),
        "created_at": iso(row.created_at),
        "expires_at": iso(row.expires_at),
    }


class Invitations:
    def __init__(self, directory: Directory, ttl_s: float = C.INVITATION_TTL_S) -> None:
        self.directory = directory
        self.ttl = timedelta(seconds=ttl_s)

    async def invite(self, org_id: str, email: str, role: str, actor: Actor) -> dict[str, Any]:
        """Invite the user with this email (created if unknown) to `org_id` as `role`. Inviting again
        renews the open invitation with the new role. A current member's role is changed at once, as
        `set_member` would: they have joined already."""
        role = self.directory.roles.named(role)  # before anything is written
        user_id = await self.directory.user_by_email(email, actor)
        if await self.directory.member_role(org_id, user_id) is not None:
            member = await self.directory.set_member(org_id, user_id, role, actor)
            return {**member, "status": "member"}
        now = datetime.now(UTC)
        async with self.directory.db.connect(transaction=True) as conn:
            # A lapsed invitation stays lapsed: inviting again makes a new one.
            await invitations.expire_lapsed(conn, org_id, user_id, now)
            invitation_id = await invitations.open_or_renew(
                conn, new_id("inv"), org_id, user_id, role, actor.id, now + self.ttl
            )
            await write_event(
                conn,
                "invitation.created",
                actor=actor,
                org_id=org_id,
                user_id=user_id,
                target=invitation_id,
                detail={"role": role},
            )
            row = await _one(conn, invitation_id)
        return _view(row, now)

    async def for_user(self, user_id: str) -> list[dict[str, Any]]:
        """The user's open invitations, oldest first."""
        now = datetime.now(UTC)
        async with self.directory.db.connect() as conn:
            rows = await invitations.pending(conn, now, user_id=user_id)
        return [_view(r, now) for r in rows]

    async def for_org(self, org_id: str) -> list[dict[str, Any]]:
        """The org's open invitations, oldest first."""
        now = datetime.now(UTC)
        async with self.directory.db.connect() as conn:
            rows = await invitations.pending(conn, now, org_id=org_id)
        return [_view(r, now) for r in rows]

    async def decide(self, invitation_id: str, user_id: str | None, accept: bool, actor: Actor = CLI) -> dict[str, Any]:
        """Accept or decline an open invitation. `user_id`: the user deciding (None: the operator's
        command line, on the invited user's behalf). Someone else's invitation is not found."""
        now = datetime.now(UTC)
        async with self.directory.db.connect(transaction=True) as conn:
            row = await invitations.get(conn, invitation_id, lock=True)
            if row is None or (user_id is not None and row.user_id != user_id):
                raise NotFound(f"no invitation {invitation_id}")
            status = row.status(now)
            if status != "pending":
                raise Conflict(f"invitation {invitation_id} is {status}")
            if accept:
                await self._inviter_still_may(conn, row)
            state = "accepted" if accept else "declined"
            # The inviting org's audit learns the answer, not where or with what the user gave it.
            actor = Actor(actor.id)
            await invitations.close(conn, invitation_id, state, now)
            await write_event(
                conn,
                f"invitation.{state}",
                actor=actor,
                org_id=row.org_id,
                user_id=row.user_id,
                target=invitation_id,
                detail={"role": row.role},
            )
            if accept:
                await self.directory.join(conn, row.org_id, row.user_id, row.role, actor)
            row = await _one(conn, invitation_id)
        return _view(row, now)

    async def _inviter_still_may(self, conn: Conn, row: InvitationRow) -> None:
        """An invitation is only as good as its sender now is: one sent by a member since removed, or
        demoted below admin or below the role it offers, is void (the operator's command line is always good)."""
        inviter = row.invited_by
        if inviter in (None, CLI.id):
            return
        roles = self.directory.roles
        now_role = await orgs.role(conn, row.org_id, inviter)
        needed = max(roles.rank(row.role), roles.rank(roles.admin))
        if now_role not in roles.order or roles.rank(now_role) < needed:
            raise Conflict("whoever sent this invitation can no longer grant its role")

    async def withdraw(self, org_id: str | None, invitation_id: str, actor: Actor) -> dict[str, Any]:
        """An org's admin takes back an open invitation of that org (None: the operator, any org's)."""
        now = datetime.now(UTC)
        async with self.directory.db.connect(transaction=True) as conn:
            row = await invitations.get(conn, invitation_id, org_id=org_id, lock=True)
            if row is None:
                raise NotFound(f"no invitation {invitation_id}")
            status = row.status(now)
            if status != "pending":
                raise Conflict(f"invitation {invitation_id} is {status}")
            await invitations.close(conn, invitation_id, "revoked", now)
            await write_event(
                conn,
                "invitation.revoked",
                actor=actor,
                org_id=row.org_id,
                user_id=row.user_id,
                target=invitation_id,
            )
            row = await _one(conn, invitation_id)
        return _view(row, now)


INVITATIONS = web.AppKey("invitations", Invitations)


async def _one(conn: Conn, invitation_id: str) -> InvitationRow:
    """An invitation this call has just read or written (so it exists)."""
    row = await invitations.get(conn, invitation_id)
    assert row is not None
    return row
