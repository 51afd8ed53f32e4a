"""Real local server topologies for the tests: a Redis Cluster, a Redis Sentinel set and a Postgres primary with
a streaming hot standby. No mocks: the failures the gateway must survive (a node gone, a failover, a standby
lagging behind) are the servers' own.

Synchronous on purpose: fixtures start and stop these, and the tests drive failures between their awaits.
Every wait is bounded; a server that does not come up fails with the tail of its log.
"""

# Every process here is started from a fixed argument list with absolute paths: no shell, no outside input.
# ruff: noqa: S603

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeAlias, TypeVar

from gateway._services import Postgres, _as_postgres, _pg_bin

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
CLUSTER_SLOTS = 16384

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------------------------
# Small shared pieces: ports, waiting, log tails, a RESP client (no redis-py: its pooled sockets would outlive a
# killed node and warn, and the suite turns warnings into errors).

RespValue: TypeAlias = "str | int | list[RespValue] | None"


class RedisReplyError(Exception):
    """The server answered with an error reply (`-ERR ...`, `-MOVED ...`, `-CLUSTERDOWN ...`)."""


class PsqlError(Exception):
    """psql failed: the server refused the connection (still starting, stopped) or the SQL failed."""


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on 127.0.0.1: all sockets are held open together, so none is handed out twice."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"--- {path}: {e}"
    return f"--- last lines of {path}:\n" + "\n".join(text.splitlines()[-lines:])


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, logs: Sequence[Path] = ()) -> T:
    """`probe()` until it returns something other than None. A refused connection, a Redis error reply or a psql
    failure count as "not yet"; any other exception is a real failure and propagates at once."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            value = probe()
            if value is not None:
                return value
        except (OSError, RedisReplyError, PsqlError, subprocess.TimeoutExpired) as e:
            last = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last is not None else ""
            tails = "\n".join(log_tail(p) for p in logs)
            raise TimeoutError(f"{what}: not reached within {timeout_s} s{detail}\n{tails}".rstrip())
        time.sleep(0.05)


def wait_until(what: str, cond: Callable[[], bool], timeout_s: float, logs: Sequence[Path] = ()) -> None:
    wait_for(what, lambda: True if cond() else None, timeout_s, logs)


def _read_reply(f: IO[bytes]) -> RespValue:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed in the middle of a reply")
    kind, body = line[:1], line[1:-2].decode(errors="replace")
    if kind == b"+":
        return body
    if kind == b"-":
        raise RedisReplyError(body)
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data = f.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed in the middle of a reply")
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_read_reply(f) for _ in range(count)]
    raise ConnectionError(f"not a RESP2 reply: {line!r}")


def redis_command(port: int, *args: str, timeout_s: float = 2.0) -> RespValue:
    """One command on a fresh connection to 127.0.0.1:port; bulk strings come back decoded as text."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(payload)
        with s.makefile("rb") as f:
            return _read_reply(f)


def _str(v: RespValue) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string reply, got {v!r}")
    return v


def _int(v: RespValue) -> int:
    if not isinstance(v, int):
        raise TypeError(f"expected an integer reply, got {v!r}")
    return v


def _list(v: RespValue) -> list[RespValue]:
    if not isinstance(v, list):
        raise TypeError(f"expected an array reply, got {v!r}")
    return v


def _fields(text: RespValue) -> dict[str, str]:
    """`key:value` lines (INFO, CLUSTER INFO) as a dict."""
    return dict(line.split(":", 1) for line in _str(text).splitlines() if ":" in line and not line.startswith("#"))


def _pairs(v: RespValue) -> dict[str, str]:
    """A flat [k1, v1, k2, v2, ...] array (SENTINEL MASTER, SENTINEL REPLICAS entries) as a dict."""
    items = [_str(x) for x in _list(v)]
    return dict(zip(items[::2], items[1::2], strict=True))


