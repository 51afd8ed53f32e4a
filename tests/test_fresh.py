"""gateway/fresh.py: values kept fresh by invalidation, never overwritten by a read that began before."""

from __future__ import annotations

import asyncio

import pytest

from gateway.backends import StoreUnavailable
from gateway.cache import LocalCache
from gateway.errors import AuthUnavailable
from gateway.fresh import FreshMap


async def test_a_read_begun_before_an_invalidation_does_not_land_after_it() -> None:
    """Found by review: a revocation applied as put(True) while a read of the old state (False) was under
    way was overwritten when the read finished, so a revoked family counted as live for ttl_s."""
    local = LocalCache(10, 30, 10)
    local.listening = True
    release = asyncio.Event()

    async def load(keys: list[str]) -> dict[str, bool]:
        await release.wait()
        return {k: False for k in keys}

    families: FreshMap[bool] = FreshMap(local, load, 30, 300, 100)
    reading = asyncio.ensure_future(families.get("fam_1"))
    await asyncio.sleep(0)
    families.invalidate(["fam_1"])  # what the app's `revoked` does first
    families.put("fam_1", True)
    release.set()
    assert await reading is False  # that read's own caller gets what it read
    assert families.fresh("fam_1") is True


async def test_postgres_down_serves_what_was_read_within_the_stale_bound() -> None:
    local = LocalCache(10, 30, 10)
    local.listening = True
    down = False

    async def load(keys: list[str]) -> dict[str, bool]:
        if down:
            raise StoreUnavailable("down")
        return {k: False for k in keys}

    families: FreshMap[bool] = FreshMap(local, load, 0.0, 300, 100)  # nothing stays fresh: each use reads
    assert await families.get("fam_1") is False
    down = True
    assert await families.get("fam_1") is False  # stale, within ttl + stale
    with pytest.raises(AuthUnavailable):
        await families.get("fam_never_read")  # nothing to fall back on: 503, never a verdict
