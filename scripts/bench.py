"""`make bench`: one table of throughput and latency ratios, every figure measured side by side in this run.

The server under test runs alone on core 0 (`taskset -c 0`), wrk on core 1 (`taskset -c 1 wrk -t1 ...`),
over loopback; Postgres and Redis run on core 1 too (they stand in for servers elsewhere: they compete
with wrk, not with the server under test). Starts its own Postgres and Redis and one `gateway serve
--workers 1` process per configuration (the shipped config/gateway.yaml, `log_level: WARNING`, the
shipped config/policy.yaml), and stops every process it started, on error and Ctrl-C too. Writes the
table to docs/benchmarks.md and prints it. `--duration N` sets the seconds of each measured wrk run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml
from _bench import ROOT, World, local_services, pct, seed_world

from gateway._services import free_port
from gateway.config import config_from_mapping
from gateway.errors import ConfigError

T = TypeVar("T")
DOC = ROOT / "docs/benchmarks.md"
SHIPPED = ROOT / "config/gateway.yaml"
POLICY = ROOT / "config/policy.yaml"
CORE_SERVER, CORE_CLIENT = "0", "1"
ROUTE = "/v1/things"  # config/policy.yaml's "api" rule: a valid key, the org from X-Org-Id
UNLIMITED = {"rate": "1000000/1s", "burst": 1000000}
CONNS, FEW_CONNS, FLOOD_CONNS = 50, 10, 50
WARMUP_S = 2
COLD_S = 5
REVOCATIONS = 100
POLL_S = 0.002
ROWS = frozenset(["1", "2", "3", "4", "5", "6", "7", "8", "8a", "8b", "9", "9a", "9b", "10", "11", "12"])
COLD_POOL = 600  # cold keys: each is verified (argon2) once per fresh Redis; rows 7 and 8 use them in turn

WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "status": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"timeout": %d, "p50_us": %.1f, "p99_us": %.1f, "max_us": %.1f}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""
# Each request takes the next key of the file given after `--` (wrapping at its end): the header is
# rebuilt per request. With -t1 one Lua state sends every request, so the keys go out in order.
WRK_ROTATE = r"""
local keys, n, i = {}, 0, 0
function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then n = n + 1; keys[n] = "Bearer " .. line end
  end
end
function request()
  i = i % n + 1
  wrk.headers["Authorization"] = keys[i]
  return wrk.format()
