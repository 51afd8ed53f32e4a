"""Outages under load: a `gateway serve` process reaches Postgres and Redis through fault proxies while a
steady load of cached, uncached and invalid keys (and /healthz) keeps arriving, through each fault and
through the recovery. A fault that heals only when traffic pauses is not healed.

For each fault: no 5xx but 503 `auth_unavailable`; no 401 for a valid key; no allow for an invalid one;
cached keys answered without waiting on Postgres; uncached keys working again within one second of the
backend's return, under load; /healthz fast throughout. `pytest tests/test_faults.py -s` prints, per
fault, the recovery time under load and the worst cached-key latency during the fault.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from gateway.keys import KeyFormat, new_secret
from tests._faultproxy import FaultProxy
from tests.conftest import GatewayProcess, Services, World, corrupt, nginx_headers, start_gateway

DB_TIMEOUT_MS = 1000
# Above the default (50 ms): the fault proxies forward from a thread of this busy test process, and a
# Redis call they delay past its timeout would trip the breaker of a store that is not at fault.
REDIS_TIMEOUT_MS = 250
FAULT_S = 2.5
RECOVERY_S = 2.5
# Every limit far above the load, so a refusal can only come from a fault.
_HIGH = "{rate: 1000000/1m, burst: 100000, on_redis_error: local}"
CONFIG = f"""
database: {{timeout_ms: {DB_TIMEOUT_MS}, connect_retries: 2, pool_max: 10}}
redis: {{timeout_ms: {REDIS_TIMEOUT_MS}}}
cache: {{local_ttl_s: 0.3}}
rate_limits:
  key: {_HIGH}
  org: {_HIGH}
  anonymous: {_HIGH}
  failures_per_address: {_HIGH}
  failures_per_key: {_HIGH}
