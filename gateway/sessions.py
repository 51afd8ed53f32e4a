"""Browser sessions, kept in Redis: the web page's (signed in with a key, which caps them) and those the
platform's backend issues for its signed-in users (`POST /v1/sessions`, capped by the user's membership).

A browser holds only an opaque id in a cookie (`sessions.cookie`); Redis a hash under the SHA-256 of it
(`C.REDIS_SESSION`): user, the key it was signed in with (if any), CSRF token, active org, created and
last-seen times. Each user's sessions are in a sorted set (`C.REDIS_USER_SESSIONS`), so signing out ends
all of them and their number stays bounded. A session ends `sessions.idle_ttl_s` after it was last seen
(Redis expires it) and `sessions.absolute_ttl_s` after it began, however busy. Last-seen is written at
most once per `sessions.touch_interval_s`, in the background: no request waits on a Redis write.

Redis unreachable is 503 auth_unavailable, never a signed-out 401.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from multidict import CIMultiDictProxy

from gateway import constants as C
from gateway._breaker import Breaker, guarded
from gateway.backends import REDIS_ERRORS, REDIS_UNAVAILABLE
from gateway.config import SessionsConfig
from gateway.errors import AuthUnavailable, CsrfFailed, InvalidRequest
from gateway.formats import iso
from gateway.redis_client import RedisClient

log = logging.getLogger("gateway.sessions")

CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))
_MAX_ID = 100
T = TypeVar("T")

# Changes a field of a session only while it exists: a write racing its end never brings it back.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""


@dataclass(frozen=True)
class Session:
    handle: str  # the Redis key's digest: names the session in listings, never usable as a cookie
    user_id: str
    key_id: str | None  # the key the web page signed in with: the session never grants more than it
    csrf: str
    active_org: str | None
    created: float
    last_seen: float
    agent: str
    address: str
    # A session a service account issued acts in its org only, never above the issuer's role there (an
    # org's admins vouch for nothing elsewhere); None: the user's orgs, their membership roles.
    orgs: tuple[str, ...] | None = None
    role_cap: str | None = None

    @property
    def public_id(self) -> str:
        return "ses_" + self.handle[:24]

    def view(self, current: str | None = None) -> dict[str, Any]:
        return {
            "id": self.public_id,
            "active_org": self.active_org,
            "created": iso(self.created),
            "last_seen": iso(self.last_seen),
            "user_agent": self.agent,
            "address": self.address or None,
            "signed_in_with_key": self.key_id,
            "current": self.handle == current,
        }


def digest_of(session_id: str) -> str:
    # aiohttp decodes header bytes that are not UTF-8 as lone surrogates: hashed as the bytes they were.
    return hashlib.sha256(session_id.encode("utf-8", "surrogateescape")).hexdigest()


def cookie_value(cookie_headers: list[str], name: str) -> str | None:
    """The session cookie from the request's Cookie headers; sent twice (a cookie planted by a sibling
    domain beside ours, say) it is ambiguous: refused."""
    found = [
        value.strip()
        for header in cookie_headers
        for part in header.split(";")
        for key, sep, value in (part.strip().partition("="),)
        if sep and key == name
    ]
    if len(found) > 1:
        raise InvalidRequest(f"the {name} cookie was sent more than once")
    if not found or not found[0] or len(found[0]) > _MAX_ID:
        return None
    return found[0]


def check_origin(headers: CIMultiDictProxy[str], method: str, allowed: tuple[str, ...]) -> None:
    """A cookie-only request with an unsafe method must come from an allowed page: its `Origin` is one of
    `sessions.allowed_origins`, or the browser says `Sec-Fetch-Site: same-origin`. Else 403 csrf_failed."""
    if method in SAFE_METHODS:
        return
    origins = headers.getall("Origin", [])
    if len(origins) == 1 and origins[0] in allowed:
        return
    if headers.getall("Sec-Fetch-Site", []) == ["same-origin"]:
        return
    raise CsrfFailed("a cookie-only request with an unsafe method must come from an allowed origin")


def check_csrf(headers: CIMultiDictProxy[str], method: str, session: Session, allowed: tuple[str, ...]) -> None:
    """A /v1/ write with the cookie: the session's CSRF token (the web page sends it), or an allowed origin."""
    if method in SAFE_METHODS:
        return
    token = headers.get(CSRF_HEADER)
    if token is not None and hmac.compare_digest(token.encode("utf-8", "surrogateescape"), session.csrf.encode()):
        return
    check_origin(headers, method, allowed)


