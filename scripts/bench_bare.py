"""The ceiling of `make bench`: a bare aiohttp + uvloop responder that answers every request 200 with the
eight identity headers the gateway sends, and nothing else (no parsing, no cache, no Redis).

One process, uvloop, access log off, like `gateway serve --workers 1` with `log_level: WARNING`.
`python scripts/bench_bare.py --port P [--headers JSON]`; SIGINT or SIGTERM stops it at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import uvloop
from aiohttp import web

from gateway.models import IDENTITY_HEADERS  # the headers the gateway answers with, exactly

EXAMPLE = {
    "X-Org": "org_0123456789abcdef",
    "X-Role": "admin",
    "X-User": "usr_0123456789abcdef",
    "X-Key-Id": "0123456789ABCDEF",
    "X-Scopes": "*",
    "X-Project": "",
    "X-Key-Env": "live",
    "X-Auth-Method": "api_key",
}


def make_app(headers: dict[str, str]) -> web.Application:
    async def answer(_request: web.Request) -> web.Response:
        return web.Response(status=200, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def serve(host: str, port: int, headers: dict[str, str]) -> None:
    runner = web.AppRunner(make_app(headers), access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--headers", help="JSON object: the identity header values to answer with")
    a = ap.parse_args()
    values = {**EXAMPLE, **(json.loads(a.headers) if a.headers else {})}
    headers = {name: str(values[name]) for name in IDENTITY_HEADERS}
    uvloop.run(serve(a.host, a.port, headers))


if __name__ == "__main__":
    main()