"""


@dataclass
class Sample:
    kind: str  # cached, uncached, invalid, healthz
    sent: float  # monotonic
    latency: float
    status: int
    code: str


@dataclass
class Load:
    """Requests every few milliseconds of each kind until stopped. An uncached key is used until it is
    allowed once, then the next never-used key is taken, so every uncached request really is one."""

    gw: GatewayProcess
    cached: list[str]
    fresh: list[str]
    invalid: list[str]
    samples: list[Sample] = field(default_factory=list)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    pending: list[asyncio.Future[None]] = field(default_factory=list)

    async def _one(self, session: aiohttp.ClientSession, kind: str, path: str, headers: dict[str, str]) -> int:
        sent = time.monotonic()
        try:
            async with session.get(self.gw.url + path, headers=headers) as r:
                body = await r.read()
                status, code = r.status, r.headers.get("X-Auth-Error", "")
                if kind == "readyz":  # which stores the process sees as down, e.g. "postgres,redis"
                    checks = json.loads(body)["checks"]
                    code = ",".join(sorted(name for name, state in checks.items() if state != "ok"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, code = 0, type(exc).__name__
        self.samples.append(Sample(kind, sent, time.monotonic() - sent, status, code))
        return status

    async def _loop(self, kind: str, interval_s: float, next_request: Callable[[], Awaitable[None]]) -> None:
        while not self.stopped.is_set():
            # Each request runs on its own, so a slow answer never holds back the next one.
            self.pending.append(asyncio.ensure_future(next_request()))
            await asyncio.sleep(interval_s)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            n = {"cached": 0, "invalid": 0}

            async def cached() -> None:
                n["cached"] += 1
                key = self.cached[n["cached"] % len(self.cached)]
                await self._one(session, "cached", "/auth/nginx", nginx_headers(key))

            async def uncached() -> None:
                if len(self.fresh) < 2:
                    raise AssertionError("the load ran out of never-used keys: create more")
                key = self.fresh[0]
                status = await self._one(session, "uncached", "/auth/nginx", nginx_headers(key))
                if status == 200 and self.fresh[0] == key:
                    self.fresh.pop(0)

            async def invalid() -> None:
                n["invalid"] += 1
                key = self.invalid[n["invalid"] % len(self.invalid)]
                await self._one(session, "invalid", "/auth/nginx", nginx_headers(key))

            async def healthz() -> None:
                await self._one(session, "healthz", "/healthz", {})

            async def readyz() -> None:
                await self._one(session, "readyz", "/readyz", {})

            loops = [
                self._loop("cached", 0.01, cached),
                self._loop("uncached", 0.04, uncached),
                self._loop("invalid", 0.03, invalid),
                self._loop("healthz", 0.1, healthz),
                self._loop("readyz", 0.05, readyz),
            ]
            await asyncio.gather(*loops)
            await asyncio.gather(*self.pending)  # the last requests finish


@dataclass
class Faults:
    services: Services
    pg: FaultProxy
    redis: FaultProxy


@pytest.fixture
def faults(services: Services, clean: None) -> Iterator[Faults]:
    pg = FaultProxy(services.pg.port)
    rd = FaultProxy(services.redis.port)
    pg.start()
    rd.start()
    try:
        yield Faults(services, pg, rd)
    finally:
        pg.close()
        rd.close()
        # A case that restarted a server must leave it running for the rest of the suite.
        if services.pg.proc is None:
            services.pg.start()
        if services.redis.proc is None:
            services.redis.start()


# What each case does to which store: (inject, heal). `heal` returns once the store is back.
Action = Callable[[Faults], Awaitable[None]]


def _proxy(which: str, mode: str) -> tuple[Action, Action]:
    async def inject(f: Faults) -> None:
        for name in which.split("+"):
            proxy: FaultProxy = getattr(f, name)
            if mode == "hang":
                proxy.hang()
            elif mode == "refuse":
                proxy.refuse()
            else:
                proxy.slow(int(DB_TIMEOUT_MS * 1.5))
        await asyncio.sleep(FAULT_S)

    async def heal(f: Faults) -> None:
        for name in which.split("+"):
            getattr(f, name).pass_()

    return inject, heal


def _restarted(which: str) -> tuple[Action, Action]:
    async def inject(f: Faults) -> None:
        servers = [f.services.pg if n == "pg" else f.services.redis for n in which.split("+")]
        for s in servers:
            await asyncio.to_thread(s.stop)
        await asyncio.sleep(FAULT_S)
        for s in servers:
            await asyncio.to_thread(s.start)

    async def heal(_f: Faults) -> None:
        return None

    return inject, heal


CASES = {
    "postgres hung": _proxy("pg", "hang"),
    "postgres refused": _proxy("pg", "refuse"),
    "postgres slow": _proxy("pg", "slow"),
    "postgres restarted": _restarted("pg"),
    "redis hung": _proxy("redis", "hang"),
    "redis refused": _proxy("redis", "refuse"),
    "redis slow": _proxy("redis", "slow"),
    "redis restarted": _restarted("redis"),
    "both hung": _proxy("pg+redis", "hang"),
}


def _invalid_keys(real: str) -> list[str]:
    """A bad checksum (refused with no I/O), unknown key ids (refused after a lookup) and a wrong secret
    for a real key id (refused after an argon2 run)."""
    fmt = KeyFormat("gw")
    parsed = fmt.parse(real)
    assert parsed is not None
    return [
        corrupt(real),
        fmt.generate("live")[0],
        fmt.generate("live")[0],
        fmt.build("live", parsed.key_id, new_secret()),
    ]


@pytest.mark.parametrize("case", list(CASES))
async def test_fault_under_load(case: str, faults: Faults, world: World, tmp_path: Path) -> None:
    inject, heal = CASES[case]
    services = faults.services
    env = {
        "GATEWAY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{faults.pg.port}/postgres",
        "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{faults.redis.port}/0",
    }
    cached = [(await world.key(name=f"c{i}", orgs=[world.org_a]))["key"] for i in range(5)]
    fresh = [(await world.key(name=f"u{i}", orgs=[world.org_a]))["key"] for i in range(200)]
    invalid = _invalid_keys(cached[0])
    gw = await start_gateway(services, tmp_path, "faults", config_yaml=CONFIG, env=env)
    try:
        async with aiohttp.ClientSession() as s:
            for key in cached:
                async with s.get(gw.url + "/auth/nginx", headers=nginx_headers(key)) as r:
                    assert r.status == 200, await r.text()
        load = Load(gw, cached, fresh, invalid)
        running = asyncio.ensure_future(load.run())
        await asyncio.sleep(0.7)
        fault_at = time.monotonic()
        await inject(faults)
        await heal(faults)
        healed_at = time.monotonic()
        await asyncio.sleep(RECOVERY_S)
        load.stopped.set()
        await running
        async with aiohttp.ClientSession() as s, s.get(gw.url + "/readyz") as r:
            # Both stores are in use again, and the process heard invalidations throughout the end.
            assert (r.status, (await r.json())["checks"]) == (
                200,
                {"postgres": "ok", "redis": "ok", "invalidations": "ok"},
            ), case
    finally:
        gw.stop()
    logs = gw.logs()
    assert "Traceback" not in logs and "unexpected error" not in logs, logs[-3000:]
    report = _check(case, load.samples, fault_at, healed_at, redis_only=case.startswith("redis"))
    print(report)


def _check(case: str, samples: list[Sample], fault_at: float, healed_at: float, *, redis_only: bool) -> str:
    by_kind = {k: [s for s in samples if s.kind == k] for k in ("cached", "uncached", "invalid", "healthz", "readyz")}
    for kind, got in by_kind.items():
        assert len(got) > 10, f"{case}: too few {kind} requests ({len(got)})"
    for s in samples:
        assert s.status != 0, f"{case}: {s.kind} request failed: {s.code}"
        if s.status >= 500:
            assert (s.status, s.code) == (503, "auth_unavailable"), f"{case}: {s}"
    for s in by_kind["cached"]:
        assert s.status == 200, f"{case}: cached key answered {s.status} {s.code} at {s.sent - fault_at:+.2f}s"
    for s in by_kind["uncached"]:
        assert s.status in (200, 503), f"{case}: valid uncached key answered {s.status} {s.code}"
        if redis_only:
            # Redis is a cache: without it keys are read from Postgres.
            assert s.status == 200, f"{case}: uncached key answered {s.status} with only Redis down"
    for s in by_kind["invalid"]:
        assert s.status in (401, 503), f"{case}: invalid key answered {s.status} {s.code}"
    late = [s for s in by_kind["uncached"] if s.sent > healed_at and s.status != 200]
    recovery = max((s.sent - healed_at for s in late), default=0.0)
    assert recovery <= 1.0, f"{case}: uncached keys still refused {recovery:.2f}s after the store came back"
    assert any(s.sent > healed_at + 1.0 and s.status == 200 for s in by_kind["uncached"])
    during = [s for s in by_kind["cached"] if fault_at <= s.sent <= healed_at]
    worst_cached = max(s.latency for s in during)
    # Never the Postgres deadline: a cached key is answered from the cache, not after a timeout.
    assert worst_cached < DB_TIMEOUT_MS / 1000, f"{case}: a cached key waited {worst_cached:.3f}s"
    worst_health = max(s.latency for s in by_kind["healthz"] + by_kind["readyz"])
    assert worst_health < 0.5, f"{case}: /healthz or /readyz took {worst_health:.3f}s"
    assert all(s.status == 200 for s in by_kind["readyz"]), f"{case}: a store outage made /readyz fail"
    # Each store is seen as up again (its breaker closed) within a second of its return, under load.
    seen_down = {}
    for store in ("postgres", "redis"):
        down = [s.sent - healed_at for s in by_kind["readyz"] if s.sent > healed_at and store in s.code.split(",")]
        seen_down[store] = max(down, default=0.0)
        assert seen_down[store] <= 1.0, f"{case}: {store} still seen as down {seen_down[store]:.2f}s after its return"
    refused = sum(1 for s in by_kind["uncached"] if s.status == 503)
    first_ok = min(s.sent + s.latency for s in by_kind["uncached"] if s.sent >= healed_at and s.status == 200)
    return (
        f"\nFAULT {case:20s} last uncached refusal {recovery * 1000:5.0f} ms and first uncached 200"
        f" {(first_ok - healed_at) * 1000:5.0f} ms after the store's return | worst cached during the fault"
        f" {worst_cached * 1000:6.1f} ms | worst healthz {worst_health * 1000:5.1f} ms | uncached 503s {refused:3d}"
        f" | seen down after return: postgres {seen_down['postgres'] * 1000:4.0f} ms, redis"
        f" {seen_down['redis'] * 1000:4.0f} ms | requests {len(samples)}"
    )
