"""Local Postgres and Redis servers for `make run` and the test suite.

Postgres refuses to run as root, so when we are root it runs as the unprivileged `postgres` user via
`runuser`, in a directory that user owns. Servers are stopped through their pid files (the real server
process), never through the `runuser` wrapper.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PG_BIN_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str:
    for d in PG_BIN_DIRS:
        if Path(d, name).exists():
            return str(Path(d, name))
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: install PostgreSQL server binaries")
    return found


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _wait_port(
    port: int,
    timeout_s: float,
    proc: subprocess.Popen[bytes] | None,
    what: str,
    hello: tuple[bytes, bytes] | None = None,
) -> None:
    """Until the port accepts a connection; with `hello` (request, reply prefix), until the server also
    answers it: a server can accept connections before it serves them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                if hello is None:
                    return
                s.sendall(hello[0])
                if s.recv(64).startswith(hello[1]):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start serving on port {port}")


def _kill_pidfile(pidfile: Path, sig: int, proc: subprocess.Popen[bytes] | None, timeout_s: float = 15) -> None:
    """Signal the server named in its pid file and wait until it is gone. When the process we
    started has exited (the server itself, or the runuser wrapper that reaps it), it is gone."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@dataclass
class Postgres:
    datadir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.datadir, pw.pw_uid, pw.pw_gid)
        if not (self.datadir / "PG_VERSION").exists():
            r = subprocess.run(
                _as_postgres(
                    [
                        _pg_bin("initdb"),
                        "-D",
                        str(self.datadir),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--no-sync",
                        "--no-instructions",
                    ]
                ),
                check=False,
                capture_output=True,
            )
            if r.returncode != 0:
                raise RuntimeError(
                    f"initdb failed: {r.stderr.decode(errors='replace').strip()}"
                    " (every parent directory must be searchable by the postgres user)"
                )

    def start(self) -> None:
        with open(self.datadir / "server.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                _as_postgres(
                    [
                        _pg_bin("postgres"),
                        "-D",
                        str(self.datadir),
                        "-p",
                        str(self.port),
                        "-c",
                        "listen_addresses=127.0.0.1",
                        "-c",
                        f"unix_socket_directories={self.datadir}",
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                        "-c",
                        "max_connections=200",
                    ]
                ),
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        _wait_port(self.port, 30, self.proc, "postgres")
        # Accepting TCP is not the same as accepting queries: wait for the startup to finish.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = subprocess.run(
                [_pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
                capture_output=True,
                check=False,
            )
            if r.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("postgres did not become ready")

    def stop(self) -> None:
        _kill_pidfile(self.datadir / "postmaster.pid", signal.SIGINT, self.proc)  # fast shutdown
        if self.proc is not None:
            self.proc.wait(timeout=15)
            self.proc = None


@dataclass
class Redis:
    workdir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.workdir / "redis.pid"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        with open(self.workdir / "redis.log", "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    server,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--pidfile",
                    str(self.pidfile),
                    "--daemonize",
                    "no",
                    "--maxmemory-policy",
                    "volatile-lru",
                ],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        _wait_port(self.port, 15, self.proc, "redis-server", (b"PING\r\n", b"+PONG"))

    def stop(self) -> None:
        _kill_pidfile(self.pidfile, signal.SIGTERM, self.proc)
        if self.proc is not None:
            if self.proc.poll() is None and not self.pidfile.exists():
                self.proc.terminate()  # no pid file yet: redis-server is this very process
            self.proc.wait(timeout=15)
            self.proc = None