end
"""


# --- processes ------------------------------------------------------------------------------------


class Children:
    """Every process this run starts, each in its own session (so Ctrl-C reaches only us, and we stop
    them in order), stopped by its own signal, killed if it does not go."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[int, tuple[str, subprocess.Popen[bytes], int]] = {}

    def start(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None, stop: int = signal.SIGINT
    ) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
            )
        self.procs[proc.pid] = (name, proc, stop)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
        _, _, sig = self.procs.pop(proc.pid, ("", proc, signal.SIGINT))
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for _, proc, _ in reversed(list(self.procs.values())):
            self.stop(proc)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def pinned(core: str, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", core, *cmd]


@contextlib.contextmanager
def affinity(cores: set[int]) -> Iterator[None]:
    """This thread (and what it starts) on `cores` for a while."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port}")


def flush_redis(url: str) -> None:
    """FLUSHDB on our own Redis: cold keys are cold again (no cached entry, no negative one)."""
    host, _, rest = url.removeprefix("redis://").partition(":")
    with socket.create_connection((host, int(rest.partition("/")[0])), timeout=5) as s:
        s.sendall(b"FLUSHDB\r\n")
        if not s.recv(64).startswith(b"+OK"):
            raise RuntimeError("FLUSHDB failed")


# --- nginx ----------------------------------------------------------------------------------------


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_version() -> str:
    return version([nginx_binary(), "-v"]).removeprefix("nginx version: ")


def write_nginx_conf(root: Path, port: int, auth_port: int, app_port: int) -> Path:
    """deploy/nginx/gateway.conf with its ports and log path adapted (as tests/test_deploy_nginx.py does),
    one worker, and the upstream as a second server block answering 200 itself."""
    site = (ROOT / "deploy/nginx/gateway.conf").read_text()
    for old, new in (
        ("127.0.0.1:8080", f"127.0.0.1:{auth_port}"),
        ("127.0.0.1:9000", f"127.0.0.1:{app_port}"),
        ("listen 8000;", f"listen 127.0.0.1:{port};"),
        ("/var/log/nginx/gateway.access.log", str(root / "access.log")),
    ):
        if old not in site:
            raise RuntimeError(f"deploy/nginx/gateway.conf no longer holds {old!r}: adapt scripts/bench.py")
        site = site.replace(old, new)
    root.mkdir(parents=True, exist_ok=True)
    (root / "site.conf").write_text(site)
    (root / "upstream.conf").write_text(
        f"server {{\n    listen 127.0.0.1:{app_port};\n    access_log off;\n"
        f'    location / {{ return 200 "ok\\n"; }}\n}}\n'
    )
    temp = "".join(f"{d}_temp_path {root}/{d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = root / "nginx.conf"
    conf.write_text(
        f"worker_processes 1;\ndaemon off;\npid {root}/nginx.pid;\nerror_log {root}/error.log warn;\n"
        f"events {{ worker_connections 1024; }}\n"
        f"http {{\naccess_log off;\n{temp}include {root}/site.conf;\ninclude {root}/upstream.conf;\n}}\n"
    )
    check = subprocess.run(
        [nginx_binary(), "-t", "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t: {check.stderr.strip()[-300:]}")
    return conf


# --- wrk ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    requests: int
    seconds: float
    non2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


class Wrk:
    def __init__(self, tmp: Path, children: Children, headers: dict[str, str]) -> None:
        self.tmp = tmp
        self.children = children
        self.headers = headers
        self.count = 0
        (tmp / "done.lua").write_text(WRK_DONE)
        (tmp / "rotate.lua").write_text(WRK_ROTATE + WRK_DONE)

    def command(
        self, url: str, conns: int, seconds: int, keys: Path | None, headers: dict[str, str | None]
    ) -> list[str]:
        script = self.tmp / ("rotate.lua" if keys else "done.lua")
        cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "10s", "-s", str(script)]
        for name, value in {**self.headers, **headers}.items():
            if value is not None:  # None: this run does not send the header
                cmd += ["-H", f"{name}: {value}"]
        cmd.append(url)
        if keys is not None:
            cmd += ["--", str(keys)]
        return pinned(CORE_CLIENT, cmd)

    def start(
        self, url: str, conns: int, seconds: int, keys: Path | None = None, headers: dict[str, str | None] | None = None
    ) -> tuple[subprocess.Popen[bytes], str]:
        self.count += 1
        name = f"wrk{self.count}"
        return self.children.start(name, self.command(url, conns, seconds, keys, headers or {})), name

    def finish(self, proc: subprocess.Popen[bytes], name: str, seconds: int) -> Run:
        try:
            proc.wait(seconds + 30)
        finally:
            self.children.stop(proc)
        out = self.children.log(name)
        m = re.search(r"^WRKJSON (\{.*\})$", out, re.MULTILINE)
        if proc.returncode != 0 or m is None:
            raise RuntimeError(f"wrk failed (status {proc.returncode}): {out.strip()[-300:]}")
        d = json.loads(m.group(1))
        return Run(
            requests=d["requests"],
            seconds=d["duration_us"] / 1e6,
            non2xx=d["status"],
            socket_errors=d["connect"] + d["read"] + d["write"] + d["timeout"],
            p50_ms=d["p50_us"] / 1000,
            p99_ms=d["p99_us"] / 1000,
        )

    def run(
        self,
        url: str,
        conns: int,
        seconds: int,
        keys: Path | None = None,
        headers: dict[str, str | None] | None = None,
        warm: bool = True,
    ) -> Run:
        if warm:
            self.finish(*self.start(url, conns, WARMUP_S, keys, headers), WARMUP_S)
        return self.finish(*self.start(url, conns, seconds, keys, headers), seconds)


# --- the gateway ----------------------------------------------------------------------------------


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def shipped(**rate_limits: Any) -> dict[str, Any]:
    """config/gateway.yaml as shipped, but WARNING logs (no access log line per request) and its policy
    file named absolutely; `rate_limits` merged over the shipped ones."""
    data = yaml.safe_load(SHIPPED.read_text())
    data = merge(data, {"log_level": "WARNING", "policy_file": str(POLICY), "rate_limits": rate_limits})
    return data


def raised(**extra: Any) -> dict[str, Any]:
    return shipped(key={**UNLIMITED, **extra}, org={**UNLIMITED, **extra})


class Unsupported(Exception):
    pass


class Gateways:
    def __init__(self, tmp: Path, env: dict[str, str], children: Children) -> None:
        self.tmp = tmp
        self.env = env
        self.children = children

    def start(self, name: str, data: dict[str, Any]) -> tuple[subprocess.Popen[bytes], str]:
        try:
            config_from_mapping(data, env=self.env)
        except ConfigError as exc:
            raise Unsupported(str(exc)) from None
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(data, sort_keys=False))
        port = free_port()
        cmd = [sys.executable, "-m", "gateway", "--config", str(cfg), "serve", "--workers", "1", "--port", str(port)]
        proc = self.children.start(name, pinned(CORE_SERVER, cmd), env=self.env)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(self.wait_ready(url, proc, name))
        return proc, url

    async def wait_ready(self, url: str, proc: subprocess.Popen[bytes], name: str) -> None:
        """Until /readyz says ready with the invalidation listener connected."""
        async with aiohttp.ClientSession() as s:
            for _ in range(600):
                if proc.poll() is not None:
                    tail = self.children.log(name).strip().splitlines()[-1:]
                    raise RuntimeError(f"gateway {name} exited with status {proc.returncode}: {' '.join(tail)}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(url + "/readyz") as r:
                        body = await r.json()
                        if r.status == 200 and body.get("checks", {}).get("invalidations") == "ok":
                            return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"gateway {name} did not become ready")


async def metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("gateway_") and "_created" not in line.split()[0]:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
    return out


def delta(after: dict[str, float], before: dict[str, float], prefix: str) -> dict[str, float]:
    return {
        k[len(prefix) :]: v - before.get(k, 0.0)
        for k, v in after.items()
        if k.startswith(prefix) and v - before.get(k, 0.0) > 0
    }


def label(series: str, name: str) -> str:
    m = re.search(rf'{name}="([^"]*)"', series)
    return m.group(1) if m else series


def tiers(d: dict[str, float]) -> str:
    """Where the key lookups of a run (its warm-up included) were answered, as shares."""
    by = {label(k, "tier"): v for k, v in d.items() if k.startswith("gateway_key_cache_total")}
    total = sum(by.values())
    if not total:
        return "no key lookups"
    return "key lookups answered by: " + ", ".join(f"{t} {v / total:.1%}" for t, v in sorted(by.items()))


# --- the rows -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    num: str
    what: str
    run: Run | None = None
    rps: str = ""
    ratio: str = ""
    p50: str = ""
    p99: str = ""
    answers: str = ""
    bar: str = ""
    note: str = ""


def answers(run: Run, expect: str = "200") -> str:
    if expect == "200":
        text = "all 2xx" if run.non2xx == 0 else f"{run.non2xx} of {run.requests} non-2xx"
    else:
        text = f"all {expect}" if run.non2xx == run.requests else f"{run.requests - run.non2xx} not {expect}"
    return text + (f", {run.socket_errors} socket errors" if run.socket_errors else "")


def verdict(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'} ({text})"


class Bench:
    def __init__(
        self, tmp: Path, env: dict[str, str], redis_url: str, world: World, seconds: int, only: set[str] | None
    ) -> None:
        self.tmp = tmp
        self.only = only  # row numbers to run (`--rows`); None: every row
        self.env = env
        self.redis_url = redis_url
        self.world = world
        self.seconds = seconds
        self.children = Children(tmp)
        self.gateways = Gateways(tmp, env, self.children)
        keys = [str(k["key"]) for k in world.keys]
        self.hot, self.operator = keys[0], keys[1]
        self.tier_keys = world.keys[2 : 2 + REVOCATIONS]
        self.cold_file = tmp / "cold.txt"
        self.cold_file.write_text("\n".join(keys[2 + REVOCATIONS :]) + "\n")
        self.tier_file = tmp / "tier.txt"
        self.tier_file.write_text("\n".join(str(k["key"]) for k in self.tier_keys) + "\n")
        self.junk = self.hot[:-1] + ("A" if self.hot[-1] != "A" else "B")  # right shape, bad checksum
        self.request_headers = {"X-Original-Method": "GET", "X-Original-URI": ROUTE, "X-Org-Id": world.org}
        self.wrk = Wrk(tmp, self.children, {**self.request_headers, "Authorization": f"Bearer {self.hot}"})
        self.rows: dict[str, Row] = {}
        self.problems: list[str] = []
        self.started: list[tuple[datetime, str]] = []  # local time each row began, for the gateways' logs
        self.identity: dict[str, str] = {
            "X-Org": world.org,
            "X-Role": "admin",
            "X-User": world.user,
            "X-Key-Id": str(world.keys[0]["id"]),
            "X-Scopes": "*",
            "X-Project": "",
            "X-Key-Env": "live",
            "X-Auth-Method": "api_key",
        }

    def row(self, num: str, what: str, body: Callable[[Row], None]) -> None:
        r = Row(num, what)
        self.rows[num] = r
        if self.only is not None and num not in self.only and num.rstrip("ab") not in self.only:
            r.rps = "skipped (--rows)"
            return
        self.started.append((datetime.now(), num))  # naive local time, as the logs
        print(f"  row {num}: {what} ...", flush=True)
        try:
            body(r)
        except Unsupported as exc:
            r.rps = "n/a (exact not supported)" if "exact" in str(exc) else f"n/a (config refused: {exc})"
        except Exception as exc:  # the row says what went wrong; the table goes on
            r.rps = "error"
            r.note = str(exc)
            self.problems.append(f"row {num}: {exc}")

    def fill(self, r: Row, run: Run, ref: Run | None, ref_name: str = "row 1", expect: str = "200") -> None:
        r.run = run
        r.rps = f"{run.rps:,.0f}"
        r.ratio = f"{run.rps / ref.rps:.2f}x {ref_name}" if ref is not None else ""
        r.p50, r.p99 = f"{run.p50_ms:.2f}", f"{run.p99_ms:.2f}"
        r.answers = answers(run, expect)
        bad = run.non2xx if expect == "200" else run.requests - run.non2xx
        if bad or run.socket_errors:
            self.problems.append(f"row {r.num}: {r.answers}")

    def ref(self, num: str) -> Run | None:
        row = self.rows.get(num)
        return row.run if row is not None else None

    def measured(self, url: str, proc_name: str, run: Callable[[], T]) -> tuple[T, dict[str, float]]:
        """Runs `run` and returns what the gateway's counters say happened meanwhile."""
        before = asyncio.run(metrics(url))
        result = run()
        after = asyncio.run(metrics(url))
        self.check_counters(proc_name, delta(after, before, ""))
        return result, delta(after, before, "")

    def check_counters(self, name: str, d: dict[str, float]) -> None:
        for series, v in sorted(d.items()):
            if series.startswith(("gateway_backend_errors", "gateway_ratelimit_fallback", "gateway_argon2_busy")):
                self.problems.append(f"{name}: {series} +{v:.0f}")

    # row 1 and the nginx rows' auth server
    def bare(self) -> str:
        port = free_port()
        cmd = [sys.executable, str(ROOT / "scripts/bench_bare.py"), "--port", str(port)]
        proc = self.children.start("bare", pinned(CORE_SERVER, [*cmd, "--headers", json.dumps(self.identity)]))
        wait_port(port, proc, "the bare responder")
        return f"http://127.0.0.1:{port}"

    async def probe(self, url: str, key: str) -> tuple[int, dict[str, str]]:
        async with (
            aiohttp.ClientSession() as s,
            s.get(url + "/auth/nginx", headers={**self.request_headers, "Authorization": f"Bearer {key}"}) as r,
        ):
            return r.status, dict(r.headers)

    def check_identity(self, url: str) -> None:
        status, headers = asyncio.run(self.probe(url, self.hot))
        if status != 200:
            self.problems.append(f"the first request of a valid key got {status} {headers.get('X-Auth-Error')}")
            return
        got = {h: headers.get(h) for h in self.identity}
        if got != self.identity:
            self.problems.append(f"identity headers differ from the bare responder's: {got} != {self.identity}")

    def all_rows(self) -> None:
        n = self.seconds
        auth = "/auth/nginx"
        bare_url = self.bare()

        def row1(r: Row) -> None:
            self.fill(r, self.wrk.run(bare_url + auth, CONNS, n), None)
            r.ratio = "1.00 (ceiling)"

        self.row("1", "bare aiohttp + uvloop responder: 200 + the eight identity headers", row1)

        gw2, url2 = self.gateways.start("gw-limits", raised())
        self.check_identity(url2)

        def row2(r: Row) -> None:
            run, d = self.measured(url2, "row 2", lambda: self.wrk.run(url2 + auth, CONNS, n))
            self.fill(r, run, self.ref("1"))
            r.note = tiers(d)
            ref = self.ref("1")
            if ref is not None:
                r.bar = verdict(run.rps >= 0.6 * ref.rps and run.p99_ms <= 10, "≥ 0.6x row 1, p99 ≤ 10 ms")

        self.row("2", "/auth/nginx, valid key, in-process cache hit, shipped config, key/org limits raised", row2)

        def row5(r: Row) -> None:
            junk: dict[str, str | None] = {"Authorization": f"Bearer {self.junk}"}
            run, _ = self.measured(url2, "row 5", lambda: self.wrk.run(url2 + auth, CONNS, n, headers=junk))
            self.fill(r, run, self.ref("1"), expect="401")
            ref = self.ref("1")
            if ref is not None:
                r.bar = verdict(run.rps >= 0.8 * ref.rps, "≥ 0.8x row 1")

        self.row("5", "junk key (right shape, bad checksum: refused with no I/O), row 2's process", row5)
        self.credential_rows(url2)
        self.nginx_rows(bare_url, url2)
        self.flood_rows(url2)
        self.children.stop(gw2)
        self.children.stop(self.children_named("bare"))

        def gateway_row(num: str, name: str, data: dict[str, Any], keys: Path | None = None) -> Callable[[Row], None]:
            def body(r: Row) -> None:
                proc, url = self.gateways.start(name, data)
                try:
                    run, d = self.measured(url, f"row {num}", lambda: self.wrk.run(url + auth, CONNS, n, keys))
                    self.fill(r, run, self.ref("1"))
                    r.note = tiers(d)
                finally:
                    self.children.stop(proc)

            return body

        self.row(
            "3",
            "as row 2 with `exact: true` on the key and org limits",
            gateway_row("3", "gw-exact", raised(exact=True)),
        )
        self.row(
            "4",
            "as row 2 with `rate_limits: {enabled: false}`",
            gateway_row("4", "gw-nolimits", shipped(enabled=False)),
        )
        redis_tier = merge(raised(), {"cache": {"local_max_entries": 1}})
        self.row(
            "6",
            f"Redis-hit tier: {REVOCATIONS} keys in turn through a one-entry in-process cache",
            gateway_row("6", "gw-redis", redis_tier, self.tier_file),
        )
        self.row("7", "cold misses: a new key each request (Postgres + argon2id), 5 s", self.cold_row)
        self.row("10", f"revocation delay across two processes ({REVOCATIONS} keys)", self.revocation_row)

    def credential_rows(self, url: str) -> None:
        """A JWT access token (verified once, then from the in-process cache: its family's state and the
        user's memberships fresh by NOTIFY) and a session cookie (one Redis read a request), on row 2's
        process, against the bare responder (row 1)."""
        auth = url + "/auth/nginx"
        token, cookie = asyncio.run(self.credentials(url))

        def via(num: str, headers: dict[str, str | None], method: str) -> Callable[[Row], None]:
            def body(r: Row) -> None:
                status, got = asyncio.run(self.probe_with(url, headers))
                if (status, got.get("X-Auth-Method")) != (200, method):
                    self.problems.append(f"row {num}: the probe got {status} {got.get('X-Auth-Error')}")
                run, _ = self.measured(
                    url, f"row {num}", lambda: self.wrk.run(auth, CONNS, self.seconds, None, headers)
                )
                self.fill(r, run, self.ref("1"))
                r.note = f"answered with X-Auth-Method: {method}"

            return body

        self.row("11", "/auth/nginx, JWT access token (cached verification), row 2's process",
                 via("11", {"Authorization": f"Bearer {token}"}, "jwt"))  # fmt: skip
        self.row("12", "/auth/nginx, session cookie (a Redis read, batched per loop tick), row 2's process",
                 via("12", {"Authorization": None, "Cookie": cookie}, "session"))  # fmt: skip

    async def credentials(self, url: str) -> tuple[str, str]:
        """An access token for the hot key's user and org, and a session signed in with the hot key."""
        hot = {"Authorization": f"Bearer {self.hot}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/tokens", json={"org": self.world.org}, headers=hot) as r:
                token = str((await r.json())["access_token"])
            async with http.post(f"{url}/ui/session", json={"key": self.hot}) as r:
                cookie = f"gw_session={r.cookies['gw_session'].value}"
        return token, cookie

    async def probe_with(self, url: str, headers: dict[str, str | None]) -> tuple[int, dict[str, str]]:
        sent = {k: v for k, v in {**self.request_headers, **headers}.items() if v is not None}
        async with aiohttp.ClientSession() as http, http.get(f"{url}/auth/nginx", headers=sent) as r:
            return r.status, dict(r.headers)

    def children_named(self, name: str) -> subprocess.Popen[bytes]:
        for n, proc, _ in self.children.procs.values():
            if n == name:
                return proc
        raise RuntimeError(f"no process {name}")

    def nginx_rows(self, bare_url: str, gw_url: str) -> None:
        results: dict[str, Run] = {}

        def through(name: str, auth_url: str) -> Run:
            root = self.tmp / name
            port, app_port = free_port(), free_port()
            auth_port = int(auth_url.rsplit(":", 1)[1])
            conf = write_nginx_conf(root, port, auth_port, app_port)
            proc = self.children.start(
                name,
                pinned(CORE_SERVER, [nginx_binary(), "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")]),
                stop=signal.SIGTERM,
            )
            try:
                wait_port(port, proc, "nginx")
                url = f"http://127.0.0.1:{port}{ROUTE}"
                headers: dict[str, str | None] = {"X-Original-Method": None, "X-Original-URI": None}  # nginx's own
                run = self.wrk.run(url, CONNS, self.seconds, headers=headers)
            finally:
                self.children.stop(proc)
            errors = [
                ln
                for ln in (root / "error.log").read_text().splitlines()
                if re.search(r"\[(error|crit|alert|emerg)\]", ln)
            ]
            if errors:
                self.problems.append(f"{name}: {len(errors)} nginx error lines, first: {errors[0][-200:]}")
            return run

        def row9a(r: Row) -> None:
            results["a"] = through("nginx-bare", bare_url)
            self.fill(r, results["a"], None)
            r.ratio = "1.00 (ceiling of 9)"

        def row9b(r: Row) -> None:
            results["b"], _ = self.measured(gw_url, "row 9b", lambda: through("nginx-gateway", gw_url))
            self.fill(r, results["b"], results.get("a"), "row 9a")
            if "a" in results:
                r.bar = verdict(results["b"].rps >= 0.6 * results["a"].rps, "≥ 0.6x row 9a")

        self.row("9a", "nginx (deploy/nginx/gateway.conf) → bare responder as auth → nginx upstream", row9a)
        self.row("9b", "nginx (deploy/nginx/gateway.conf) → gateway (row 2's) → nginx upstream", row9b)

    def flood_rows(self, url: str) -> None:
        n = self.seconds
        auth = url + "/auth/nginx"
        base: dict[str, Run] = {}

        def row8a(r: Row) -> None:
            base["run"], _ = self.measured(url, "row 8a", lambda: self.wrk.run(auth, FEW_CONNS, n))
            self.fill(r, base["run"], self.ref("2"), "row 2")

        def row8b(r: Row) -> None:
            self.wrk.run(auth, FEW_CONNS, WARMUP_S, warm=False)

            def both() -> tuple[Run, Run]:
                flood = self.wrk.start(auth, FLOOD_CONNS, n + 2, self.cold_file)
                time.sleep(1)
                hot = self.wrk.finish(*self.wrk.start(auth, FEW_CONNS, n), n)
                return hot, self.wrk.finish(*flood, n + 2)

            (hot, flood), d = self.measured(url, "row 8b", both)
            self.fill(r, hot, self.ref("2"), "row 2")
            argon2 = d.get("gateway_argon2_verifications_total", 0.0)
            r.note = (
                f"the flood: {flood.rps:,.0f} req/s of cold keys at -c{FLOOD_CONNS} ({argon2:.0f} argon2 runs, "
                f"{answers(flood)}, p99 {flood.p99_ms:,.0f} ms)"
            )
            if flood.non2xx:
                self.problems.append(f"row 8b flood: {answers(flood)}")
            if "run" in base:
                ratio = hot.p99_ms / base["run"].p99_ms
                r.ratio += f"; p99 {ratio:.1f}x row 8a"
                r.bar = verdict(ratio <= 2, "p99 ≤ 2x row 8a")

        self.row("8a", f"hot path alone at -c{FEW_CONNS} (row 2's process)", row8a)
        self.row("8b", f"hot path at -c{FEW_CONNS} during a flood of cold misses at -c{FLOOD_CONNS}", row8b)

    def cold_row(self, r: Row) -> None:
        flush_redis(self.redis_url)  # row 8b verified some of the cold keys: forget them
        proc, url = self.gateways.start("gw-cold", raised())
        try:
            asyncio.run(self.probe(url, self.hot))  # connections to Postgres and Redis made, not measured
            threads = asyncio.run(metrics(url)).get("gateway_argon2_threads", 0.0)
            run, d = self.measured(
                url, "row 7", lambda: self.wrk.run(url + "/auth/nginx", CONNS, COLD_S, self.cold_file, warm=False)
            )
        finally:
            self.children.stop(proc)
        self.fill(r, run, self.ref("1"))
        argon2 = d.get("gateway_argon2_verifications_total", 0.0)
        r.note = (
            f"{argon2:.0f} argon2 runs for {run.requests} answers ({threads:.0f} argon2 thread(s): "
            "`keys.verify_threads: auto`, on core 0)"
        )

    def revocation_row(self, r: Row) -> None:
        a, url_a = self.gateways.start("gw-a", raised())
        b, url_b = self.gateways.start("gw-b", raised())
        try:
            with affinity({int(CORE_CLIENT)}):
                delays, acks, codes = asyncio.run(self.revocations(url_a, url_b))
        finally:
            self.children.stop(a)
            self.children.stop(b)
        r.p50, r.p99 = f"{pct(delays, 0.5):.1f}", f"{pct(delays, 0.99):.1f}"
        r.answers = ", ".join(f"{c} x{k}" for c, k in sorted(codes.items()))
        r.note = (
            f"from sending POST /v1/keys/{{id}}/revoke to process A until process B answers 401, polled every "
            f"{POLL_S * 1000:.0f} ms; the revoke call itself: p50 {pct(acks, 0.5):.1f} ms"
        )
        r.bar = verdict(pct(delays, 0.99) <= 100, "p99 ≤ 100 ms")

    async def revocations(self, url_a: str, url_b: str) -> tuple[list[float], list[float], dict[str, int]]:
        headers = self.request_headers
        delays: list[float] = []
        acks: list[float] = []
        codes: dict[str, int] = {}
        async with aiohttp.ClientSession() as s:

            async def status(url: str, key: str) -> tuple[int, str]:
                async with s.get(url + "/auth/nginx", headers={**headers, "Authorization": f"Bearer {key}"}) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("X-Auth-Error", "")

            for k in self.tier_keys:  # cached in both processes
                for url in (url_a, url_b):
                    for _ in range(2):
                        got = await status(url, str(k["key"]))
                        if got[0] != 200:
                            raise RuntimeError(f"a valid key got {got} before its revocation")

            async def revoke(key_id: str) -> float:
                t = time.perf_counter()
                async with s.post(
                    f"{url_a}/v1/keys/{key_id}/revoke", headers={"Authorization": f"Bearer {self.operator}"}
                ) as resp:
                    body = await resp.text()
                    if resp.status != 200:
                        raise RuntimeError(f"revoke answered {resp.status}: {body[:200]}")
                return time.perf_counter() - t

            for k in self.tier_keys:
                t0 = time.perf_counter()
                ack = asyncio.ensure_future(revoke(str(k["id"])))
                while True:
                    code, err = await status(url_b, str(k["key"]))
                    if code != 200:
                        break
                    if time.perf_counter() - t0 > 10:
                        raise RuntimeError("process B still accepted a revoked key after 10 s")
                    await asyncio.sleep(POLL_S)
                delays.append(time.perf_counter() - t0)
                codes[f"{code} {err}"] = codes.get(f"{code} {err}", 0) + 1
                acks.append(await ack)
        return delays, acks, codes

    def during(self, stamp: str) -> str:
        """The row under way at a log line's time (`2026-01-02 03:04:05,678`, local time)."""
        try:
            t = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")  # local time, as logged
        except ValueError:
            return "?"
        rows = [num for start, num in self.started if start <= t]
        return rows[-1] if rows else "start-up"

    def gateway_problems(self) -> None:
        """The gateways' warnings and errors (their logs are at WARNING), by message, with counts and the
        rows under way when they were logged."""
        for name in sorted(p.name for p in self.tmp.glob("gw-*.log")):
            seen: dict[str, tuple[int, list[str]]] = {}
            for ln in (self.tmp / name).read_text(errors="replace").splitlines():
                m = re.match(r"(\S+ \S+) (WARNING|ERROR|CRITICAL) (.*)", ln)
                if m is None and not ln.startswith("Traceback"):
                    continue
                msg = f"{m.group(2)} {m.group(3)}" if m else ln
                msg = re.sub(r"[0-9]+(\.[0-9]+)?", "N", msg)[:200]  # one entry per message, whatever numbers
                count, rows = seen.get(msg, (0, []))
                row = self.during(m.group(1)) if m else "?"
                seen[msg] = (count + 1, rows if row in rows else [*rows, row])
            gw = name.removesuffix(".log")
            for msg, (count, rows) in list(seen.items())[:6]:
                self.problems.append(f"{gw}: {count}x `{msg}` (logged during or after row {', '.join(rows)})")
            if len(seen) > 6:
                self.problems.append(f"{gw}: {len(seen) - 6} more kinds of warning")


