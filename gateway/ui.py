"""The web page at /ui/: sign in with an API key, then manage keys, members, sessions and audit in the browser.

Signing in exchanges the key for a session in Redis (`gateway.sessions`; the browser gets an opaque,
HttpOnly, SameSite=Strict cookie, Secure over TLS; Redis keeps only a hash of it). The session never grants
more than the key it was signed in with. The page is static HTML with a
small script that calls the same /v1/ API with that cookie; every write carries the session's CSRF token.
A strict Content-Security-Policy allows nothing but the page's own files.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web

from gateway._body import json_object, read_raw
from gateway.authz import role_in
from gateway.config import RolesConfig
from gateway.directory import DIRECTORY
from gateway.errors import InvalidRequest, MissingCredentials
from gateway.forward import client_address
from gateway.models import KeyRecord
from gateway.session_api import (
    audit_session,
    session_cookie,
    set_session_cookie,
    sign_out_everywhere,
    switch_session_org,
)
from gateway.sessions import Session, check_csrf, cookie_value
from gateway.typedefs import CONFIG, SESSIONS, TRUSTED, VERIFIER

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_STATIC = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}


async def _session_view(session: Session, record: KeyRecord, request: web.Request) -> web.Response:
    roles = request.config_dict[CONFIG].roles
    ids = [o for o in record.memberships if role_in(record, o, roles) is not None]
    orgs = await request.config_dict[DIRECTORY].orgs(ids)  # an outage: StoreUnavailable, a 503
    view = {
        "user_id": session.user_id,
        "key_id": session.key_id,
        "session_id": session.public_id,
        "active_org": session.active_org,
        "orgs": [_org_view(o, role_in(record, o["id"], roles), roles) for o in orgs],
        "csrf": session.csrf,
        "roles": list(roles.order),
    }
    return web.json_response(view, headers=SECURITY_HEADERS)


def _org_view(org: dict[str, Any], role: str | None, roles: RolesConfig) -> dict[str, Any]:
    """An org as the page shows it: whether this session administers it (`roles.admin` or above) is
    decided here, by the same rule as the API's, so the page never guesses from role names."""
    return {**org, "role": role, "admin": role is not None and roles.administers(role)}


async def sign_in(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        raise InvalidRequest('send the key as JSON: {"key": ...}')
    body = json_object(await read_raw(request, request.config_dict[CONFIG].server.body_timeout_s))
    if set(body) != {"key"} or not isinstance(body["key"], str):
        raise InvalidRequest('the body must be {"key": "..."}', field="key")
    app = request.config_dict
    verifier = app[VERIFIER]
    parsed = verifier.parse(body["key"].strip())
    client_ip = client_address(request.remote, request.headers, app[TRUSTED])
    # Each sign-in attempt is charged to its address, and each success to the key's own limit, as one
    # request through the proxy would be: a session is no way around the key's rate limit.
    await verifier.charge_sign_in(client_ip)
    record = await verifier.authenticate(parsed, client_ip)
    verifier.check_state(record, client_ip)
    await verifier.charge(record, None)
    roles = app[CONFIG].roles
    orgs = sorted(o for o in record.memberships if role_in(record, o, roles) is not None)
    address = str(client_ip) if client_ip is not None else None
    session_id, session = await app[SESSIONS].create(
        record.user_id, record.id, orgs[0] if orgs else None, request.headers.get("User-Agent", ""), address
    )
    await audit_session(request, "session.created", session, {"via": "sign_in"})
    response = await _session_view(session, record, request)
    set_session_cookie(response, session_cookie(request, session_id))
    return response


async def current(request: web.Request) -> tuple[Session, KeyRecord]:
    """The request's session and its record; a revoked or expired key is a 401 saying so."""
    app = request.config_dict
    session_id = cookie_value(request.headers.getall("Cookie", []), app[CONFIG].sessions.cookie)
    session = await app[SESSIONS].load(session_id) if session_id is not None else None
    if session is None:
        raise MissingCredentials("sign in first")
    client_ip = client_address(request.remote, request.headers, app[TRUSTED])
    return session, await app[VERIFIER].session_principal(session, client_ip)


async def get_session(request: web.Request) -> web.Response:
    """The signed-in session, or 204 when there is none (a revoked or expired key is a 401 saying so)."""
    try:
        session, record = await current(request)
    except MissingCredentials:
        return web.Response(status=204, headers=SECURITY_HEADERS)
    verifier = request.config_dict[VERIFIER]
    await verifier.charge(record, verifier.org_of(record, session.active_org))
    return await _session_view(session, record, request)


async def switch_org(request: web.Request) -> web.Response:
    session, record = await current(request)
    app = request.config_dict
    check_csrf(request.headers, request.method, session, app[CONFIG].sessions.allowed_origins)
    verifier = app[VERIFIER]
    await verifier.charge(record, verifier.org_of(record, session.active_org))
    org = json_object(await read_raw(request, app[CONFIG].server.body_timeout_s)).get("org")
    session = await switch_session_org(request, session, record, org)
    return await _session_view(session, record, request)


async def sign_out(request: web.Request) -> web.Response:
    """Ends every session of the user, in every browser, not only this one, and their tokens."""
    session, _ = await current(request)
    check_csrf(request.headers, request.method, session, request.config_dict[CONFIG].sessions.allowed_origins)
    await sign_out_everywhere(request, session.user_id)
    response = web.json_response({"signed_out": True}, headers=SECURITY_HEADERS)
    response.del_cookie(request.config_dict[CONFIG].sessions.cookie, path="/")
    return response


async def static(request: web.Request) -> web.Response:
    name = request.match_info.get("name") or "index.html"
    if name not in _STATIC:
        raise web.HTTPNotFound()
    body = resources.files("gateway").joinpath("ui_static", name).read_bytes()
    return web.Response(body=body, content_type=_STATIC[name], headers=SECURITY_HEADERS)


async def redirect(_request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/ui/session", sign_in)
    app.router.add_get("/ui/session", get_session)
    app.router.add_post("/ui/session/org", switch_org)
    app.router.add_delete("/ui/session", sign_out)
    app.router.add_get("/ui", redirect)
    app.router.add_get("/ui/", static)
    app.router.add_get("/ui/{name}", static)
