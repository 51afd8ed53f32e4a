"""Rate limiting with GCRA (the generic cell rate algorithm) in Redis.

GCRA keeps one number per limited thing, the theoretical arrival time (TAT) of the next request: a
request is admitted when `TAT + interval - tolerance <= now`, and then moves TAT by one interval. It is
exact (no window edges), needs one key and one atomic script call per limit, and its state expires by
itself once idle. The script reads the clock from Redis, so replicas with skewed clocks still share one
timeline. The limits of one request are sent as one pipeline: one round trip; with `pipeline: true`,
the decisions of every request in one event-loop tick share a single round trip.

A call may take several tokens at once (`cost`): as many as are free, up to the cost. A process spends
them itself (leases, see `gateway.leases`), so a hot key costs a Redis call per lease, not per request;
a limit with `exact: true` takes one token per request, as always.

When Redis is slow or down, each limit follows its `on_redis_error` policy: `local` (the same algorithm,
in this process), `open` (admit) or `closed` (refuse with 503: an outage is never reported as a verdict).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

from gateway import constants as C
from gateway._breaker import Breaker, BreakerOpen, guarded
from gateway.backends import REDIS_ERRORS, REDIS_UNAVAILABLE
from gateway.config import LimitConfig, RateLimitsConfig, rate_of
from gateway.errors import AuthUnavailable, InvalidRequest, RateLimited
from gateway.leases import Lease, Leases, max_lease
from gateway.metrics import Metrics
from gateway.redis_client import RedisClient, is_cluster

log = logging.getLogger("gateway.ratelimit")

# KEYS[1]: the TAT key. ARGV: interval (µs), tolerance (µs), cost (the most tokens to take), peek (1: decide,
# do not record). Takes as many tokens as are free, up to cost. Returns {tokens taken (0: refused),
# remaining, reset µs (until fully refilled), retry µs (until one token would be free)}.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local take = math.min(cost, math.floor((now + tolerance - tat) / interval))
if take < 1 then
  return {0, 0, string.format('%.0f', tat - now), string.format('%.0f', tat + interval - tolerance - now)}
end
local new_tat = tat + interval * take
if ARGV[4] ~= '1' then
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
end
return {take, math.floor((tolerance - (new_tat - now)) / interval), string.format('%.0f', new_tat - now), '0'}
"""


def parse_rate(text: str, what: str = "rate_limit") -> tuple[int, int]:
    """`100/1m`, `10/s`, `5000/1h` -> (count, period in ms)."""
    rate = rate_of(text)
    if rate is None:
        raise InvalidRequest(f"{what}: expected N/PERIOD such as 100/1m or 10/s", field=what)
    return rate


@dataclass(frozen=True, slots=True)
class Limit:
    name: str  # anonymous, key, org, failures_per_address, failures_per_key, failures_per_key_address
    count: int
    period_ms: int
    burst: int
    on_redis_error: str = "local"
    exact: bool = False  # one Redis call per request: no leases
    lease_cap: int = dataclasses.field(init=False, compare=False)  # the most tokens a process may hold

    def __post_init__(self) -> None:
        object.__setattr__(self, "lease_cap", max_lease(self.burst, self.exact))

    @classmethod
    def from_config(cls, name: str, cfg: LimitConfig) -> Limit:
        count, period = parse_rate(cfg.rate, f"rate_limits.{name}.rate")
        return cls(name, count, period, cfg.burst, cfg.on_redis_error, cfg.exact)

    @classmethod
    def override(cls, base: Limit, text: str) -> Limit:
        """A key's own `--rate-limit N/PERIOD`: N per period, up to N at once."""
        count, period = parse_rate(text)
        return cls(base.name, count, period, count, base.on_redis_error, base.exact)

    @property
    def interval_us(self) -> float:
        return self.period_ms * 1000 / self.count

    @property
    def tolerance_us(self) -> float:
        return self.interval_us * self.burst


