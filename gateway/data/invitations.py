"""invitations: an org's offer of a role to a user, open until answered, withdrawn or lapsed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.backends import Conn
from gateway.data.db import typed, typed_all


@dataclass(frozen=True, slots=True)
class InvitationRow:
    id: str
    org_id: str
    org_name: str
    user_id: str
    email: str | None
    role: str
    invited_by: str | None
    created_at: datetime
    expires_at: datetime
    state: str  # as stored: a pending one past expires_at has lapsed all the same

    def status(self, now: datetime) -> str:
        return "expired" if self.state == "pending" and self.expires_at <= now else self.state


_SELECT = (
    "SELECT i.id, i.org_id, o.name AS org_name, i.user_id, u.email, i.role, i.invited_by, i.created_at,"
    " i.expires_at, i.state FROM invitations i JOIN orgs o ON o.id = i.org_id JOIN users u ON u.id = i.user_id"
)


async def expire_lapsed(conn: Conn, org_id: str, user_id: str, now: datetime) -> None:
    """Record a lapsed open invitation as expired, so that inviting again makes a new one."""
    await conn.execute(
        "UPDATE invitations SET state = 'expired', decided_at = expires_at"
        " WHERE org_id = $1 AND user_id = $2 AND state = 'pending' AND expires_at <= $3",
        org_id,
        user_id,
        now,
    )


async def open_or_renew(
    conn: Conn, new_id: str, org_id: str, user_id: str, role: str, invited_by: str, expires_at: datetime
) -> str:
    """The id of the user's open invitation to the org: `new_id` made now, or the open one renewed."""
    invitation_id: str = await conn.fetchval(
        "INSERT INTO invitations (id, org_id, user_id, role, invited_by, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (org_id, user_id) WHERE state = 'pending' DO UPDATE SET role = EXCLUDED.role,"
        " invited_by = EXCLUDED.invited_by, created_at = now(), expires_at = EXCLUDED.expires_at"
        " RETURNING id",
        new_id,
        org_id,
        user_id,
        role,
        invited_by,
        expires_at,
    )
    return invitation_id


async def get(conn: Conn, invitation_id: str, *, org_id: str | None = None, lock: bool = False) -> InvitationRow | None:
    """An invitation (of `org_id` only, if given); with `lock`, held until the transaction ends."""
    query = f"{_SELECT} WHERE i.id = $1 AND ($2::text IS NULL OR i.org_id = $2)" + (" FOR UPDATE OF i" if lock else "")
    return typed(InvitationRow, await conn.fetchrow(query, invitation_id, org_id))


async def pending(
    conn: Conn, now: datetime, *, org_id: str | None = None, user_id: str | None = None
) -> list[InvitationRow]:
    """Open invitations of an org or of a user, oldest first."""
    rows = await conn.fetch(
        f"{_SELECT} WHERE ($1::text IS NULL OR i.org_id = $1) AND ($2::text IS NULL OR i.user_id = $2)"
        " AND i.state = 'pending' AND i.expires_at > $3 ORDER BY i.created_at, i.id",
        org_id,
        user_id,
        now,
    )
    return typed_all(InvitationRow, rows)


async def close(conn: Conn, invitation_id: str, state: str, now: datetime) -> None:
    """Record the answer (accepted, declined) or the withdrawal (revoked)."""
    await conn.execute("UPDATE invitations SET state = $2, decided_at = $3 WHERE id = $1", invitation_id, state, now)
