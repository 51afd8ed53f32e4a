"""The gateway on Redis Sentinel and Redis Cluster, real topologies from Debian's packages: a master fails
under verification load and the answers stay right (no false allow, no revoked key served, no limit over
its bound), and Redis is used again once the topology has recovered (the time it took is reported)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway import constants as C
from gateway._breaker import Breaker
from gateway.app import create_app
from gateway.cache import RedisCache
from gateway.config import SessionsConfig
from gateway.metrics import Metrics
from gateway.ratelimit import Limit, RateLimiter
from gateway.redis_client import RedisClient, connect_redis, is_cluster
from gateway.sessions import SessionStore
from gateway.typedefs import LISTENER, REDIS, REDIS_BREAKER
from tests._topologies import redis_cluster, redis_sentinel
from tests.conftest import Services, World, corrupt, make_config, nginx_headers, until

pytestmark = pytest.mark.topology

RATE_PER_S = 20  # the key limit under test: 20 a second, 20 at once
BURST = 20
LOAD_S = 6.0  # verification load, with the failure one second in
WORKERS = 6


@dataclass
class Tally:
    by_key: dict[str, Counter[int]] = field(default_factory=dict)
    allowed_after_revoke: int = 0
    errors: list[str] = field(default_factory=list)


def _config(services: Services, redis: dict[str, Any]) -> Any:
    cfg = make_config(
        services,
        redis={"url": "", "timeout_ms": 100, **redis},
        cache={"local_ttl_s": 0.2, "redis_ttl_s": 60},  # local entries lapse: Redis is asked all along
        rate_limits={"key": {"rate": f"{RATE_PER_S}/1s", "burst": BURST}},
    )
    return cfg


async def _load(
    c: Any, keys: dict[str, str], org: str, revoked: dict[str, float], tally: Tally, until_t: float
) -> None:
    """Verification requests round the keys until `until_t`; each answer is tallied by key and status."""

    async def worker(i: int) -> None:
        names = list(keys)
        n = i
        while time.monotonic() < until_t:
            name = names[n % len(names)]
            n += 1
            started = time.monotonic()
            try:
                r = await c.get("/auth/nginx", headers=nginx_headers(keys[name], **{"X-Org-Id": org}))
            except Exception as exc:
                tally.errors.append(f"{name}: {type(exc).__name__}")
                continue
            tally.by_key.setdefault(name, Counter())[r.status] += 1
            if r.status == 200 and name in revoked and started > revoked[name]:
                tally.allowed_after_revoke += 1
            await asyncio.sleep(0.002)

    await asyncio.gather(*(worker(i) for i in range(WORKERS)))


async def _recovered(client: RedisClient, probe_key: str, since: float, timeout_s: float = 30) -> float:
    """Seconds from `since` until the gateway's own client writes `probe_key` (a key of the failed node's
    slot, on a cluster) again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            await client.set(probe_key, "1", px=1000)
            return time.monotonic() - since
        except Exception:
            await asyncio.sleep(0.05)
    raise AssertionError(f"Redis not writable again within {timeout_s} s")


async def _failover_under_load(
    c: Any, world: World, fail: Callable[[], Awaitable[None]], probe_key: Callable[[str], str]
) -> tuple[Tally, float, dict[str, Any]]:
    await until(lambda: c.app[LISTENER].connected)
    w = world
    steady = await w.key("steady", orgs=[w.org_a])
    doomed = await w.key("doomed", orgs=[w.org_a])
    keys = {"steady": steady["key"], "doomed": doomed["key"], "wrong": corrupt(steady["key"])}
    for key in keys.values():  # cached in Redis before the failure
        await c.get("/auth/nginx", headers=nginx_headers(key, **{"X-Org-Id": w.org_a}))
    tally = Tally()
    revoked: dict[str, float] = {}
    start = time.monotonic()
    load = asyncio.ensure_future(_load(c, keys, w.org_a, revoked, tally, start + LOAD_S))
    await asyncio.sleep(1.0)
    failed_at = time.monotonic()
    await fail()
    await asyncio.sleep(0.3)  # the failure has been seen: the revocation cannot reach Redis now
    await w.keyring.revoke_key(doomed["id"])
    revoked["doomed"] = time.monotonic()  # committed: from here no request may be allowed
    recovery_s = await _recovered(c.app[REDIS], probe_key(steady["id"]), failed_at)
    await load
    elapsed = time.monotonic() - start
    return tally, recovery_s, {"elapsed": elapsed, "steady": steady}


def _check(tally: Tally, elapsed: float, failovers: int) -> None:
    assert tally.errors == []
    assert tally.allowed_after_revoke == 0, "a revoked key was served"
    assert tally.by_key["wrong"][200] == 0, "a wrong secret was allowed"
    assert tally.by_key["doomed"][401] > 0  # refused after the revocation
    for counts in tally.by_key.values():
        assert counts[500] == 0
    # The bound of the key limit: its burst, plus its rate over the run; and, with `on_redis_error: local`,
    # a burst of this process's own while Redis could not be reached (documented in docs/scaling.md).
    bound = BURST * (1 + failovers) + RATE_PER_S * elapsed
    assert 0 < tally.by_key["steady"][200] <= bound
    assert tally.by_key["steady"][429] > 0  # the limit did bite


