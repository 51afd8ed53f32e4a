"""What a flood of bad keys costs the gateway: CPU seconds per request (from /proc) and argon2 runs,
for random well-formed keys from one address, from many addresses, and wrong secrets for one real key id."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from _bench import local_services, seed, start_gateway, wait_up

from gateway.keys import KeyFormat


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def argon2_runs(s: aiohttp.ClientSession, url: str) -> float:
    async with s.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("gateway_argon2_verifications_total"):
                return float(line.split()[1])
    return 0.0


async def flood(url: str, pid: int, name: str, keys: Sequence[str], addresses: Sequence[str | None]) -> None:
    codes: Counter[str] = Counter()
    queue = list(zip(keys, addresses, strict=True))
    async with aiohttp.ClientSession() as s:
        a0, c0, t0 = await argon2_runs(s, url), cpu_seconds(pid), time.perf_counter()

        async def worker() -> None:
            while queue:
                key, addr = queue.pop()
                h = {"X-Original-Method": "GET", "X-Original-URI": "/v1/x", "X-API-Key": key}
                if addr:
                    h["X-Forwarded-For"] = addr
                async with s.get(url + "/auth/nginx", headers=h) as r:
                    codes[r.headers.get("X-Auth-Error", "ok")] += 1

        await asyncio.gather(*(worker() for _ in range(20)))
        cpu, wall = cpu_seconds(pid) - c0, time.perf_counter() - t0
        runs = await argon2_runs(s, url) - a0
    n = len(keys)
    print(f"{name:52s} {n:6d} {cpu / n * 1e6:10.0f} {n / wall:9,.0f} {runs:7.0f}  {dict(codes)}")


async def bench(tmp: Path, env: dict[str, str], n: int) -> None:
    (real,) = await seed(env, 1)
    proc, url = start_gateway(tmp, "flood", env)
    try:
        await wait_up(url)
        fmt = KeyFormat("gw")
        rng = random.Random(1)  # noqa: S311 - addresses for a workload, not secrets
        ips = [f"198.{rng.randrange(18, 20)}.{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in range(n)]
        print(
            f"{'flood (argon2id m=19456 t=2, default limits)':52s} {'reqs':>6s} {'CPU µs/req':>10s} "
            f"{'req/s':>9s} {'argon2':>7s}  answers"
        )
        await flood(
            url,
            proc.pid,
            "random well-formed keys, one address",
            [fmt.generate("live")[0] for _ in range(n)],
            [None] * n,
        )
        await flood(
            url,
            proc.pid,
            "random well-formed keys, a new address each",
            [fmt.generate("live")[0] for _ in range(n)],
            ips,
        )
        wrong = [fmt.build("live", str(real["id"]), fmt.generate("live")[0].split("_")[3][:43]) for _ in range(n)]
        await flood(url, proc.pid, "wrong secrets for one real key id, many addresses", wrong, ips)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    a = ap.parse_args()
    with local_services() as (tmp, _pg, _rd, env):
        asyncio.run(bench(tmp, env, a.requests))


if __name__ == "__main__":
    main()
