"""signing_keys, token_families and refresh_tokens: every statement about JWT signing keys and the refresh
families behind access tokens. Refresh tokens are stored only as HMAC digests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.backends import Conn
from gateway.data.db import typed, typed_all


@dataclass(frozen=True, slots=True)
class SigningKeyRow:
    """A signing key as published (no private part)."""

    kid: str
    alg: str
    public_jwk: str  # JSON text of the public JWK
    state: str  # next, current, previous or retired
    created_at: datetime
    activated_at: datetime | None
    retire_after: datetime | None


@dataclass(frozen=True, slots=True)
class PrivateKeyRow:
    kid: str
    alg: str
    private_enc: bytes


@dataclass(frozen=True, slots=True)
class FamilyRow:
    id: str
    user_id: str
    org_id: str
    role: str
    scopes: list[str] | None
    project_ids: list[str] | None
    key_id: str | None
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoked_why: str | None


@dataclass(frozen=True, slots=True)
class NewFamily:
    id: str
    user_id: str
    org_id: str
    role: str
    scopes: list[str] | None
    project_ids: list[str] | None
    key_id: str | None
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class RefreshRow:
    family_id: str
    seq: int
    rotated_at: datetime | None
    latest: int  # the family's highest seq: the token issued last
    in_grace: bool  # rotated no longer ago than the grace, by the database's clock
    lapsed: bool  # the family is past its absolute or idle end, by the database's clock


_KEY_COLUMNS = "kid, alg, public_jwk::text AS public_jwk, state, created_at, activated_at, retire_after"
_FAMILY_COLUMNS = (
    "id, user_id, org_id, role, scopes, project_ids, key_id, created_at, last_used_at, expires_at, revoked_at,"
    " revoked_why"
)


# --- signing keys --------------------------------------------------------------------------------


async def signing_keys(conn: Conn, *, published_only: bool = True) -> list[SigningKeyRow]:
    where = "WHERE state <> 'retired'" if published_only else ""
    rows = await conn.fetch(f"SELECT {_KEY_COLUMNS} FROM signing_keys {where} ORDER BY created_at, kid")
    return typed_all(SigningKeyRow, rows)


async def signer(conn: Conn) -> PrivateKeyRow | None:
    """The key that signs now."""
    row = await conn.fetchrow("SELECT kid, alg, private_enc FROM signing_keys WHERE state = 'current'")
    return typed(PrivateKeyRow, row)


async def insert_signing_key(conn: Conn, kid: str, alg: str, public_jwk: str, private_enc: bytes, state: str) -> bool:
    """False when another process made a key in that state first (one current, one next)."""
    status = await conn.execute(
        "INSERT INTO signing_keys (kid, alg, public_jwk, private_enc, state, activated_at)"
        " VALUES ($1, $2, $3::jsonb, $4, $5, CASE WHEN $5 = 'current' THEN now() END)"
        " ON CONFLICT DO NOTHING",
        kid,
        alg,
        public_jwk,
        private_enc,
        state,
    )
    return status.endswith(" 1")


async def lock_signing_keys(conn: Conn) -> None:
    """Serialise changes of the key set (inside the caller's transaction)."""
    await conn.execute("LOCK TABLE signing_keys IN SHARE ROW EXCLUSIVE MODE")


async def rotate_signing_keys(conn: Conn, keep_previous_s: float) -> None:
    """current -> previous (published `keep_previous_s` more), next -> current; retire lapsed previous keys.
    The caller inserts the new next key in the same transaction."""
    await conn.execute("UPDATE signing_keys SET state = 'retired' WHERE state = 'previous' AND retire_after <= now()")
    await conn.execute(
        "UPDATE signing_keys SET state = 'previous', retire_after = now() + make_interval(secs => $1)"
        " WHERE state = 'current'",
        keep_previous_s,
    )
    await conn.execute("UPDATE signing_keys SET state = 'current', activated_at = now() WHERE state = 'next'")


# --- refresh families ------------------------------------------------------------------------------


async def insert_family(conn: Conn, family: NewFamily) -> None:
    await conn.execute(
        "INSERT INTO token_families (id, user_id, org_id, role, scopes, project_ids, key_id, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        family.id,
        family.user_id,
        family.org_id,
        family.role,
        family.scopes,
        family.project_ids,
        family.key_id,
        family.expires_at,
    )


async def family(conn: Conn, family_id: str, *, lock: bool = False) -> FamilyRow | None:
    suffix = " FOR UPDATE" if lock else ""
    row = await conn.fetchrow(f"SELECT {_FAMILY_COLUMNS} FROM token_families WHERE id = $1{suffix}", family_id)
    return typed(FamilyRow, row)


async def revoked_families(conn: Conn, family_ids: list[str]) -> dict[str, bool]:
    """For each family that exists: whether it is revoked (an absent family is not in the answer)."""
    rows = await conn.fetch(
        "SELECT id, revoked_at IS NOT NULL AS revoked FROM token_families WHERE id = ANY($1::text[])", family_ids
    )
    return {r["id"]: r["revoked"] for r in rows}


async def touch_family(conn: Conn, family_id: str) -> None:
    await conn.execute("UPDATE token_families SET last_used_at = now() WHERE id = $1", family_id)


async def revoke_family(conn: Conn, family_id: str, why: str) -> bool:
    """True when this call revoked it (it existed and was not revoked yet)."""
    status = await conn.execute(
        "UPDATE token_families SET revoked_at = now(), revoked_why = $2 WHERE id = $1 AND revoked_at IS NULL",
        family_id,
        why,
    )
    return status.endswith(" 1")


async def revoke_user_families(conn: Conn, user_id: str, why: str, org_id: str | None = None) -> list[str]:
    """Revoke every live family of the user (in `org_id` only, when given); their ids."""
    rows = await conn.fetch(
        "UPDATE token_families SET revoked_at = now(), revoked_why = $2"
        " WHERE user_id = $1 AND revoked_at IS NULL AND ($3::text IS NULL OR org_id = $3) RETURNING id",
        user_id,
        why,
        org_id,
    )
    return [r["id"] for r in rows]


async def revoke_key_families(conn: Conn, key_id: str, why: str) -> list[str]:
    """Revoke every live family issued with the key; their ids."""
    rows = await conn.fetch(
        "UPDATE token_families SET revoked_at = now(), revoked_why = $2"
        " WHERE key_id = $1 AND revoked_at IS NULL RETURNING id",
        key_id,
        why,
    )
    return [r["id"] for r in rows]


# --- refresh tokens ----------------------------------------------------------------------------------


async def insert_refresh(conn: Conn, digest: bytes, family_id: str, seq: int) -> None:
    await conn.execute(
        "INSERT INTO refresh_tokens (digest, family_id, seq) VALUES ($1, $2, $3)", digest, family_id, seq
    )


async def refresh_family_of(conn: Conn, digest: bytes) -> str | None:
    """The family of a refresh token (the caller then locks it with `family(..., lock=True)`)."""
    family_id: str | None = await conn.fetchval("SELECT family_id FROM refresh_tokens WHERE digest = $1", digest)
    return family_id


async def refresh_state(conn: Conn, digest: bytes, grace_s: float, idle_s: float) -> RefreshRow | None:
    """The refresh token and its family's latest seq. Read after locking the family: refreshes of one
    family are serialised, so this is the state no other refresh can change until the caller commits.
    Times are judged by the database's clock, the one that wrote them."""
    row = await conn.fetchrow(
        "SELECT t.family_id, t.seq, t.rotated_at,"
        " (SELECT max(seq) FROM refresh_tokens l WHERE l.family_id = t.family_id) AS latest,"
        " COALESCE(now() - t.rotated_at <= make_interval(secs => $2), false) AS in_grace,"
        " (f.expires_at <= now() OR f.last_used_at + make_interval(secs => $3) <= now()) AS lapsed"
        " FROM refresh_tokens t JOIN token_families f ON f.id = t.family_id WHERE t.digest = $1",
        digest,
        grace_s,
        idle_s,
    )
    return typed(RefreshRow, row)


async def mark_refresh_rotated(conn: Conn, family_id: str, seq: int) -> None:
    await conn.execute(
        "UPDATE refresh_tokens SET rotated_at = now() WHERE family_id = $1 AND seq = $2 AND rotated_at IS NULL",
        family_id,
        seq,
    )
