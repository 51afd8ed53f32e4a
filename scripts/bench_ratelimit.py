"""The rate limiter alone against a real Redis: decisions per second and p50/p99 latency of one decision
(two limits charged, as for a verified key), with and without pipelining concurrent decisions."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from gateway._services import Redis, free_port
from gateway.metrics import Metrics
from gateway.ratelimit import Limit, RateLimiter


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))] * 1000


async def run(url: str, decisions: int, concurrency: int) -> None:
    # Roomy limits: every decision is a real admit, none short-circuits.
    key, org = Limit("key", 1_000_000, 1000, 1_000_000), Limit("org", 1_000_000, 1000, 1_000_000)
    print(f"{'mode':12s} {'concurrency':>11s} {'decisions/s':>12s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for pipelined in (False, True):
        for conc in (1, concurrency):
            client = aioredis.Redis.from_url(url)
            limiter = RateLimiter(client, Metrics(), pipeline=pipelined)
            samples: list[float] = []

            async def worker(n: int, w: int, limiter: RateLimiter, samples: list[float]) -> None:
                for i in range(n):
                    t = time.perf_counter()
                    await limiter.check([(key, f"k{w}-{i % 50}"), (org, f"o{w}")])
                    samples.append(time.perf_counter() - t)

            per = decisions // conc
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(per, w, limiter, samples) for w in range(conc)))
            elapsed = time.perf_counter() - t0
            mode = "pipelined" if pipelined else "per request"
            rate = per * conc / elapsed
            print(f"{mode:12s} {conc:11d} {rate:12,.0f} {pct(samples, 0.5):8.3f} {pct(samples, 0.99):8.3f}")
            await client.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=50)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-rl-bench-"))
    rd = Redis(tmp / "redis", free_port())
    rd.start()
    try:
        asyncio.run(run(rd.url, a.decisions, a.concurrency))
    finally:
        rd.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
