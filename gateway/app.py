"""The application factory: builds every object explicitly and ties their lifetimes to the app."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import constants as C
from gateway._answer import Answer, error_response, unexpected
from gateway._breaker import CLOSED, OPEN, Breaker
from gateway.api import api_app
from gateway.audit import AUDIT_LOG, AuditLog, FailureAuditor, UsageAuditor
from gateway.authz import KeyResolver, ProjectDirectory
from gateway.backends import OUTAGES, StoreUnavailable, outage
from gateway.cache import LocalCache, RedisCache
from gateway.config import Config
from gateway.data.db import Database, connect_pool
from gateway.directory import DIRECTORY, Directory
from gateway.errors import AuthUnavailable, GatewayError
from gateway.forward import ENDPOINTS, ENVOY_PREFIX, ForwardAuth
from gateway.fresh import FreshMap
from gateway.grants import GRANTS, TokenService
from gateway.health import Lifecycle, backend_checks, watch_backends
from gateway.invitations import INVITATIONS, Invitations
from gateway.keyring import KEYRING, Keyring
from gateway.keys import KeyFormat, SecretHasher, redact
from gateway.keys_verify import keys_verify
from gateway.listener import Change, InvalidationListener, supervise
from gateway.logs import RequestIds
from gateway.metrics import Metrics
from gateway.models import KeyRecord
from gateway.openapi import openapi
from gateway.policy import HeaderOrgPolicy, Policy, ReloadablePolicy
from gateway.ratelimit import BruteForceGuard, Limits, RateLimiter
from gateway.redis_client import RedisClient, connect_redis
from gateway.session_api import add_public_routes as add_token_routes
from gateway.sessions import SessionStore
from gateway.signing import SigningKeys
from gateway.store import Store
from gateway.tokens import AccessTokens
from gateway.tracing import TRACING, make_tracing
from gateway.typedefs import (
    AUDITOR,
    CONFIG,
    FORWARD,
    HASHER,
    KEY_FORMAT,
    LIFECYCLE,
    LIMITER,
    LIMITS,
    LISTENER,
    METRICS,
    POLICY,
    PROJECTS,
    REDIS,
    REDIS_BREAKER,
    REQUEST_IDS,
    RESOLVER,
    SESSIONS,
    SIGNING,
    STORE,
    TRUSTED,
    USAGE,
    VERIFIER,
    Network,
)
from gateway.ui import add_routes as add_ui_routes
from gateway.verifier import Memberships, Verifier

log = logging.getLogger("gateway.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def redis_client(cfg: Config) -> RedisClient:
    return connect_redis(cfg.redis)


def _breaker(name: str, metrics: Metrics) -> Breaker:
    down = False  # one line when the store goes, one when it is back; failed probes in between are quiet

    def changed(backend: str, state: str) -> None:
        nonlocal down
        metrics.backend_up.labels(backend).set(1 if state == CLOSED else 0)
        metrics.breaker_transitions.labels(backend, state).inc()
        if state == CLOSED and down:
            down = False
            log.warning("%s is reachable again", backend)
        elif state == OPEN and not down:
            down = True
            log.warning("%s unavailable: calls skipped, one probe every %.1f s", backend, C.BREAKER_COOLDOWN_S)

    def failed(backend: str) -> None:
        metrics.backend_errors.labels(backend).inc()

    metrics.backend_up.labels(name).set(1)
    return Breaker(name, on_change=changed, on_failure=failed, on_latency=_timings(metrics))


def _timings(metrics: Metrics) -> Callable[[str, str, float], None]:
    latency = metrics.backend_latency

    def timed(backend: str, op: str, seconds: float) -> None:
        latency.observe((backend, op), seconds)

    return timed


async def _hasher_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    threads = cfg.keys.verify_threads.per_process(cfg.server.workers, cfg.keys.argon2.parallelism)
    app[HASHER] = SecretHasher(cfg.keys.argon2, threads, cfg.keys.verify_queue)
    app[METRICS].argon2_threads.set(threads)
    yield
    app[HASHER].close()


async def _stores_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    pool = await connect_pool(cfg.database)
    timeout_s = cfg.database.timeout_ms / 1000
    replica = None
    if cfg.database.replica_url.get():
        # No connection at start-up (min_size 0): a replica that is down is an outage of the replica only,
        # and every read goes to the primary meanwhile.
        replica_cfg = dataclasses.replace(cfg.database, url=cfg.database.replica_url, pool_min=0, connect_retries=1)
        replica_pool = await connect_pool(replica_cfg)
        replica = Database(replica_pool, timeout_s, breaker=_breaker("postgres_replica", app[METRICS]))
    app[STORE] = Store(pool, timeout_s, _breaker("postgres", app[METRICS]), replica=replica)
    app[REDIS] = redis_client(cfg)
    app[REDIS_BREAKER] = _breaker("redis", app[METRICS])
    yield
    await app[REDIS].aclose()
    await app[STORE].close()


async def _resolver_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg, metrics = app[CONFIG], app[METRICS]
    breaker = app[REDIS_BREAKER]
    local = LocalCache(cfg.cache.local_max_entries, cfg.cache.local_ttl_s, cfg.cache.negative_ttl_s)
    shared = RedisCache(
        app[REDIS], cfg.cache.redis_ttl_s, cfg.cache.negative_ttl_s, cfg.cache.stale_if_error_s, breaker
    )
    limiter = (
        RateLimiter(app[REDIS], metrics, breaker, pipeline=cfg.rate_limits.pipeline)
        if cfg.rate_limits.enabled
        else None
    )
    app[LIMITER] = limiter
    guard = BruteForceGuard(limiter, app[LIMITS], app[REDIS], metrics) if limiter is not None else None
    resolver = KeyResolver(
        cfg.pepper.get().encode(),
        app[HASHER],
        app[STORE],
        local,
        shared,
        cfg.cache.redis_ttl_s,
        cfg.cache.stale_if_error_s,
        metrics,
    )
    app[RESOLVER] = resolver
    # Its own breaker only times its calls: a management call reports an outage itself (503), and never
    # takes a probe turn from the hot path's breaker.
    timed = Breaker("postgres", on_latency=_timings(app[METRICS]))
    db = Database(app[STORE].pool, cfg.database.management_timeout_ms / 1000, breaker=timed)
    app[KEYRING] = Keyring(db, app[KEY_FORMAT], app[HASHER], cfg.roles)
    app[DIRECTORY] = Directory(db, cfg.roles)
    app[AUDIT_LOG] = AuditLog(db)
    app[INVITATIONS] = Invitations(app[DIRECTORY])
    app[PROJECTS] = ProjectDirectory(app[STORE], cfg.cache.local_max_entries)
    store, pepper = app[STORE], cfg.pepper.get().encode()
    fresh = (cfg.cache.local_ttl_s, cfg.cache.stale_if_error_s, cfg.cache.local_max_entries)
    members: Memberships = FreshMap(local, store.memberships, *fresh)
    families: FreshMap[bool] = FreshMap(local, store.revoked_families, *fresh)
    key_records: FreshMap[KeyRecord | None] = FreshMap(local, store.key_records, *fresh)
    signing = SigningKeys(db, cfg.tokens)
    await signing.load()
    app[SIGNING] = signing
    access = AccessTokens(signing, cfg.tokens, pepper, families)

    def revoked(family_ids: list[str]) -> None:  # by this process: applied here at once, elsewhere by NOTIFY
        families.invalidate(family_ids)  # a read begun before the revocation must not land over it
        for family in family_ids:
            families.put(family, True)

    app[GRANTS] = TokenService(db, signing, cfg.tokens, pepper, cfg.keys.prefix, revoked)
    app[SESSIONS] = SessionStore(app[REDIS], breaker, cfg.sessions)
    app[VERIFIER] = Verifier(
        app[KEY_FORMAT],
        resolver,
        app[PROJECTS],
        store,
        limiter,
        app[LIMITS],
        cfg.roles,
        metrics,
        guard,
        members,
        access,
        key_records,
    )
    app[AUDITOR] = FailureAuditor(app[STORE], cfg.audit.failed_max_per_flush, metrics)
    app[USAGE] = UsageAuditor(app[STORE], metrics)
    app[FORWARD] = ForwardAuth(
        cfg,
        app[KEY_FORMAT],
        app[POLICY],
        app[VERIFIER],
        app[AUDITOR],
        metrics,
        app[TRUSTED],
        app[LIFECYCLE],
        app[SESSIONS],
        app[USAGE],
        app[REQUEST_IDS],
        app[TRACING],
    )

    async def on_keys(key_ids: list[str]) -> None:
        metrics.invalidations.inc(len(key_ids))
        key_records.invalidate(key_ids)
        await resolver.invalidate(key_ids)

    async def on_change(change: Change) -> None:
        members.invalidate(change.users)
        revoked(list(change.families))  # only a revocation is announced
        if change.signing_keys:
            await _reload_signing_keys(signing)

    listener = InvalidationListener(
        cfg.database.url.get(),
        local,
        on_keys,
        cfg.database.timeout_ms / 1000,
        on_change=on_change,
        on_position=app[STORE].advance if app[STORE].replica is not None else None,
    )
    app[LISTENER] = listener
    tasks = [
        asyncio.create_task(supervise("invalidation listener", listener.run)),
        asyncio.create_task(supervise("signing keys", lambda: _reload_signing_keys_forever(signing))),
        asyncio.create_task(supervise("flusher", lambda: _flush_forever(app))),
        asyncio.create_task(
            supervise("health", lambda: watch_backends(app[STORE], app[REDIS], breaker, C.HEALTH_INTERVAL_S))
        ),
    ]
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await resolver.close()
    await app[SESSIONS].close()
    await _flush_once(app)
    await app[USAGE].flush(final=True)


async def _reload_signing_keys(signing: SigningKeys) -> None:
    try:
        await signing.load()
    except StoreUnavailable:  # the keys held stay in use; the next notification or period tries again
        log.warning("re-reading the signing keys failed: Postgres unavailable")


async def _reload_signing_keys_forever(signing: SigningKeys) -> None:
    """A backstop for notifications lost while the LISTEN connection was down (a previous key retiring)."""
    while True:
        await asyncio.sleep(C.SIGNING_KEYS_RELOAD_S)
        await _reload_signing_keys(signing)


async def _flush_once(app: web.Application) -> None:
    await app[RESOLVER].retry_invalidations()
    await app[RESOLVER].flush_last_used()
    await app[AUDITOR].flush()
    await app[USAGE].flush()
    app[METRICS].local_entries.set(len(app[RESOLVER].local))
    app[METRICS].listener_up.set(1 if app[LISTENER].connected else 0)


async def _flush_forever(app: web.Application) -> None:
    cfg = app[CONFIG]
    interval = min(cfg.last_used_flush_s, cfg.audit.flush_interval_s)
    while True:
        await asyncio.sleep(interval)
        try:
            await _flush_once(app)
        except Exception:  # a background flusher must never die
            log.exception("background flush failed")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map errors to the contract's JSON: a store's outage that escaped its mapping is 503
    auth_unavailable; anything else unexpected is a bug, 500 internal_error with the request id it was
    logged under (never a traceback to the client, never disguised as an outage). Every answer says
    the request's id (`X-Request-Id`), which every line logged for the request carries too."""
    app = request.app
    peer = request.remote
    trusted = peer is not None and _is_trusted(peer, app[TRUSTED])
    rid = app[REQUEST_IDS].begin(request.headers.get(hdrs.X_REQUEST_ID), trusted)
    started = time.perf_counter()
    response = await _answered(request, handler)
    if isinstance(response, Answer):  # a proxy's call, answered by ForwardAuth (its id is in its head)
        return response
    response.headers[hdrs.X_REQUEST_ID] = rid
    # By route template (`/v1/keys/{key_id}`), never the path itself: a bounded set of series.
    route = request.match_info.route.resource
    template = route.canonical if route is not None else "unmatched"
    metrics = app[METRICS]
    metrics.http_latency.observe((request.method, template), time.perf_counter() - started)
    metrics.http_answers.inc(request.method, template, str(response.status))
    return response


