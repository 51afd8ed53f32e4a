"""Latency of /auth/verify by cache tier: p50/p99 over sequential requests on one keep-alive connection.

Starts its own Postgres and Redis (like the tests) and one `gateway serve` process per configuration,
with the production argon2id parameters. Run with `make bench`; `--requests N` and `--cold N` change sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg

from gateway._services import Postgres, Redis, free_port
from gateway.admin import Admin, KeySpec
from gateway.config import config_from_mapping
from gateway.keys import KeyFormat, SecretHasher
from gateway.store import migrate

ROOT = Path(__file__).resolve().parent.parent
PEPPER = "bench-pepper-0123456789abcdefghijklmnopqrstuvwxyz"


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000


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


def start_gateway(tmp: Path, name: str, cache_yaml: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(f"log_level: WARNING\ncache: {cache_yaml}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", str(cfg), "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}"


async def wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(400):
            try:
                async with s.get(url + "/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("gateway did not start")


async def bench(tmp: Path, pg: Postgres, rd: Redis, requests: int, cold: int) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        env = {**os.environ, "GATEWAY_DATABASE_URL": pg.url, "GATEWAY_REDIS_URL": rd.url, "GATEWAY_PEPPER": PEPPER}
        cfg = config_from_mapping({}, env=env)
        pool = await asyncpg.create_pool(pg.url, min_size=1, max_size=4)
        async with pool.acquire() as conn:
            await migrate(conn)
        hasher = SecretHasher(cfg.keys.argon2, 2)
        admin = Admin(pool, KeyFormat("gw"), hasher, cfg.roles)
        org = (await admin.create_org("bench"))["id"]
        user = (await admin.create_user("bench@example.com"))["id"]
        await admin.set_member(org, user, "admin")
        t = time.perf_counter()
        keys = [
            (
                await admin.create_key(
                    KeySpec(user_id=user, name=f"k{i}", role="admin", orgs=[], projects=[], scopes=None)
                )
            )["key"]
            for i in range(cold + 1)
        ]
        print(f"created {len(keys)} keys (argon2id m=19456 KiB t=2 p=1) in {time.perf_counter() - t:.1f}s")
        hasher.close()
        await pool.close()

        setups = {
            "in-process hit": "{}",
            "redis hit (in-process TTL 0)": "{local_ttl_s: 0}",
            "postgres revalidation (all TTLs 0, no argon2)": "{local_ttl_s: 0, redis_ttl_s: 0}",
        }
        print(f"\n/auth/verify latency, sequential, one keep-alive connection, {requests} requests each")
        print(f"{'tier':48s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s}")
        for name, cache in setups.items():
            proc, url = start_gateway(tmp, name.split()[0], cache, env)
            procs.append(proc)
            await wait_up(url)
            await measure(url, keys[:1], 200)  # warm the caches and the connection
            s = await measure(url, keys[:1], requests)
            print(f"{name:48s} {pct(s, 0.5):8.2f} {pct(s, 0.99):8.2f} {statistics.mean(s) * 1000:8.2f}")
            proc.terminate()
            proc.wait()
        proc, url = start_gateway(tmp, "cold", "{}", env)
        procs.append(proc)
        await wait_up(url)
        s = await measure(url, keys[1:], cold)
        print(
            f"{f'cold miss: Postgres + argon2id ({cold} distinct keys)':48s} {pct(s, 0.5):8.2f} {pct(s, 0.99):8.2f} "
            f"{statistics.mean(s) * 1000:8.2f}"
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--cold", type=int, default=1_000)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    tmp.chmod(0o755)  # the postgres user must reach its data directory
    pg, rd = Postgres(tmp / "pg", free_port()), Redis(tmp / "redis", free_port())
    pg.init()
    pg.start()
    rd.start()
    try:
        asyncio.run(bench(tmp, pg, rd, a.requests, a.cold))
    finally:
        rd.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
