"""Management operations (orgs, users, memberships, projects, keys).

Every write that changes access records its audit event and its cache invalidation (a NOTIFY) in the
same transaction as the change: the invalidation is delivered exactly when the change commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web

from gateway import constants as C
from gateway.audit import CLI, Actor, write_event
from gateway.backends import PG_ERRORS, StoreUnavailable
from gateway.config import RolesConfig
from gateway.errors import Conflict, GatewayError, InsufficientPermissions, InvalidRequest, NotFound
from gateway.formats import PERMISSION_RE, UNIT_S, iso, parse_iso
from gateway.keys import ENVS, KeyFormat, SecretHasher, random_b62
from gateway.ratelimit import parse_rate

_DURATION_RE = re.compile(r"([0-9]{1,9})(s|m|h|d|w)")
_EMAIL_RE = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}")
MAX_NAME = 200
MAX_LIST = 100


def parse_duration(text: str, what: str = "duration") -> timedelta:
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None:
        raise InvalidRequest(f"{what}: expected a number and a unit s, m, h, d or w, such as 30d", field=what)
    return timedelta(seconds=int(m.group(1)) * UNIT_S[m.group(2)])


def parse_rate_limit(text: str) -> str:
    parse_rate(text, "rate limit")
    return text.strip()


def new_id(kind: str) -> str:
    return f"{kind}_{random_b62(16)}"


def _email(value: str) -> str:
    email = value.strip().lower()
    if not _EMAIL_RE.fullmatch(email):
        raise InvalidRequest("email is not a valid address", field="email")
    return email


def _name(value: str, what: str = "name") -> str:
    value = value.strip()
    if not value or len(value) > MAX_NAME or any(ord(c) < 0x20 for c in value):
        raise InvalidRequest(f"{what} must be 1-{MAX_NAME} printable characters", field=what)
    return value


def key_status(row: asyncpg.Record, now: datetime) -> str:
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return "expired"
    return "active"


def key_view(row: asyncpg.Record) -> dict[str, Any]:
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
class CheckedSpec:
    """A KeySpec that passed `Admin.validate_spec`, with what the check worked out."""

    spec: KeySpec
    expires: datetime | None
    cidrs: list[str] | None  # the allowlist as normalised networks


async def notify_keys(conn: asyncpg.Connection, key_ids: list[str]) -> None:
    for i in range(0, len(key_ids), C.PG_NOTIFY_BATCH):
        payload = json.dumps({"k": key_ids[i : i + C.PG_NOTIFY_BATCH]})
        await conn.execute("SELECT pg_notify($1, $2)", C.PG_INVALIDATION_CHANNEL, payload)


_KEY = "SELECT * FROM api_keys WHERE id = $1"
_KEY_FOR_UPDATE = "SELECT * FROM api_keys WHERE id = $1 FOR UPDATE"


async def _key(conn: asyncpg.Connection, key_id: str, *, lock: bool = False) -> asyncpg.Record | None:
    """A key's row; with `lock`, held until the transaction ends (FOR UPDATE)."""
    query = _KEY_FOR_UPDATE if lock else _KEY
    row: asyncpg.Record | None = await conn.fetchrow(query, key_id)
    return row


async def _block(conn: asyncpg.Connection, key_id: str, org_id: str, actor: Actor) -> None:
    """Stop a key acting in one org (see `Admin.stop_key_in`), inside the caller's transaction."""
    await conn.execute(
        "INSERT INTO key_org_blocks (key_id, org_id, blocked_by) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        key_id,
        org_id,
        actor.id,
    )


