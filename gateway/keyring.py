"""API keys: their spec and its checks, minting, listing, revoking, stopping in an org, rotating.

Every change records its audit event and its cache invalidation (a NOTIFY) in the same transaction as the
change: the invalidation is delivered exactly when the change commits."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web

from gateway.audit import CLI, Actor, write_event
from gateway.backends import Conn
from gateway.config import RolesConfig
from gateway.db import Database, must_exist
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.formats import PERMISSION_RE, UNIT_S, iso, parse_iso, valid_name
from gateway.keys import ENVS, KeyFormat, SecretHasher
from gateway.ratelimit import parse_rate

_DURATION_RE = re.compile(r"([0-9]{1,9})(s|m|h|d|w)")
MAX_LIST = 100


def parse_duration(text: str, what: str = "duration") -> timedelta:
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None:
        raise InvalidRequest(f"{what}: expected a number and a unit s, m, h, d or w, such as 30d", field=what)
    return timedelta(seconds=int(m.group(1)) * UNIT_S[m.group(2)])


def parse_rate_limit(text: str) -> str:
    parse_rate(text, "rate limit")
    return text.strip()


def key_status(row: asyncpg.Record | Mapping[str, Any], now: datetime) -> str:
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return "expired"
    return "active"


def key_view(row: asyncpg.Record | Mapping[str, Any]) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "id": row["id"],
        "name": row["name"],
        "user_id": row["user_id"],
        "role": row["role"],
        "env": row["env"],
        "start": row["start"],
        "scopes": row["scopes"],
        "orgs": "all" if row["all_orgs"] else list(row["org_ids"]),
        "projects": "all" if row["all_projects"] else list(row["project_ids"]),
        "allowed_ips": [str(c) for c in row["allowed_cidrs"]] if row["allowed_cidrs"] is not None else None,
        "rate_limit": row["rate_limit"],
        "status": key_status(row, now),
        "expires_at": iso(row["expires_at"]),
        "created_at": iso(row["created_at"]),
        "last_used_at": iso(row["last_used_at"]),
        "revoked_at": iso(row["revoked_at"]),
        "rotated_to": row["rotated_to"],
    }


def key_expiry(spec: KeySpec) -> datetime | None:
    """When a key made from `spec` expires (None: never); InvalidRequest for a bad or past time."""
    if spec.expires_in and spec.expires_at:
        raise InvalidRequest("give --expires-in or --expires-at, not both", field="expires_at")
    if spec.expires_in:
        return datetime.now(UTC) + parse_duration(spec.expires_in, "expires_in")
    if not spec.expires_at:
        return None
    try:
        expires = parse_iso(spec.expires_at)
    except ValueError:
        raise InvalidRequest("expires_at must be an ISO 8601 time", field="expires_at") from None
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    if expires <= datetime.now(UTC):
        raise InvalidRequest("expires_at must be in the future", field="expires_at")
    return expires


@dataclass(frozen=True)
class KeySpec:
    user_id: str
    name: str
    role: str
    orgs: list[str]  # empty: all the owner's orgs
    projects: list[str]  # empty: all projects
    scopes: list[str] | None
    env: str = "live"
    expires_in: str | None = None
    expires_at: str | None = None
    allow_ips: list[str] | None = None
    rate_limit: str | None = None


@dataclass(frozen=True)
class KeyQuery:
    """Which keys a listing shows, oldest first: those of `owner` and/or acting in `org`, in `status`
    (active, expired, revoked), after the (created_at, id) cursor, at most `limit`."""

    owner: str | None = None
    org: str | None = None
    status: str | None = None
    after: tuple[datetime, str] | None = None
    limit: int | None = None


@dataclass(frozen=True)
class CheckedSpec:
    """A KeySpec that passed `Keyring.validate_spec`, with what the check worked out."""

    spec: KeySpec
    expires: datetime | None
    cidrs: list[str] | None  # the allowlist as normalised networks


_KEY = "SELECT * FROM api_keys WHERE id = $1"
_KEY_FOR_UPDATE = "SELECT * FROM api_keys WHERE id = $1 FOR UPDATE"


async def _key(conn: Conn, key_id: str, *, lock: bool = False) -> asyncpg.Record | None:
    """A key's row; with `lock`, held until the transaction ends (FOR UPDATE)."""
    query = _KEY_FOR_UPDATE if lock else _KEY
    row: asyncpg.Record | None = await conn.fetchrow(query, key_id)
    return row


