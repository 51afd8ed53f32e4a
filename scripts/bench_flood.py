"""What a flood of bad keys costs the gateway: CPU seconds per request (from /proc) and argon2 runs,
for random well-formed keys from one address, from many addresses, and wrong secrets for one real key id."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
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


def spawn_gateway(tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    (tmp / "g.yaml").write_text("log_level: WARNING\n")
    cmd = [sys.executable, "-m", "gateway", "--config", str(tmp / "g.yaml"), "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


async def bench(pg: Postgres, rd: Redis, tmp: Path, n: int) -> None:
    env = {**os.environ, "GATEWAY_DATABASE_URL": pg.url, "GATEWAY_REDIS_URL": rd.url, "GATEWAY_PEPPER": PEPPER}
    cfg = config_from_mapping({}, env=env)
    pool = await asyncpg.create_pool(pg.url, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        await migrate(conn)
    hasher = SecretHasher(cfg.keys.argon2, 1)
    admin = Admin(pool, KeyFormat("gw"), hasher, cfg.roles)
    org = (await admin.create_org("flood"))["id"]
    user = (await admin.create_user("flood@example.com"))["id"]
    await admin.set_member(org, user, "admin")
    real = await admin.create_key(KeySpec(user_id=user, name="real", role="admin", orgs=[], projects=[], scopes=None))
    hasher.close()
    await pool.close()
    proc, url = spawn_gateway(tmp, env)
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.get(url + "/healthz"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
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
        wrong = [fmt.build("live", real["id"], fmt.generate("live")[0].split("_")[3][:43]) for _ in range(n)]
        await flood(url, proc.pid, "wrong secrets for one real key id, many addresses", wrong, ips)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-flood-"))
    tmp.chmod(0o755)  # the postgres user must reach its data directory
    pg, rd = Postgres(tmp / "pg", free_port()), Redis(tmp / "redis", free_port())
    pg.init()
    pg.start()
    rd.start()
    try:
        asyncio.run(bench(pg, rd, tmp, a.requests))
    finally:
        rd.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
