"""Real Postgres and Redis for the whole session, on free ports in a temporary directory; every test
starts from empty tables and an empty Redis."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway._services import Postgres, Redis, free_port
from gateway.app import create_app
from gateway.config import Config, config_from_mapping
from gateway.data.db import Database
from gateway.data.schema import migrate
from gateway.directory import Directory
from gateway.keyring import Keyring, KeySpec
from gateway.keys import KeyFormat, SecretHasher
from tests._proxies import stop_process

PEPPER = "test-pepper-0123456789-abcdefghijklmnop"
ROOT = Path(__file__).resolve().parent.parent

# The test client of a gateway app, as the `client` fixture and `aiohttp_client(create_app(...))` give it.
Client = TestClient[web.Request, web.Application]


@dataclass
class Services:
    root: Path
    pg: Postgres
    redis: Redis


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    root = Path(tempfile.mkdtemp(prefix="gateway-tests-"))
    root.chmod(0o755)  # the postgres user must reach its data directory
    pg = Postgres(root / "pg", free_port())
    rd = Redis(root / "redis", free_port())
    pg.init()
    pg.start()
    rd.start()

    async def _migrate() -> None:
        conn = await asyncpg.connect(pg.url)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(_migrate())
    try:
        yield Services(root, pg, rd)
    finally:
        rd.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


SIGNING_SECRET = "test-signing-secret-0123456789abcdef"


def make_config(services: Services, **overrides: Any) -> Config:
    data: dict[str, Any] = {
        "database": {"url": services.pg.url, "timeout_ms": 1000, "connect_retries": 2},
        "redis": {"url": services.redis.url, "timeout_ms": 200},
        "pepper": PEPPER,
        "tokens": {"signing_secret": SIGNING_SECRET},
        # Small argon2 parameters keep the suite fast; the OWASP defaults are tested on their own.
        "keys": {"argon2": {"memory_kib": 1024, "time_cost": 1, "parallelism": 1}},
        "audit": {"flush_interval_s": 0.1},
        "last_used_flush_s": 0.1,
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return config_from_mapping(data, env={})


@pytest.fixture
async def clean(services: Services) -> AsyncIterator[None]:
    conn = await asyncpg.connect(services.pg.url)
    try:
        await conn.execute(
            "TRUNCATE audit_events, refresh_tokens, token_families, api_keys, projects, memberships, users, orgs"
            " CASCADE"
        )
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(services.redis.url)
    await client.flushall()
    await client.aclose()
    yield


@pytest.fixture
def cfg(services: Services, clean: None) -> Config:
    return make_config(services)


@pytest.fixture
async def pool(services: Services, clean: None) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(services.pg.url, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
async def keyring(cfg: Config, pool: asyncpg.Pool) -> AsyncIterator[Keyring]:
    hasher = SecretHasher(cfg.keys.argon2, 2)
    yield Keyring(Database(pool), KeyFormat(cfg.keys.prefix), hasher, cfg.roles)
    hasher.close()


@pytest.fixture
def directory(cfg: Config, pool: asyncpg.Pool) -> Directory:
    return Directory(Database(pool), cfg.roles)


@pytest.fixture
async def rclient(services: Services) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(services.redis.url)
    yield client
    await client.aclose()


@dataclass
class World:
    """A small tenant set-up: org A and B, a user who is admin of A and viewer of B."""

    keyring: Keyring
    directory: Directory
    org_a: str = ""
    org_b: str = ""
    user: str = ""
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def key(self, name: str = "k", role: str = "admin", **kw: Any) -> dict[str, Any]:
        spec = KeySpec(
            user_id=kw.pop("user", self.user),
            name=name,
            role=role,
            orgs=kw.pop("orgs", []),
            projects=kw.pop("projects", []),
            scopes=kw.pop("scopes", None),
            **kw,
        )
        created = await self.keyring.create_key(spec)
        self.keys[name] = created
        return created

    @property
    def pool(self) -> asyncpg.Pool:
        return self.keyring.db.pool


@pytest.fixture
async def world(keyring: Keyring, directory: Directory) -> World:
    w = World(keyring, directory)
    w.org_a = (await directory.create_org("A"))["id"]
    w.org_b = (await directory.create_org("B"))["id"]
    w.user = (await directory.create_user("owner@example.com"))["id"]
    await directory.set_member(w.org_a, w.user, "admin")
    await directory.set_member(w.org_b, w.user, "viewer")
    return w


@pytest.fixture
async def client(aiohttp_client: Any, cfg: Config) -> Client:
    c: Client = await aiohttp_client(create_app(cfg))
    return c


def nginx_headers(key: str | None = None, uri: str = "/v1/things", method: str = "GET", **extra: str) -> dict[str, str]:
    h = {"X-Original-Method": method, "X-Original-URI": uri}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    h.update(extra)
    return h


def corrupt(key: str) -> str:
    """The key with its last checksum character changed."""
    return key[:-1] + ("A" if key[-1] != "A" else "B")


async def poll(
    ask: Callable[[], Awaitable[aiohttp.ClientResponse]],
    done: Callable[[aiohttp.ClientResponse], bool],
    timeout_s: float = 2.0,
) -> aiohttp.ClientResponse:
    """Ask until the answer is `done` (a change propagating through NOTIFY), or the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = await ask()
        if done(r) or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.02)


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until `cond()` holds (something happening in the background), or fail."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@dataclass
class GatewayProcess:
    """A `gateway serve` subprocess, as in production."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def gateway_env(services: Services, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_DATABASE_URL=services.pg.url,
        GATEWAY_REDIS_URL=services.redis.url,
        GATEWAY_PEPPER=PEPPER,
        GATEWAY_SIGNING_SECRET=SIGNING_SECRET,
        **extra,
    )
    return env


def write_test_config(path: Path, **yaml_sections: str) -> Path:
    """Small argon2 parameters, DEBUG logs and no drain on SIGTERM (tests stop gateways all the time), with
    each given YAML text merged over them section by section: `server: {port: 1}` keeps `drain_s: 0`,
    where a repeated top-level key in one YAML document would silently replace the whole section."""
    import yaml

    data: dict[str, Any] = {
        "keys": {"argon2": {"memory_kib": 1024, "time_cost": 1, "parallelism": 1}},
        "log_level": "DEBUG",
        "log": {"format": "text"},  # tests read these logs as text; tests/test_logs.py reads JSON ones
        "server": {"drain_s": 0},
    }
    for text in yaml_sections.values():
        for section, value in (yaml.safe_load(text) or {}).items():
            merge = isinstance(value, dict) and isinstance(data.get(section), dict)
            data[section] = {**data[section], **value} if merge else value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def spawn_gateway(
    services: Services, tmp: Path, name: str, *extra: str, config_yaml: str = "", env: dict[str, str] | None = None
) -> GatewayProcess:
    port = free_port()
    config = write_test_config(tmp / f"{name}.yaml", extra=config_yaml)
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(config), "serve", "--port", str(port), *extra],
            env={**gateway_env(services), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    return GatewayProcess(port, proc, log_path)


async def start_gateway(
    services: Services,
    tmp: Path,
    name: str = "gw",
    *extra: str,
    config_yaml: str = "",
    env: dict[str, str] | None = None,
) -> GatewayProcess:
    gp = spawn_gateway(services, tmp, name, *extra, config_yaml=config_yaml, env=env)
    proc = gp.proc
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {gp.logs()}")
            try:
                async with session.get(f"{gp.url}/healthz") as r:
                    if r.status == 200:
                        return gp
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    gp.stop()
    raise RuntimeError(f"gateway did not start: {gp.logs()}")
