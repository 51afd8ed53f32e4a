"""Shared pieces of the benchmark scripts: local servers, seed data, a gateway process, percentiles."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from gateway._services import Postgres, Redis, free_port
from gateway.config import config_from_mapping
from gateway.data.db import Database
from gateway.data.schema import migrate
from gateway.directory import Directory
from gateway.keyring import Keyring, KeySpec
from gateway.keys import KeyFormat, SecretHasher

ROOT = Path(__file__).resolve().parent.parent
PEPPER = "bench-pepper-0123456789abcdefghijklmnopqrstuvwxyz"


def pct(samples: list[float], p: float) -> float:
    """The p-quantile in milliseconds."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000


@contextmanager
def local_services() -> Iterator[tuple[Path, Postgres, Redis, dict[str, str]]]:
    """Postgres and Redis on free ports in a temporary directory, and the environment for a gateway."""
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    tmp.chmod(0o755)  # the postgres user must reach its data directory
    pg, rd = Postgres(tmp / "pg", free_port()), Redis(tmp / "redis", free_port())
    pg.init()
    pg.start()
    rd.start()
    try:
        env = {
            **os.environ,
            "GATEWAY_DATABASE_URL": pg.url,
            "GATEWAY_REDIS_URL": rd.url,
            "GATEWAY_PEPPER": PEPPER,
            "GATEWAY_SIGNING_SECRET": PEPPER[::-1],
        }
        yield tmp, pg, rd, env
    finally:
        rd.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class World:
    """What `seed_world` made: one org, one user (the org's admin) and that user's admin keys."""

    org: str
    user: str
    keys: list[dict[str, object]]


async def seed_world(env: dict[str, str], keys: int, concurrency: int = 1, config: Any = None) -> World:
    """Migrates, then creates an org, an admin user and `keys` keys with the production argon2 parameters
    (those of `config`, a parsed config file, else the defaults), `concurrency` at a time."""
    cfg = config_from_mapping(config or {}, env=env)
    pool = await asyncpg.create_pool(cfg.database.url.get(), min_size=1, max_size=max(4, concurrency + 1))
    hasher = SecretHasher(cfg.keys.argon2, max(2, concurrency))
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        db = Database(pool)
        directory, keyring = Directory(db, cfg.roles), Keyring(db, KeyFormat(cfg.keys.prefix), hasher, cfg.roles)
        org = (await directory.create_org("bench"))["id"]
        user = (await directory.create_user("bench@example.com"))["id"]
        await directory.set_member(org, user, "admin")
        spec = KeySpec(user_id=user, name="bench", role="admin", orgs=[], projects=[], scopes=None)
        gate = asyncio.Semaphore(concurrency)

        async def one() -> dict[str, object]:
            async with gate:
                return await keyring.create_key(spec)

        return World(org, user, list(await asyncio.gather(*(one() for _ in range(keys)))))
    finally:
        hasher.close()
        await pool.close()


async def seed(env: dict[str, str], keys: int) -> list[dict[str, object]]:
    """Migrates, then creates an org, an admin user and `keys` keys with the production argon2 parameters."""
    return (await seed_world(env, keys)).keys


def start_gateway(
    tmp: Path, name: str, env: dict[str, str], config_yaml: str = ""
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cfg = tmp / f"{name}.yaml"
    cfg.write_text("log_level: WARNING\n" + config_yaml)
    cmd = [sys.executable, "-m", "gateway", "--config", str(cfg), "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