def _is_trusted(peer: str, trusted: tuple[Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in net for net in trusted)


async def _answered(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status >= 400:
            code = {404: "not_found", 405: "method_not_allowed", 413: "invalid_request"}.get(
                exc.status, "invalid_request"
            )
            return web.json_response(
                {"error": {"code": code, "message": exc.reason}}, status=exc.status, headers={"X-Auth-Error": code}
            )
        raise
    except ConnectionResetError:
        transport = request.transport
        if transport is None or transport.is_closing():
            # The client left (mid-body, say): nobody is left to answer, and it is not an error of ours.
            # The access log shows nginx's 499 "client closed request"; the write goes nowhere.
            return web.Response(status=CLIENT_CLOSED_REQUEST)
        log.warning("connection reset on %s %s: answered 503", request.method, redact(request.path))
        return error_response(AuthUnavailable())  # a store's connection, reset under us: an outage
    except OUTAGES as exc:
        if not outage(exc):
            return error_response(unexpected(request))
        log.warning("%s on %s %s: answered 503", type(exc).__name__, request.method, redact(request.path))
        return error_response(AuthUnavailable())
    except Exception:
        return error_response(unexpected(request))


CLIENT_CLOSED_REQUEST = 499


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 while the process can decide; 503 while starting or draining. The stores' state is
    reported in the body only: a shared outage must not take every replica out of service."""
    lifecycle = request.app[LIFECYCLE]
    status = "draining" if lifecycle.draining else "ready" if lifecycle.ready else "starting"
    checks = backend_checks(request.app[STORE], request.app[REDIS_BREAKER])
    checks["invalidations"] = "ok" if request.app[LISTENER].connected else "unavailable"
    return web.json_response({"status": status, "checks": checks}, status=200 if status == "ready" else 503)


async def openapi_handler(_request: web.Request) -> web.Response:
    return web.json_response(openapi())


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_app(gateway: web.Application) -> web.Application:
    """`/metrics` alone, for `metrics.port`: the gateway's own registry, served apart from the public port."""
    app = web.Application()
    app[METRICS] = gateway[METRICS]
    app.router.add_get("/metrics", metrics_handler)
    return app


async def _sighup_ctx(app: web.Application) -> AsyncIterator[None]:
    """SIGHUP reloads the route policy; a bad new policy is logged and the old one kept."""
    policy = app[POLICY]
    loop = asyncio.get_running_loop()
    installed = False
    if isinstance(policy, ReloadablePolicy) and threading.current_thread() is threading.main_thread():
        loop.add_signal_handler(signal.SIGHUP, policy.reload)
        installed = True
    yield
    if installed:
        loop.remove_signal_handler(signal.SIGHUP)


def make_policy(cfg: Config) -> Policy:
    """The configured route policy (raises ConfigError naming the bad rule)."""
    return ReloadablePolicy(cfg.policy_file, cfg.roles) if cfg.policy_file else HeaderOrgPolicy()


async def _lifecycle_ctx(app: web.Application) -> AsyncIterator[None]:
    """Last of the start-up steps: once it runs, the process can decide."""
    app[LIFECYCLE].ready = True
    yield
    app[LIFECYCLE].ready = False


def _forward(endpoint: str) -> Handler:
    """A route to one `/auth/` endpoint (`gateway serve` answers these before routing; see `_server`)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await request.app[FORWARD].handle(request, endpoint)

    return handle


def create_app(cfg: Config, policy: Policy | None = None) -> web.Application:
    tracing = make_tracing(cfg.tracing)
    middlewares: list[Middleware] = [errors_middleware]
    if tracing is not None:
        middlewares.insert(0, tracing.middleware())
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024)
    app[TRACING] = tracing
    app[CONFIG] = cfg
    app[LIFECYCLE] = Lifecycle()
    app[KEY_FORMAT] = KeyFormat(cfg.keys.prefix)
    app[METRICS] = Metrics()
    app[POLICY] = policy or make_policy(cfg)
    app[TRUSTED] = cfg.trusted_networks()
    app[LIMITS] = Limits.from_config(cfg.rate_limits)
    app[REQUEST_IDS] = RequestIds()
    app.cleanup_ctx.extend([_hasher_ctx, _stores_ctx, _resolver_ctx, _sighup_ctx, _lifecycle_ctx])
    if tracing is not None:
        app.cleanup_ctx.insert(0, tracing.ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if not cfg.metrics.port:  # else only on its own port: see `metrics_app`
        app.router.add_get("/metrics", metrics_handler)
    for endpoint in ENDPOINTS:
        app.router.add_route("*", f"/auth/{endpoint}", _forward(endpoint))
    # Envoy appends the original path to its path_prefix.
    app.router.add_route("*", ENVOY_PREFIX + "/{tail:.*}", _forward("envoy"))
    app.router.add_post("/v1/keys/verify", keys_verify)
    app.router.add_get("/v1/openapi.json", openapi_handler)
    add_ui_routes(app)
    add_token_routes(app)
    app.add_subapp("/v1/", api_app())
    return app
