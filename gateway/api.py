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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import hdrs, web

from gateway._body import read_body
from gateway.audit import AUDIT_LOG, Actor
from gateway.authz import granted, pattern_matches
from gateway.data.audit import LastUse
from gateway.data.keys import KeyRow
from gateway.directory import DIRECTORY
from gateway.errors import (
    InsufficientPermissions,
    InvalidRequest,
    IpNotAllowed,
    MissingCredentials,
    NotFound,
    OrgNotAllowed,
    ProjectNotAllowed,
)
from gateway.formats import MAX_NAME, iso, parse_iso
from gateway.forward import client_address, credential
from gateway.invitations import INVITATIONS
from gateway.keyring import KEYRING, MAX_LIST, KeyQuery, KeySpec, key_expiry, key_view, spec_of
from gateway.policy import checked_id
from gateway.ratelimit import parse_rate
from gateway.schemas import EVENT_TYPE_RE, KeyCreate, MemberAdd, MemberRole, Named, Role, Rotate
from gateway.session_api import SESSION
from gateway.session_api import add_routes as add_session_routes
from gateway.sessions import check_csrf, cookie_value
from gateway.tokens import looks_like_jwt
from gateway.typedefs import CONFIG, SESSIONS, TRUSTED, VERIFIER

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_PAGE = 100


from gateway.principal import PRINCIPAL, Principal  # noqa: E402


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every management call carries an API key, a bearer access token, or a session cookie (and, to
    write, its CSRF token or an allowed origin): verified, state-checked and rate-limited."""
    app = request.config_dict
    verifier = app[VERIFIER]
    client_ip = client_address(request.remote, request.headers, app[TRUSTED])
    raw = credential(request.headers)
    cfg = app[CONFIG].sessions
    session_id = cookie_value(request.headers.getall("Cookie", []), cfg.cookie) if raw is None else None
    if session_id is not None:
        session = await app[SESSIONS].load(session_id)
        if session is None:
            raise MissingCredentials("the session has ended: sign in again")
        check_csrf(request.headers, request.method, session, cfg.allowed_origins)
        record = await verifier.session_principal(session, client_ip)
        request[SESSION] = session
    elif raw is None:
        raise MissingCredentials("send an API key as Authorization: Bearer <key> or X-API-Key")
    elif looks_like_jwt(raw):
        record = await verifier.token_record(raw, client_ip)
    else:
        record = await verifier.authenticate(verifier.parse(raw), client_ip)
        verifier.check_state(record, client_ip)
    # Charged as a proxied request is: the key's limit, and the org's when the call acts in one of the
    # key's orgs (a call naming another org is refused by its permission check, on the key's limit alone).
    # Refusals so far came from the cache: only a call that will run costs a Postgres read.
    await verifier.charge(record, verifier.org_of(record, request.match_info.get("org")))
    record = await verifier.current(record, client_ip)
    address = str(client_ip) if client_ip is not None else None
    actor = Actor(record.user_id, address, request.headers.get("User-Agent"), record.id or None)
    stopped = tuple(await app[KEYRING].stopped_in(record.id)) if record.id else ()
    request[PRINCIPAL] = Principal(record, actor, app[CONFIG].roles, stopped)
    return await handler(request)


@web.middleware
async def valid_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every id in the path is an id: a NUL or other control byte would reach Postgres, which refuses it
    as an error, not as a missing row; anything else unlike an id is simply nothing there to find."""
    for name, value in request.match_info.items():
        checked_id(value, name)
    return await handler(request)


def no_key_from_a_token(p: Principal) -> None:
    """An access token lives minutes; a key it made would outlive it (and its family's revocation)."""
    if p.record.method == "jwt":
        raise InsufficientPermissions("an access token cannot make keys: use a key or the web page")


# --- input ---------------------------------------------------------------------------------------