@dataclass
class RedisProcess:
    """One redis-server or redis-sentinel, started directly (no wrapper), so the Popen is the server itself and
    SIGKILL on it is a real crash."""

    binary: str
    args: list[str]
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 15) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [self.binary, *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(f"{Path(self.binary).name} answering PING on {self.port}", self._pong, timeout_s, [self.log])
        except BaseException:
            self.kill()
            raise

    def _pong(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"{Path(self.binary).name} on {self.port} exited with {code}\n{log_tail(self.log)}")
        return redis_command(self.port, "PING", timeout_s=0.5) == "PONG"

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone (its port is free again then)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, 10 s to exit, then SIGKILL. Already dead is fine."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(10)

    def command(self, *args: str, timeout_s: float = 2.0) -> RespValue:
        return redis_command(self.port, *args, timeout_s=timeout_s)


def _stop_all(stops: Sequence[Callable[[], None]]) -> None:
    """Run every stop even when one fails; raise the first failure afterwards."""
    first: BaseException | None = None
    for stop in stops:
        try:
            stop()
        except Exception as e:  # keep stopping the rest
            first = first or e
    if first is not None:
        raise first


# ---------------------------------------------------------------------------------------------------------------
# Redis Cluster


class RedisClusterTopology:
    """`masters` Redis Cluster masters, no replicas: the slots are spread over the nodes, so a key's node can die
    while the others keep serving their slots (require-full-coverage is off), and come back with its slots.

    Nothing is persisted (`--save ''`): a restarted node comes back empty. Each node has its own cluster bus port
    (`--cluster-port`), so no port+10000 arithmetic can collide with anything."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.workdir = workdir
        ports = free_ports(2 * masters)
        self.nodes: list[RedisProcess] = []
        for i in range(masters):
            port, bus = ports[i], ports[masters + i]
            d = workdir / f"cluster-node-{i}-{port}"
            args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--daemonize", "no"]
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port", str(bus)]
            args += ["--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no"]
            args += ["--save", "", "--appendonly", "no"]
            self.nodes.append(RedisProcess(REDIS_SERVER, args, port, d))
        self.node_ids: list[str] = []

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    @property
    def logs(self) -> list[Path]:
        return [n.log for n in self.nodes]

    def start(self) -> None:
        for n in self.nodes:
            n.start()
        r = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *self.addresses, "--cluster-yes"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if r.returncode != 0:
            out = (r.stdout + r.stderr).decode(errors="replace")
            raise RuntimeError(f"redis-cli --cluster create failed ({r.returncode}):\n{out}")
        self.node_ids = [_str(n.command("CLUSTER", "MYID")) for n in self.nodes]
        for i in range(len(self.nodes)):
            wait_until(f"cluster node {i} sees all slots served", functools.partial(self._healthy, i), 30, self.logs)

    def stop(self) -> None:
        _stop_all([n.stop for n in self.nodes])

    def command(self, index: int, *args: str) -> RespValue:
        """A command on node `index` itself (no redirection is followed)."""
        return self.nodes[index].command(*args)

    def cluster_info(self, index: int) -> dict[str, str]:
        return _fields(self.command(index, "CLUSTER", "INFO"))

    def node_flags(self, index: int, seen_from: int) -> set[str]:
        """The flags (`master`, `fail?`, `fail`, `myself`, ...) of node `index` in CLUSTER NODES of `seen_from`."""
        for line in _str(self.command(seen_from, "CLUSTER", "NODES")).splitlines():
            fields = line.split()
            if fields and fields[0] == self.node_ids[index]:
                return set(fields[2].split(","))
        raise LookupError(f"node {index} is not in the cluster view of node {seen_from}")

    def _healthy(self, index: int) -> bool:
        info = self.cluster_info(index)
        return (
            info.get("cluster_state") == "ok"
            and info.get("cluster_slots_assigned") == str(CLUSTER_SLOTS)
            and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
            and info.get("cluster_known_nodes") == str(len(self.nodes))
        )

    def kill(self, index: int) -> None:
        """SIGKILL node `index` (a crash: no goodbye to the other nodes) and wait until it is gone."""
        self.nodes[index].kill()

    def restart(self, index: int, timeout_s: float = 20) -> None:
        """Start node `index` again on the same port and directory: its nodes.conf brings back its id, epoch and
        slots. Returns once it reports cluster_state:ok and no live node flags it `fail`/`fail?` any more (a
        master with slots loses its FAIL flag about 2 node-timeouts after it is reachable again)."""
        node = self.nodes[index]
        node.start()

        def rejoined() -> bool:
            if self.cluster_info(index).get("cluster_state") != "ok":
                return False
            peers = [j for j, n in enumerate(self.nodes) if j != index and n.alive]
            return all(not ({"fail", "fail?"} & self.node_flags(index, j)) for j in peers)

        wait_until(f"restarted cluster node {index} rejoined", rejoined, timeout_s, [node.log])

    def node_for_key(self, key: str) -> int:
        """The index of the node whose slots hold `key`, in the view of the first live node."""
        asker = next((n for n in self.nodes if n.alive), None)
        if asker is None:
            raise RuntimeError("no cluster node is running")
        slot = _int(asker.command("CLUSTER", "KEYSLOT", key))
        for entry in _list(asker.command("CLUSTER", "SLOTS")):
            first, last, master, *_ = _list(entry)  # [first slot, last slot, [ip, port, id, ...], replicas...]
            if _int(first) <= slot <= _int(last):
                return self.ports.index(_int(_list(master)[1]))
        raise LookupError(f"slot {slot} of {key!r} is not assigned")


# ---------------------------------------------------------------------------------------------------------------
# Redis Sentinel


class RedisSentinelTopology:
    """A master, one replica and three sentinels (quorum 2) watching them: SIGKILL the master and the sentinels
    promote the replica in a few seconds (down-after 1 s). Nothing is persisted (`--save ''`)."""

    def __init__(self, workdir: Path, master_name: str = "gwmaster") -> None:
        self.workdir = workdir
        self.master_name = master_name
        ports = free_ports(5)
        self.master_port, self.replica_port = ports[0], ports[1]
        self.servers: dict[int, RedisProcess] = {}
        for port, extra in ((self.master_port, []), (self.replica_port, ["--replicaof", "127.0.0.1", str(ports[0])])):
            d = workdir / f"redis-{port}"
            args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--daemonize", "no"]
            # Redis 7 waits 5 s before a diskless full sync, for more replicas to join it: not here.
            args += ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0", *extra]
            self.servers[port] = RedisProcess(REDIS_SERVER, args, port, d)
        self.sentinels: list[RedisProcess] = []
        for port in ports[2:]:
            d = workdir / f"sentinel-{port}"
            self.sentinels.append(RedisProcess(REDIS_SENTINEL, [str(d / "sentinel.conf")], port, d))

    @property
    def sentinel_addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    @property
    def logs(self) -> list[Path]:
        return [p.log for p in (*self.servers.values(), *self.sentinels)]

    def _write_sentinel_conf(self, sentinel: RedisProcess) -> None:
        # Sentinel rewrites its own file (discovered replicas and sentinels, epochs): it must be writable.
        sentinel.workdir.mkdir(parents=True, exist_ok=True)
        name = self.master_name
        (sentinel.workdir / "sentinel.conf").write_text(
            f"port {sentinel.port}\n"
            "bind 127.0.0.1\n"
            f'dir "{sentinel.workdir}"\n'
            "daemonize no\n"
            'logfile ""\n'
            "sentinel resolve-hostnames no\n"
            f"sentinel monitor {name} 127.0.0.1 {self.master_port} 2\n"
            f"sentinel down-after-milliseconds {name} 1000\n"
            f"sentinel failover-timeout {name} 5000\n"
            f"sentinel parallel-syncs {name} 1\n"
        )

    def start(self, timeout_s: float = 30) -> None:
        """Master, then replica (until its link is up), then the sentinels, until each one knows the master as
        healthy, the replica and the two other sentinels: only then can they agree on a failover."""
        self.servers[self.master_port].start()
        replica = self.servers[self.replica_port]
        replica.start()
        wait_until(
            "replica link to the master up",
            lambda: _fields(replica.command("INFO", "replication")).get("master_link_status") == "up",
            timeout_s,
            self.logs,
        )
        for s in self.sentinels:
            self._write_sentinel_conf(s)
            s.start()
        for s in self.sentinels:
            wait_until(
                f"sentinel {s.port} sees the whole set", functools.partial(self._sees_all, s), timeout_s, self.logs
            )

    def _sees_all(self, sentinel: RedisProcess) -> bool:
        master = _pairs(sentinel.command("SENTINEL", "MASTER", self.master_name))
        replicas = [_pairs(r) for r in _list(sentinel.command("SENTINEL", "REPLICAS", self.master_name))]
        return (
            master.get("flags") == "master"
            and master.get("num-other-sentinels") == "2"
            and any(r.get("port") == str(self.replica_port) and r.get("flags") == "slave" for r in replicas)
        )

    def stop(self) -> None:
        _stop_all([s.stop for s in (*self.sentinels, *self.servers.values())])

    def current_master(self) -> tuple[str, int]:
        """The master as the first sentinel that answers reports it."""
        for s in self.sentinels:
            if not s.alive:
                continue
            with contextlib.suppress(OSError, RedisReplyError):
                host, port = _list(s.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name))
                return _str(host), int(_str(port))
        raise RuntimeError("no sentinel answered GET-MASTER-ADDR-BY-NAME")

    def command(self, port: int, *args: str) -> RespValue:
        """A command on the Redis server at `port` (master or replica)."""
        return redis_command(port, *args)

    def kill_master(self) -> int:
        """SIGKILL the current master (a crash: the sentinels see it stop answering) and return its port."""
        port = self.current_master()[1]
        self.servers[port].kill()
        return port

    def wait_promoted(self, old_port: int, timeout_s: float = 15) -> tuple[str, int]:
        """Until every live sentinel names one new master (not `old_port`) and that server says ROLE master."""

        def promoted() -> tuple[str, int] | None:
            seen = {
                (_str(h), int(_str(p)))
                for s in self.sentinels
                if s.alive
                for h, p in [_list(s.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name))]
            }
            if len(seen) != 1:
                return None
            addr = seen.pop()
            if addr[1] == old_port or _list(redis_command(addr[1], "ROLE"))[0] != "master":
                return None
            return addr

        return wait_for(f"a master other than {old_port} promoted", promoted, timeout_s, self.logs)


# ---------------------------------------------------------------------------------------------------------------
# Postgres streaming replication


def _searchable_by_all(path: Path) -> bool:
    """Every directory from / down to `path` lets others in (o+x): the postgres user can reach it."""
    p = path.resolve()
    return all(d.stat().st_mode & stat.S_IXOTH for d in (p, *p.parents))


class PostgresStreamingReplica:
    """A Postgres primary and a hot standby streaming its WAL (pg_basebackup -R through a replication slot, so
    the primary keeps the WAL a stopped standby still needs). The gateway's reads can go to the standby and see
    the primary's writes late, or not at all while replay is paused.

    When we are root Postgres runs as the `postgres` user, which cannot enter pytest's tmp_path (its parents are
    0700): then the data lives in a directory of our own (0755), removed by stop()."""

    SLOT = "gw_standby"
    _STREAMING = "SELECT pg_is_in_recovery() AND EXISTS (SELECT FROM pg_stat_wal_receiver WHERE status = 'streaming')"

    def __init__(self, workdir: Path | None = None) -> None:
        """`workdir` must not hold an earlier run's servers; None, or one the postgres user cannot reach, means a
        temporary directory of our own."""
        self._own_root = workdir is None or (os.geteuid() == 0 and not _searchable_by_all(workdir))
        if workdir is None or self._own_root:
            self.root = Path(tempfile.mkdtemp(prefix="gw-pg-replica-"))
        else:
            self.root = workdir / "pg-replica"
            self.root.mkdir(parents=True)
        self.root.chmod(0o755)
        primary_port, replica_port = free_ports(2)
        self.primary = Postgres(self.root / "primary", primary_port)
        self.replica = Postgres(self.root / "standby", replica_port)

    @property
    def primary_url(self) -> str:
        return self.primary.url

    @property
    def replica_url(self) -> str:
        return self.replica.url

    @property
    def logs(self) -> list[Path]:
        return [self.primary.datadir / "server.log", self.replica.datadir / "server.log"]

    def start(self) -> None:
        self._start_server(self.primary, init=True)
        self._basebackup()
        self._start_server(self.replica)
        self._wait_streaming()

    def _start_server(self, pg: Postgres, init: bool = False) -> None:
        try:
            if init:
                pg.init()
            pg.start()
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{log_tail(pg.datadir / 'server.log')}") from e

    def _basebackup(self) -> None:
        d = self.replica.datadir
        d.mkdir()
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(d, pw.pw_uid, pw.pw_gid)
        d.chmod(0o700)
        cmd = [_pg_bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres"]
        cmd += ["-D", str(d), "-R", "-X", "stream", "-C", "-S", self.SLOT, "--checkpoint=fast", "--no-sync"]
        r = subprocess.run(_as_postgres(cmd), capture_output=True, timeout=120, check=False)
        if r.returncode != 0:
            out = (r.stdout + r.stderr).decode(errors="replace").strip()
            raise RuntimeError(f"pg_basebackup failed ({r.returncode}): {out}\n{log_tail(self.logs[0])}")
        (d / "server.log").unlink(missing_ok=True)  # the primary's log, copied along: the standby starts its own

    def _wait_streaming(self, timeout_s: float = 30) -> None:
        wait_until(
            "standby in recovery and streaming from the primary",
            lambda: self.replica_sql(self._STREAMING) == "t",
            timeout_s,
            self.logs,
        )

    def stop(self) -> None:
        """Standby first (a primary's fast shutdown waits for its walsenders), then the primary; our own data
        directory goes too."""
        try:
            _stop_all([self.replica.stop, self.primary.stop])
        finally:
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)

    def primary_sql(self, sql: str) -> str:
        return psql(self.primary.port, sql)

    def replica_sql(self, sql: str) -> str:
        return psql(self.replica.port, sql)

    def stop_replica(self) -> None:
        """Fast shutdown of the standby; the primary keeps its WAL for it in the slot."""
        self.replica.stop()

    def start_replica(self) -> None:
        """Start the standby again; returns once it streams from the primary again."""
        self._start_server(self.replica)
        self._wait_streaming()

    def pause_replay(self, timeout_s: float = 10) -> None:
        """Stop applying WAL on the standby (it keeps receiving it): returns once replay is really paused."""
        self.replica_sql("SELECT pg_wal_replay_pause()")
        wait_until(
            "WAL replay paused",
            lambda: self.replica_sql("SELECT pg_get_wal_replay_pause_state()") == "paused",
            timeout_s,
            self.logs,
        )

    def resume_replay(self, timeout_s: float = 10) -> None:
        self.replica_sql("SELECT pg_wal_replay_resume()")
        wait_until(
            "WAL replay resumed",
            lambda: self.replica_sql("SELECT pg_get_wal_replay_pause_state()") == "not paused",
            timeout_s,
            self.logs,
        )

    def wait_caught_up(self, timeout_s: float = 10) -> None:
        """Until the standby has replayed (applied) everything the primary had inserted into its WAL at call time."""
        self._wait_standby_lsn("pg_last_wal_replay_lsn", "replayed", timeout_s)

    def wait_received(self, timeout_s: float = 10) -> None:
        """Until the standby has received (not necessarily applied) everything the primary had inserted into its
        WAL at call time: with replay paused, the standby then has the change and still does not show it."""
        self._wait_standby_lsn("pg_last_wal_receive_lsn", "received", timeout_s)

    def _wait_standby_lsn(self, function: str, what: str, timeout_s: float) -> None:
        # The target is the end of a marker record inserted now (pg_logical_emit_message returns it; it works at
        # wal_level=replica): everything committed before the call precedes it. Not pg_current_wal_lsn(): with
        # synchronous_commit=off a commit may be inserted but not yet written. Not pg_current_wal_insert_lsn()
        # either: when the last record ends on a page boundary it points past the next page header, which the
        # standby's LSNs never reach until more WAL comes.
        target = self.primary_sql("SELECT pg_logical_emit_message(false, 'gateway-tests', 'sync point')")
        wait_until(
            f"standby {what} WAL up to {target}",
            lambda: self.replica_sql(f"SELECT {function}() >= '{target}'::pg_lsn") == "t",
            timeout_s,
            self.logs,
        )


def psql(port: int, sql: str, timeout_s: float = 15) -> str:
    """Run SQL through psql as `postgres` on 127.0.0.1:port; the unaligned, tuples-only output, stripped."""
    cmd = [_pg_bin("psql"), "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres"]
    cmd += ["-At", "-v", "ON_ERROR_STOP=1", "-c", sql]  # bare rows, stop at the first error
    r = subprocess.run(
        cmd,
        capture_output=True,
        timeout=timeout_s,
        check=False,
        env={**os.environ, "PGCONNECT_TIMEOUT": "3"},
    )
    if r.returncode != 0:
        raise PsqlError(f"psql on {port} failed ({r.returncode}): {r.stderr.decode(errors='replace').strip()}")
    return r.stdout.decode().strip()


# ---------------------------------------------------------------------------------------------------------------
# Context managers for fixtures: start, yield, and always stop.


@contextlib.contextmanager
def redis_cluster(workdir: Path, masters: int = 3) -> Iterator[RedisClusterTopology]:
    topo = RedisClusterTopology(workdir, masters)
    try:
        topo.start()
        yield topo
    finally:
        topo.stop()


@contextlib.contextmanager
def redis_sentinel(workdir: Path, master_name: str = "gwmaster") -> Iterator[RedisSentinelTopology]:
    topo = RedisSentinelTopology(workdir, master_name)
    try:
        topo.start()
        yield topo
    finally:
        topo.stop()


@contextlib.contextmanager
def postgres_replica(workdir: Path | None = None) -> Iterator[PostgresStreamingReplica]:
    topo = PostgresStreamingReplica(workdir)
    try:
        topo.start()
        yield topo
    finally:
        topo.stop()


__all__ = [
    "PostgresStreamingReplica",
    "PsqlError",
    "RedisClusterTopology",
    "RedisProcess",
    "RedisReplyError",
    "RedisSentinelTopology",
    "free_ports",
    "postgres_replica",
    "psql",
    "redis_cluster",
    "redis_command",
    "redis_sentinel",
    "wait_for",
    "wait_until",
]
