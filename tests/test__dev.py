"""`make run` (gateway/_dev.py) on a fresh machine: its own Postgres and Redis, a demo key printed once,
a gateway that answers it; the second run reuses all of it. The README's first promise."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from gateway._services import free_port
from tests.conftest import ROOT


@pytest.fixture
def fresh_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: its parents are private to root, and Postgres runs as the `postgres` user.
    path = Path(tempfile.mkdtemp(prefix="gw-make-run-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _until(out: IO[str], pattern: str, seen: list[str], timeout_s: float = 90) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = out.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"{pattern!r} not printed: {''.join(seen)[-3000:]}")


def _run(cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway._dev"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_make_run_brings_up_a_gateway_with_its_own_stores(fresh_dir: Path) -> None:
    port = free_port()
    shipped = (ROOT / "config/gateway.yaml").read_text()
    config = shipped.replace("policy_file: policy.yaml", f"policy_file: {ROOT / 'config/policy.yaml'}")
    config = config.replace("  port: 8080", f"  port: {port}")
    assert config != shipped
    (fresh_dir / "gateway.yaml").write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {"GATEWAY_CONFIG": str(fresh_dir / "gateway.yaml"), "PYTHONPATH": str(ROOT)}
    seen: list[str] = []
    proc = _run(fresh_dir, env)
    try:
        assert proc.stdout is not None
        _until(proc.stdout, r"Demo API key", seen)
        key = _until(proc.stdout, r"gw_live_", seen).strip()
        _until(proc.stdout, r"gateway listening on", seen)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/auth/nginx",
            headers={"Authorization": f"Bearer {key}", "X-Original-Method": "GET", "X-Original-URI": "/v1/things"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200 and r.headers["X-Auth-Method"] == "api_key" and r.headers["X-Role"] == "admin"
    finally:
        assert _stop(proc) == 0, "".join(seen)[-3000:]
    assert (fresh_dir / ".local/demo.json").exists() and (fresh_dir / ".local/pepper").stat().st_mode & 0o077 == 0
    assert not (fresh_dir / ".local/pg/postmaster.pid").exists()  # its Postgres stopped with it

    # Again: the same stores, no new key, and the key printed before still works.
    seen.clear()
    proc = _run(fresh_dir, env)
    try:
        assert proc.stdout is not None
        _until(proc.stdout, r"demo data exists", seen)
        _until(proc.stdout, r"gateway listening on", seen)
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200
    finally:
        assert _stop(proc) == 0, "".join(seen)[-3000:]
    assert "Demo API key" not in "".join(seen)


def test_make_run_installs_only_what_running_needs() -> None:
    """`make run` installed the test tools too (Caddy, Chromium, the dev extra): now only `make test` does."""
    make, bash = shutil.which("make"), shutil.which("bash")
    assert make is not None and bash is not None
    run = subprocess.run([make, "-n", "-B", "run"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    test = subprocess.run([make, "-n", "-B", "test"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "pip install --quiet -e .\n" in run and "[dev]" not in run and "system-deps.sh run" in run
    assert "-e '.[dev]'" in test and "system-deps.sh test" in test

    def packages(mode: str) -> set[str]:
        printed = subprocess.run(
            [bash, "scripts/system-deps.sh", "--print", mode], capture_output=True, text=True, cwd=ROOT, check=True
        )
        return set(printed.stdout.split())

    assert packages("run") == {"redis-server", "postgresql"}
    servers = {"redis-server", "postgresql", "nginx-light", "caddy", "chromium", "wrk", "redis-sentinel"}
    assert packages("test") == servers | {"kubernetes-client", "docker-compose"}