def str_list(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > MAX_LIST:
        raise InvalidRequest(f"{name} must be a list of at most {MAX_LIST} strings", field=name)
    return list(value)


def all_or_list(body: dict[str, Any], name: str) -> list[str]:
    """`"all"` (or absent, or null: see gateway.schemas) is every one, now and future: an empty list for
    KeySpec."""
    value = body.get(name)
    if value is None or value == "all":
        return []
    items = str_list(body, name)
    if not items:
        raise InvalidRequest(f'{name} must be "all" or a non-empty list', field=name)
    for item in items:
        field_id(item, name)  # as in paths (`valid_ids`): a NUL reached Postgres, which refused it (500)
    return items


def field_id(value: str, name: str) -> str:
    """`value`, an id (gateway.policy.checked_id), or InvalidRequest naming the field it came in."""
    try:
        return checked_id(value, name)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, field=name) from None


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
        # In UTC, as Postgres will have it: a time that is no year 1 to 9999 there is refused here (it
        # raised OverflowError from the driver, answered 500).
        return parse_iso(value).astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{name} must be an ISO 8601 time", field=name) from None


# --- keys ----------------------------------------------------------------------------------------


def no_escalation(p: Principal, spec: KeySpec, verb: str = "create", spec_stopped: Sequence[str] = ()) -> None:
    """A key may only create (rotate, revoke) keys that can do no more than itself. `spec_stopped`: the
    orgs an existing key was stopped in (a new all-orgs key inherits the caller's, see `create_key`)."""
    me, roles = p.record, p.roles
    if roles.rank(spec.role) > roles.rank(me.role):
        raise InsufficientPermissions(f"a {me.role} key cannot {verb} a {spec.role} key")
    if p.stopped and (
        set(spec.orgs) & set(p.stopped)
        or (not spec.orgs and verb != "create" and not set(p.stopped) <= set(spec_stopped))
    ):
        raise OrgNotAllowed("that key acts in an org where this key was stopped")
    if not me.all_orgs and (not spec.orgs or not set(spec.orgs) <= set(me.org_ids)):
        raise OrgNotAllowed("that key's orgs must be within this key's orgs")
    if not me.all_projects and (not spec.projects or not set(spec.projects) <= set(me.project_ids)):
        raise ProjectNotAllowed("that key's projects must be within this key's projects")
    if me.scopes is not None and (
        spec.scopes is None or not all(any(pattern_matches(m, s) for m in me.scopes) for s in spec.scopes)
    ):
        raise InsufficientPermissions("that key's scopes must be within this key's")
    if me.expires_at is not None:
        expires = key_expiry(spec)
        if expires is None or expires.timestamp() > me.expires_at:
            raise InsufficientPermissions("that key must expire no later than this key")
    if me.env == "test" and spec.env != "test":
        raise InsufficientPermissions("a test key can only create test keys")
    if me.rate_limit is not None and not _slower(spec.rate_limit, me.rate_limit):
        raise InsufficientPermissions(f"that key needs a rate limit within this key's {me.rate_limit}")
    if me.allowed_cidrs is not None:
        mine = me.networks() or ()
        theirs = [ipaddress.ip_network(c, strict=False) for c in spec.allow_ips or []]
        if not theirs or not all(any(_within(t, n) for n in mine) for t in theirs):
            raise IpNotAllowed("that key's allowlist must be within this key's")


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


def _acting_orgs(row: KeyRow, owner_roles: dict[str, str], stopped: list[str]) -> list[str]:
    """The orgs a key can act in now: its own or all of its owner's, less those it was stopped in."""
    orgs = list(owner_roles) if row.all_orgs else [o for o in row.org_ids if o in owner_roles]
    return sorted(o for o in orgs if o not in stopped)


def _effective_roles(p: Principal, role: str, owner_roles: dict[str, str], orgs: list[str]) -> dict[str, str]:
    roles = p.roles
    return {o: roles.lower(role, owner_roles[o]) for o in orgs if role in roles.order and owner_roles[o] in roles.order}