class Admin:
    def __init__(
        self,
        pool: asyncpg.Pool,
        fmt: KeyFormat,
        hasher: SecretHasher,
        roles: RolesConfig,
        timeout_s: float = C.DEFAULT_MANAGEMENT_TIMEOUT_MS / 1000,
        on_invalidate: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.pool = pool
        self.fmt = fmt
        self.hasher = hasher
        self.roles = roles
        self.timeout_s = timeout_s
        # Told the key ids each change invalidates (the CLI drops them from Redis itself): a callback of the
        # caller's, not state kept here, since one Admin serves concurrent calls.
        self.on_invalidate = on_invalidate

    @contextlib.asynccontextmanager
    async def connect(self, *, transaction: bool = False) -> AsyncIterator[asyncpg.Connection]:
        """A connection for one management call, in a transaction if asked: the whole call within
        `timeout_s`, and a database that cannot answer in time is StoreUnavailable (503). A connection
        that timed out or failed is closed rather than rolled back: a ROLLBACK to a server that does not
        answer would hang the call (closing it ends the transaction on the server)."""
        conn: asyncpg.Connection | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                conn = await self.pool.acquire()
                tx = conn.transaction() if transaction else None
                if tx is not None:
                    await tx.start()
                try:
                    yield conn
                except (GatewayError, asyncpg.PostgresError):
                    # Refused by the call or by the server, which answered: undo, keep the connection.
                    if tx is not None:
                        await tx.rollback()
                    raise
                if tx is not None:
                    await tx.commit()
        except BaseException as exc:
            if conn is not None and not isinstance(exc, GatewayError | asyncpg.PostgresError):
                conn.terminate()
            if isinstance(exc, PG_ERRORS):
                raise StoreUnavailable(f"the database did not answer in time ({type(exc).__name__})") from None
            raise
        finally:
            if conn is not None:
                await self.pool.release(conn, timeout=self.timeout_s)

    async def _invalidate(self, conn: asyncpg.Connection, key_ids: list[str]) -> None:
        """Every process drops these keys when the caller's transaction commits (NOTIFY)."""
        await notify_keys(conn, key_ids)
        if self.on_invalidate is not None:
            self.on_invalidate(key_ids)

    def role_name(self, role: str) -> str:
        """`role`, if this gateway knows it; else InvalidRequest naming the field."""
        if role not in self.roles.order:
            raise InvalidRequest(f"role must be one of {', '.join(self.roles.order)}", field="role")
        return role

    # --- orgs, users, members, projects ---------------------------------------------------------

    async def create_org(self, name: str, actor: Actor = CLI, owner: str | None = None) -> dict[str, Any]:
        """A new org; with `owner`, that user is its owner (the highest role), in the same transaction."""
        org_id = new_id("org")
        async with self.connect(transaction=True) as conn:
            await conn.execute("INSERT INTO orgs (id, name) VALUES ($1, $2)", org_id, _name(name))
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
        email = _email(email)
        async with self.connect(transaction=True) as conn:
            user_id = await self._insert_user(conn, email, actor)
        if user_id is None:
            raise Conflict(f"a user with email {email} exists")
        return {"id": user_id, "email": email}

    async def user_by_email(self, email: str, actor: Actor) -> str:
        """The id of the user with this email, created if there is none."""
        email = _email(email)
        async with self.connect(transaction=True) as conn:
            query = "SELECT id FROM users WHERE email = $1"
            found: str | None = await conn.fetchval(query, email) or await self._insert_user(conn, email, actor)
            if found is None:  # made by a concurrent call since we looked
                found = await conn.fetchval(query, email)
        if found is None:
            raise Conflict(f"the user with email {email} could not be read back")
        return found

    async def _insert_user(self, conn: asyncpg.Connection, email: str, actor: Actor) -> str | None:
        """The new user's id; None when the email is taken (nothing written)."""
        user_id = new_id("usr")
        added = await conn.fetchval(
            "INSERT INTO users (id, email) VALUES ($1, $2) ON CONFLICT (email) DO NOTHING RETURNING id", user_id, email
        )
        if added is None:
            return None
        await write_event(conn, "user.created", actor=actor, user_id=user_id, target=user_id)
        return user_id

    async def _must_exist(self, conn: asyncpg.Connection, table: str, id_: str) -> None:
        queries = {
            "orgs": "SELECT 1 FROM orgs WHERE id = $1",
            "users": "SELECT 1 FROM users WHERE id = $1",
        }
        if await conn.fetchval(queries[table], id_) is None:
            raise NotFound(f"no {table[:-1]} {id_}")

    async def _user_keys(self, conn: asyncpg.Connection, user_id: str) -> list[str]:
        return [r["id"] for r in await conn.fetch("SELECT id FROM api_keys WHERE user_id = $1", user_id)]

    async def _membership_changed(
        self, conn: asyncpg.Connection, org_id: str, user_id: str, old: str | None, new: str | None, actor: Actor
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
        await self._invalidate(conn, await self._user_keys(conn, user_id))

    async def _keep_an_owner(self, conn: asyncpg.Connection, org_id: str, user_id: str, new: str | None) -> None:
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
        role = self.role_name(role)
        async with self.connect(transaction=True) as conn:
            await self._must_exist(conn, "orgs", org_id)
            await self._must_exist(conn, "users", user_id)
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

    async def join(self, conn: asyncpg.Connection, org_id: str, user_id: str, role: str, actor: Actor) -> None:
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
        async with self.connect(transaction=True) as conn:
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
        async with self.connect(transaction=True) as conn:
            await self._must_exist(conn, "orgs", org_id)
            try:
                await conn.execute(
                    "INSERT INTO projects (id, org_id, name) VALUES ($1, $2, $3)", project_id, org_id, _name(name)
                )
            except asyncpg.UniqueViolationError:
                raise Conflict(f"org {org_id} already has a project named {name}") from None
            await write_event(conn, "project.created", actor=actor, org_id=org_id, detail={"project": project_id})
        return {"id": project_id, "org_id": org_id, "name": name.strip()}

    # --- keys -------------------------------------------------------------------------------------

    def validate_spec(self, spec: KeySpec) -> CheckedSpec:
        """The spec checked on its own (no database): InvalidRequest naming the field, else ready to mint."""
        _name(spec.name)
        self.role_name(spec.role)
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

    async def _check_scope(self, conn: asyncpg.Connection, spec: KeySpec) -> None:
        await self._must_exist(conn, "users", spec.user_id)
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
        self, conn: asyncpg.Connection, spec: KeySpec, expires: datetime | None, cidrs: list[str] | None
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
        self, conn: asyncpg.Connection, type_: str, key_id: str, actor: Actor, detail: dict[str, Any] | None = None
    ) -> None:
        """One audit event per org the key can act in, so each org's audit shows it."""
        row = await conn.fetchrow(
            "SELECT k.user_id, CASE WHEN k.all_orgs THEN ARRAY(SELECT m.org_id FROM memberships m"
            " WHERE m.user_id = k.user_id) ELSE k.org_ids END AS orgs FROM api_keys k WHERE k.id = $1",
            key_id,
        )
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
        async with self.connect(transaction=True) as conn:
            await self._check_scope(conn, spec)
            key_id, raw = await self._insert_key(conn, spec, checked.expires, checked.cidrs)
            await self._key_event(conn, "api_key.created", key_id, actor, {"role": spec.role, "env": spec.env})
            row = await _key(conn, key_id)
        assert row is not None  # inserted just now, in this transaction
        return row, raw

    async def list_keys(
        self,
        user_id: str | None = None,
        org_id: str | None = None,
        status: str | None = None,
        after: tuple[datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Keys, oldest first: of one owner, and/or that can act in one org, in one status."""
        return [key_view(r) for r in await self.key_rows(user_id, org_id, status, after, limit)]

    async def key_rows(
        self,
        user_id: str | None = None,
        org_id: str | None = None,
        status: str | None = None,
        after: tuple[datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[asyncpg.Record]:
        """`list_keys`'s rows."""
        now = datetime.now(UTC)
        async with self.connect() as conn:
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
        async with self.connect() as conn:
            return await _key(conn, key_id)

    async def show_key(self, key_id: str) -> dict[str, Any]:
        row = await self.key_row(key_id)
        if row is None:
            raise NotFound(f"no key {key_id}")
        return key_view(row)

    async def revoke_key(self, key_id: str, actor: Actor = CLI) -> dict[str, Any]:
        async with self.connect(transaction=True) as conn:
            row = await conn.fetchrow(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 RETURNING *", key_id
            )
            if row is None:
                raise NotFound(f"no key {key_id}")
            await self._key_event(conn, "api_key.revoked", key_id, actor)
            await self._invalidate(conn, [key_id])
        return key_view(row)

    async def stop_key_in(self, key_id: str, org_ids: list[str], actor: Actor) -> dict[str, Any]:
        """Stop a key acting in `org_ids` only (what an org's admin can do to a key that also acts in
        other orgs): its owner's other orgs are untouched."""
        async with self.connect(transaction=True) as conn:
            row = await _key(conn, key_id)
            if row is None:
                raise NotFound(f"no key {key_id}")
            for org_id in org_ids:
                await _block(conn, key_id, org_id, actor)
                await write_event(
                    conn,
                    "api_key.revoked",
                    actor=actor,
                    org_id=org_id,
                    key_id=key_id,
                    target=key_id,
                    detail={"scope": "org"},
                )
            await self._invalidate(conn, [key_id])
        return key_view(row)

    async def stopped_in(self, key_id: str) -> list[str]:
        """The orgs a key was stopped in by their admins."""
        return (await self.stopped_in_each([key_id]))[key_id]

    async def member_roles(self, user_id: str) -> dict[str, str]:
        """The user's role in each org they belong to."""
        return (await self.member_roles_of([user_id]))[user_id]

    async def member_roles_of(self, user_ids: list[str]) -> dict[str, dict[str, str]]:
        """`member_roles` of several users at once (one query for a page of keys)."""
        roles: dict[str, dict[str, str]] = {u: {} for u in user_ids}
        async with self.connect() as conn:
            rows = await conn.fetch(
                "SELECT user_id, org_id, role FROM memberships WHERE user_id = ANY($1::text[])", user_ids
            )
        for r in rows:
            roles[r["user_id"]][r["org_id"]] = r["role"]
        return roles

    async def stopped_in_each(self, key_ids: list[str]) -> dict[str, list[str]]:
        """`stopped_in` of several keys at once."""
        stopped: dict[str, list[str]] = {k: [] for k in key_ids}
        async with self.connect() as conn:
            rows = await conn.fetch(
                "SELECT key_id, org_id FROM key_org_blocks WHERE key_id = ANY($1::text[]) ORDER BY org_id", key_ids
            )
        for r in rows:
            stopped[r["key_id"]].append(r["org_id"])
        return stopped

    async def projects_in(self, project_ids: list[str], org_ids: list[str]) -> list[str]:
        """Those of `project_ids` that belong to one of `org_ids`."""
        async with self.connect() as conn:
            rows = await conn.fetch(
                "SELECT id FROM projects WHERE id = ANY($1::text[]) AND org_id = ANY($2::text[]) ORDER BY id",
                project_ids,
                org_ids,
            )
        return [r["id"] for r in rows]

    async def rotate_key(self, key_id: str, grace: str | None, actor: Actor = CLI) -> dict[str, Any]:
        grace_td = parse_duration(grace, "grace") if grace else timedelta(0)
        async with self.connect(transaction=True) as conn:
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
            await self._invalidate(conn, [key_id])
            row = await _key(conn, new_id_)
        return {**key_view(row), "key": raw, "rotated_from": key_id}

    # --- self-serve queries and writes ------------------------------------------------------------

    async def orgs(self, org_ids: list[str]) -> list[dict[str, Any]]:
        async with self.connect() as conn:
            rows = await conn.fetch("SELECT id, name FROM orgs WHERE id = ANY($1::text[]) ORDER BY name, id", org_ids)
        return [dict(r) for r in rows]

    async def members(self, org_id: str) -> list[dict[str, Any]]:
        async with self.connect() as conn:
            rows = await conn.fetch(
                "SELECT u.id AS user_id, u.email, u.kind, u.name, m.role FROM memberships m"
                " JOIN users u ON u.id = m.user_id WHERE m.org_id = $1 ORDER BY u.kind, u.email, u.name, u.id",
                org_id,
            )
        return [dict(r) for r in rows]

    async def member_role(self, org_id: str, user_id: str) -> str | None:
        async with self.connect() as conn:
            role: str | None = await conn.fetchval(
                "SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2", org_id, user_id
            )
        return role

    async def create_service_account(self, org_id: str, name: str, role: str, actor: Actor) -> dict[str, Any]:
        """A non-human member of one org: its keys are the org's, and outlive whoever made them."""
        self.role_name(role)
        user_id = new_id("svc")
        async with self.connect(transaction=True) as conn:
            await self._must_exist(conn, "orgs", org_id)
            await conn.execute(
                "INSERT INTO users (id, kind, name, service_org) VALUES ($1, 'service', $2, $3)",
                user_id,
                _name(name),
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
        async with self.connect() as conn:
            org: str | None = await conn.fetchval("SELECT service_org FROM users WHERE id = $1", user_id)
        return org

    async def service_accounts(self, org_id: str) -> list[dict[str, Any]]:
        async with self.connect() as conn:
            rows = await conn.fetch(
                "SELECT u.id, u.name, m.role FROM users u JOIN memberships m ON m.user_id = u.id AND m.org_id = $1"
                " WHERE u.kind = 'service' AND u.service_org = $1 ORDER BY u.name, u.id",
                org_id,
            )
        return [{**dict(r), "org_id": org_id} for r in rows]

    async def service_account(self, org_id: str, user_id: str) -> dict[str, Any] | None:
        return next((sa for sa in await self.service_accounts(org_id) if sa["id"] == user_id), None)

    async def projects(self, org_id: str) -> list[dict[str, Any]]:
        async with self.connect() as conn:
            rows = await conn.fetch("SELECT id, org_id, name FROM projects WHERE org_id = $1 ORDER BY name", org_id)
        return [dict(r) for r in rows]

    async def delete_project(
        self, org_id: str, project_id: str, revoke_keys: bool, actor: Actor, max_owner_role: str | None = None
    ) -> dict[str, Any]:
        """Refuses while live keys name the project, unless `revoke_keys` stops them in the same transaction:
        a key that can act only in this org is revoked, any other is stopped in this org only (its owner's
        other orgs are not this org's to touch). `max_owner_role`: the caller's role; keys of members above
        it are refused (None: the operator's command line)."""
        async with self.connect(transaction=True) as conn:
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
                    await _block(conn, r["id"], org_id, actor)
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
                await self._invalidate(conn, naming)
            await conn.execute("DELETE FROM projects WHERE id = $1", project_id)
            await write_event(
                conn, "project.deleted", actor=actor, org_id=org_id, target=project_id, detail={"revoked_keys": naming}
            )
        return {"id": project_id, "deleted": True, "revoked_keys": naming}

    async def audit(
        self,
        org_id: str,
        *,
        type_: str | None = None,
        key_id: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """An org's audit events, newest first."""
        async with self.connect() as conn:
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
            {
                **dict(r),
                "at": iso(r["at"]),
                "detail": json.loads(r["detail"]) if isinstance(r["detail"], str) else r["detail"],
            }
            for r in rows
        ]


ADMIN = web.AppKey("admin", Admin)