# --- the report -----------------------------------------------------------------------------------


def version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else "?"


def machine() -> list[tuple[str, str]]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or "?",
    )
    pg = shutil.which("postgres") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))), None)
    return [
        ("CPU", cpu),
        ("cores", str(os.cpu_count())),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("aiohttp", importlib.metadata.version("aiohttp")),
        ("uvloop", importlib.metadata.version("uvloop")),
        ("nginx", nginx_version()),
        ("wrk", version(["wrk", "-v"]).split(" [")[0]),
        ("Redis", version(["redis-server", "--version"])),
        ("PostgreSQL", version([str(pg), "--version"]) if pg else "not found"),
    ]


def report(
    bench: Bench, host: list[tuple[str, str]], started: datetime, elapsed_s: float, load: tuple[float, float]
) -> str:
    order = ["1", "2", "3", "4", "5", "11", "12", "6", "7", "8a", "8b", "9a", "9b", "10"]
    rows = [bench.rows[k] for k in order if k in bench.rows]
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (scripts/bench.py); overwritten by each run. Every ratio compares figures",
        "measured side by side in the same run on the same machine, so a loaded machine lowers the figures",
        "more than the ratios.",
        "",
        f"Run: {started:%Y-%m-%d %H:%M} UTC, {elapsed_s:.0f} s in all. Command: `make bench` "
        f"(`{' '.join(['python', 'scripts/bench.py', *sys.argv[1:]])}`). Load average (1 min) "
        f"before: {load[0]:.2f}, after: {load[1]:.2f}.",
        "",
        "| " + " | ".join(k for k, _ in host) + " |",
        "|" + "---|" * len(host),
        "| " + " | ".join(v for _, v in host) + " |",
        "",
        f"Server under test on core 0 (`taskset -c 0`), load from `taskset -c 1 wrk -t1 -c{CONNS} "
        f"-d{bench.seconds}s --latency` on core 1 over loopback, after a {WARMUP_S} s warm-up run; Postgres and "
        "Redis on core 1. Latencies are wrk's (ms).",
        "",
        "| # | what | req/s | ratio | p50 ms | p99 ms | answers | bar |",
        "|---|---|---:|---|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.num} | {r.what} | {r.rps} | {r.ratio} | {r.p50} | {r.p99} | {r.answers} | {r.bar} |")
    lines += ["", "Notes from this run:", ""]
    lines += [f"- row {r.num}: {r.note}" for r in rows if r.note]
    lines += ["", "Problems seen in this run:", ""]
    lines += [f"- {p}" for p in bench.problems] or ["- none"]
    lines += ["", ROWS_EXPLAINED.strip(), ""]
    return "\n".join(lines)


