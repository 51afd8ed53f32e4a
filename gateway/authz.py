"""From a parsed key to an identity: find the key through the cache tiers, then decide what it may do."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import NoReturn, Protocol

from gateway import constants as C
from gateway._answer import header_block
from gateway._breaker import BreakerOpen
from gateway.backends import REDIS_UNAVAILABLE, StoreUnavailable
from gateway.cache import Entry, LocalCache, RedisCache
from gateway.config import RolesConfig
from gateway.errors import (
    AuthUnavailable,
    ExpiredApiKey,
    GatewayError,
    InsufficientPermissions,
    InvalidApiKey,
    IpNotAllowed,
    OrgNotAllowed,
    OrgRequired,
    ProjectNotAllowed,
    RevokedApiKey,
)
from gateway.keys import ParsedKey, SecretHasher, VerifierBusy, digest
from gateway.metrics import Metrics
from gateway.models import IDENTITY_HEADERS, IP, Identity, KeyRecord
from gateway.policy import RouteDecision
from gateway.store import Store

log = logging.getLogger("gateway.authz")


# --- permissions -------------------------------------------------------------------------------


def pattern_matches(pattern: str, permission: str) -> bool:
    """`*` alone matches everything; otherwise `*` matches one whole segment."""
    if pattern == "*":
        return True
    p, q = pattern.split(":"), permission.split(":")
    return len(p) == len(q) and all(a in ("*", b) for a, b in zip(p, q, strict=True))


def _meet(a: str, b: str) -> str | None:
    """The pattern granting exactly what both grant, if any."""
    if a == "*":
        return b
    if b == "*":
        return a
    p, q = a.split(":"), b.split(":")
    if len(p) != len(q):
        return None
    out = []
    for x, y in zip(p, q, strict=True):
        if x == "*":
            out.append(y)
        elif y in ("*", x):
            out.append(x)
        else:
            return None
    return ":".join(out)


def effective_permissions(role_patterns: tuple[str, ...], scopes: tuple[str, ...] | None) -> tuple[str, ...]:
    if scopes is None:
        return tuple(sorted(set(role_patterns)))
    met = {m for r in role_patterns for s in scopes if (m := _meet(r, s)) is not None}
    # Drop patterns another one already covers, so X-Scopes stays short and exact.
    kept = {m for m in met if not any(o != m and pattern_matches(o, m) for o in met)}
    return tuple(sorted(kept))


def granted(patterns: tuple[str, ...], permission: str) -> bool:
    return any(pattern_matches(p, permission) for p in patterns)


# --- identity ----------------------------------------------------------------------------------


def active_org(record: KeyRecord, requested: str | None) -> str:
    def in_scope(org: str) -> bool:
        return record.all_orgs or org in record.org_ids

    if requested is not None:
        if not in_scope(requested) or requested not in record.memberships:
            raise OrgNotAllowed("the key may not act in this org")
        return requested
    if not record.all_orgs and len(record.org_ids) == 1:
        org = record.org_ids[0]
    elif len(record.memberships) == 1:
        org = next(iter(record.memberships))
        if not in_scope(org):
            raise OrgNotAllowed("the key may not act in this org")
    else:
        raise OrgRequired("this key can act in several orgs: name one with X-Org-Id")
    if org not in record.memberships:
        raise OrgNotAllowed("the key's owner is not a member of this org")
    return org


def acting_org(record: KeyRecord, decision: RouteDecision, roles: RolesConfig) -> str | None:
    """The org this request of the key acts in, if the key can act there at all (else None: a denial
    for another org's route is not that org's business, nor shown in its audit)."""
    try:
        org = active_org(record, decision.org)
    except GatewayError:
        return None
    return org if role_in(record, org, roles) is not None else None


def check_state(record: KeyRecord, client_ip: IP | None, now: float) -> None:
    """Revoked, expired, or used from outside its allowlist: the key is refused whatever the route."""
    if record.revoked_at is not None and record.revoked_at <= now:
        raise RevokedApiKey("this key was revoked")
    if record.expires_at is not None and record.expires_at <= now:
        raise ExpiredApiKey("this key has expired")
    networks = record.networks()
    if networks is not None and (client_ip is None or not any(client_ip in n for n in networks)):
        raise IpNotAllowed("the client address is not in this key's allowlist")


def role_in(record: KeyRecord, org: str, roles: RolesConfig) -> str | None:
    """The key's effective role in `org`: the lower of its own and its owner's; None if it cannot act there."""
    member = record.memberships.get(org)
    if member is None or not (record.all_orgs or org in record.org_ids):
        return None
    if record.role not in roles.order or member not in roles.order:
        return None
    return roles.lower(record.role, member)


def authorize(
    record: KeyRecord, decision: RouteDecision, client_ip: IP | None, roles: RolesConfig, now: float
) -> Identity:
    """Check the key's state and what the route requires. Raises the contract's errors."""
    check_state(record, client_ip, now)
    org = active_org(record, decision.org)
    identity = record.identity(org, decision.project)
    if identity is None:
        identity = _identity(record, org, decision.project, roles)
        record.remember_identity(org, decision.project, identity)
    if decision.project is not None and not (record.all_projects or decision.project in record.project_ids):
        raise ProjectNotAllowed("the key may not act in this project")
    if decision.permission is not None and not granted(identity.scopes, decision.permission):
        raise InsufficientPermissions(f"requires {decision.permission}")
    if decision.role is not None and roles.rank(identity.role) < roles.rank(decision.role):
        raise InsufficientPermissions(f"requires role {decision.role}")
    return identity


def _identity(record: KeyRecord, org: str, project: str | None, roles: RolesConfig) -> Identity:
    """The key acting in `org` (and `project`): its effective role and permissions, and the identity
    headers it is answered with. Depends on the record and the roles config only, so a cached record
    keeps it (see `KeyRecord.identity`) until the key is invalidated."""
    member_role = record.memberships[org]
    if record.role not in roles.order or member_role not in roles.order:
        raise InsufficientPermissions("a role this gateway does not know grants nothing")
    role = roles.lower(record.role, member_role)
    scopes = effective_permissions(roles.permissions[role], record.scopes)
    return Identity(
        key_id=record.id,
        user_id=record.user_id,
        org=org,
        role=role,
        scopes=scopes,
        env=record.env,
        project=project,
        expires_at=record.expires_at,
        rate_limit=record.rate_limit,
        head=header_block(
            zip(
                IDENTITY_HEADERS,
                (org, role, record.user_id, record.id, ",".join(scopes), project or "", record.env, record.method),
                strict=True,
            )
        ),
    )


# --- projects ----------------------------------------------------------------------------------


class ProjectDirectory:
    """Which org a project belongs to. A project never moves, so answers are kept (bounded LRU);
    an unknown project is not remembered, so a project created later is found."""

    def __init__(self, store: Store, max_entries: int) -> None:
        self.store = store
        self.max_entries = max_entries
        self._orgs: OrderedDict[str, str] = OrderedDict()

    async def org_of(self, project_id: str) -> str | None:
        org = self._orgs.get(project_id)
        if org is not None:
            self._orgs.move_to_end(project_id)
            return org
        try:
            org = await self.store.project_org(project_id)
        except StoreUnavailable:
            raise AuthUnavailable("the key store is unreachable") from None
        if org is not None:
            self._orgs[project_id] = org
            if len(self._orgs) > self.max_entries:
                self._orgs.popitem(last=False)
        return org


async def check_project(identity: Identity, projects: ProjectDirectory) -> None:
    """A project named by the route must belong to the active org."""
    if identity.project is not None and await projects.org_of(identity.project) != identity.org:
        raise ProjectNotAllowed("the project is not in the active org")


# --- key resolution ----------------------------------------------------------------------------


class Checkpoints(Protocol):
    """Where a load asks before its costly steps (see `gateway.verifier.Verifier`); each may raise."""

    async def before_lookup(self, address: str | None) -> None: ...

    async def before_argon2(self, key_id: str, address: str | None) -> None: ...

    async def verified(self, key_id: str, address: str | None) -> None: ...


class KeyResolver:
    """Finds a key's record: in-process cache, then Redis, then Postgres plus argon2.

    Concurrent misses for the same key share one load (and so one argon2 computation). A key held in
    the in-process cache past its fresh time is answered from it at once while one background load per
    key revalidates it (stale-while-revalidate), within the same bound as stale-if-error: no answer
    waits on a backend for a key this process already holds. Revocations still apply at once: they
    arrive by NOTIFY, drop the entry and detach loads under way; expiry is checked on every request.

    What the brute-force budgets allow is not decided here: the resolver only calls its `checkpoints`
    (the Verifier) at the two costly moments of a load, before a Postgres lookup of a key nothing is
    known of, and before an argon2 run, and tells them of a verified secret.
    """

    def __init__(
        self,
        pepper: bytes,
        hasher: SecretHasher,
        store: Store,
        local: LocalCache,
        redis: RedisCache | None,
        redis_ttl_s: float,
        stale_if_error_s: float,
        metrics: Metrics,
        checkpoints: Checkpoints | None = None,
    ) -> None:
        self.pepper = pepper
        self.hasher = hasher
        self.store = store
        self.local = local
        self.redis = redis
        self.redis_ttl_s = redis_ttl_s
        self.stale_if_error_s = stale_if_error_s
        self.metrics = metrics
        self.checkpoints = checkpoints
        # Loads under way, by digest, with their key id: an invalidation detaches them, so a request
        # that arrives after it never joins a load that read the key before it.
        self._inflight: dict[str, tuple[str, asyncio.Future[KeyRecord]]] = {}
        # Keys whose Redis invalidation failed: retried until it lands, never read from Redis meanwhile.
        self.pending_invalidations: set[str] = set()
        self.last_used: dict[str, float] = {}

    async def resolve(self, key: ParsedKey, client: IP | None = None) -> KeyRecord:
        """The key's record. `client` is who asks (for the brute-force budgets of a lookup)."""
        d = digest(self.pepper, key.raw)
        negative = self.local.get_negative(d)
        if negative is not None:
            self.metrics.cache.inc("local_negative")
            raise InvalidApiKey(unknown_key=negative == C.NEGATIVE_UNKNOWN_KEY)
        entry = self.local.get(d)
        if entry is not None and self.local.fresh(entry):
            self.metrics.cache.inc("local")
            record = entry.record
        elif entry is not None and self._within_stale_limit(entry):
            self.metrics.cache.inc("local_stale")
            self._revalidate(key, d, entry)
            record = entry.record
        else:
            address = str(client) if client is not None else None  # only a miss needs it as text
            record = await self._single_flight(key, d, lambda: self._load(key, d, entry, address))
        self.last_used[record.id] = time.time()
        return record

    def _within_stale_limit(self, entry: Entry) -> bool:
        return time.time() - entry.loaded_at < self.redis_ttl_s + self.stale_if_error_s

    def _revalidate(self, key: ParsedKey, d: str, entry: Entry) -> None:
        """One background load per key; its outcome lands in the cache for the next request."""
        if d in self._inflight or time.monotonic() < entry.revalidate_after:
            return
        fut = self._start(key, d, lambda: self._load(key, d, entry, None))

        def done(f: asyncio.Future[KeyRecord]) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            if isinstance(exc, InvalidApiKey):
                self.local.drop(d)  # the key is gone, or its secret changed
            elif exc is not None and not isinstance(exc, GatewayError):  # an outage or a refusal is no bug
                log.error("background revalidation failed", exc_info=exc)

        fut.add_done_callback(done)

    def _start(self, key: ParsedKey, d: str, load: Callable[[], Awaitable[KeyRecord]]) -> asyncio.Future[KeyRecord]:
        found = self._inflight.get(d)
        if found is not None:
            return found[1]
        fut = asyncio.ensure_future(load())
        self._inflight[d] = (key.key_id, fut)

        def done(f: asyncio.Future[KeyRecord]) -> None:
            current = self._inflight.get(d)
            if current is not None and current[1] is f:
                del self._inflight[d]

        fut.add_done_callback(done)
        return fut

    async def _single_flight(self, key: ParsedKey, d: str, load: Callable[[], Awaitable[KeyRecord]]) -> KeyRecord:
        return await asyncio.shield(self._start(key, d, load))

    async def close(self) -> None:
        """Stop background revalidations (at shutdown, before the stores close)."""
        futures = [fut for _, fut in self._inflight.values()]
        for fut in futures:
            fut.cancel()
        if futures:
            await asyncio.wait(futures)

    async def _redis_lookup(self, key: ParsedKey, d: str, epoch: int) -> tuple[Entry | None, str | None]:
        """(usable Redis entry, generation to fill with); raises InvalidApiKey on a negative hit."""
        if self.redis is None or key.key_id in self.pending_invalidations:
            return None, None
        try:
            found = await self.redis.lookup(key.key_id, d)
        except REDIS_UNAVAILABLE as exc:
            self._redis_failed(exc)
            return None, None
        if found.negative is not None:
            self.metrics.cache.inc("redis_negative")
            self.local.put_negative(d, found.negative, epoch)
            raise InvalidApiKey(unknown_key=found.negative == C.NEGATIVE_UNKNOWN_KEY)
        return found.entry, found.generation

    async def _load(self, key: ParsedKey, d: str, local_entry: Entry | None, address: str | None) -> KeyRecord:
        epoch = self.local.epoch
        redis_entry, generation = await self._redis_lookup(key, d, epoch)
        if (
            redis_entry is not None
            and time.time() - redis_entry.loaded_at < self.redis_ttl_s
            and self.local.listening
            and self.local.shared_trusts(redis_entry)
        ):
            self.metrics.cache.inc("redis")
            self.local.put(d, redis_entry, epoch)
            return redis_entry.record
        self.metrics.cache.inc("miss")
        # Taken before the read: a record counts as read no later than this (see LocalCache.trusts).
        read_at = time.time()
        if self.checkpoints is not None and local_entry is None and redis_entry is None:
            await self.checkpoints.before_lookup(address)  # nothing known of this key: the costly path
        try:
            loaded, from_replica = await self.store.load_key_from(key.key_id)
        except StoreUnavailable:  # a failed call is counted by the store's breaker; a skipped one is not a failure
            return self._stale(local_entry, redis_entry)
        if loaded is None:
            await self._remember_invalid(key, d, generation, epoch, C.NEGATIVE_UNKNOWN_KEY)
            raise InvalidApiKey(unknown_key=True)
        record, secret_hash = loaded
        known = [e for e in (local_entry, redis_entry) if e is not None]
        # A digest already verified against this very hash needs no new argon2 run.
        fingerprint_known = any(e.record.hash_fingerprint == record.hash_fingerprint for e in known)
        if not fingerprint_known and not await self._argon2(key, secret_hash, address):
            await self._remember_invalid(key, d, generation, epoch, C.NEGATIVE_WRONG_SECRET)
            raise InvalidApiKey()
        entry = Entry(record, read_at)
        self.local.put(d, entry, epoch)
        if self.redis is not None and generation is not None and not from_replica:
            try:
                await self.redis.put(d, entry, generation)
            except REDIS_UNAVAILABLE as exc:
                self._redis_failed(exc)
        return record

    async def _argon2(self, key: ParsedKey, secret_hash: str, address: str | None) -> bool:
        """Verify the secret, within the brute-force budgets and the hasher's bound."""
        if self.hasher.saturated:
            self._busy()  # before any budget is charged for a run that cannot start
        if self.checkpoints is not None:
            await self.checkpoints.before_argon2(key.key_id, address)
        try:
            verified = await self.hasher.verify(secret_hash, key.secret)
        except VerifierBusy:
            self._busy()
        self.metrics.argon2.inc()
        if verified and self.checkpoints is not None:
            await self.checkpoints.verified(key.key_id, address)
        return verified

    def _busy(self) -> NoReturn:
        """Every argon2 thread and queue slot is taken: the gateway cannot decide now (never a 401)."""
        self.metrics.argon2_busy.inc()
        raise AuthUnavailable(
            "too many keys are being verified at once; retry shortly",
            headers={"Retry-After": str(C.VERIFY_BUSY_RETRY_AFTER_S)},
        )

    def _redis_failed(self, exc: BaseException) -> None:
        """Fall back (the breaker has counted the failure, if it was one)."""
        if not isinstance(exc, BreakerOpen):
            log.debug("redis call failed: %s", exc.__class__.__name__)

    def _stale(self, local_entry: Entry | None, redis_entry: Entry | None) -> KeyRecord:
        limit = self.redis_ttl_s + self.stale_if_error_s
        if redis_entry is not None and self.local.maybe_invalidated(redis_entry):
            redis_entry = None  # Redis may have lost its invalidation: never served, stale or not
        usable = [e for e in (local_entry, redis_entry) if e is not None and time.time() - e.loaded_at < limit]
        if not usable:
            raise AuthUnavailable("the key store is unreachable")
        self.metrics.cache.inc("stale")
        if local_entry is not None:
            # Served stale: ask the store again only after the breaker's cooldown.
            local_entry.revalidate_after = time.monotonic() + C.BREAKER_COOLDOWN_S
        return max(usable, key=lambda e: e.loaded_at).record

    async def _remember_invalid(self, key: ParsedKey, d: str, generation: str | None, epoch: int, why: str) -> None:
        self.local.put_negative(d, why, epoch)
        if self.redis is not None and generation is not None:
            try:
                await self.redis.put_negative(key.key_id, d, why)
            except REDIS_UNAVAILABLE as exc:
                self._redis_failed(exc)

    async def invalidate(self, key_ids: list[str]) -> None:
        """Drop the keys here and in Redis (every process does the Redis part too: it is idempotent,
        and covers an admin that could not reach Redis)."""
        self.local.invalidate(key_ids)
        doomed = set(key_ids)
        for d in [d for d, (key_id, _) in self._inflight.items() if key_id in doomed]:
            del self._inflight[d]  # its waiters get what it read; new requests start a new load
        self.pending_invalidations.update(key_ids)
        await self.retry_invalidations()

    async def retry_invalidations(self) -> None:
        if self.redis is None or not self.pending_invalidations:
            return
        batch = sorted(self.pending_invalidations)
        try:
            await self.redis.invalidate(batch)
        except REDIS_UNAVAILABLE as exc:
            self._redis_failed(exc)
            return
        self.pending_invalidations.difference_update(batch)

    async def flush_last_used(self) -> None:
        if not self.last_used:
            return
        batch, self.last_used = self.last_used, {}
        try:
            await self.store.touch_last_used(batch)
        except StoreUnavailable:
            for k, t in batch.items():  # keep them for the next flush
                self.last_used[k] = max(t, self.last_used.get(k, 0.0))