@dataclass(slots=True)  # not frozen: made on every request, and a frozen init costs a setattr per field
class Decision:
    limit: Limit
    allowed: bool
    remaining: int
    reset_s: int
    retry_after_s: int

    @staticmethod
    def strictest(decisions: Sequence[Decision]) -> Decision:
        """The refusal with the longest wait, else the admission with the fewest left (the first of equals)."""
        worst = decisions[0]
        for d in decisions[1:]:
            if d.allowed != worst.allowed:
                if not d.allowed:
                    worst = d
            elif not d.allowed:
                if d.retry_after_s > worst.retry_after_s:
                    worst = d
            elif d.remaining < worst.remaining or (d.remaining == worst.remaining and d.reset_s > worst.reset_s):
                worst = d
        return worst

    def headers(self, *, retry: bool = True) -> dict[str, str]:
        """The RateLimit-* headers; with Retry-After when this decision refused (and `retry`)."""
        h = {
            "RateLimit-Limit": str(self.limit.burst),
            "RateLimit-Remaining": str(max(self.remaining, 0)),
            "RateLimit-Reset": str(self.reset_s),
        }
        if retry and not self.allowed:
            h["Retry-After"] = str(max(self.retry_after_s, 1))
        return h


def _decision(limit: Limit, admitted: int, remaining: int, reset_us: float, retry_us: float) -> Decision:
    return Decision(limit, bool(admitted), int(remaining), math.ceil(reset_us / 1e6), math.ceil(retry_us / 1e6))


def _spend(lease: Lease, limit: Limit, now: float) -> Decision | None:
    """A decision from this process's lease: a token it holds, or the refusal Redis gave until its retry
    time. None: ask Redis. The headers count the lease's tokens as remaining (they are the client's)."""
    if lease.take(now):
        return Decision(limit, True, lease.remaining + lease.tokens, math.ceil(lease.reset_at - now), 0)
    if lease.denied(now):
        return Decision(limit, False, 0, math.ceil(lease.reset_at - now), math.ceil(lease.denied_until - now))
    return None


class LocalLimiter:
    """The same GCRA in this process: the fallback when Redis cannot be reached."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._tat: OrderedDict[str, float] = OrderedDict()

    def check(self, limit: Limit, key: str, peek: bool = False) -> Decision:
        now = time.monotonic() * 1e6
        tat = max(self._tat.get(key, now), now)
        new_tat = tat + limit.interval_us
        allow_at = new_tat - limit.tolerance_us
        if now < allow_at:
            return _decision(limit, 0, 0, tat - now, allow_at - now)
        if peek:
            return _decision(
                limit, 1, math.floor((limit.tolerance_us - (new_tat - now)) / limit.interval_us), new_tat - now, 0
            )
        self._tat[key] = new_tat
        self._tat.move_to_end(key)
        while len(self._tat) > self.max_entries:
            self._tat.popitem(last=False)
        return _decision(
            limit, 1, math.floor((limit.tolerance_us - (new_tat - now)) / limit.interval_us), new_tat - now, 0
        )


def address_bucket(address: str | None) -> str:
    """Who a per-address limit charges: an IPv4 address, or the /64 of an IPv6 one (one subscriber's
    whole allocation: anyone with a /64 could otherwise take a fresh budget with each of its addresses)."""
    if address is None:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def redis_key(limit: Limit, ident: str) -> str:
    return C.REDIS_RATE_LIMIT.format(name=limit.name, ident=ident)


# One Redis call: (limit, identity, most tokens to take, peek).
_Call = tuple[Limit, str, int, bool]


def _args(call: _Call) -> list[str | int]:
    """The script's ARGV for one call."""
    limit, _, cost, peek = call
    return [f"{limit.interval_us:.3f}", f"{limit.tolerance_us:.3f}", cost, 1 if peek else 0]


# What the script answers: (tokens taken, remaining, reset µs, retry µs).
_Raw = tuple[int, int, float, float]


