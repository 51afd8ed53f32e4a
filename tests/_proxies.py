"""Shared pieces of the real-proxy tests: an echo upstream and a raw HTTP client."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL


async def echo(request: web.Request) -> web.Response:
    """The upstream: answers with the path and every header exactly as received."""
    return web.json_response({"path": request.raw_path, "headers": [[k, v] for k, v in request.headers.items()]})


def echo_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal a server we started, give it 10 s to finish, then kill it."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


async def fetch(base: str, path: str = "/v1/things", headers: Any = None, method: str = "GET") -> tuple[int, Any, Any]:
    """(status, headers, JSON body). The path is sent exactly as written (no client-side cleaning)."""
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, URL(base + path, encoded=True), headers=headers or {}) as r,
    ):
        text = await r.text()
        try:
            return r.status, r.headers, json.loads(text)
        except ValueError:
            return r.status, r.headers, {"text": text}


def seen(body: dict[str, Any], name: str) -> list[str]:
    """The values of a header as the upstream received it."""
    return [v for k, v in body["headers"] if k.lower() == name.lower()]


# Ways to dress a protected path up as a public one (`/docs/**` is public in the shipped policy).
PATH_TRICKS = [
    "/docs/../v1/things",
    "/docs/%2e%2e/v1/things",
    "/docs/%2E%2E/v1/things",
    "//docs/../v1/things",
    "/docs/./../v1/things",
    "/docs/..%2Fv1/things",
    "/docs%2F..%2Fv1/things",
    "/docs/..%2F..%2Fv1/things",
]
