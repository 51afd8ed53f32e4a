"""Redis commands and Postgres statements per `/auth/nginx` decision, measured on a real `gateway serve`.

Starts its own servers on free ports in a temporary directory (`--topology single`: one Postgres with
pg_stat_statements preloaded when the server has it, and one Redis; `cluster`: that Postgres and a 3-master
Redis Cluster, `redis.cluster`; `replica`: a Postgres primary with a streaming hot standby,
`database.replica_url`, and one Redis; the last two from tests/_topologies.py), migrates, creates one org,
one admin user and that user's keys (small argon2 parameters: the hash's cost does not change what is asked
of Postgres or Redis), then for each scenario starts one `gateway serve --workers 1` (the shipped
config/gateway.yaml and config/policy.yaml, WARNING logs, the scenario's changes) on an empty Redis, warms
it up, resets the counters (Redis `CONFIG RESETSTAT`, `pg_stat_statements_reset()`), sends the scenario's
requests with a keep-alive aiohttp client, and reads back what each backend saw:

- Redis `INFO commandstats` (summed over a cluster's masters): commands by name. Commands a Lua script runs
  are counted there too: the rate limiter's GCRA script runs TIME and GET once per call and SET once per
  admitted call, shown apart.
- the gateway's own /metrics: round trips by purpose (`gateway_backend_seconds_count`, Postgres primary and
  standby apart), rate-limit charges by source (lease, refill, exact) and key lookups by cache tier.
- `pg_stat_statements` (statements by text; asyncpg's pool resets a connection on release with one round trip
  of four statements, counted apart), in the single and cluster topologies. Not `pg_stat_database`:
  Postgres 15 backends flush those counters lazily (up to 10 s idle), so short deltas undercount.
- CPU seconds of the gateway, Redis and every Postgres process (/proc), per request.

Background work is counted too and shown as such: each process PINGs Redis and runs `SELECT 1` once a
second (health), its LISTEN connection runs `SELECT 1` every 0.5 s, last use and audit rows are flushed
in batches. Every process this starts is stopped on the way out, on error and Ctrl-C too; `--timeout`
bounds the whole run (about 40 s with the defaults).

    .venv/bin/python scripts/measure_redis_ops.py [--topology single|cluster|replica] [--only hot-exact,unknown]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as aioredis
import yaml

from gateway._services import PG_BIN_DIRS, Postgres, Redis, free_port
from gateway.config import config_from_mapping
from gateway.data.db import Database
from gateway.data.schema import migrate
from gateway.directory import Directory
from gateway.keyring import Keyring, KeySpec
from gateway.keys import KeyFormat, SecretHasher

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config/gateway.yaml"
POLICY = ROOT / "config/policy.yaml"
ROUTE = "/v1/things"  # config/policy.yaml's "api" rule: a valid key, the org from X-Org-Id
PEPPER = "measure-pepper-0123456789abcdefghijklmnopqrstuvwxyz"
SMALL_ARGON2 = {"memory_kib": 1024, "time_cost": 1, "parallelism": 1}
RAISED = {"rate": "1000000/1s", "burst": 1000000}  # as `make bench`: every request charged, none refused
# Every failed verification (an unknown key) is charged to the client's address: raised so that none is
# refused, and `exact` as the shipped burst of 10 makes it (a lease of at most a tenth of the burst: 1).
FAILURES_RAISED = {**RAISED, "exact": True}
OWN_COMMANDS = ("config|resetstat", "info", "dbsize")  # this script's, not the gateway's
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROBE_S = 0.05


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    rate_limits: dict[str, Any]
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    traffic: str = "hot"  # hot (one key) | spread (keys in turn) | unknown (a new unknown key each) | cold
    probe: bool = False  # meanwhile, another key of the same org asks every PROBE_S: what is it answered?


SCENARIOS = [
    Scenario(
        "hot-lease",
        "one cached key, key and org limits raised (lease of up to 1000 tokens): `make bench` row 2",
        {"key": RAISED, "org": RAISED},
    ),
    Scenario(
        "hot-exact",
        "as hot-lease with `exact: true` on the key and org limits (no leases): `make bench` row 3",
        {"key": {**RAISED, "exact": True}, "org": {**RAISED, "exact": True}},
    ),
    Scenario(
        "spread-lease",
        "SPREAD cached keys in turn (one org), limits as hot-lease: each key lukewarm in this process",
        {"key": RAISED, "org": RAISED},
        traffic="spread",
    ),
    Scenario(
        "over-limit",
        "one cached key with the shipped limits (key 600/1m burst 100, org 3000/1m burst 500): mostly 429",
        {},
        probe=True,
    ),
    Scenario(
        "redis-tier",
        "SPREAD keys in turn through a one-entry in-process cache: every lookup answered by Redis (row 6)",
        {"key": RAISED, "org": RAISED},
        cache={"local_max_entries": 1},
        traffic="spread",
    ),
    Scenario(
        "unknown",
        "MISS well-formed keys whose id is in no database row, each once: Redis miss, Postgres lookup, 401",
        {"key": RAISED, "org": RAISED, "failures_per_address": FAILURES_RAISED},
        traffic="unknown",
    ),
    Scenario(
        "cold",
        "MISS valid keys never seen, each once: Redis miss, Postgres lookup, argon2, Redis fill, 200",
        {"key": RAISED, "org": RAISED, "failures_per_address": FAILURES_RAISED},
        traffic="cold",
    ),
]


# --- servers --------------------------------------------------------------------------------------


def stat_statements_lib() -> bool:
    """Whether the Postgres server we will run ships pg_stat_statements."""
    for d in PG_BIN_DIRS:
        if Path(d, "postgres").exists():
            return Path(d).parent.joinpath("lib", "pg_stat_statements.so").exists()
    return False


@dataclasses.dataclass
class Backends:
    """What the gateways of this run use: a Postgres primary (and its streaming standby), one Redis or the
    masters of a Redis Cluster."""

    tmp: Path
    pg: Postgres
    replica: Postgres | None
    redis_url: str  # "" in cluster mode
    cluster: list[str]  # host:port of each master in cluster mode
    redis_nodes: list[tuple[int, Callable[[], int]]]  # (port, pid of the server) of every Redis
    statements: bool  # pg_stat_statements preloaded on the primary


def _tests_importable() -> None:
    """tests/_topologies.py (the suite's own Redis Cluster and Postgres streaming-replica servers) importable."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def _preload_statements(pg: Postgres) -> None:
    with open(pg.datadir / "postgresql.conf", "a") as conf:
        conf.write("\nshared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track = all\n")


def _pid_of(pidfile: Path) -> Callable[[], int]:
    return lambda: int(pidfile.read_text().split()[0]) if pidfile.exists() else 0


def _pid_of_proc(proc: Callable[[], subprocess.Popen[bytes] | None]) -> Callable[[], int]:
    def pid() -> int:
        p = proc()
        return p.pid if p is not None else 0

    return pid


@contextlib.contextmanager
def services(topology: str) -> Iterator[Backends]:
    """The servers of `topology` (single: one Postgres with pg_stat_statements when available, one Redis;
    cluster: that Postgres and a 3-master Redis Cluster; replica: a Postgres primary with a streaming hot
    standby, one Redis), stopped and removed on exit, whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="gateway-measure-"))
    tmp.chmod(0o755)  # the postgres user must reach its data directory
    stops: list[Callable[[], None]] = []
    try:
        replica: Postgres | None = None
        statements = False
        if topology == "replica":
            _tests_importable()
            from tests._topologies import PostgresStreamingReplica

            pair = PostgresStreamingReplica(tmp)
            stops.append(pair.stop)
            pair.start()
            pg, replica = pair.primary, pair.replica
        else:
            pg = Postgres(tmp / "pg", free_port())
            stops.append(pg.stop)
            pg.init()
            statements = stat_statements_lib()
            if statements:
                _preload_statements(pg)
            pg.start()
        if topology == "cluster":
            _tests_importable()
            from tests._topologies import RedisClusterTopology

            nodes = RedisClusterTopology(tmp / "cluster", masters=3)
            stops.append(nodes.stop)
            nodes.start()
            redis_nodes = [(n.port, _pid_of_proc(functools.partial(getattr, n, "proc"))) for n in nodes.nodes]
            yield Backends(tmp, pg, replica, "", list(nodes.addresses), redis_nodes, statements)
        else:
            rd = Redis(tmp / "redis", free_port())
            stops.append(rd.stop)
            rd.start()
            yield Backends(tmp, pg, replica, rd.url, [], [(rd.port, _pid_of(rd.pidfile))], statements)
    finally:
        for stop in reversed(stops):
            with contextlib.suppress(Exception):
                stop()
        shutil.rmtree(tmp, ignore_errors=True)


@dataclasses.dataclass
class Seeded:
    org: str
    hot: str
    spread: list[str]
    cold: list[str]


async def seed(pg_url: str, spread: int, cold: int, statements: bool) -> Seeded:
    """Migrates, then one org, its admin and the admin's keys (`1 + spread + cold`)."""
    env = {"GATEWAY_DATABASE_URL": pg_url, "GATEWAY_REDIS_URL": "redis://127.0.0.1:1/0", "GATEWAY_PEPPER": PEPPER}
    cfg = config_from_mapping({"keys": {"argon2": SMALL_ARGON2}}, env=env)  # Redis is not used here
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    hasher = SecretHasher(cfg.keys.argon2, 2)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
            if statements:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        db = Database(pool)
        directory, keyring = Directory(db, cfg.roles), Keyring(db, KeyFormat(cfg.keys.prefix), hasher, cfg.roles)
        org = (await directory.create_org("measure"))["id"]
        user = (await directory.create_user("measure@example.com"))["id"]
        await directory.set_member(org, user, "admin")
        spec = KeySpec(user_id=user, name="measure", role="admin", orgs=[], projects=[], scopes=None)
        gate = asyncio.Semaphore(4)

        async def one() -> str:
            async with gate:
                return str((await keyring.create_key(spec))["key"])

        keys = list(await asyncio.gather(*(one() for _ in range(1 + spread + cold))))
        return Seeded(org, keys[0], keys[1 : 1 + spread], keys[1 + spread :])
    finally:
        hasher.close()
        await pool.close()


def gateway_config(b: Backends, s: Scenario) -> Path:
    data = yaml.safe_load(SHIPPED.read_text())
    data["log_level"] = "WARNING"  # no line per decision
    if b.cluster:
        data["redis"] = {**data.get("redis", {}), "url": "", "cluster": {"addresses": b.cluster}}
    data["policy_file"] = str(POLICY)
    data["server"] = {**data.get("server", {}), "drain_s": 0}
    for name, over in s.rate_limits.items():
        data["rate_limits"][name] = {**data["rate_limits"].get(name, {}), **copy.deepcopy(over)}
    data["cache"] = {**data.get("cache", {}), **s.cache}
    path = b.tmp / f"{s.name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Gateway:
    """One `gateway serve --workers 1` in its own session, stopped by SIGINT (killed after 10 s)."""

    def __init__(self, b: Backends, s: Scenario) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(GATEWAY_DATABASE_URL=b.pg.url, GATEWAY_PEPPER=PEPPER, GATEWAY_SIGNING_SECRET=PEPPER[::-1])
        if b.redis_url:
            env["GATEWAY_REDIS_URL"] = b.redis_url
        if b.replica is not None:
            env["GATEWAY_DATABASE_REPLICA_URL"] = b.replica.url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = b.tmp / f"{s.name}.log"
        cmd = [sys.executable, "-m", "gateway", "--config", str(gateway_config(b, s))]
        cmd += ["serve", "--workers", "1", "--port", str(self.port)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - a fixed argument list, no shell
                cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    async def ready(self, http: aiohttp.ClientSession) -> None:
        """Until /readyz says ready with the invalidation listener connected (30 s at most)."""
        for _ in range(600):
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"gateway exited with status {self.proc.returncode}: {' | '.join(tail)}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(self.url + "/readyz") as r:
                    body = await r.json()
                    if r.status == 200 and body.get("checks", {}).get("invalidations") == "ok":
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError("gateway did not become ready within 30 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def warnings(self) -> list[str]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [ln[:200] for ln in lines if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback", ln)]


# --- counters -------------------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def postgres_cpu_s(pg: Postgres) -> float:
    """The postmaster's CPU and its children's, live (backends, workers) and reaped (cutime, cstime)."""
    try:
        master = int((pg.datadir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == master:
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / CLK_TCK
        elif ppid == master:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


async def gateway_metrics(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    async with http.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(("gateway_backend_seconds_count", "gateway_ratelimit_charges", "gateway_key_cache")):
                name, value = line.rsplit(" ", 1)
                if not name.split("{")[0].endswith("_created"):
                    out[name] = float(value)
    return out


def labels(series: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', series))


async def commandstats(clients: Sequence[aioredis.Redis]) -> dict[str, tuple[int, int]]:
    """(calls, usec) by command name, as INFO commandstats reports them, summed over every Redis."""
    out: dict[str, tuple[int, int]] = {}
    for client in clients:
        for name, stats in (await client.info("commandstats")).items():
            if isinstance(stats, dict):
                calls, usec = out.get(name.removeprefix("cmdstat_"), (0, 0))
                calls, usec = calls + int(stats.get("calls", 0)), usec + int(stats.get("usec", 0))
                out[name.removeprefix("cmdstat_")] = (calls, usec)
    return out


@dataclasses.dataclass
class Snapshot:
    cpu: dict[str, float]
    metrics: dict[str, float]


async def snapshot(http: aiohttp.ClientSession, gw: Gateway, b: Backends) -> Snapshot:
    cpu = {"gateway": cpu_s(gw.proc.pid), "redis": sum(cpu_s(pid()) for _, pid in b.redis_nodes)}
    cpu["postgres"] = postgres_cpu_s(b.pg)
    if b.replica is not None:
        cpu["postgres standby"] = postgres_cpu_s(b.replica)
    return Snapshot(cpu, await gateway_metrics(http, gw.url))


STATEMENT_NAMES = (
    ("json_object_agg", "keys.load: the key with its owner's memberships (a miss's lookup)"),
    ("pg_advisory_unlock_all", "pool release reset, 1 of 4 in one round trip: SELECT pg_advisory_unlock_all()"),
    ("close all", "pool release reset, 2 of 4: CLOSE ALL"),
    ("unlisten *", "pool release reset, 3 of 4: UNLISTEN *"),
    ("reset all", "pool release reset, 4 of 4: RESET ALL"),
    ("select $1", "SELECT 1: health check (1/s) and the LISTEN connection's ping (2/s)"),
    ("insert into audit_events", "audit rows (denials aggregated per second, uses per minute)"),
    ("last_used_at", "keys' last use (batched every 5 s)"),
    ("signing_keys", "JWT signing keys (re-read every 60 s)"),
)


def statement_name(query: str) -> str:
    q = " ".join(query.split()).lower()
    for needle, name in STATEMENT_NAMES:
        if needle in q:
            return name
    return " ".join(query.split())[:90]


async def statements(conn: asyncpg.Connection) -> Counter[str]:
    rows = await conn.fetch(
        "SELECT query, calls FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
        " WHERE datname = current_database())"
    )
    out: Counter[str] = Counter()
    for r in rows:
        q = str(r["query"])
        if "pg_stat_" in q or q.lower().startswith(("create extension", "select pg_stat_statements_reset")):
            continue  # this script's own
        out[statement_name(q)] += int(r["calls"])
    return out


# --- traffic --------------------------------------------------------------------------------------


async def send(
    http: aiohttp.ClientSession, url: str, keys: Sequence[str], org: str, concurrency: int
) -> tuple[Counter[int], float]:
    """One GET /auth/nginx per key in `keys`, `concurrency` at a time on keep-alive connections."""
    base = {"X-Original-Method": "GET", "X-Original-URI": ROUTE, "X-Org-Id": org}
    todo = iter(keys)
    statuses: Counter[int] = Counter()

    async def worker() -> None:
        for key in todo:
            async with http.get(url, headers={**base, "Authorization": f"Bearer {key}"}) as r:
                await r.read()
                statuses[r.status] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses, time.perf_counter() - started


async def neighbour(url: str, seeded: Seeded, seen: Counter[str]) -> None:
    """Another key of the same org, one request every PROBE_S until cancelled (on its own connection, not
    queued behind the load): its answers, by status and the limit a refusal names."""
    headers = {"X-Original-Method": "GET", "X-Original-URI": ROUTE, "X-Org-Id": seeded.org}
    headers["Authorization"] = f"Bearer {seeded.spread[0]}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while True:
            async with http.get(url, headers=headers) as r:
                body = await r.text()
                named = re.search(r"\((\w+) limit\)", body)
                seen[f"{r.status}" + (f" ({named.group(1)} limit)" if named else "")] += 1
            await asyncio.sleep(PROBE_S)


@dataclasses.dataclass
class Result:
    scenario: Scenario
    requests: int
    seconds: float
    statuses: Counter[int]
    commands: dict[str, tuple[int, int]]
    statements: Counter[str] | None
    cpu: dict[str, float]
    metrics: dict[str, float]
    dbsize: int
    used_memory: int
    warnings: list[str]
    probe: Counter[str]
    cluster: bool  # the rate limiter's calls are one request each there (no pipeline: see gateway/ratelimit.py)


def traffic(s: Scenario, seeded: Seeded, n: int, misses: int) -> tuple[list[str], list[str]]:
    """(warm-up keys, measured keys)."""
    if s.traffic == "hot":
        return [seeded.hot] * 500, [seeded.hot] * n
    if s.traffic == "spread":
        return list(seeded.spread), [seeded.spread[i % len(seeded.spread)] for i in range(n)]
    if s.traffic == "unknown":
        fmt = KeyFormat("gw")
        return [seeded.hot] * 20, [fmt.generate("live")[0] for _ in range(misses)]
    return [seeded.hot] * 20, list(seeded.cold[:misses])  # cold


async def measure(s: Scenario, b: Backends, seeded: Seeded, args: argparse.Namespace) -> Result:
    clients = [aioredis.Redis(host="127.0.0.1", port=port) for port, _ in b.redis_nodes]
    # An empty Redis for each scenario: a limit's GCRA state outlives the process that wrote it (an earlier
    # scenario's smaller org limit would refuse this one's requests until its TAT had passed).
    for client in clients:
        await client.flushall()
    gw = Gateway(b, s)
    conn = await asyncpg.connect(b.pg.url)
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            await gw.ready(http)
            auth = gw.url + "/auth/nginx"
            warm, keys = traffic(s, seeded, args.requests, args.misses)
            await send(http, auth, warm, seeded.org, args.concurrency)
            await asyncio.sleep(0.3)  # the warm-up's background writes land before the counters are reset
            before = await snapshot(http, gw, b)
            if b.statements:
                await conn.execute("SELECT pg_stat_statements_reset()")
            for client in clients:
                await client.config_resetstat()
            probe: Counter[str] = Counter()
            prober = asyncio.ensure_future(neighbour(auth, seeded, probe)) if s.probe else None
            try:
                statuses, seconds = await send(http, auth, keys, seeded.org, args.concurrency)
            finally:
                if prober is not None:
                    prober.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await prober
            commands = await commandstats(clients)
            found = await statements(conn) if b.statements else None
            after = await snapshot(http, gw, b)
            memory = sum([int((await c.info("memory")).get("used_memory", 0)) for c in clients])
            dbsize = sum([int(await c.dbsize()) for c in clients])
    finally:
        gw.stop()
        for client in clients:
            await client.aclose()
        await conn.close()
    metrics = {k: v - before.metrics.get(k, 0.0) for k, v in after.metrics.items()}
    return Result(
        s,
        len(keys),
        seconds,
        statuses,
        {k: v for k, v in commands.items() if k not in OWN_COMMANDS},
        found,
        {who: sec - before.cpu.get(who, 0.0) for who, sec in after.cpu.items()},
        {k: v for k, v in metrics.items() if v > 0},
        dbsize,
        memory,
        gw.warnings(),
        probe,
        bool(b.cluster),
    )


# --- report ---------------------------------------------------------------------------------------


def per(n: float, requests: int) -> str:
    return f"{n / requests:.4f}" if requests else "-"


def split_commands(r: Result) -> tuple[dict[str, int], dict[str, int], int]:
    """(commands the gateway sent, commands its scripts ran inside Redis, script runs)."""
    calls = {k: c for k, (c, _) in r.commands.items()}
    runs = calls.get("evalsha", 0) + calls.get("eval", 0)
    sets_sent = sum(
        int(v)
        for k, v in r.metrics.items()
        if k.startswith("gateway_backend_seconds_count") and labels(k).get("op") in ("cache_put", "cache_put_negative")
    )
    inner = {"time": min(calls.get("time", 0), runs), "get": min(calls.get("get", 0), runs)}
    inner["set"] = max(0, calls.get("set", 0) - sets_sent)
    sent = {k: c - inner.get(k, 0) for k, c in calls.items()}
    return {k: c for k, c in sent.items() if c}, {k: c for k, c in inner.items() if c}, runs


def report(r: Result) -> list[str]:
    s, n = r.scenario, r.requests
    answers = ", ".join(f"{code} x{count}" for code, count in sorted(r.statuses.items()))
    sent, inner, runs = split_commands(r)
    out = [
        f"## {s.name}: {s.what}",
        "",
        f"{n:,} requests in {r.seconds:.1f} s ({n / r.seconds:,.0f}/s): {answers}",
        "",
        "| Redis command (INFO commandstats) | calls | per request | per second | µs executing, per request |",
        "|---|---:|---:|---:|---:|",
    ]
    notes = {
        "ping": " (background: health check, 1/s)",
        "hello": " (connection set-up: the pool growing)",
        "client|setname": " (connection set-up)",
        "script|exists": " (redis-py: before each pipeline with a script)",
    }
    for name, calls in sorted(sent.items(), key=lambda kv: -kv[1]):
        usec = r.commands.get(name, (0, 0))[1]
        rate = calls / r.seconds
        out.append(f"| {name}{notes.get(name, '')} | {calls:,} | {per(calls, n)} | {rate:,.0f} | {usec / n:.2f} |")
    for name, calls in sorted(inner.items()):
        rate = calls / r.seconds
        out.append(f"| {name} (inside the GCRA script) | {calls:,} | {per(calls, n)} | {rate:,.0f} | (in evalsha's) |")
    total_sent = sum(c for k, c in sent.items() if k != "ping")
    sent_rate = total_sent / r.seconds
    out.append(f"| **sent by the gateway, PING aside** | {total_sent:,} | {per(total_sent, n)} | {sent_rate:,.0f} | |")
    out.append(f"| **GCRA script runs** (evalsha) | {runs:,} | {per(runs, n)} | {runs / r.seconds:,.0f} | |")
    out += ["", "| gateway metric (delta) | count | per request |", "|---|---:|---:|"]
    for series, v in sorted(r.metrics.items()):
        lab = labels(series)
        if series.startswith("gateway_backend_seconds_count"):
            what = f"round trips to {lab.get('backend')}: {lab.get('op')}"
        elif series.startswith("gateway_ratelimit_charges"):
            what = f"rate-limit charge: {lab.get('limit')} from {lab.get('source')}"
        else:
            what = f"key lookup answered by: {lab.get('tier')}"
        out.append(f"| {what} | {v:,.0f} | {per(v, n)} |")
    out += ["", "| Postgres | count | per request |", "|---|---:|---:|"]
    if r.statements is not None:
        for name, calls in r.statements.most_common():
            out.append(f"| statement: {name} | {calls:,} | {per(calls, n)} |")
    else:
        out.append("| (no pg_stat_statements in this topology: see the round trips above) | | |")
    out += ["", "| CPU (/proc utime+stime) | seconds | µs per request |", "|---|---:|---:|"]
    for who, sec in r.cpu.items():
        out.append(f"| {who} | {sec:.2f} | {sec / n * 1e6:,.0f} |")
    out += ["", f"Redis afterwards: {r.dbsize:,} keys, used_memory {r.used_memory:,} bytes."]
    if r.probe:
        seen = ", ".join(f"{k} x{v}" for k, v in sorted(r.probe.items()))
        out += ["", f"Meanwhile another key of the same org, one request every {PROBE_S * 1000:.0f} ms: {seen}."]
    if r.warnings:
        out += ["", "Gateway warnings: " + "; ".join(r.warnings[:3])]
    return [*out, ""]


def summary(results: list[Result]) -> list[str]:
    out = [
        "## Summary (per request)",
        "",
        "| scenario | requests | req/s | answers | Redis cmds sent | of which EVALSHA | SCRIPT EXISTS"
        " | incl. in-script | Redis round trips | Redis CPU µs | PG lookups | PG statements | gateway CPU µs |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        n = r.requests
        sent, inner, runs = split_commands(r)
        total_sent = sum(c for k, c in sent.items() if k != "ping")
        trips = sum(v for k, v in r.metrics.items() if 'backend="redis"' in k and "_count" in k)
        if r.cluster:  # each EVALSHA its own request, where the metric counts one per batch
            trips += runs - sum(v for k, v in r.metrics.items() if 'backend="redis"' in k and 'op="ratelimit"' in k)
        trips += sent.get("script|exists", 0)  # a pipeline with a script is two round trips (redis-py)
        lookups = r.statements.get(STATEMENT_NAMES[0][1], 0) if r.statements is not None else 0
        pg_all = sum(r.statements.values()) if r.statements is not None else 0
        answers = ", ".join(f"{c}" for c in sorted(r.statuses))
        na = r.statements is None
        out.append(
            f"| {r.scenario.name} | {n:,} | {n / r.seconds:,.0f} | {answers} | {per(total_sent, n)} | {per(runs, n)}"
            f" | {per(sent.get('script|exists', 0), n)} | {per(total_sent + sum(inner.values()), n)}"
            f" | {per(trips, n)} | {r.cpu['redis'] / n * 1e6:,.1f}"
            f" | {'n/a' if na else per(lookups, n)} | {'n/a' if na else per(pg_all, n)}"
            f" | {r.cpu['gateway'] / n * 1e6:,.0f} |"
        )
    return [*out, ""]


async def caught_up(primary: str, standby: str, timeout_s: float = 30) -> None:
    """Until the standby has replayed what the primary had written when this was called."""
    p, s = await asyncpg.connect(primary), await asyncpg.connect(standby)
    try:
        target = await p.fetchval("SELECT pg_current_wal_insert_lsn()")
        deadline = time.monotonic() + timeout_s
        while (await s.fetchval("SELECT pg_last_wal_replay_lsn()")) < target:
            if time.monotonic() > deadline:
                raise RuntimeError("the standby did not catch up with the seeded data")
            await asyncio.sleep(0.05)
    finally:
        await p.close()
        await s.close()


async def run(args: argparse.Namespace, only: set[str] | None) -> None:
    started = time.monotonic()
    chosen = [s for s in SCENARIOS if only is None or s.name in only]
    with services(args.topology) as b:
        t = time.perf_counter()
        cold = args.misses if any(s.traffic == "cold" for s in chosen) else 0
        seeded = await seed(b.pg.url, args.spread, cold, b.statements)
        if b.replica is not None:
            await caught_up(b.pg.url, b.replica.url)
        print(f"# measure_redis_ops: {1 + args.spread + cold} keys created in {time.perf_counter() - t:.1f} s")
        redis = f"Redis Cluster {', '.join(b.cluster)}" if b.cluster else f"Redis {b.redis_url}"
        standby = f", its streaming standby {b.replica.url} (database.replica_url)" if b.replica else ""
        print(
            f"Topology {args.topology}: Postgres {b.pg.url}{standby}; {redis}; pg_stat_statements:"
            f" {'yes' if b.statements else 'no'}; client concurrency {args.concurrency}\n",
            flush=True,
        )
        results: list[Result] = []
        try:
            async with asyncio.timeout(max(1.0, args.timeout - (time.monotonic() - started))):
                for scenario in chosen:
                    what = scenario.what.replace("SPREAD", str(args.spread)).replace("MISS", str(args.misses))
                    s = dataclasses.replace(scenario, what=what)
                    async with asyncio.timeout(args.scenario_timeout):
                        r = await measure(s, b, seeded, args)
                    results.append(r)
                    print("\n".join(report(r)), flush=True)
        except TimeoutError:
            print(f"stopped: past --timeout {args.timeout:.0f} s or --scenario-timeout {args.scenario_timeout:.0f} s")
        print("\n".join(summary(results)))
        print(f"{time.monotonic() - started:.0f} s in all")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=50_000, help="measured requests of each cached-key scenario")
    ap.add_argument("--misses", type=int, default=2_000, help="measured requests of the unknown and cold scenarios")
    ap.add_argument("--spread", type=int, default=200, help="keys in turn in spread-lease and redis-tier")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    ap.add_argument("--scenario-timeout", type=float, default=40, help="seconds one scenario may take")
    ap.add_argument("--timeout", type=float, default=115, help="seconds the whole run may take (servers started)")
    ap.add_argument("--only", help="comma-separated scenario names: " + ",".join(s.name for s in SCENARIOS))
    ap.add_argument(
        "--topology",
        choices=["single", "cluster", "replica"],
        default="single",
        help="single: one Postgres, one Redis; cluster: a 3-master Redis Cluster (redis.cluster); replica: a"
        " Postgres streaming standby (database.replica_url)",
    )
    args = ap.parse_args()
    only = {x.strip() for x in args.only.split(",")} if args.only else None
    unknown = sorted((only or set()) - {s.name for s in SCENARIOS})
    if unknown:
        sys.exit(f"--only: no scenario {unknown[0]}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stops what it started, like Ctrl-C
    asyncio.run(run(args, only))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted")