class RateLimiter:
    def __init__(
        self, client: RedisClient, metrics: Metrics, breaker: Breaker | None = None, *, pipeline: bool = True
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.batching = pipeline
        self.local = LocalLimiter()
        self.leases = Leases()
        self._script = client.register_script(GCRA_LUA)
        self._cluster = is_cluster(client)
        self.breaker = breaker or Breaker("redis")  # shared with every other Redis caller of this process
        self._batch: list[tuple[_Call, asyncio.Future[_Raw]]] = []
        self._last_warning = 0.0

    async def check(self, charges: Sequence[tuple[Limit, str]], *, peek: bool = False) -> list[Decision]:
        """Charge one request against every (limit, identity): from this process's leases where it holds
        tokens, else in one Redis round trip. With `peek`, only say whether it would be admitted (always
        asked of Redis)."""
        if not charges:
            return []  # nothing to ask (and no Redis call, which could take a breaker's probe turn)
        if peek:
            return await self._exact([(limit, ident, 1, True) for limit, ident in charges])
        now = time.monotonic()
        leases = self.leases
        decisions: list[Decision | None] = []
        complete = True
        charged = self.metrics.ratelimit_charges
        for limit, ident in charges:
            d = _spend(leases.get(limit.name, ident), limit, now) if limit.lease_cap > 1 else None
            if d is None:
                complete = False
            else:
                charged.inc(limit.name, "lease")
            decisions.append(d)
        if complete:
            return decisions  # type: ignore[return-value]  # every one came from a lease
        missing = [i for i, d in enumerate(decisions) if d is None]
        exact = [i for i in missing if charges[i][0].lease_cap <= 1]
        leased = [i for i in missing if charges[i][0].lease_cap > 1]
        if exact:
            got = await self._exact([(*charges[i], 1, False) for i in exact])
            for i, d in zip(exact, got, strict=True):
                decisions[i] = d
        for i in leased:  # rarely more than one at once: leases of one request run out at different times
            decisions[i] = await self._refill(*charges[i])
        return decisions  # type: ignore[return-value]

    async def _exact(self, calls: list[_Call]) -> list[Decision]:
        """One token per call from Redis, or each limit's fallback when Redis cannot be reached."""
        try:
            raws = await self._redis(calls)
            for limit, *_ in calls:
                self.metrics.ratelimit_charges.inc(limit.name, "exact")
        except REDIS_UNAVAILABLE as exc:
            log.debug("rate limiter: redis unavailable: %s", exc.__class__.__name__)
            return [self._fallback(limit, ident, peek) for limit, ident, _, peek in calls]
        return [_decision(limit, *raw) for (limit, *_), raw in zip(calls, raws, strict=True)]

    async def _refill(self, limit: Limit, ident: str) -> Decision:
        """A token from a new lease. One refill per (limit, identity) at a time: concurrent requests wait
        for it and spend from it, so a burst of requests takes one lease, not one each."""
        lease = self.leases.get(limit.name, ident)
        while True:
            if lease.refill is not None:
                if not self.breaker.available:
                    # The refill in flight is the breaker's probe of a Redis that just failed: waiting
                    # for it would cost its timeout, which the breaker is there to spare everyone else.
                    return self._fallback(limit, ident, False)
                await asyncio.shield(lease.refill)
            else:
                size = lease.next_size(time.monotonic(), limit.lease_cap)
                lease.refill = asyncio.get_running_loop().create_future()
                try:
                    (raw,) = await self._redis([(limit, ident, size, False)])
                    self.metrics.ratelimit_charges.inc(limit.name, "refill")
                except REDIS_UNAVAILABLE as exc:
                    log.debug("rate limiter: redis unavailable: %s", exc.__class__.__name__)
                    return self._fallback(limit, ident, False)
                finally:
                    lease.refill.set_result(None)
                    lease.refill = None
                lease.grant(time.monotonic(), *raw)
            decision = _spend(lease, limit, time.monotonic())
            if decision is not None:
                return decision

    async def _redis(self, calls: list[_Call]) -> list[_Raw]:
        """The script's answers, in one round trip (shared with the tick's other calls when batching)."""
        if not self.breaker.allow():
            raise BreakerOpen("redis")
        if self.batching:
            return list(await asyncio.gather(*(self._enqueue(call) for call in calls)))
        return await self._round_trip(calls)

    async def _round_trip(self, calls: Sequence[_Call]) -> list[_Raw]:
        """One pipeline for all calls; its outcome is the breaker's (the caller passed `allow()`). On Redis
        Cluster the calls go to their nodes at once instead: a cluster pipeline cannot carry EVALSHA, and
        each call names one key, so no call spans slots."""
        started = time.perf_counter()
        try:
            if self._cluster:
                got = await asyncio.gather(
                    *(self._script(keys=[redis_key(c[0], c[1])], args=_args(c)) for c in calls),
                    return_exceptions=True,  # every call is awaited to its end; the first failure is raised
                )
                failed = [r for r in got if isinstance(r, BaseException)]
                if failed:
                    raise failed[0]
                replies: list[Any] = list(got)
            else:
                try:
                    replies = await self._pipeline(calls)
                except NoScriptError:  # Redis restarted, or failed over to a replica: load it, once
                    await self.client.script_load(GCRA_LUA)
                    replies = await self._pipeline(calls)
        except REDIS_ERRORS:
            self.breaker.failed()
            raise
        finally:
            self.breaker.timed("ratelimit", time.perf_counter() - started)
        self.breaker.succeeded()
        return [(int(r[0]), int(r[1]), float(r[2]), float(r[3])) for r in replies]

    async def _pipeline(self, calls: Sequence[_Call]) -> list[Any]:
        """EVALSHA itself, not the Script object, in the pipeline: redis-py would send a SCRIPT EXISTS
        before each such pipeline, a second round trip on every refill."""
        async with self.client.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(self._script.sha, 1, redis_key(call[0], call[1]), *_args(call))
            return list(await pipe.execute())

    def _enqueue(self, call: _Call) -> asyncio.Future[_Raw]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_Raw] = loop.create_future()
        if not self._batch:
            loop.call_soon(lambda: asyncio.ensure_future(self._flush()))
        self._batch.append((call, fut))
        return fut

    async def _flush(self) -> None:
        batch, self._batch = self._batch, []
        try:
            raws = await self._round_trip([call for call, _ in batch])
        except Exception as exc:  # every waiter gets an answer, whatever went wrong
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), raw in zip(batch, raws, strict=True):
            if not fut.done():
                fut.set_result(raw)

    def _fallback(self, limit: Limit, ident: str, peek: bool) -> Decision:
        self.metrics.ratelimit_fallback.labels(limit.name, limit.on_redis_error).inc()
        self.metrics.ratelimit_charges.inc(limit.name, "fallback")
        now = time.monotonic()
        if now - self._last_warning > 10:
            self._last_warning = now
            log.warning("rate limiter: Redis unreachable, limits follow their on_redis_error policy")
        if limit.on_redis_error == "open":
            return Decision(limit, True, limit.burst, 0, 0)
        if limit.on_redis_error == "closed":
            raise AuthUnavailable("the rate limiter cannot reach Redis")
        return self.local.check(limit, f"{limit.name}:{ident}", peek=peek)


