"""`/v1/` for sessions and tokens: issuing a session for a platform's signed-in user, switching a session's
org, ending sessions, issuing / refreshing / revoking JWT access tokens, and the published JWKS.

Who may issue what (never more than the caller could do itself):
- `POST /v1/sessions`: a service account whose role grants `sessions:issue` in the org, for a member of it.
- `POST /v1/tokens`: a session (its user, its active org), the user's own API key (capped by the key: role,
  orgs, scopes, projects), or a service account granted `tokens:issue` for a member of its org.
`/v1/tokens/refresh` and `/v1/tokens/revoke` take the token itself as the credential (RFC 6749 §6, RFC 7009).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from gateway._body import read_body, read_raw, storable
from gateway.audit import AUDIT_LOG, Actor
from gateway.authz import active_org, effective_permissions, pattern_matches, role_in
from gateway.config import RolesConfig
from gateway.directory import DIRECTORY
from gateway.errors import GatewayError, InsufficientPermissions, InvalidRequest, NotFound, OrgNotAllowed
from gateway.formats import PERMISSION_RE
from gateway.forward import client_address
from gateway.grants import GRANTS, Grant
from gateway.keyring import parse_duration
from gateway.models import KeyRecord
from gateway.principal import PRINCIPAL, Principal
from gateway.schemas import Body, OrgSwitch, SessionCreate, TokenCreate, TokenRefresh, TokenRevoke, read
from gateway.sessions import Session
from gateway.typedefs import CONFIG, SESSIONS, SIGNING, TRUSTED, VERIFIER

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
SESSION = web.RequestKey("session", Session)  # set when the call came with a session cookie


async def audit_session(
    request: web.Request, type_: str, session: Session, detail: dict[str, Any], actor: Actor | None = None
) -> None:
    address = client_address(request.remote, request.headers, request.config_dict[TRUSTED])
    who = actor or Actor(session.user_id, str(address) if address else None, request.headers.get("User-Agent"))
    await request.config_dict[AUDIT_LOG].record(
        type_, who, org_id=session.active_org, user_id=session.user_id, target=session.public_id, detail=detail
    )


async def switch_session_org(request: web.Request, session: Session, record: KeyRecord, org: object) -> Session:
    """The session's active org becomes `org` (one its record can act in), for every replica's next request."""
    if not isinstance(org, str) or role_in(record, org, request.config_dict[CONFIG].roles) is None:
        raise InvalidRequest("not an org this session can act in", field="org")
    if not await request.config_dict[SESSIONS].switch_org(session, org):
        raise InvalidRequest("the session has ended: sign in again")
    switched = Session(**{**session.__dict__, "active_org": org})
    await audit_session(request, "session.org_switched", switched, {"from": session.active_org, "to": org})
    return switched


async def sign_out_everywhere(request: web.Request, user_id: str, actor: Actor | None = None) -> None:
    """Every session of the user ends, and every refresh family (their access tokens stop at once)."""
    await request.config_dict[SESSIONS].end_user(user_id)
    who = actor or Actor(user_id)
    await request.config_dict[GRANTS].revoke_user(user_id, "signed_out", who)
    await request.config_dict[AUDIT_LOG].record(
        "session.ended", who, user_id=user_id, target=user_id, detail={"all": True}
    )


def _principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def _secure(request: web.Request) -> bool:
    if request.secure:
        return True
    peer = client_address(request.remote, request.headers, ())  # the direct peer
    trusted = peer is not None and any(peer in n for n in request.config_dict[TRUSTED])
    return trusted and request.headers.get("X-Forwarded-Proto") == "https"


def session_cookie(request: web.Request, session_id: str) -> dict[str, Any]:
    """The session cookie's attributes: HttpOnly, SameSite=Strict, Secure over TLS, for the session's life."""
    cfg = request.config_dict[CONFIG].sessions
    return {
        "name": cfg.cookie,
        "value": session_id,
        "path": "/",
        "http_only": True,
        # A `__Host-` cookie is refused by browsers unless Secure: the name asks for TLS.
        "secure": _secure(request) or cfg.cookie.startswith("__Host-"),
        "same_site": "Strict",
        "max_age": int(cfg.absolute_ttl_s),
    }


def set_session_cookie(response: web.StreamResponse, cookie: dict[str, Any]) -> None:
    response.set_cookie(
        cookie["name"],
        cookie["value"],
        httponly=cookie["http_only"],
        samesite=cookie["same_site"],
        secure=cookie["secure"],
        path=cookie["path"],
        max_age=cookie["max_age"],
    )


# --- sessions ------------------------------------------------------------------------------------------


async def create_session(request: web.Request) -> web.Response:
    p = _principal(request)
    if p.record.method == "jwt":  # a session would outlive the token and its family's revocation
        raise InsufficientPermissions("an access token cannot issue sessions: use the service account's key")
    body = await read_body(request, SessionCreate)
    org, user = body["org"], body["user"]
    await _service_account_of(request, p.user_id, org)
    cap = p.require(org, "sessions:issue")
    if org not in await request.config_dict[VERIFIER].memberships(user, current=True):
        raise NotFound(f"no member {user} in this org")
    # The session acts in the issuer's org only, never above the issuer's role there.
    session_id, session = await request.config_dict[SESSIONS].create(
        user, None, org, request.headers.get("User-Agent", ""), p.actor.ip, (org,), cap
    )
    await audit_session(request, "session.created", session, {"via": "api"}, p.actor)
    view = {"session": session.view(), "csrf": session.csrf, "cookie": session_cookie(request, session_id)}
    return web.json_response(view, status=201, headers=NO_STORE)


async def _service_account_of(request: web.Request, user_id: str, org: str) -> None:
    if await request.config_dict[DIRECTORY].service_org(user_id) != org:
        raise InsufficientPermissions("only a service account of this org may do this")


def _calling_session(request: web.Request) -> Session:
    session: Session | None = request.get(SESSION)
    if session is None:
        raise InvalidRequest("this call needs the session cookie (not a key or token)")
    return session


async def switch_org(request: web.Request) -> web.Response:
    session = _calling_session(request)
    body = await read_body(request, OrgSwitch)
    session = await switch_session_org(request, session, _principal(request).record, body["org"])
    return web.json_response({"session": session.view(session.handle)})


async def end_session(request: web.Request) -> web.Response:
    session = _calling_session(request)
    await request.config_dict[SESSIONS].end(session)
    await audit_session(request, "session.ended", session, {"all": False})
    response = web.json_response({"ended": True})
    response.del_cookie(request.config_dict[CONFIG].sessions.cookie, path="/")
    return response


async def my_sessions(request: web.Request) -> web.Response:
    p = _principal(request)
    current = request.get(SESSION)
    sessions = await request.config_dict[SESSIONS].of_user(p.user_id)
    return web.json_response({"items": [s.view(current.handle if current else None) for s in sessions]})


async def end_my_session(request: web.Request) -> web.Response:
    p = _principal(request)
    wanted = request.match_info["session_id"]
    for session in await request.config_dict[SESSIONS].of_user(p.user_id):
        if session.public_id == wanted:
            await request.config_dict[SESSIONS].end(session)
            await audit_session(request, "session.ended", session, {"all": False}, p.actor)
            return web.json_response({"ended": True})
    raise NotFound(f"no session {wanted}")


async def end_my_sessions(request: web.Request) -> web.Response:
    """Sign out everywhere: every session of the caller's user, and every token family."""
    p = _principal(request)
    await sign_out_everywhere(request, p.user_id, p.actor)
    response = web.json_response({"ended": True})
    response.del_cookie(request.config_dict[CONFIG].sessions.cookie, path="/")
    return response