class SessionStore:
    def __init__(self, redis: RedisClient, breaker: Breaker, cfg: SessionsConfig) -> None:
        self.redis = redis
        self.breaker = breaker
        self.cfg = cfg
        self._update = redis.register_script(_UPDATE)
        self._touching: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch: dict[str, asyncio.Future[Mapping[Any, Any]]] = {}  # this tick's reads, by handle

    async def _call(self, fn: Callable[[RedisClient], Awaitable[T]], op: str) -> T:
        """A session-store call through the Redis breaker; unreachable is 503, never a signed-out 401."""
        try:
            return await guarded(self.breaker, lambda: fn(self.redis), REDIS_ERRORS, op)
        except REDIS_UNAVAILABLE:
            raise AuthUnavailable("the session store is unreachable") from None

    def _ttl(self, created: float, now: float) -> int:
        """Seconds the session may live from now: idle, within its absolute end."""
        return max(0, int(min(self.cfg.idle_ttl_s, created + self.cfg.absolute_ttl_s - now)))

    async def create(
        self,
        user_id: str,
        key_id: str | None,
        active_org: str | None,
        agent: str,
        address: str | None,
        orgs: tuple[str, ...] | None = None,
        role_cap: str | None = None,
    ) -> tuple[str, Session]:
        """A new session; its id (the cookie's value, returned this once) and the session."""
        session_id = secrets.token_urlsafe(32)
        now = time.time()
        session = Session(
            digest_of(session_id),
            user_id,
            key_id,
            secrets.token_urlsafe(32),
            active_org,
            now,
            now,
            agent[:200],
            address or "",
            orgs,
            role_cap,
        )
        redis_key = C.REDIS_SESSION.format(digest=session.handle)
        mine = C.REDIS_USER_SESSIONS.format(user_id=user_id)
        fields: dict[Any, Any] = {
            "user_id": user_id,
            "key_id": key_id or "",
            "csrf": session.csrf,
            "active_org": active_org or "",
            "created": repr(now),
            "last_seen": repr(now),
            "agent": session.agent,
            "address": session.address,
            "orgs": ",".join(orgs) if orgs is not None else "*",
            "role_cap": role_cap or "",
        }

        async def save(redis: RedisClient) -> None:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hset(redis_key, mapping=fields)
                pipe.expire(redis_key, self._ttl(now, now))
                pipe.zadd(mine, {redis_key: now})
                pipe.zremrangebyscore(mine, "-inf", now - self.cfg.absolute_ttl_s)  # gone by themselves
                pipe.expire(mine, int(self.cfg.absolute_ttl_s))
                # Beyond the cap, the oldest sessions end: a user's sessions never grow without bound.
                pipe.zrange(mine, 0, -(self.cfg.max_per_user + 1))
                *_, evicted = await pipe.execute()
            if evicted:
                await _delete(redis, mine, evicted)

        await self._call(save, "session_create")
        return session_id, session

    async def load(self, session_id: str) -> Session | None:
        """The live session this cookie names, or None. Last-seen is refreshed in the background.

        Reads are batched: every session asked for in one event-loop tick is read in one pipeline (one
        round trip), and requests of the same session in that tick share its read. A request that starts
        after an org switch returned is in a later tick: it reads the switch."""
        handle = digest_of(session_id)
        raw = await asyncio.shield(self._read(handle))  # shared by this tick's requests of the session
        session = _session(handle, raw)
        if session is None:
            return None
        now = time.time()
        if now - session.created >= self.cfg.absolute_ttl_s:
            return None  # past its absolute end, even if Redis still holds it
        if now - session.last_seen >= self.cfg.touch_interval_s:
            self._touch_later(session, now)
        return session

    def _read(self, handle: str) -> asyncio.Future[Mapping[Any, Any]]:
        fut = self._batch.get(handle)
        if fut is None:
            if not self._batch:
                asyncio.get_running_loop().call_soon(self._flush_soon)
            fut = self._batch[handle] = asyncio.get_running_loop().create_future()
        return fut

    def _flush_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        batch, self._batch = self._batch, {}

        async def read_all(redis: RedisClient) -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                for handle in batch:
                    pipe.hgetall(C.REDIS_SESSION.format(digest=handle))
                return list(await pipe.execute())

        try:
            found = await self._call(read_all, "session_get")
        except asyncio.CancelledError:  # at shutdown: no waiter is left hanging
            for fut in batch.values():
                fut.cancel()
            raise
        except Exception as exc:  # every waiter gets an answer, whatever went wrong
            for fut in batch.values():
                if not fut.done():
                    fut.set_exception(exc)
            return
        for fut, raw in zip(batch.values(), found, strict=True):
            if not fut.done():
                fut.set_result(raw)

    def _touch_later(self, session: Session, now: float) -> None:
        if session.handle in self._touching:
            return
        self._touching.add(session.handle)

        async def touch() -> None:
            try:
                key = C.REDIS_SESSION.format(digest=session.handle)
                await self._call(
                    lambda _r: self._update(keys=[key], args=["last_seen", repr(now), self._ttl(session.created, now)]),
                    "session_touch",
                )
            except AuthUnavailable:
                pass  # the next request tries again
            finally:
                self._touching.discard(session.handle)

        task = asyncio.get_running_loop().create_task(touch())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def switch_org(self, session: Session, org: str) -> bool:
        """Every replica's next request sees it: sessions are read from Redis on each use."""
        key = C.REDIS_SESSION.format(digest=session.handle)
        done = await self._call(lambda _r: self._update(keys=[key], args=["active_org", org, 0]), "session_switch")
        return bool(done)

    async def end(self, session: Session) -> None:
        mine = C.REDIS_USER_SESSIONS.format(user_id=session.user_id)
        await self._call(lambda r: _delete(r, mine, [C.REDIS_SESSION.format(digest=session.handle)]), "session_end")

    async def end_user(self, user_id: str) -> None:
        """Every session of the user ends, in every browser."""
        mine = C.REDIS_USER_SESSIONS.format(user_id=user_id)

        async def end_all(redis: RedisClient) -> None:
            sessions = [k for k in await redis.zrange(mine, 0, -1) if isinstance(k, bytes | str)]
            await _delete(redis, mine, sessions)
            await redis.delete(mine)

        await self._call(end_all, "session_end_all")

    async def of_user(self, user_id: str) -> list[Session]:
        """The user's live sessions, newest first."""
        mine = C.REDIS_USER_SESSIONS.format(user_id=user_id)

        async def read(redis: RedisClient) -> list[tuple[str, Mapping[Any, Any]]]:
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in await redis.zrevrange(mine, 0, -1)]
            async with redis.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.hgetall(k)
                found = await pipe.execute()
            return list(zip(keys, found, strict=True))

        now = time.time()
        sessions = [_session(k.rpartition(":")[2], raw) for k, raw in await self._call(read, "session_list")]
        return [s for s in sessions if s is not None and now - s.created < self.cfg.absolute_ttl_s]

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)


async def _delete(redis: RedisClient, mine: str, keys: list[Any]) -> None:
    if not keys:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:  # one DEL each: sessions live in different Cluster slots
            pipe.delete(key)
        pipe.zrem(mine, *keys)
        await pipe.execute()


def _session(handle: str, raw: Mapping[Any, Any]) -> Session | None:
    if not raw:
        return None
    d = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()
    }
    try:
        return Session(
            handle=handle,
            user_id=d["user_id"],
            key_id=d.get("key_id") or None,
            csrf=d["csrf"],
            active_org=d.get("active_org") or None,
            created=float(d["created"]),
            last_seen=float(d["last_seen"]),
            agent=d.get("agent", ""),
            address=d.get("address", ""),
            orgs=None if d["orgs"] == "*" else tuple(o for o in d["orgs"].split(",") if o),
            role_cap=d.get("role_cap") or None,
        )
    except (KeyError, ValueError):
        log.error("ignoring a malformed session in Redis")
        return None