def enforce(decisions: Sequence[Decision], metrics: Metrics) -> Decision | None:
    """The strictest decision; raises RateLimited (with its headers) when any limit refused."""
    if not decisions:
        return None
    for d in decisions:
        metrics.ratelimit.inc(d.limit.name, "allowed" if d.allowed else "refused")
    worst = Decision.strictest(decisions)
    if not worst.allowed:
        raise RateLimited(f"too many requests ({worst.limit.name} limit)", headers=worst.headers())
    return worst


@dataclass(frozen=True, slots=True)
class Limits:
    anonymous: Limit
    key: Limit
    org: Limit
    failures_per_address: Limit
    failures_per_key: Limit
    failures_per_key_address: Limit
    sign_in: Limit
    # Keys' own `--rate-limit` texts, parsed once each (few distinct values).
    _overrides: dict[str, Limit] = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: RateLimitsConfig) -> Limits:
        return cls(*(Limit.from_config(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cls) if f.init))

    def for_key(self, override: str | None) -> Limit:
        """The key's own `--rate-limit`, else the configured per-key limit."""
        if not override:
            return self.key
        limit = self._overrides.get(override)
        if limit is None:
            limit = Limit.override(self.key, override)
            if len(self._overrides) < C.DEFAULT_LOCAL_MAX_ENTRIES:
                self._overrides[override] = limit
        return limit


