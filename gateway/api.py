"""The self-serve management API under /v1/: keys, orgs, members, projects, service accounts, audit.

Every call is made with an API key and authorised with the same effective-role rules as /auth/verify.
A key never creates anything more powerful than itself. Ids that belong to another org answer 404,
exactly like ids that do not exist. Errors are the app's JSON (`invalid_request` names the `field`).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway._body import json_object
from gateway.admin import MAX_LIST, KeySpec, key_expiry, key_view
from gateway.audit import Actor
from gateway.authz import check_state, pattern_matches, role_in
from gateway.cache import KeyRecord
from gateway.config import RolesConfig
from gateway.errors import (
    InsufficientPermissions,
    InvalidApiKey,
    InvalidRequest,
    IpNotAllowed,
    MissingCredentials,
    NotFound,
    OrgNotAllowed,
    ProjectNotAllowed,
)
from gateway.forward import charge, client_address, credential, key_limit, verified_record
from gateway.policy import checked_id
from gateway.ratelimit import parse_rate
from gateway.typedefs import ADMIN, CONFIG, KEY_FORMAT, TRUSTED
from gateway.ui import COOKIE, check_csrf, load_session

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_PAGE = 100
ADMIN_ROLE = "admin"


@dataclass(frozen=True)
class Principal:
    record: KeyRecord
    actor: Actor
    roles: RolesConfig

    @property
    def user_id(self) -> str:
        return self.record.user_id

    def role_in(self, org: str) -> str | None:
        return role_in(self.record, org, self.roles)

    def require(self, org: str, minimum: str | None = None) -> str:
        """The effective role in `org`: an org the key cannot act in is 404, too low a role 403."""
        role = self.role_in(org)
        if role is None:
            raise NotFound(f"no org {org}")
        if minimum is not None and self.roles.rank(role) < self.roles.rank(minimum):
            raise InsufficientPermissions(f"requires role {minimum} in this org")
        return role

    def is_admin(self, org: str) -> bool:
        role = self.role_in(org)
        return role is not None and self.roles.rank(role) >= self.roles.rank(ADMIN_ROLE)

    def orgs(self) -> list[str]:
        return sorted(org for org in self.record.memberships if self.role_in(org) is not None)


PRINCIPAL = web.RequestKey("principal", Principal)


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every management call carries an API key, or the web page's session cookie (and, to write, its
    CSRF token): verified, state-checked and rate-limited."""
    app = request.config_dict
    client_ip = client_address(request.remote, request.headers, app[TRUSTED])
    raw = credential(request.headers)
    if raw is None and COOKIE in request.cookies:
        found = await load_session(request)
        if found is None:
            raise MissingCredentials("the session has ended: sign in again")
        session, record = found
        check_csrf(request, session)
    elif raw is None:
        raise MissingCredentials("send an API key as Authorization: Bearer <key> or X-API-Key")
    else:
        parsed = app[KEY_FORMAT].parse(raw)
        if parsed is None:
            raise InvalidApiKey()
        record = await verified_record(app, parsed, client_ip)
        check_state(record, client_ip, time.time())
    await charge(app, [(key_limit(app, record.rate_limit), record.id)])
    address = str(client_ip) if client_ip is not None else None
    actor = Actor(record.user_id, address, request.headers.get("User-Agent"), record.id)
    request[PRINCIPAL] = Principal(record, actor, app[CONFIG].roles)
    return await handler(request)


# --- input ---------------------------------------------------------------------------------------


async def read_body(
    request: web.Request, fields: dict[str, type | tuple[type, ...]], required: set[str]
) -> dict[str, Any]:
    """A JSON object with only `fields`, each of its type; unknown fields and wrong types are refused."""
    body = json_object(await request.read(), empty_is_object=True)
    for name in sorted(body):
        if name not in fields:
            raise InvalidRequest(f"unknown field {name}", field=name)
        if body[name] is not None and not isinstance(body[name], fields[name]):
            raise InvalidRequest(f"{name} has the wrong type", field=name)
    for name in sorted(required):
        if body.get(name) is None:
            raise InvalidRequest(f"{name} is required", field=name)
    return body


