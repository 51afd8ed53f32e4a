"""The web page at /ui/: sign in with an API key, then manage keys, members and audit in the browser.

Signing in exchanges the key for a server-side session in Redis (the browser gets an opaque, HttpOnly,
SameSite=Strict cookie, Secure over TLS; Redis keeps only a hash of it). The page is static HTML with a
small script that calls the same /v1/ API with that cookie; every write carries the session's CSRF token.
A strict Content-Security-Policy allows nothing but the page's own files.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
from aiohttp import web

from gateway import constants as C
from gateway._body import json_object, read_raw
from gateway._breaker import guarded
from gateway.authz import role_in
from gateway.backends import REDIS_ERRORS, REDIS_UNAVAILABLE
from gateway.config import RolesConfig
from gateway.directory import DIRECTORY
from gateway.errors import AuthUnavailable, InvalidRequest, MissingCredentials
from gateway.forward import client_address
from gateway.models import KeyRecord
from gateway.typedefs import CONFIG, REDIS, REDIS_BREAKER, TRUSTED, VERIFIER

COOKIE = "gw_session"
CSRF_HEADER = "X-CSRF-Token"
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
T = TypeVar("T")
_STATIC = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}


@dataclass
class Session:
    key_id: str
    user_id: str
    csrf: str
    active_org: str | None
    created: float


async def _redis(request: web.Request, fn: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """A session-store call through the Redis breaker; unreachable is 503, never a signed-out 401."""
    app = request.config_dict
    try:
        return await guarded(app[REDIS_BREAKER], lambda: fn(app[REDIS]), REDIS_ERRORS)
    except REDIS_UNAVAILABLE:
        raise AuthUnavailable("the session store is unreachable") from None


def _redis_key(session_id: str) -> str:
    return C.REDIS_SESSION.format(digest=hashlib.sha256(session_id.encode()).hexdigest())


async def load_session(request: web.Request) -> tuple[Session, KeyRecord] | None:
    """The request's session and its key (revoked or expired keys end the session)."""
    session_id = request.cookies.get(COOKIE)
    if not session_id or len(session_id) > 100:
        return None
    app = request.config_dict
    raw = await _redis(request, lambda r: r.get(_redis_key(session_id)))
    if raw is None:
        return None
    session = Session(**json.loads(raw))
    if time.time() - session.created >= app[CONFIG].ui.session_ttl_s:
        return None  # a session ends `session_ttl_s` after sign-in, however busy it was since
    client_ip = client_address(request.remote, request.headers, app[TRUSTED])
    record = await app[VERIFIER].session_record(session.key_id, client_ip)
    return (session, record) if record is not None else None


def check_csrf(request: web.Request, session: Session) -> None:
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    token = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(token.encode(), session.csrf.encode()):
        raise InvalidRequest("missing or wrong CSRF token", field=CSRF_HEADER)


def _secure(request: web.Request) -> bool:
    if request.secure:
        return True
    peer = client_address(request.remote, request.headers, ())  # the direct peer
    trusted = peer is not None and any(peer in n for n in request.config_dict[TRUSTED])
    return trusted and request.headers.get("X-Forwarded-Proto") == "https"


async def _session_view(session: Session, record: KeyRecord, request: web.Request) -> web.Response:
    roles = request.config_dict[CONFIG].roles
    ids = [o for o in record.memberships if role_in(record, o, roles) is not None]
    orgs = await request.config_dict[DIRECTORY].orgs(ids)  # an outage: StoreUnavailable, a 503
    view = {
        "user_id": session.user_id,
        "key_id": session.key_id,
        "active_org": session.active_org,
        "orgs": [_org_view(o, role_in(record, o["id"], roles), roles) for o in orgs],
        "csrf": session.csrf,
        "roles": list(roles.order),
    }
    return web.json_response(view, headers=SECURITY_HEADERS)


