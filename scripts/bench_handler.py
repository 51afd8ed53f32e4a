"""The cost of one `/auth/nginx` decision in-process: the forward-auth handler called in a loop, without
sockets or HTTP parsing, for a cached key (the hot path) and for a junk key.

Starts its own Postgres and Redis, builds the app with the shipped policy and raised key/org limits (as
`make bench` row 2), warms the caches, then times `--calls` handler calls of each kind. Prints
microseconds per call; with `--profile`, the top of a cProfile of the hot path too. Inside a loaded
server a decision costs more than here (the framework's work between calls evicts the handler's data
from the CPU caches), so compare runs of this script with each other, not with `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from typing import Any

from _bench import ROOT, local_services, seed_world
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.app import create_app
from gateway.config import config_from_mapping
from gateway.typedefs import FORWARD

RAISED = {"rate": "1000000/1s", "burst": 1000000}


class _Peer:
    """What a request needs of its transport here: the client's address."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False


async def measure(env: dict[str, str], calls: int, profile: bool) -> None:
    world = await seed_world(env, 1)
    key = str(world.keys[0]["key"])
    cfg = config_from_mapping(
        {
            "policy_file": str(ROOT / "config/policy.yaml"),
            "log_level": "WARNING",
            "rate_limits": {"key": RAISED, "org": RAISED},
        },
        env=env,
    )
    app = create_app(cfg)
    runner = web.AppRunner(app)
    await runner.setup()
    forward = app[FORWARD]

    async def handle(request: web.Request) -> web.StreamResponse:
        return await forward.handle(request, "nginx")

    base = {"X-Original-URI": "/v1/things", "X-Original-Method": "GET", "X-Org-Id": world.org, "Host": "api"}

    def requests(raw: str) -> list[web.Request]:
        headers = {**base, "Authorization": f"Bearer {raw}"}
        return [
            make_mocked_request("GET", "/auth/nginx", headers=headers, app=app, transport=_Peer()) for _ in range(calls)
        ]

    try:
        for name, raw, status in (("cached key", key, 200), ("junk key", key[:-1] + "0", 401)):
            warm = await handle(requests(raw)[0])
            assert warm.status == status, (name, warm.status)
            batch = requests(raw)
            started = time.perf_counter()
            for request in batch:
                await handle(request)
            print(f"{name:12s} {(time.perf_counter() - started) / calls * 1e6:6.1f} µs per decision")
        if profile:
            batch = requests(key)
            profiler = cProfile.Profile()
            profiler.enable()
            for request in batch:
                await handle(request)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the hot path")
    args = parser.parse_args()
    with local_services() as (_tmp, _pg, _rd, env):
        asyncio.run(measure(env, args.calls, args.profile))


if __name__ == "__main__":
    main()