async def test_a_sentinel_failover_under_load(
    aiohttp_client: Any, services: Services, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with redis_sentinel(tmp_path) as topo:
        cfg = _config(services, {"sentinel": {"master": topo.master_name, "addresses": topo.sentinel_addresses}})
        c = await aiohttp_client(create_app(cfg))
        assert not is_cluster(c.app[REDIS])
        old_port = topo.current_master()[1]

        async def fail() -> None:
            await asyncio.to_thread(topo.kill_master)

        tally, recovery_s, info = await _failover_under_load(c, world, fail, lambda _kid: "gw:probe")
        promoted = topo.current_master()[1]
        assert promoted != old_port  # the replica was promoted, and the gateway writes there
        _check(tally, info["elapsed"], failovers=1)
        assert c.app[REDIS_BREAKER].available
        with capsys.disabled():
            print(f"\nsentinel: master killed, Redis writable again after {recovery_s:.2f} s; {tally.by_key}")


async def test_a_cluster_master_failure_under_load(
    aiohttp_client: Any, services: Services, world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with redis_cluster(tmp_path) as topo:
        cfg = _config(services, {"cluster": {"addresses": topo.addresses[:1]}})
        c = await aiohttp_client(create_app(cfg))
        assert is_cluster(c.app[REDIS])
        victim: list[int] = []

        def rl_key(key_id: str) -> str:
            return f"gw:rl:{{key:{key_id}}}"  # the key limit's key (its slot is the probe's)

        async def fail() -> None:
            key_id = next(iter(world.keys.values()))["id"]
            victim.append(topo.node_for_key(rl_key(key_id)))
            await asyncio.to_thread(topo.kill, victim[0])
            await asyncio.sleep(0.5)
            await asyncio.to_thread(topo.restart, victim[0])  # no replica to promote: the master comes back

        tally, recovery_s, info = await _failover_under_load(c, world, fail, lambda kid: f"gw:probe:{{key:{kid}}}")
        _check(tally, info["elapsed"], failovers=2)  # its state is lost with the node (nothing persisted)
        with capsys.disabled():
            print(
                f"\ncluster: master killed and restarted, its slots writable after {recovery_s:.2f} s; {tally.by_key}"
            )


async def test_a_cluster_serves_every_kind_of_call_the_gateway_makes(services: Services, tmp_path: Path) -> None:
    """A tick's rate-limit calls spread over the nodes, the cache's lookups and invalidations, and sessions
    (create, read, switch org, end all of a user's): on a real cluster, none refused for spanning slots."""
    with redis_cluster(tmp_path) as topo:
        cfg = _config(services, {"cluster": {"addresses": topo.addresses[:1]}})
        client = connect_redis(cfg.redis)
        breaker = Breaker("redis")
        try:
            limiter = RateLimiter(client, Metrics(), breaker)
            limit = Limit("key", 5, 1000, 5, exact=True)
            idents = [f"id{i}" for i in range(24)]
            nodes = {topo.node_for_key(f"gw:rl:{{key:{i}}}") for i in idents}
            assert len(nodes) == 3  # the tick's calls go to every node
            for _ in range(6):
                decisions = await asyncio.gather(*(limiter.check([(limit, i)]) for i in idents))
            assert [d.allowed for (d,) in decisions] == [False] * len(idents)  # the 6th of 5 is refused
            assert breaker.available  # and none of those calls failed

            cache = RedisCache(client, 60, 10, 60, breaker)
            assert (await cache.lookup("kid1", "digest")).entry is None
            await cache.put_negative("kid1", "digest", C.NEGATIVE_WRONG_SECRET)
            assert (await cache.lookup("kid1", "digest")).negative == C.NEGATIVE_WRONG_SECRET
            await cache.invalidate([f"kid{i}" for i in range(10)])
            assert (await cache.lookup("kid1", "digest")).generation == "1"

            sessions = SessionStore(client, breaker, SessionsConfig())
            handles = [await sessions.create("usr_1", None, "org_a", "test", "127.0.0.1") for _ in range(3)]
            session = await sessions.load(handles[0][0])
            assert session is not None and session.active_org == "org_a"
            assert await sessions.switch_org(session, "org_b")
            assert (await sessions.load(handles[0][0])).active_org == "org_b"  # type: ignore[union-attr]
            await sessions.end_user("usr_1")
            assert [await sessions.load(h) for h, _ in handles] == [None, None, None]
        finally:
            await client.aclose()


async def test_a_cluster_that_cannot_be_reached_is_an_outage_not_a_bug(
    aiohttp_client: Any, services: Services, world: World
) -> None:
    """redis-py's cluster client raises RedisClusterException, outside RedisError, when no node answers:
    every request that touched Redis was a 500. It is an outage: the key is verified from Postgres and the
    limits fall back, as with any Redis outage."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{s.getsockname()[1]}"
    c = await aiohttp_client(create_app(_config(services, {"cluster": {"addresses": [nowhere]}})))
    await until(lambda: c.app[LISTENER].connected)
    k = await world.key("nocluster", orgs=[world.org_a])
    for _ in range(3):
        r = await c.get("/auth/nginx", headers=nginx_headers(k["key"], **{"X-Org-Id": world.org_a}))
        assert r.status == 200
    assert (await (await c.get("/readyz")).json())["checks"]["redis"] == "unavailable"
