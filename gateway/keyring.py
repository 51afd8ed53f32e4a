"""API keys: their spec and its checks, minting, listing, revoking, stopping in an org, rotating.

Every change records its audit event and its cache invalidation (a NOTIFY) in the same transaction as the
change: the invalidation is delivered exactly when the change commits."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from gateway.audit import CLI, Actor, write_event
from gateway.backends import Conn
from gateway.config import RolesConfig
from gateway.data import keys, orgs, tokens, users
from gateway.data.db import Database, notify
from gateway.data.keys import KeyRow, NewKey
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.formats import PERMISSION_RE, UNIT_S, iso, parse_iso, valid_name
from gateway.keys import ENVS, KeyFormat, SecretHasher
from gateway.ratelimit import parse_rate

_DURATION_RE = re.compile(r"([0-9]{1,9})(s|m|h|d|w)")
MAX_LIST = 100
MAX_DURATION_S = 100 * 365 * 86400


def parse_duration(text: str, what: str = "duration") -> timedelta:
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None:
        raise InvalidRequest(f"{what}: expected a number and a unit s, m, h, d or w, such as 30d", field=what)
    seconds = int(m.group(1)) * UNIT_S[m.group(2)]
    if seconds > MAX_DURATION_S:  # beyond any key's life, and past what a datetime can hold
        raise InvalidRequest(f"{what} must be at most {MAX_DURATION_S // 86400}d", field=what)
    return timedelta(seconds=seconds)


def parse_rate_limit(text: str) -> str:
    parse_rate(text, "rate limit")
    return text.strip()


def key_status(row: KeyRow, now: datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


def key_view(row: KeyRow) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "id": row.id,
        "name": row.name,
        "user_id": row.user_id,
        "role": row.role,
        "env": row.env,
        "start": row.start,
        "scopes": row.scopes,
        "orgs": "all" if row.all_orgs else list(row.org_ids),
        "projects": "all" if row.all_projects else list(row.project_ids),
        "allowed_ips": _networks(row.allowed_cidrs),
        "rate_limit": row.rate_limit,
        "status": key_status(row, now),
        "expires_at": iso(row.expires_at),
        "created_at": iso(row.created_at),
        "last_used_at": iso(row.last_used_at),
        "revoked_at": iso(row.revoked_at),
        "rotated_to": row.rotated_to,
    }


def _networks(cidrs: list[str] | None) -> list[str] | None:
    """Spelt as Python spells them (as the allowlist was checked at creation), not as Postgres does: the
    two differ for IPv6 networks holding an IPv4 part."""
    return None if cidrs is None else [str(ipaddress.ip_network(c)) for c in cidrs]


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
        # In UTC, as stored: 9999-12-31T23:59:59-14:00 is past the last time a datetime can hold.
        expires = expires.replace(tzinfo=UTC) if expires.tzinfo is None else expires.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest("expires_at must be an ISO 8601 time", field="expires_at") from None
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


def spec_of(key: KeyRow) -> KeySpec:
    """The settings of an existing key, as a rotation copies them."""
    return KeySpec(
        user_id=key.user_id,
        name=key.name,
        role=key.role,
        orgs=[] if key.all_orgs else list(key.org_ids),
        projects=[] if key.all_projects else list(key.project_ids),
        scopes=key.scopes,
        env=key.env,
        expires_at=iso(key.expires_at),
        allow_ips=key.allowed_cidrs,
        rate_limit=key.rate_limit,
    )


@dataclass(frozen=True)
class KeyQuery:
    """Which keys a listing shows, oldest first: those of `owner` and/or acting in `org`, in `status`
    (active, expired, revoked), after the (created_at, id) cursor, at most `limit`; whose name or id holds
    `search`; expiring before `expires_before`."""

    owner: str | None = None
    org: str | None = None
    status: str | None = None
    after: tuple[datetime, str] | None = None
    limit: int | None = None
    search: str | None = None
    expires_before: datetime | None = None


@dataclass(frozen=True)
class CheckedSpec:
    """A KeySpec that passed `Keyring.validate_spec`, with what the check worked out."""

    spec: KeySpec
    expires: datetime | None
    cidrs: list[str] | None  # the allowlist as normalised networks


async def block(conn: Conn, key_id: str, org_id: str, actor: Actor) -> None:
    """Stop a key acting in one org (see `Keyring.stop_key_in`), inside the caller's transaction."""
    await keys.block(conn, key_id, org_id, actor.id)


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
        if not await users.exists(conn, spec.user_id):
            raise NotFound(f"no user {spec.user_id}")
        member_of = {m.org_id for m in await orgs.memberships(conn, [spec.user_id])}
        for org in spec.orgs:
            if org not in member_of:
                raise InvalidRequest(f"user {spec.user_id} is not a member of org {org}", field="orgs")
        allowed_orgs = set(spec.orgs) if spec.orgs else member_of
        owners = await orgs.project_orgs(conn, spec.projects) if spec.projects else {}
        for project in spec.projects:
            if owners.get(project) not in allowed_orgs:
                raise InvalidRequest(f"project {project} is not in the key's orgs", field="projects")

    async def _insert_key(
        self, conn: Conn, spec: KeySpec, expires: datetime | None, cidrs: list[str] | None
    ) -> tuple[str, str]:
        raw, parsed = self.fmt.generate(spec.env)
        new = NewKey(
            id=parsed.key_id,
            user_id=spec.user_id,
            name=spec.name.strip(),
            role=spec.role,
            env=spec.env,
            secret_hash=await self.hasher.hash(parsed.secret),
            start=self.fmt.display_start(spec.env, parsed.key_id),
            scopes=spec.scopes,
            orgs=spec.orgs,
            projects=spec.projects,
            allowed_cidrs=cidrs,
            rate_limit=spec.rate_limit,
            expires_at=expires,
        )
        await keys.insert(conn, new)
        return parsed.key_id, raw

    async def _key_event(
        self, conn: Conn, type_: str, key_id: str, actor: Actor, detail: dict[str, Any] | None = None
    ) -> None:
        """One audit event per org the key can act in, so each org's audit shows it."""
        reach = await keys.reach(conn, key_id)
        assert reach is not None  # the caller holds the key (created or read in this transaction)
        orgs_: list[str | None] = [*reach.orgs] or [None]  # a key acting nowhere is audited all the same
        for org in orgs_:
            await write_event(
                conn,
                type_,
                actor=actor,
                org_id=org,
                user_id=reach.user_id,
                key_id=key_id,
                target=key_id,
                detail=detail,
            )

    async def create_key(self, spec: KeySpec, actor: Actor = CLI) -> dict[str, Any]:
        row, raw = await self.mint(self.validate_spec(spec), actor)
        return {**key_view(row), "key": raw}

    async def mint(self, checked: CheckedSpec, actor: Actor) -> tuple[KeyRow, str]:
        """A new key from a checked spec (its user and projects checked here): its row and the raw key,
        shown this once."""
        spec = checked.spec
        async with self.db.connect(transaction=True) as conn:
            await self._check_scope(conn, spec)
            key_id, raw = await self._insert_key(conn, spec, checked.expires, checked.cidrs)
            await self._key_event(conn, "api_key.created", key_id, actor, {"role": spec.role, "env": spec.env})
            row = await keys.get(conn, key_id)
        assert row is not None  # inserted just now, in this transaction
        return row, raw

    async def list_keys(self, query: KeyQuery) -> list[dict[str, Any]]:
        """Keys, oldest first: of one owner, and/or that can act in one org, in one status."""
        return [key_view(r) for r in await self.key_rows(query)]

    async def key_rows(self, query: KeyQuery) -> list[KeyRow]:
        """`list_keys`'s rows."""
        async with self.db.connect() as conn:
            return await keys.listing(
                conn,
                owner=query.owner,
                org=query.org,
                status=query.status,
                now=datetime.now(UTC),
                after=query.after,
                limit=query.limit,
                search=query.search,
                expires_before=query.expires_before,
            )

    async def key_names(self, key_ids: list[str]) -> dict[str, str]:
        """The name of each of these keys that exists."""
        async with self.db.connect() as conn:
            return await keys.names(conn, key_ids)

    async def key_row(self, key_id: str) -> KeyRow | None:
        async with self.db.connect() as conn:
            return await keys.get(conn, key_id)

    async def show_key(self, key_id: str) -> dict[str, Any]:
        row = await self.key_row(key_id)
        if row is None:
            raise NotFound(f"no key {key_id}")
        return key_view(row)

    async def revoke_key(self, key_id: str, actor: Actor = CLI) -> dict[str, Any]:
        async with self.db.connect(transaction=True) as conn:
            row = await keys.revoke(conn, key_id)
            if row is None:
                raise NotFound(f"no key {key_id}")
            await self._key_event(conn, "api_key.revoked", key_id, actor)
            await self.db.invalidate(conn, [key_id])
            # Tokens issued with the key were capped by it: they end with it.
            families = await tokens.revoke_key_families(conn, key_id, "key_revoked")
            if families:
                await notify(conn, families=families)
        return key_view(row)

    async def stop_key_in(self, key_id: str, org_ids: list[str], actor: Actor) -> dict[str, Any]:
        """Stop a key acting in `org_ids` only (what an org's admin can do to a key that also acts in
        other orgs): its owner's other orgs are untouched."""
        async with self.db.connect(transaction=True) as conn:
            row = await keys.get(conn, key_id)
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
            found = await keys.blocks(conn, key_ids)
        for b in found:
            stopped[b.key_id].append(b.org_id)
        return stopped

    async def rotate_key(self, key_id: str, grace: str | None, actor: Actor = CLI) -> dict[str, Any]:
        grace_td = parse_duration(grace, "grace") if grace else timedelta(0)
        async with self.db.connect(transaction=True) as conn:
            old = await keys.get(conn, key_id, lock=True)
            if old is None:
                raise NotFound(f"no key {key_id}")
            status = key_status(old, datetime.now(UTC))
            if status != "active":
                raise Conflict(f"key {key_id} is {status} and cannot be rotated")
            new_id_, raw = await self._insert_key(conn, spec_of(old), old.expires_at, old.allowed_cidrs)
            # Stopped in an org, stopped there still: rotation is no way back in.
            await keys.copy_blocks(conn, key_id, new_id_)
            await keys.mark_rotated(conn, key_id, new_id_, grace_td)
            await self._key_event(
                conn,
                "api_key.rotated",
                key_id,
                actor,
                {"new_key_id": new_id_, "grace_s": int(grace_td.total_seconds())},
            )
            await self.db.invalidate(conn, [key_id])
            row = await keys.get(conn, new_id_)
        assert row is not None  # inserted just now, in this transaction
        return {**key_view(row), "key": raw, "rotated_from": key_id}


KEYRING = web.AppKey("keyring", Keyring)
