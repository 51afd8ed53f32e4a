"""Latency of /auth/verify by cache tier: p50/p99 over sequential requests on one keep-alive connection.

Starts its own Postgres and Redis (like the tests) and one `gateway serve` process per configuration,
with the production argon2id parameters. Run with `make bench-extra`; `--requests N` and `--cold N` change sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import aiohttp
from _bench import local_services, pct, seed, start_gateway, wait_up


async def measure(url: str, keys: list[str], n: int) -> list[float]:
    out = []
    headers = {"X-Original-Method": "GET", "X-Original-URI": "/v1/things"}
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            h = {**headers, "Authorization": f"Bearer {keys[i % len(keys)]}"}
            t = time.perf_counter()
            async with s.get(url + "/auth/verify", headers=h) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"unexpected {r.status} {r.headers.get('X-Auth-Error')}")
            out.append(time.perf_counter() - t)
    return out


def row(name: str, s: list[float]) -> str:
    return f"{name:48s} {pct(s, 0.5):8.2f} {pct(s, 0.99):8.2f} {statistics.mean(s) * 1000:8.2f}"


async def bench(tmp: Path, env: dict[str, str], requests: int, cold: int) -> None:
    t = time.perf_counter()
    keys = [str(k["key"]) for k in await seed(env, cold + 2)]
    print(f"created {len(keys)} keys (argon2id m=19456 KiB t=2 p=1) in {time.perf_counter() - t:.1f}s")
    # The "rl" limits are lifted so the benchmark measures verification, not refusals.
    unlimited = "rate_limits: {key: {rate: 1000000/1s, burst: 1000000}, org: {rate: 1000000/1s, burst: 1000000}}\n"
    # A stale in-process entry is answered at once (stale-while-revalidate), so the lower tiers are
    # reached by alternating two keys through a one-entry in-process cache: each request misses it.
    setups = {
        "in-process hit": ("", 1),
        "redis hit (in-process cache misses)": ("cache: {local_max_entries: 1}\n", 2),
        "postgres revalidation (no argon2)": ("cache: {local_max_entries: 1, redis_ttl_s: 0}\n", 2),
    }
    print(f"\n/auth/verify latency, sequential, one keep-alive connection, {requests} requests each")
    print(f"{'tier':48s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s}")
    for i, (name, (cache, n_keys)) in enumerate(setups.items()):
        proc, url = start_gateway(tmp, f"tier{i}", env, cache + unlimited)
        try:
            await wait_up(url)
            await measure(url, keys[:n_keys], 200)  # warm the caches and the connection
            print(row(name, await measure(url, keys[:n_keys], requests)))
        finally:
            proc.terminate()
            proc.wait()
    proc, url = start_gateway(tmp, "cold", env, unlimited)
    try:
        await wait_up(url)
        print(row(f"cold miss: Postgres + argon2id ({cold} distinct keys)", await measure(url, keys[2:], cold)))
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--cold", type=int, default=1_000)
    a = ap.parse_args()
    with local_services() as (tmp, _pg, _rd, env):
        asyncio.run(bench(tmp, env, a.requests, a.cold))


if __name__ == "__main__":
    main()