def _org_view(org: dict[str, Any], role: str | None, roles: RolesConfig) -> dict[str, Any]:
    """An org as the page shows it: whether this key administers it (`roles.admin` or above) is decided
    here, by the same rule as the API's, so the page never guesses from role names."""
    return {**org, "role": role, "admin": role is not None and roles.administers(role)}


async def _save(request: web.Request, session_id: str, session: Session) -> None:
    cfg = request.config_dict[CONFIG].ui
    ttl = int(cfg.session_ttl_s)
    left = max(1, int(session.created + ttl - time.time()))  # saving again never extends a session
    mine = C.REDIS_USER_SESSIONS.format(user_id=session.user_id)

    async def save(redis: aioredis.Redis) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(_redis_key(session_id), json.dumps(asdict(session)), ex=left)
            pipe.zadd(mine, {_redis_key(session_id): session.created})
            pipe.zremrangebyscore(mine, "-inf", time.time() - ttl)  # sessions already gone by themselves
            pipe.expire(mine, ttl)
            # Beyond the cap, the oldest sessions end: a user's sessions never grow without bound.
            pipe.zrange(mine, 0, -(cfg.max_sessions_per_user + 1))
            *_, evicted = await pipe.execute()
        if evicted:
            async with redis.pipeline(transaction=False) as pipe:
                for key in evicted:  # one DEL each: sessions live in different Cluster slots
                    pipe.delete(key)
                pipe.zrem(mine, *evicted)
                await pipe.execute()

    await _redis(request, save)


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
    session_id = secrets.token_urlsafe(32)
    session = Session(record.id, record.user_id, secrets.token_urlsafe(32), orgs[0] if orgs else None, time.time())
    await _save(request, session_id, session)
    response = await _session_view(session, record, request)
    response.set_cookie(
        COOKIE,
        session_id,
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
        path="/",
        max_age=int(app[CONFIG].ui.session_ttl_s),
    )
    return response


async def current(request: web.Request) -> tuple[str, Session, KeyRecord]:
    found = await load_session(request)
    if found is None:
        raise MissingCredentials("sign in first")
    return request.cookies[COOKIE], *found


async def get_session(request: web.Request) -> web.Response:
    """The signed-in session, or 204 when there is none (a revoked or expired key is a 401 saying so)."""
    found = await load_session(request)
    if found is None:
        return web.Response(status=204, headers=SECURITY_HEADERS)
    session, record = found
    verifier = request.config_dict[VERIFIER]
    await verifier.charge(record, verifier.org_of(record, session.active_org))
    return await _session_view(session, record, request)


async def switch_org(request: web.Request) -> web.Response:
    session_id, session, record = await current(request)
    check_csrf(request, session)
    verifier = request.config_dict[VERIFIER]
    await verifier.charge(record, verifier.org_of(record, session.active_org))
    org = json_object(await read_raw(request, request.config_dict[CONFIG].server.body_timeout_s)).get("org")
    if not isinstance(org, str) or role_in(record, org, request.config_dict[CONFIG].roles) is None:
        raise InvalidRequest("not an org this key can act in", field="org")
    session.active_org = org
    await _save(request, session_id, session)
    return await _session_view(session, record, request)


async def sign_out(request: web.Request) -> web.Response:
    """Ends every session of the user, in every browser, not only this one."""
    _, session, _ = await current(request)
    check_csrf(request, session)
    mine = C.REDIS_USER_SESSIONS.format(user_id=session.user_id)

    async def end_all(redis: aioredis.Redis) -> None:
        sessions = [k for k in await redis.zrange(mine, 0, -1) if isinstance(k, bytes | str)]
        async with redis.pipeline(transaction=False) as pipe:
            for key in sessions:  # one DEL each: sessions live in different Cluster slots
                pipe.delete(key)
            pipe.delete(mine)
            await pipe.execute()

    await _redis(request, end_all)
    response = web.json_response({"signed_out": True}, headers=SECURITY_HEADERS)
    response.del_cookie(COOKIE, path="/")
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