class BruteForceGuard:
    """Failed verifications are limited per client address, argon2 runs per key id, then per (key id,
    address).

    Checked only before expensive work (a Postgres lookup, an argon2 run), never on a cache hit. Every
    argon2 run of a key id is charged to the key id's budget first. Once a flood of guesses has spent
    it, an address still gets a small budget of its own for that key id (`failures_per_key_address`),
    and addresses where the key verified in the last day are never refused: so the key's holder, even
    at an address it never used, still verifies at its first try, while each attacking address is held
    to that small budget, and to its own failure budget, which a refusal here is charged to as well
    (it then stops before the Postgres lookup). What bounds argon2 work as a whole, over every key id,
    is the hasher: `keys.verify_threads` at once, `keys.verify_queue` waiting, the rest refused.
    The address check is a peek, so concurrent requests of one address may overshoot it by their number.
    """

    def __init__(self, limiter: RateLimiter, limits: Limits, client: RedisClient, metrics: Metrics) -> None:
        self.limiter = limiter
        self.limits = limits
        self.client = client
        self.metrics = metrics

    async def before_lookup(self, address: str | None) -> None:
        """Before a key that is not cached is looked up: has this address failed too often?"""
        (by_address,) = await self.limiter.check(
            [(self.limits.failures_per_address, address_bucket(address))], peek=True
        )
        if not by_address.allowed:
            enforce([by_address], self.metrics)

    async def before_argon2(self, key_id: str, address: str | None) -> None:
        """Charge an argon2 run of `key_id` before it starts, so concurrent guesses cannot slip past the
        budgets: the key id's, else this address's for the key id. Raises RateLimited."""
        (by_key,) = await self.limiter.check([(self.limits.failures_per_key, key_id)])
        if by_key.allowed or await self._known_good(key_id, address):
            return
        pair = f"{key_id}:{address_bucket(address)}"
        (by_pair,) = await self.limiter.check([(self.limits.failures_per_key_address, pair)])
        if by_pair.allowed:
            return
        await self.failed(address)  # a refused guess counts against its address like a wrong one
        for d in (by_key, by_pair):
            self.metrics.ratelimit.inc(d.limit.name, "refused")
        soonest = min((by_key, by_pair), key=lambda d: d.retry_after_s)  # either budget lets the next run in
        raise RateLimited(f"too many requests ({soonest.limit.name} limit)", headers=soonest.headers())

    async def failed(self, address: str | None) -> Decision:
        (decision,) = await self.limiter.check([(self.limits.failures_per_address, address_bucket(address))])
        return decision

    async def verified(self, key_id: str, address: str | None) -> None:
        if address is None:
            return
        key = C.REDIS_GOOD_ADDRESSES.format(key_id=key_id)

        async def remember() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.sadd(key, address)
                pipe.expire(key, C.GOOD_ADDRESS_TTL_S)
                await pipe.execute()

        with contextlib.suppress(*REDIS_UNAVAILABLE):  # counted by the breaker; only a cache of good news
            await guarded(self.limiter.breaker, remember, REDIS_ERRORS, "good_address_put")

    async def _known_good(self, key_id: str, address: str | None) -> bool:
        if address is None:
            return False
        key = C.REDIS_GOOD_ADDRESSES.format(key_id=key_id)
        try:
            known = await guarded(
                self.limiter.breaker, lambda: self.client.sismember(key, address), REDIS_ERRORS, "good_address_get"
            )
            return bool(known)
        except REDIS_UNAVAILABLE:
            return False