def str_list(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > MAX_LIST:
        raise InvalidRequest(f"{name} must be a list of at most {MAX_LIST} strings", field=name)
    return list(value)


def all_or_list(body: dict[str, Any], name: str) -> list[str]:
    """`"all"` (or absent) is every one, now and future: an empty list for KeySpec."""
    value = body.get(name, "all")
    if value == "all":
        return []
    items = str_list(body, name)
    if not items:
        raise InvalidRequest(f'{name} must be "all" or a non-empty list', field=name)
    return items


def page(request: web.Request) -> tuple[int, str | None]:
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise InvalidRequest("limit must be a whole number", field="limit") from None
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}", field="limit")
    return limit, request.query.get("cursor")


def encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):  # a forged cursor, nested deep
        raise InvalidRequest("cursor is not valid", field="cursor") from None


def _time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{name} must be an ISO 8601 time", field=name) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


# --- keys ----------------------------------------------------------------------------------------

_KEY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "role": str,
    "scopes": list,
    "orgs": (str, list),
    "projects": (str, list),
    "env": str,
    "expires_in": str,
    "expires_at": str,
    "allowed_ips": list,
    "rate_limit": str,
}


def no_escalation(p: Principal, spec: KeySpec) -> None:
    """A key may only create keys that can do no more than itself."""
    me, roles = p.record, p.roles
    if roles.rank(spec.role) > roles.rank(me.role):
        raise InsufficientPermissions(f"a {me.role} key cannot create a {spec.role} key")
    if not me.all_orgs and (not spec.orgs or not set(spec.orgs) <= set(me.org_ids)):
        raise OrgNotAllowed("the new key's orgs must be within this key's orgs")
    if not me.all_projects and (not spec.projects or not set(spec.projects) <= set(me.project_ids)):
        raise ProjectNotAllowed("the new key's projects must be within this key's projects")
    if me.scopes is not None and (
        spec.scopes is None or not all(any(pattern_matches(m, s) for m in me.scopes) for s in spec.scopes)
    ):
        raise InsufficientPermissions("the new key's scopes must be within this key's")
    if me.expires_at is not None:
        expires = key_expiry(spec)
        if expires is None or expires.timestamp() > me.expires_at:
            raise InsufficientPermissions("the new key must expire no later than this key")
    if me.env == "test" and spec.env != "test":
        raise InsufficientPermissions("a test key can only create test keys")
    if me.rate_limit is not None and not _slower(spec.rate_limit, me.rate_limit):
        raise InsufficientPermissions(f"the new key needs a rate limit within this key's {me.rate_limit}")
    if me.allowed_cidrs is not None:
        mine = me.networks() or ()
        theirs = [ipaddress.ip_network(c, strict=False) for c in spec.allow_ips or []]
        if not theirs or not all(any(_within(t, n) for n in mine) for t in theirs):
            raise IpNotAllowed("the new key's allowlist must be within this key's")


def _slower(child: str | None, parent: str) -> bool:
    """Does `child` (N/PERIOD) admit no more than `parent`, sustained (N per period) and at once (N)?"""
    if child is None:
        return False  # no limit of its own would mean the configured default, maybe far above the parent's
    (n, period_ms), (m, parent_ms) = parse_rate(child), parse_rate(parent)
    return n <= m and n * parent_ms <= m * period_ms


def _within(net: Any, outer: Any) -> bool:
    return bool(net.version == outer.version and net.subnet_of(outer))


def spec_from(body: dict[str, Any], owner: str) -> KeySpec:
    return KeySpec(
        user_id=owner,
        name=body["name"],
        role=body["role"],
        orgs=all_or_list(body, "orgs"),
        projects=all_or_list(body, "projects"),
        scopes=str_list(body, "scopes"),
        env=body.get("env") or "live",
        expires_in=body.get("expires_in"),
        expires_at=body.get("expires_at"),
        allow_ips=str_list(body, "allowed_ips"),
        rate_limit=body.get("rate_limit"),
    )


def with_effective_roles(p: Principal, key: dict[str, Any], owner_roles: dict[str, str]) -> dict[str, Any]:
    """Adds, per org the key can act in, the role it really has there (capped by its owner's membership)."""
    orgs = list(owner_roles) if key["orgs"] == "all" else [o for o in key["orgs"] if o in owner_roles]
    roles = p.roles
    key["effective_role"] = {
        o: roles.lower(key["role"], owner_roles[o])
        for o in sorted(orgs)
        if key["role"] in roles.order and owner_roles[o] in roles.order
    }
    return key