ROWS_EXPLAINED = f"""
## What each row measures

Every gateway is `python -m gateway --config FILE serve --workers 1 --port P`, with FILE the shipped
config/gateway.yaml except `log_level: WARNING` (no access-log line per request), `policy_file` the
shipped config/policy.yaml, and the changes a row names. Requests are `GET /auth/nginx` with
`X-Original-Method: GET`, `X-Original-URI: {ROUTE}` (policy rule "api": a valid key, the org from
`X-Org-Id`), `X-Org-Id` of the key's org and `Authorization: Bearer <key>`, an admin key of an admin
of that org. "Key/org limits raised": `rate_limits.key` and `.org` set to `rate: 1000000/1s, burst:
1000000`, so every request is still charged but none refused.

1. The ceiling: scripts/bench_bare.py, aiohttp on uvloop in one process, access log off, answering
   every request 200 with the eight identity headers (X-Org, X-Role, X-User, X-Key-Id, X-Scopes,
   X-Project, X-Key-Env, X-Auth-Method) carrying the values the gateway sends for the same key.
2. A valid key answered from the in-process cache; the per-key and per-org limits charged as
   configured (the shipped `pipeline: true`), with raised numbers. Bar: ≥ 0.6x row 1, p99 ≤ 10 ms.
3. Row 2 with `exact: true` on the key and org limits; "n/a" when the config does not know the field.
4. Row 2 with `rate_limits: {{enabled: false}}`: what verification costs without any limit.
5. A key of the right shape whose checksum is wrong, refused 401 before any Postgres or Redis call;
   the rate counts every answer (all 401). Bar: ≥ 0.8x row 1.
6. Every lookup misses the in-process cache and is answered by Redis: `cache.local_max_entries: 1`
   and wrk's Lua script sending {REVOCATIONS} keys in turn, so the one entry kept is never the next key
   asked for (and concurrent requests rarely share a key, whose lookups would be coalesced).
7. Cold misses: keys never seen by this process nor cached in Redis (flushed before), each request a
   new key: a Redis miss, a Postgres read and an argon2id verification (m=19456 KiB, t=2) on the
   process's argon2 threads (`keys.verify_threads: auto`: one per core the process may use, so one
   here), on core 0. {COLD_S} s at -c{CONNS}: the p99 is mostly the
   queue (Little's law: {CONNS} requests in flight over the verification rate).
8. 8a: row 2's process at -c{FEW_CONNS}. 8b: the same, measured while a second wrk (also on core 1)
   floods the process with cold misses at -c{FLOOD_CONNS}, started 1 s before and ending 1 s after.
   Bar: 8b's p99 ≤ 2x 8a's.
9. nginx with deploy/nginx/gateway.conf as shipped (auth_request; ports and log paths adapted as
   tests/test_deploy_nginx.py does; one worker), the upstream a second server block of the same nginx
   answering `return 200`. 9a: its auth server is the bare responder of row 1; 9b: row 2's gateway.
   nginx runs on core 0 with the auth server (each variant: nginx + its auth server on one core), so
   9b/9a is the share of one core the gateway leaves to nginx, compared like for like. Bar: 9b ≥ 0.6x
   9a.
10. Two gateway processes (row 2's config) on the same Postgres and Redis, both on core 0; {REVOCATIONS}
    keys, each cached in both. For each key in turn: `POST /v1/keys/{{id}}/revoke` to process A (with
    another key of the same owner) while the client polls process B's `/auth/nginx` every
    {POLL_S * 1000:.0f} ms with the key; the delay runs from sending the revocation to B's first 401
    (B learns of it by Postgres NOTIFY). Bar: p99 ≤ 100 ms.
11. Row 2's process and request with `Authorization: Bearer <JWT>` instead of the key: an access token
    issued by `POST /v1/tokens` with the hot key for its org (EdDSA). Verified once (signature, claims),
    then answered from the in-process cache of verified tokens; its family's state and the user's
    memberships from the fresh maps (pushed by NOTIFY), the key it was issued with from the key cache.
12. Row 2's process and request with the web page's session cookie instead of the key (signed in with
    the hot key): each request reads its session from Redis, the reads of one event-loop tick in one
    pipeline (here every connection sends the same cookie, so a tick's requests share one read).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=int, default=10, help="seconds of each measured wrk run")
    ap.add_argument("--no-doc", action="store_true", help="print the table only; leave docs/benchmarks.md")
    ap.add_argument("--rows", help="run only these rows, e.g. 1,2,5 (implies --no-doc); row 1 is the ceiling")
    a = ap.parse_args()
    only = {n.strip() for n in a.rows.split(",")} if a.rows else None
    unknown = sorted((only or set()) - ROWS)
    if unknown:
        sys.exit(f"--rows: no row {unknown[0]} (rows: {', '.join(sorted(ROWS, key=lambda r: (len(r), r)))})")
    if os.cpu_count() is None or (os.cpu_count() or 0) < 2 or shutil.which("wrk") is None:
        sys.exit("make bench needs 2 cores and wrk (scripts/system-deps.sh installs it)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleans up like Ctrl-C
    started, t0, load0 = datetime.now(UTC), time.monotonic(), os.getloadavg()[0]
    host = machine()
    shipped_cfg = yaml.safe_load(SHIPPED.read_text())
    with affinity({int(CORE_CLIENT)}), local_services() as (tmp, _pg, rd, env):
        with affinity(set(range(os.cpu_count() or 2))):  # key creation (argon2) on both cores
            t = time.perf_counter()
            n = 2 + REVOCATIONS + COLD_POOL
            world = asyncio.run(seed_world(env, n, concurrency=2, config=shipped_cfg))
            print(f"created {n} keys in {time.perf_counter() - t:.1f} s", flush=True)
        bench = Bench(tmp, env, rd.url, world, a.duration, only)
        try:
            bench.all_rows()
        finally:
            bench.children.stop_all()
        bench.gateway_problems()
        text = report(bench, host, started, time.monotonic() - t0, (load0, os.getloadavg()[0]))
    if not a.no_doc and only is None:
        DOC.write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every process was stopped on the way out
        sys.exit("interrupted")
