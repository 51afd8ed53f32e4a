"""The web page's sessions, kept in Redis: a browser holds only an opaque id in a cookie, Redis a hash
of it (`C.REDIS_SESSION`) with the session's key, user, CSRF token and active org, and each user's set of
sessions (`C.REDIS_USER_SESSIONS`), so that signing out ends all of them and their number stays bounded.
Redis unreachable is 503 auth_unavailable, never a signed-out 401. The page (`gateway.ui`) and the /v1/
API (a cookie instead of a key) both read them here."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from aiohttp import web

from gateway import constants as C
from gateway._breaker import guarded
from gateway.backends import REDIS_ERRORS, REDIS_UNAVAILABLE
from gateway.errors import AuthUnavailable, InvalidRequest
from gateway.forward import client_address
from gateway.models import KeyRecord
from gateway.typedefs import CONFIG, REDIS, REDIS_BREAKER, TRUSTED, VERIFIER

COOKIE = "gw_session"
CSRF_HEADER = "X-CSRF-Token"
T = TypeVar("T")


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


async def save_session(request: web.Request, session_id: str, session: Session) -> None:
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


async def end_user_sessions(request: web.Request, user_id: str) -> None:
    """Every session of the user ends, in every browser."""
    mine = C.REDIS_USER_SESSIONS.format(user_id=user_id)

    async def end_all(redis: aioredis.Redis) -> None:
        sessions = [k for k in await redis.zrange(mine, 0, -1) if isinstance(k, bytes | str)]
        async with redis.pipeline(transaction=False) as pipe:
            for key in sessions:  # one DEL each: sessions live in different Cluster slots
                pipe.delete(key)
            pipe.delete(mine)
            await pipe.execute()

    await _redis(request, end_all)