@dataclass(frozen=True)
class KeyAccess:
    """A key as the caller may see it, and the orgs in which the caller manages it as an admin there
    (empty for the caller's own key, which needs no admin)."""

    row: KeyRow
    view: dict[str, Any]
    managed: list[str]
    seen_from: list[str] | None = None  # None: the caller's own key, seen whole


async def key_access(
    request: web.Request,
    row: KeyRow,
    permission: str = "keys:read",
    known: tuple[dict[str, str], list[str]] | None = None,
) -> KeyAccess:
    """The caller's own key in full. Another user's key only as seen from the orgs where the caller is an
    admin with `keys:read` and the key acts: nothing of its owner's other orgs. 404 when there is none
    (as for a key that does not exist), 403 when the caller can see it but lacks `permission`. `known`:
    its owner's roles and the orgs it was stopped in, when read already (a page of keys at once)."""
    p = request[PRINCIPAL]
    directory, keyring = request.config_dict[DIRECTORY], request.config_dict[KEYRING]
    if known is None:
        known = (await directory.member_roles(row.user_id), await keyring.stopped_in(row.id))
    owner_roles, stopped = known
    view = key_view(row)
    acting = _acting_orgs(row, owner_roles, stopped)
    if row.user_id == p.user_id:
        view["effective_role"] = _effective_roles(p, row.role, owner_roles, acting)
        view["stopped_in"] = stopped
        return KeyAccess(row, view, [])
    seen_from = [o for o in acting if p.may(o, "keys:read")]
    if not seen_from:
        raise NotFound(f"no key {row.id}")
    managed = [o for o in seen_from if p.may(o, permission)]
    if permission.endswith(":write"):
        # As with memberships: nobody stops the key of a member whose role is above their own.
        managed = [o for o in managed if p.roles.rank(owner_roles[o]) <= p.roles.rank(p.role_in(o) or "")]
    if not managed:
        raise InsufficientPermissions(f"requires {permission} in this key's org")
    view["orgs"] = seen_from
    if set(acting) - set(seen_from) or row.all_orgs:
        view["last_used_at"] = None  # its use in the owner's other orgs is not this org's business
    if view["projects"] != "all":
        view["projects"] = await directory.projects_in(view["projects"], seen_from)
    view["effective_role"] = _effective_roles(p, row.role, owner_roles, seen_from)
    return KeyAccess(row, view, managed, seen_from)


async def with_details(request: web.Request, accesses: Sequence[KeyAccess]) -> list[dict[str, Any]]:
    """The keys' views with what a reader needs beside ids: the owner's name and kind (`owner_name`,
    `owner_kind`), the projects' names, and the address of the last use (`last_used_ip`). An admin seeing
    another member's key sees its last use in the orgs it is seen from only (when it acts elsewhere too,
    `last_used_at` is its last use there, to the minute). Four reads for a whole page of keys."""
    app = request.config_dict
    directory = app[DIRECTORY]
    people = await directory.people(sorted({a.row.user_id for a in accesses}))
    projects = sorted({x for a in accesses if a.view["projects"] != "all" for x in a.view["projects"]})
    project_names = await directory.project_names(projects) if projects else {}
    wanted: list[tuple[str, str | None]] = []
    for a in accesses:
        wanted += [(a.row.id, None)] if a.seen_from is None else [(a.row.id, o) for o in a.seen_from]
    latest: dict[str, LastUse] = {}
    for found in await app[AUDIT_LOG].last_uses(wanted):
        if found.key_id not in latest or found.at > latest[found.key_id].at:
            latest[found.key_id] = found
    out = []
    for a in accesses:
        owner = people.get(a.row.user_id, {})
        use = latest.get(a.row.id)
        view = {
            **a.view,
            "owner_name": owner.get("name"),
            "owner_kind": owner.get("kind"),
            "last_used_ip": use.ip if use is not None else None,
            "project_names": {x: project_names[x] for x in a.view["projects"] if x in project_names}
            if a.view["projects"] != "all"
            else {},
        }
        if view["last_used_at"] is None and use is not None:
            view["last_used_at"] = iso(use.at)
        out.append(view)
    return out