async def owner_roles(request: web.Request, user_id: str) -> dict[str, str]:
    admin = request.config_dict[ADMIN]
    async with admin.pool.acquire() as conn:
        rows = await conn.fetch("SELECT org_id, role FROM memberships WHERE user_id = $1", user_id)
    return {r["org_id"]: r["role"] for r in rows}


async def visible_key(request: web.Request, key_id: str) -> dict[str, Any]:
    """A key the caller may see: its own, or one that can act in an org where the caller is an admin."""
    p = request[PRINCIPAL]
    row = await request.config_dict[ADMIN].key_row(key_id)
    if row is None:
        raise NotFound(f"no key {key_id}")
    key = key_view(row)
    roles = await owner_roles(request, row["user_id"])
    if row["user_id"] != p.user_id:
        key_orgs = list(roles) if row["all_orgs"] else [o for o in row["org_ids"] if o in roles]
        if not any(p.is_admin(o) for o in key_orgs):
            raise NotFound(f"no key {key_id}")
    return with_effective_roles(p, key, roles)


async def create_key(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    body = await read_body(request, _KEY_FIELDS, {"name", "role"})
    spec = spec_from(body, p.user_id)
    request.config_dict[ADMIN].validate_spec(spec)
    no_escalation(p, spec)
    for org in spec.orgs:
        p.require(org)
    created = await request.config_dict[ADMIN].create_key(spec, p.actor)
    result = with_effective_roles(p, created, await owner_roles(request, p.user_id))
    return web.json_response(result, status=201)


async def list_keys(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    limit, cursor = page(request)
    org = request.query.get("org")
    owner = request.query.get("owner")
    status = request.query.get("status")
    if status not in (None, "active", "expired", "revoked"):
        raise InvalidRequest("status must be active, expired or revoked", field="status")
    if org is not None:
        p.require(checked_id(org, "org"), ADMIN_ROLE)  # every key of an org: its admins only
    elif owner not in (None, p.user_id):
        raise InvalidRequest("owner needs org: list another member's keys within an org you administer", field="owner")
    else:
        owner = p.user_id
    after = None
    if cursor is not None:
        try:
            at, key_id = decode_cursor(cursor)
            after = (datetime.fromisoformat(str(at).replace("Z", "+00:00")), str(key_id))
        except (ValueError, TypeError):
            raise InvalidRequest("cursor is not valid", field="cursor") from None
    admin = request.config_dict[ADMIN]
    rows = await admin.list_keys(owner, org, status, after, limit + 1)
    items = rows[:limit]
    out = [with_effective_roles(p, k, await owner_roles(request, k["user_id"])) for k in items]
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor([items[-1]["created_at"], items[-1]["id"]])
    return web.json_response({"items": out, "next_cursor": next_cursor})


async def get_key(request: web.Request) -> web.Response:
    return web.json_response(await visible_key(request, request.match_info["key_id"]))


async def revoke_key(request: web.Request) -> web.Response:
    key = await visible_key(request, request.match_info["key_id"])
    revoked = await request.config_dict[ADMIN].revoke_key(key["id"], request[PRINCIPAL].actor)
    return web.json_response(
        with_effective_roles(request[PRINCIPAL], revoked, await owner_roles(request, key["user_id"]))
    )


def spec_of(key: dict[str, Any]) -> KeySpec:
    """The settings of an existing key, as a rotation would copy them."""
    return KeySpec(
        user_id=key["user_id"],
        name=key["name"],
        role=key["role"],
        orgs=[] if key["orgs"] == "all" else list(key["orgs"]),
        projects=[] if key["projects"] == "all" else list(key["projects"]),
        scopes=key["scopes"],
        env=key["env"],
        expires_at=key["expires_at"],
        allow_ips=key["allowed_ips"],
        rate_limit=key["rate_limit"],
    )


async def rotate_key(request: web.Request) -> web.Response:
    """Rotation hands out a new raw key: only to its owner, or to an admin of a service account's org,
    and never to a key less powerful than the one rotated."""
    p = request[PRINCIPAL]
    key = await visible_key(request, request.match_info["key_id"])
    if key["user_id"] != p.user_id:
        service_org = await request.config_dict[ADMIN].service_org(key["user_id"])
        if service_org is None or not p.is_admin(service_org):
            raise InsufficientPermissions("only a key's owner can rotate it; an admin can revoke it")
    if key["status"] == "active":
        no_escalation(p, spec_of(key))
    body = await read_body(request, {"grace": str}, set())
    rotated = await request.config_dict[ADMIN].rotate_key(key["id"], body.get("grace"), p.actor)
    return web.json_response(with_effective_roles(p, rotated, await owner_roles(request, key["user_id"])), status=201)


# --- orgs, members, projects, service accounts ---------------------------------------------------


async def me(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    orgs = await request.config_dict[ADMIN].orgs(p.orgs())
    return web.json_response(
        {
            "user_id": p.user_id,
            "key_id": p.record.id,
            "orgs": [{**o, "role": p.role_in(o["id"])} for o in orgs],
        }
    )


async def create_org(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    if not p.record.all_orgs:
        raise OrgNotAllowed("only a key for all of its owner's orgs can create an org")
    body = await read_body(request, {"name": str}, {"name"})
    return web.json_response(
        await request.config_dict[ADMIN].create_org_owned(body["name"], p.user_id, p.actor), status=201
    )


async def list_orgs(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    orgs = await request.config_dict[ADMIN].orgs(p.orgs())
    return web.json_response({"items": [{**o, "role": p.role_in(o["id"])} for o in orgs]})


async def get_org(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org = request.match_info["org"]
    role = p.require(org)
    (found,) = await request.config_dict[ADMIN].orgs([org])
    return web.json_response({**found, "role": role})


async def list_members(request: web.Request) -> web.Response:
    org = request.match_info["org"]
    request[PRINCIPAL].require(org, ADMIN_ROLE)
    return web.json_response({"items": await request.config_dict[ADMIN].members(org)})


def _grantable(p: Principal, org: str, role: str) -> None:
    """Nobody grants a role above their own effective one."""
    if role not in p.roles.order:
        raise InvalidRequest(f"role must be one of {', '.join(p.roles.order)}", field="role")
    mine = p.require(org, ADMIN_ROLE)
    if p.roles.rank(role) > p.roles.rank(mine):
        raise InsufficientPermissions(f"an {mine} cannot grant {role}")


async def add_member(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org = request.match_info["org"]
    body = await read_body(request, {"email": str, "role": str}, {"email", "role"})
    _grantable(p, org, body["role"])
    admin = request.config_dict[ADMIN]
    user_id = await admin.user_by_email(body["email"], p.actor)
    await _guard_target(request, org, user_id)
    return web.json_response(await admin.set_member(org, user_id, body["role"], p.actor), status=201)


async def _guard_target(request: web.Request, org: str, user_id: str) -> None:
    """A member whose role is above the caller's cannot be changed or removed by the caller."""
    p = request[PRINCIPAL]
    current = await request.config_dict[ADMIN].member_role(org, user_id)
    mine = p.require(org, ADMIN_ROLE)
    if current is not None and p.roles.rank(current) > p.roles.rank(mine):
        raise InsufficientPermissions(f"an {mine} cannot change an {current}")


async def set_member(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org, user_id = request.match_info["org"], request.match_info["user_id"]
    body = await read_body(request, {"role": str}, {"role"})
    _grantable(p, org, body["role"])
    if await request.config_dict[ADMIN].member_role(org, user_id) is None:
        raise NotFound(f"no member {user_id}")
    await _guard_target(request, org, user_id)
    return web.json_response(await request.config_dict[ADMIN].set_member(org, user_id, body["role"], p.actor))


async def remove_member(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org, user_id = request.match_info["org"], request.match_info["user_id"]
    p.require(org, ADMIN_ROLE)
    await _guard_target(request, org, user_id)
    return web.json_response(await request.config_dict[ADMIN].remove_member(org, user_id, p.actor))


async def create_project(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org = request.match_info["org"]
    p.require(org, ADMIN_ROLE)
    body = await read_body(request, {"name": str}, {"name"})
    return web.json_response(await request.config_dict[ADMIN].create_project(org, body["name"], p.actor), status=201)


async def list_projects(request: web.Request) -> web.Response:
    org = request.match_info["org"]
    request[PRINCIPAL].require(org)
    return web.json_response({"items": await request.config_dict[ADMIN].projects(org)})


async def get_project(request: web.Request) -> web.Response:
    org, project = request.match_info["org"], request.match_info["project"]
    request[PRINCIPAL].require(org)
    found = [p for p in await request.config_dict[ADMIN].projects(org) if p["id"] == project]
    if not found:
        raise NotFound(f"no project {project}")
    return web.json_response(found[0])


async def delete_project(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org, project = request.match_info["org"], request.match_info["project"]
    p.require(org, ADMIN_ROLE)
    revoke = request.query.get("revoke_keys", "false")
    if revoke not in ("true", "false"):
        raise InvalidRequest("revoke_keys must be true or false", field="revoke_keys")
    return web.json_response(await request.config_dict[ADMIN].delete_project(org, project, revoke == "true", p.actor))


async def create_service_account(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org = request.match_info["org"]
    body = await read_body(request, {"name": str, "role": str}, {"name", "role"})
    _grantable(p, org, body["role"])
    return web.json_response(
        await request.config_dict[ADMIN].create_service_account(org, body["name"], body["role"], p.actor), status=201
    )


async def list_service_accounts(request: web.Request) -> web.Response:
    org = request.match_info["org"]
    request[PRINCIPAL].require(org, ADMIN_ROLE)
    return web.json_response({"items": await request.config_dict[ADMIN].service_accounts(org)})


async def create_service_account_key(request: web.Request) -> web.Response:
    """The org's own keys: owned by the service account, scoped to its one org."""
    p = request[PRINCIPAL]
    org, sa_id = request.match_info["org"], request.match_info["sa"]
    p.require(org, ADMIN_ROLE)
    sa = await request.config_dict[ADMIN].service_account(org, sa_id)
    if sa is None:
        raise NotFound(f"no service account {sa_id}")
    body = await read_body(request, _KEY_FIELDS, {"name", "role"})
    body["orgs"] = [org]
    spec = spec_from(body, sa_id)
    request.config_dict[ADMIN].validate_spec(spec)
    no_escalation(p, spec)
    _grantable(p, org, spec.role)
    created = await request.config_dict[ADMIN].create_key(spec, p.actor)
    return web.json_response(with_effective_roles(p, created, {org: sa["role"]}), status=201)


async def audit(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org = request.match_info["org"]
    p.require(org, ADMIN_ROLE)
    limit, cursor = page(request)
    q = request.query
    before = int(decode_cursor(cursor)) if cursor else None
    items = await request.config_dict[ADMIN].audit(
        org,
        type_=q.get("type"),
        key_id=q.get("key_id"),
        actor=q.get("actor"),
        since=_time(q.get("since"), "since"),
        until=_time(q.get("until"), "until"),
        before_id=before,
        limit=limit + 1,
    )
    more = len(items) > limit
    items = items[:limit]
    return web.json_response({"items": items, "next_cursor": encode_cursor(items[-1]["id"]) if more else None})


def api_app() -> web.Application:
    """The /v1/ sub-application (mounted after the public /v1/keys/verify and /v1/openapi.json)."""
    api = web.Application(middlewares=[authenticate])
    r = api.router
    r.add_get("/me", me)
    r.add_post("/keys", create_key)
    r.add_get("/keys", list_keys)
    r.add_get("/keys/{key_id}", get_key)
    r.add_post("/keys/{key_id}/revoke", revoke_key)
    r.add_post("/keys/{key_id}/rotate", rotate_key)
    r.add_post("/orgs", create_org)
    r.add_get("/orgs", list_orgs)
    r.add_get("/orgs/{org}", get_org)
    r.add_get("/orgs/{org}/members", list_members)
    r.add_post("/orgs/{org}/members", add_member)
    r.add_put("/orgs/{org}/members/{user_id}", set_member)
    r.add_delete("/orgs/{org}/members/{user_id}", remove_member)
    r.add_post("/orgs/{org}/projects", create_project)
    r.add_get("/orgs/{org}/projects", list_projects)
    r.add_get("/orgs/{org}/projects/{project}", get_project)
    r.add_delete("/orgs/{org}/projects/{project}", delete_project)
    r.add_post("/orgs/{org}/service-accounts", create_service_account)
    r.add_get("/orgs/{org}/service-accounts", list_service_accounts)
    r.add_post("/orgs/{org}/service-accounts/{sa}/keys", create_service_account_key)
    r.add_get("/orgs/{org}/audit", audit)
    return api