# --- tokens ----------------------------------------------------------------------------------------------


def _within(requested: object, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """The requested permission patterns, each a pattern (no space may smuggle a second one into the
    space-separated `scope` claim) and each within what the caller may grant."""
    if not isinstance(requested, list) or not requested or len(requested) > 100:
        raise InvalidRequest("scopes must be a list of 1 to 100 permission patterns", field="scopes")
    for pattern in requested:
        if not isinstance(pattern, str) or not PERMISSION_RE.fullmatch(pattern):
            raise InvalidRequest("each scope must be a permission pattern such as calls:read", field="scopes")
        if not any(pattern_matches(a, pattern) for a in allowed):
            raise InsufficientPermissions(f"scope {pattern} exceeds what the caller may grant", field="scopes")
    return tuple(sorted(set(requested)))


def _role_within(requested: str | None, cap: str, roles: RolesConfig) -> str:
    if requested is None:
        return cap
    roles.named(requested)
    if roles.rank(requested) > roles.rank(cap):
        raise InsufficientPermissions(f"role {requested} exceeds the caller's {cap}", field="role")
    return requested


async def create_token(request: web.Request) -> web.Response:
    p = _principal(request)
    record: KeyRecord = p.record
    if record.method == "jwt":
        raise InsufficientPermissions("an access token cannot issue tokens: refresh it")
    body = await read_body(request, TokenCreate)
    roles = request.config_dict[CONFIG].roles
    ttl = parse_duration(body["ttl"], "ttl").total_seconds() if body.get("ttl") else None
    if ttl is not None and not 60 <= ttl <= 3600:
        raise InvalidRequest("ttl must be between 1m and 1h", field="ttl")
    session = request.get(SESSION)
    user = body.get("user") or p.user_id
    if user != p.user_id:  # server-side generation, for a member of the service account's org
        org = body.get("org") or await request.config_dict[DIRECTORY].service_org(p.user_id)
        if org is None:
            raise InsufficientPermissions("only a service account issues tokens for another user")
        await _service_account_of(request, p.user_id, org)
        cap = p.require(org, "tokens:issue")
        member = (await request.config_dict[VERIFIER].memberships(user, current=True)).get(org)
        if member is None:
            raise NotFound(f"no member {user} in this org")
        if member not in roles.order:
            raise InsufficientPermissions("the member's role is not one this gateway knows")
        cap = roles.lower(cap, member)
    else:
        if session is not None:
            org = session.active_org or ""
            if body.get("org") not in (None, org):
                raise OrgNotAllowed("a session issues tokens for its active org: switch org first")
        else:
            try:
                org = active_org(record, body.get("org"))
            except GatewayError as exc:
                exc.field = "org"
                raise
        cap = p.require(org)
    role = _role_within(body.get("role"), cap, roles)
    allowed = p.permissions_in(org)
    asked = _within(body["scopes"], allowed) if body.get("scopes") is not None else allowed
    # The claim says what the token grants, role included: other verifiers trust it as it is.
    scopes = effective_permissions(roles.permissions[role], asked)
    if not scopes:
        raise InsufficientPermissions("the caller may grant nothing in this org")
    projects = None if record.all_projects else tuple(record.project_ids)
    # A token for the caller's own user keeps the caller's key's limits; one a service account issues for
    # a member is that member's (capped above), not tied to the service account's key.
    own = user == p.user_id
    grant = Grant(user, org, role, scopes, projects if own else None, record.id or None if own else None,
                  record.expires_at if own else None)  # fmt: skip
    pair = await request.config_dict[GRANTS].issue(grant, p.actor, ttl)
    return web.json_response(pair, headers=NO_STORE)


async def _form_or_json(request: web.Request, model: type[Body]) -> dict[str, Any]:
    """An OAuth client sends a form (RFC 6749, RFC 7009); JSON is accepted too."""
    if request.content_type == "application/x-www-form-urlencoded":
        raw = await read_raw(request, request.config_dict[CONFIG].server.body_timeout_s)
        try:
            fields = parse_qs(raw.decode(), strict_parsing=False, max_num_fields=10)
        except (UnicodeDecodeError, ValueError):
            raise InvalidRequest("the form is not valid") from None
        if any(len(v) != 1 for v in fields.values()):
            raise InvalidRequest("each field must be sent once")
        return read(model, storable({k: v[0] for k, v in fields.items()}))
    return await read_body(request, model)


async def _charge_caller(request: web.Request) -> Actor:
    app = request.config_dict
    client_ip = client_address(request.remote, request.headers, app[TRUSTED])
    await app[VERIFIER].charge_sign_in(client_ip)  # a bound on lookups per address, as for sign-ins
    return Actor("anonymous", str(client_ip) if client_ip else None, request.headers.get("User-Agent"))


async def refresh_token(request: web.Request) -> web.Response:
    body = await _form_or_json(request, TokenRefresh)
    actor = await _charge_caller(request)
    pair = await request.config_dict[GRANTS].refresh(body["refresh_token"], actor, request.config_dict[CONFIG].roles)
    return web.json_response(pair, headers=NO_STORE)


async def revoke_token(request: web.Request) -> web.Response:
    """RFC 7009: 200 whether or not the token was valid (a caller learns nothing by probing)."""
    body = await _form_or_json(request, TokenRevoke)
    actor = await _charge_caller(request)
    grants = request.config_dict[GRANTS]
    access = request.config_dict[VERIFIER].tokens
    family = await grants.family_of(body["token"], access) if access is not None else None
    if family is not None:
        await grants.revoke(family, "revoked", actor)
    return web.json_response({}, headers=NO_STORE)


async def jwks(request: web.Request) -> web.Response:
    """The published keys (next, current, previous): a verifier caching them may hold them a minute."""
    return web.json_response(request.app[SIGNING].jwks, headers={"Cache-Control": "public, max-age=60"})


def add_public_routes(app: web.Application) -> None:
    """Routes whose credential is the token in the body (no API key, session or bearer token)."""
    app.router.add_post("/v1/tokens/refresh", refresh_token)  # before the /v1/ sub-app, which authenticates
    app.router.add_post("/v1/tokens/revoke", revoke_token)
    app.router.add_get("/.well-known/jwks.json", jwks)


def add_routes(api: web.Application) -> None:
    r = api.router
    r.add_post("/sessions", create_session)
    r.add_get("/sessions", my_sessions)
    r.add_delete("/sessions", end_my_sessions)
    r.add_delete("/sessions/{session_id}", end_my_session)
    r.add_delete("/session", end_session)
    r.add_post("/session/org", switch_org)
    r.add_post("/tokens", create_token)