async def visible_key(request: web.Request, key_id: str, permission: str = "keys:read") -> KeyAccess:
    row = await request.config_dict[KEYRING].key_row(key_id)
    if row is None:
        raise NotFound(f"no key {key_id}")
    return await key_access(request, row, permission)


async def create_key(request: web.Request) -> web.Response:
    """One's own key: any valid credential of the user, never making more than that credential can do."""
    p = request[PRINCIPAL]
    no_key_from_a_token(p)
    body = await read_body(request, KeyCreate)
    spec = spec_from(body, p.user_id)
    keyring = request.config_dict[KEYRING]
    checked = keyring.validate_spec(spec)
    no_escalation(p, spec)
    for org in spec.orgs:
        p.require(org)
    row, raw = await keyring.mint(checked, p.actor)
    if p.stopped and not spec.orgs:
        # An all-orgs key made by a key stopped somewhere is stopped there too: no way back in.
        await keyring.stop_key_in(row.id, list(p.stopped), p.actor)
    return web.json_response({**(await key_access(request, row)).view, "key": raw}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    limit, cursor = page(request)
    org = request.query.get("org")
    owner = request.query.get("owner")
    if owner is not None:
        field_id(owner, "owner")  # a NUL in it reached Postgres with org=, which refused it (500)
    status = request.query.get("status")
    if status not in (None, "active", "expired", "revoked"):
        raise InvalidRequest("status must be active, expired or revoked", field="status")
    search = _search(request.query.get("q"))
    expires_before = _time(request.query.get("expires_before"), "expires_before")
    if org is not None:
        p.require(checked_id(org, "org"), "keys:read", admin=True)  # every key of an org: its admins only
    elif owner not in (None, p.user_id):
        raise InvalidRequest("owner needs org: list another member's keys within an org you administer", field="owner")
    else:
        owner = p.user_id
    after = None
    if cursor is not None:
        try:
            at, key_id = decode_cursor(cursor)
            after = (parse_iso(str(at)).astimezone(UTC), str(key_id))
        except (ValueError, TypeError, OverflowError):
            raise InvalidRequest("cursor is not valid", field="cursor") from None
    directory, keyring = request.config_dict[DIRECTORY], request.config_dict[KEYRING]
    rows = await keyring.key_rows(KeyQuery(owner, org, status, after, limit + 1, search, expires_before))
    items = rows[:limit]
    # The owners' roles and the stops are read for the whole page at once (a project-limited key of another
    # owner still costs one query for its projects).
    roles = await directory.member_roles_of(sorted({r.user_id for r in items}))
    stops = await keyring.stopped_in_each([r.id for r in items])
    seen = []
    for row in items:
        try:
            seen.append(await key_access(request, row, known=(roles[row.user_id], stops[row.id])))
        except NotFound:  # no longer acting in the org (its owner left, say): not the org's to see
            continue
    next_cursor = None
    if len(rows) > limit:
        next_cursor = encode_cursor([iso(items[-1].created_at), items[-1].id])
    return web.json_response({"items": await with_details(request, seen), "next_cursor": next_cursor})


def _search(value: str | None) -> str | None:
    """`q`: text to find in keys' names (any case) or ids; at most MAX_NAME printable characters."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if len(value) > MAX_NAME or any(ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InvalidRequest(f"q must be at most {MAX_NAME} printable characters", field="q")
    return value


async def get_key(request: web.Request) -> web.Response:
    (view,) = await with_details(request, [await visible_key(request, request.match_info["key_id"])])
    return web.json_response(view)


MAX_USAGE_DAYS = 90


async def key_usage(request: web.Request) -> web.Response:
    """A key's requests per UTC day over the last `days` (default 30), from its aggregated `api_key.used`
    rows: seen as `GET /v1/keys/{key_id}` sees it (another member's key: its use in the caller's orgs)."""
    access = await visible_key(request, request.match_info["key_id"])
    text = request.query.get("days", "30")
    if not text.isdigit() or not 1 <= int(text) <= MAX_USAGE_DAYS:
        raise InvalidRequest(f"days must be a whole number from 1 to {MAX_USAGE_DAYS}", field="days")
    days = int(text)
    items = await request.config_dict[AUDIT_LOG].daily_usage(access.row.id, access.seen_from, days)
    return web.json_response(
        {"key_id": access.row.id, "days": days, "total": sum(d["requests"] for d in items), "items": items}
    )


async def revoke_key(request: web.Request) -> web.Response:
    """Its owner revokes a key everywhere. An org's admin stops it in that org: the whole key only when it
    can act nowhere else (scoped to orgs the admin manages, or a service account's), else just there."""
    p = request[PRINCIPAL]
    keyring = request.config_dict[KEYRING]
    access = await visible_key(request, request.match_info["key_id"], "keys:write")
    row = access.row
    if not access.managed:  # one's own key, if no more powerful than the credential revoking it
        if access.view["status"] == "active":
            no_escalation(p, spec_of(row), "revoke", access.view["stopped_in"])
        await keyring.revoke_key(row.id, p.actor)
        return web.json_response((await visible_key(request, row.id)).view)
    if not row.all_orgs and set(row.org_ids) <= set(access.managed):
        revoked = await keyring.revoke_key(row.id, p.actor)
        return web.json_response({**access.view, "status": "revoked", "revoked_at": revoked["revoked_at"]})
    await keyring.stop_key_in(row.id, access.managed, p.actor)
    return web.json_response({**access.view, "status": "revoked", "revoked_in": access.managed})


async def rotate_key(request: web.Request) -> web.Response:
    """Rotation hands out a new raw key: only to its owner, or to an admin of a service account's org,
    and never to a key less powerful than the one rotated."""
    p = request[PRINCIPAL]
    no_key_from_a_token(p)
    directory, keyring = request.config_dict[DIRECTORY], request.config_dict[KEYRING]
    access = await visible_key(request, request.match_info["key_id"], "keys:write")
    if access.managed and await directory.service_org(access.row.user_id) not in access.managed:
        raise InsufficientPermissions("only a key's owner can rotate it; an admin can revoke it")
    if access.view["status"] == "active":
        no_escalation(p, spec_of(access.row), "rotate", access.view.get("stopped_in", ()))
    body = await read_body(request, Rotate)
    rotated = await keyring.rotate_key(access.row.id, body.get("grace"), p.actor)
    new = await visible_key(request, rotated["id"])
    return web.json_response({**new.view, "key": rotated["key"], "rotated_from": access.row.id}, status=201)


# --- orgs, members, projects, service accounts ---------------------------------------------------


async def me(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    orgs = await request.config_dict[DIRECTORY].orgs(p.orgs())
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
    p.require_own("orgs:write")
    body = await read_body(request, Named)
    return web.json_response(
        await request.config_dict[DIRECTORY].create_org(body["name"], p.actor, owner=p.user_id), status=201
    )


async def list_orgs(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    orgs = await request.config_dict[DIRECTORY].orgs(p.orgs())
    return web.json_response({"items": [{**o, "role": p.role_in(o["id"])} for o in orgs]})


async def get_org(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org = request.match_info["org"]
    role = p.require(org)
    (found,) = await request.config_dict[DIRECTORY].orgs([org])
    return web.json_response({**found, "role": role})


async def list_members(request: web.Request) -> web.Response:
    org = request.match_info["org"]
    request[PRINCIPAL].require(org, "members:read", admin=True)
    return web.json_response({"items": await request.config_dict[DIRECTORY].members(org)})


def _grantable(p: Principal, org: str, role: str, permission: str) -> None:
    """Nobody grants a role above their own effective one."""
    if role not in p.roles.order:
        raise InvalidRequest(f"role must be one of {', '.join(p.roles.order)}", field="role")
    mine = p.require(org, permission, admin=True)
    if p.roles.rank(role) > p.roles.rank(mine):
        raise InsufficientPermissions(f"an {mine} cannot grant {role}")
    # Nor, with a scoped key, a role that may do what the key itself may not.
    have = p.permissions_in(org)
    if not all(granted(have, pattern) for pattern in p.roles.permissions.get(role, ())):
        raise InsufficientPermissions(f"this key's scopes do not cover what {role} may do")


async def add_member(request: web.Request) -> web.Response:
    """Invites the user with this email: they join once they accept. A current member's role is set."""
    p = request[PRINCIPAL]
    org = request.match_info["org"]
    body = await read_body(request, MemberAdd)
    _grantable(p, org, body["role"], "members:write")
    directory = request.config_dict[DIRECTORY]
    user_id = await directory.user_by_email(body["email"], p.actor)
    await _guard_target(request, org, user_id)
    result = await request.config_dict[INVITATIONS].invite(org, body["email"], body["role"], p.actor)
    return web.json_response(result, status=200 if result["status"] == "member" else 202)


async def _guard_target(request: web.Request, org: str, user_id: str) -> None:
    """A member whose role is above the caller's cannot be changed or removed by the caller."""
    p = request[PRINCIPAL]
    current = await request.config_dict[DIRECTORY].member_role(org, user_id)
    mine = p.require(org, "members:write", admin=True)
    if current is not None and p.roles.rank(current) > p.roles.rank(mine):
        raise InsufficientPermissions(f"an {mine} cannot change an {current}")


async def set_member(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org, user_id = request.match_info["org"], request.match_info["user_id"]
    body = await read_body(request, Role)
    _grantable(p, org, body["role"], "members:write")
    if await request.config_dict[DIRECTORY].member_role(org, user_id) is None:
        raise NotFound(f"no member {user_id}")
    await _guard_target(request, org, user_id)
    return web.json_response(await request.config_dict[DIRECTORY].set_member(org, user_id, body["role"], p.actor))


async def remove_member(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org, user_id = request.match_info["org"], request.match_info["user_id"]
    p.require(org, "members:write", admin=True)
    await _guard_target(request, org, user_id)
    return web.json_response(await request.config_dict[DIRECTORY].remove_member(org, user_id, p.actor))


async def list_org_invitations(request: web.Request) -> web.Response:
    org = request.match_info["org"]
    request[PRINCIPAL].require(org, "members:read", admin=True)
    return web.json_response({"items": await request.config_dict[INVITATIONS].for_org(org)})


async def withdraw_invitation(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org = request.match_info["org"]
    p.require(org, "members:write", admin=True)
    invitation = checked_id(request.match_info["invitation"], "invitation")
    return web.json_response(await request.config_dict[INVITATIONS].withdraw(org, invitation, p.actor))


async def my_invitations(request: web.Request) -> web.Response:
    """The caller's own open invitations: any valid credential of the user."""
    p = request[PRINCIPAL]
    items = await request.config_dict[INVITATIONS].for_user(p.user_id)
    people = await request.config_dict[DIRECTORY].people(sorted({i["invited_by"] for i in items if i["invited_by"]}))
    return web.json_response(
        {"items": [{**i, "invited_by_name": people.get(i["invited_by"] or "", {}).get("name")} for i in items]}
    )


async def _decide(request: web.Request, accept: bool) -> web.Response:
    p = request[PRINCIPAL]
    if accept and not p.record.all_orgs:
        # Joining an org changes the user's orgs: not for a credential confined to some of them.
        raise OrgNotAllowed("only a key for all of its owner's orgs (or the web page) can accept an invitation")
    invitation = checked_id(request.match_info["invitation"], "invitation")
    return web.json_response(await request.config_dict[INVITATIONS].decide(invitation, p.user_id, accept, p.actor))


async def accept_invitation(request: web.Request) -> web.Response:
    return await _decide(request, accept=True)


async def decline_invitation(request: web.Request) -> web.Response:
    return await _decide(request, accept=False)


def _project_in_reach(p: Principal, project: str) -> None:
    """A key confined to some projects sees and manages only those (others are 404, as elsewhere)."""
    if not p.record.all_projects and project not in p.record.project_ids:
        raise NotFound(f"no project {project}")


async def create_project(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org = request.match_info["org"]
    p.require(org, "projects:write", admin=True)
    if not p.record.all_projects:
        raise ProjectNotAllowed("a key confined to some projects cannot create one")
    body = await read_body(request, Named)
    return web.json_response(
        await request.config_dict[DIRECTORY].create_project(org, body["name"], p.actor), status=201
    )


async def list_projects(request: web.Request) -> web.Response:
    org = request.match_info["org"]
    p = request[PRINCIPAL]
    p.require(org, "projects:read")
    projects = await request.config_dict[DIRECTORY].projects(org)
    return web.json_response(
        {"items": [x for x in projects if p.record.all_projects or x["id"] in p.record.project_ids]}
    )


async def get_project(request: web.Request) -> web.Response:
    org, project = request.match_info["org"], request.match_info["project"]
    request[PRINCIPAL].require(org, "projects:read")
    _project_in_reach(request[PRINCIPAL], project)
    found = [p for p in await request.config_dict[DIRECTORY].projects(org) if p["id"] == project]
    if not found:
        raise NotFound(f"no project {project}")
    return web.json_response(found[0])


async def delete_project(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org, project = request.match_info["org"], request.match_info["project"]
    role = p.require(org, "projects:write", admin=True)
    _project_in_reach(p, project)
    revoke = request.query.get("revoke_keys", "false")
    if revoke not in ("true", "false"):
        raise InvalidRequest("revoke_keys must be true or false", field="revoke_keys")
    if revoke == "true":
        p.require(org, "keys:write", admin=True)  # it stops keys
    return web.json_response(
        await request.config_dict[DIRECTORY].delete_project(
            org, project, revoke == "true", p.actor, max_owner_role=role
        )
    )


async def create_service_account(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org = request.match_info["org"]
    body = await read_body(request, MemberRole)
    _grantable(p, org, body["role"], "service_accounts:write")
    return web.json_response(
        await request.config_dict[DIRECTORY].create_service_account(org, body["name"], body["role"], p.actor),
        status=201,
    )


async def list_service_accounts(request: web.Request) -> web.Response:
    org = request.match_info["org"]
    request[PRINCIPAL].require(org, "service_accounts:read", admin=True)
    return web.json_response({"items": await request.config_dict[DIRECTORY].service_accounts(org)})


async def create_service_account_key(request: web.Request) -> web.Response:
    """The org's own keys: owned by the service account, scoped to its one org."""
    p = request[PRINCIPAL]
    no_key_from_a_token(p)
    org, sa_id = request.match_info["org"], request.match_info["sa"]
    p.require(org, "service_accounts:write", admin=True)
    directory, keyring = request.config_dict[DIRECTORY], request.config_dict[KEYRING]
    sa = await directory.service_account(org, sa_id)
    if sa is None:
        raise NotFound(f"no service account {sa_id}")
    body = await read_body(request, KeyCreate)
    body["orgs"] = [org]
    spec = spec_from(body, sa_id)
    checked = keyring.validate_spec(spec)
    no_escalation(p, spec)
    _grantable(p, org, spec.role, "service_accounts:write")
    row, raw = await keyring.mint(checked, p.actor)
    view = {**key_view(row), "key": raw}
    view["effective_role"] = _effective_roles(p, spec.role, {org: sa["role"]}, [org])
    return web.json_response(view, status=201)


async def audit(request: web.Request) -> web.Response:
    p = request[PRINCIPAL]
    org = request.match_info["org"]
    p.require(org, "audit:read", admin=True)
    limit, cursor = page(request)
    q = request.query
    before = None
    if cursor:
        before = decode_cursor(cursor)
        if type(before) is not int or not 0 < before < 2**63:
            raise InvalidRequest("cursor is not valid", field="cursor")
    for name in ("key_id", "actor"):  # a NUL in a filter reached Postgres, which refused it (500)
        if name in q:
            field_id(q[name], name)
    if "type" in q and not EVENT_TYPE_RE.fullmatch(q["type"]):
        raise InvalidRequest("type must be an event type such as api_key.created", field="type")
    items = await request.config_dict[AUDIT_LOG].events(
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
    next_cursor = encode_cursor(items[-1]["id"]) if more else None
    return web.json_response({"items": await _named_events(request, items), "next_cursor": next_cursor})


async def _named_events(request: web.Request, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Audit events with the names of who acted (`actor_name`), whom they concern (`user_name`) and the
    key (`key_name`), where those still exist."""
    app = request.config_dict
    people = await app[DIRECTORY].people(sorted({u for e in items for u in (e["actor"], e["user_id"]) if u}))
    keys = await app[KEYRING].key_names(sorted({e["key_id"] for e in items if e["key_id"]}))

    def person(user_id: str | None) -> str | None:
        return people.get(user_id or "", {}).get("name")

    return [
        {
            **e,
            "actor_name": person(e["actor"]),
            "user_name": person(e["user_id"]),
            "key_name": keys.get(e["key_id"] or ""),
        }
        for e in items
    ]


async def _no_store(_request: web.Request, response: web.StreamResponse) -> None:
    """Management answers are one principal's (and some carry a raw key once): no cache may keep them."""
    response.headers.setdefault(hdrs.CACHE_CONTROL, "no-store")


def api_app() -> web.Application:
    """The /v1/ sub-application (mounted after the public /v1/keys/verify and /v1/openapi.json)."""
    api = web.Application(middlewares=[authenticate, valid_ids])
    api.on_response_prepare.append(_no_store)
    r = api.router
    r.add_get("/me", me)
    r.add_post("/keys", create_key)
    r.add_get("/keys", list_keys)
    r.add_get("/keys/{key_id}", get_key)
    r.add_get("/keys/{key_id}/usage", key_usage)
    r.add_post("/keys/{key_id}/revoke", revoke_key)
    r.add_post("/keys/{key_id}/rotate", rotate_key)
    r.add_post("/orgs", create_org)
    r.add_get("/orgs", list_orgs)
    r.add_get("/orgs/{org}", get_org)
    r.add_get("/orgs/{org}/members", list_members)
    r.add_post("/orgs/{org}/members", add_member)
    r.add_put("/orgs/{org}/members/{user_id}", set_member)
    r.add_delete("/orgs/{org}/members/{user_id}", remove_member)
    r.add_get("/orgs/{org}/invitations", list_org_invitations)
    r.add_delete("/orgs/{org}/invitations/{invitation}", withdraw_invitation)
    r.add_get("/invitations", my_invitations)
    r.add_post("/invitations/{invitation}/accept", accept_invitation)
    r.add_post("/invitations/{invitation}/decline", decline_invitation)
    r.add_post("/orgs/{org}/projects", create_project)
    r.add_get("/orgs/{org}/projects", list_projects)
    r.add_get("/orgs/{org}/projects/{project}", get_project)
    r.add_delete("/orgs/{org}/projects/{project}", delete_project)
    r.add_post("/orgs/{org}/service-accounts", create_service_account)
    r.add_get("/orgs/{org}/service-accounts", list_service_accounts)
    r.add_post("/orgs/{org}/service-accounts/{sa}/keys", create_service_account_key)
    r.add_get("/orgs/{org}/audit", audit)
    add_session_routes(api)
    return api