async def block(conn: Conn, key_id: str, org_id: str, actor: Actor) -> None:
    """Stop a key acting in one org (see `Keyring.stop_key_in`), inside the caller's transaction."""
    await conn.execute(
        "INSERT INTO key_org_blocks (key_id, org_id, blocked_by) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        key_id,
        org_id,
        actor.id,
    )


class Keyring:
    def __init__(self, db: Database, fmt: KeyFormat, hasher: SecretHasher, roles: RolesConfig) -> None:
        self.db = db
        self.fmt = fmt
        self.hasher = hasher
        self.roles = roles

    def validate_spec(self, spec: KeySpec) -> CheckedSpec:
        """The spec checked on its own (no database): InvalidRequest naming the field, else ready to mint."""
        valid_name(spec.name)
        self.roles.named(spec.role)
        if spec.env not in ENVS:
            raise InvalidRequest("env must be live or test", field="env")
        expires = key_expiry(spec)
        for scope in spec.scopes or []:
            if not PERMISSION_RE.fullmatch(scope):
                raise InvalidRequest(f"scope {scope!r} is not a resource:action pattern", field="scopes")
        cidrs = None
        if spec.allow_ips is not None:
            try:
                cidrs = [str(ipaddress.ip_network(c, strict=False)) for c in spec.allow_ips]
            except ValueError:
                raise InvalidRequest("allowed IPs must be addresses or CIDR networks", field="allowed_ips") from None
        for what, items in (
            ("orgs", spec.orgs),
            ("projects", spec.projects),
            ("scopes", spec.scopes or []),
            ("allowed_ips", spec.allow_ips or []),
        ):
            if len(items) > MAX_LIST:
                raise InvalidRequest(f"at most {MAX_LIST} {what}", field=what)
        if spec.rate_limit is not None:
            parse_rate_limit(spec.rate_limit)
        return CheckedSpec(spec, expires, cidrs)

    async def _check_scope(self, conn: Conn, spec: KeySpec) -> None:
        await must_exist(conn, "users", spec.user_id)
        member_of = {
            r["org_id"] for r in await conn.fetch("SELECT org_id FROM memberships WHERE user_id = $1", spec.user_id)
        }
        for org in spec.orgs:
            if org not in member_of:
                raise InvalidRequest(f"user {spec.user_id} is not a member of org {org}", field="orgs")
        allowed_orgs = set(spec.orgs) if spec.orgs else member_of
        for project in spec.projects:
            owner = await conn.fetchval("SELECT org_id FROM projects WHERE id = $1", project)
            if owner is None or owner not in allowed_orgs:
                raise InvalidRequest(f"project {project} is not in the key's orgs", field="projects")

    async def _insert_key(
        self, conn: Conn, spec: KeySpec, expires: datetime | None, cidrs: list[str] | None
    ) -> tuple[str, str]:
        raw, parsed = self.fmt.generate(spec.env)
        secret_hash = await self.hasher.hash(parsed.secret)
        await conn.execute(
            "INSERT INTO api_keys (id, user_id, name, role, env, secret_hash, start, scopes, all_orgs, org_ids,"
            " all_projects, project_ids, allowed_cidrs, rate_limit, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::cidr[], $14, $15)",
            parsed.key_id,
            spec.user_id,
            spec.name.strip(),
            spec.role,
            spec.env,
            secret_hash,
            self.fmt.display_start(spec.env, parsed.key_id),
            spec.scopes,
            not spec.orgs,
            spec.orgs,
            not spec.projects,
            spec.projects,
            cidrs,
            spec.rate_limit,
            expires,
        )
        return parsed.key_id, raw

    async def _key_event(
        self, conn: Conn, type_: str, key_id: str, actor: Actor, detail: dict[str, Any] | None = None
    ) -> None:
        """One audit event per org the key can act in, so each org's audit shows it."""
        row = await conn.fetchrow(
            "SELECT k.user_id, CASE WHEN k.all_orgs THEN ARRAY(SELECT m.org_id FROM memberships m"
            " WHERE m.user_id = k.user_id) ELSE k.org_ids END AS orgs FROM api_keys k WHERE k.id = $1",
            key_id,
        )
        assert row is not None  # the caller holds the key (created or read in this transaction)
        for org in list(row["orgs"]) or [None]:
            await write_event(
                conn,
                type_,
                actor=actor,
                org_id=org,
                user_id=row["user_id"],
                key_id=key_id,
                target=key_id,
                detail=detail,
            )

    async def create_key(self, spec: KeySpec, actor: Actor = CLI) -> dict[str, Any]:
        row, raw = await self.mint(self.validate_spec(spec), actor)
        return {**key_view(row), "key": raw}

    async def mint(self, checked: CheckedSpec, actor: Actor) -> tuple[asyncpg.Record, str]:
        """A new key from a checked spec (its user and projects checked here): its row and the raw key,
        shown this once."""
        spec = checked.spec
        async with self.db.connect(transaction=True) as conn:
            await self._check_scope(conn, spec)
            key_id, raw = await self._insert_key(conn, spec, checked.expires, checked.cidrs)
            await self._key_event(conn, "api_key.created", key_id, actor, {"role": spec.role, "env": spec.env})
            row = await _key(conn, key_id)
        assert row is not None  # inserted just now, in this transaction
        return row, raw

    async def list_keys(self, query: KeyQuery) -> list[dict[str, Any]]:
        """Keys, oldest first: of one owner, and/or that can act in one org, in one status."""
        return [key_view(r) for r in await self.key_rows(query)]

    async def key_rows(self, query: KeyQuery) -> list[asyncpg.Record]:
        """`list_keys`'s rows."""
        user_id, org_id, status, after, limit = query.owner, query.org, query.status, query.after, query.limit
        now = datetime.now(UTC)
        async with self.db.connect() as conn:
            rows = await conn.fetch(
                "SELECT k.* FROM api_keys k WHERE ($1::text IS NULL OR k.user_id = $1)"
                " AND ($2::text IS NULL OR (($2 = ANY(k.org_ids) OR (k.all_orgs AND EXISTS ("
                "      SELECT 1 FROM memberships m WHERE m.user_id = k.user_id AND m.org_id = $2)))"
                "      AND NOT EXISTS (SELECT 1 FROM key_org_blocks b WHERE b.key_id = k.id AND b.org_id = $2)))"
                " AND ($3::text IS NULL"
                "      OR ($3 = 'revoked' AND k.revoked_at IS NOT NULL)"
                "      OR ($3 = 'expired' AND k.revoked_at IS NULL AND k.expires_at <= $4)"
                "      OR ($3 = 'active' AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > $4)))"
                " AND ($5::timestamptz IS NULL OR (k.created_at, k.id) > ($5, $6::text))"
                " ORDER BY k.created_at, k.id LIMIT $7",
                user_id,
                org_id,
                status,
                now,
                after[0] if after else None,
                after[1] if after else None,
                limit,
            )
        return list(rows)

    async def key_row(self, key_id: str) -> asyncpg.Record | None:
        async with self.db.connect() as conn:
            return await _key(conn, key_id)

    async def show_key(self, key_id: str) -> dict[str, Any]:
        row = await self.key_row(key_id)
        if row is None:
            raise NotFound(f"no key {key_id}")
        return key_view(row)

    async def revoke_key(self, key_id: str, actor: Actor = CLI) -> dict[str, Any]:
        async with self.db.connect(transaction=True) as conn:
            row = await conn.fetchrow(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 RETURNING *", key_id
            )
            if row is None:
                raise NotFound(f"no key {key_id}")
            await self._key_event(conn, "api_key.revoked", key_id, actor)
            await self.db.invalidate(conn, [key_id])
        return key_view(row)

    async def stop_key_in(self, key_id: str, org_ids: list[str], actor: Actor) -> dict[str, Any]:
        """Stop a key acting in `org_ids` only (what an org's admin can do to a key that also acts in
        other orgs): its owner's other orgs are untouched."""
        async with self.db.connect(transaction=True) as conn:
            row = await _key(conn, key_id)
            if row is None:
                raise NotFound(f"no key {key_id}")
            for org_id in org_ids:
                await block(conn, key_id, org_id, actor)
                await write_event(
                    conn,
                    "api_key.revoked",
                    actor=actor,
                    org_id=org_id,
                    key_id=key_id,
                    target=key_id,
                    detail={"scope": "org"},
                )
            await self.db.invalidate(conn, [key_id])
        return key_view(row)

    async def stopped_in(self, key_id: str) -> list[str]:
        """The orgs a key was stopped in by their admins."""
        return (await self.stopped_in_each([key_id]))[key_id]

    async def stopped_in_each(self, key_ids: list[str]) -> dict[str, list[str]]:
        """`stopped_in` of several keys at once."""
        stopped: dict[str, list[str]] = {k: [] for k in key_ids}
        async with self.db.connect() as conn:
            rows = await conn.fetch(
                "SELECT key_id, org_id FROM key_org_blocks WHERE key_id = ANY($1::text[]) ORDER BY org_id", key_ids
            )
        for r in rows:
            stopped[r["key_id"]].append(r["org_id"])
        return stopped

    async def rotate_key(self, key_id: str, grace: str | None, actor: Actor = CLI) -> dict[str, Any]:
        grace_td = parse_duration(grace, "grace") if grace else timedelta(0)
        async with self.db.connect(transaction=True) as conn:
            old = await _key(conn, key_id, lock=True)
            if old is None:
                raise NotFound(f"no key {key_id}")
            if key_status(old, datetime.now(UTC)) != "active":
                raise Conflict(f"key {key_id} is {key_status(old, datetime.now(UTC))} and cannot be rotated")
            spec = KeySpec(
                user_id=old["user_id"],
                name=old["name"],
                role=old["role"],
                orgs=[] if old["all_orgs"] else list(old["org_ids"]),
                projects=[] if old["all_projects"] else list(old["project_ids"]),
                scopes=old["scopes"],
                env=old["env"],
                rate_limit=old["rate_limit"],
            )
            cidrs = [str(c) for c in old["allowed_cidrs"]] if old["allowed_cidrs"] is not None else None
            new_id_, raw = await self._insert_key(conn, spec, old["expires_at"], cidrs)
            # Stopped in an org, stopped there still: rotation is no way back in.
            await conn.execute(
                "INSERT INTO key_org_blocks (key_id, org_id, blocked_by)"
                " SELECT $2, org_id, blocked_by FROM key_org_blocks WHERE key_id = $1",
                key_id,
                new_id_,
            )
            await conn.execute(
                "UPDATE api_keys SET rotated_to = $2,"
                " expires_at = LEAST(COALESCE(expires_at, 'infinity'), now() + $3::interval) WHERE id = $1",
                key_id,
                new_id_,
                grace_td,
            )
            await self._key_event(
                conn,
                "api_key.rotated",
                key_id,
                actor,
                {"new_key_id": new_id_, "grace_s": int(grace_td.total_seconds())},
            )
            await self.db.invalidate(conn, [key_id])
            row = await _key(conn, new_id_)
        assert row is not None  # inserted just now, in this transaction
        return {**key_view(row), "key": raw, "rotated_from": key_id}


KEYRING = web.AppKey("keyring", Keyring)
