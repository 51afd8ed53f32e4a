from __future__ import annotations

import asyncio
import os
import threading
import zlib

import pytest
from argon2 import PasswordHasher

from gateway.config import Argon2Config
from gateway.keys import (
    ALPHABET,
    CHECKSUM_LEN,
    KEY_ID_LEN,
    SECRET_LEN,
    KeyFormat,
    SecretHasher,
    VerifierBusy,
    b62encode,
    checksum,
    digest,
)


def test_generated_key_has_the_contract_shape() -> None:
    fmt = KeyFormat("gw")
    raw, parsed = fmt.generate("live")
    prefix, env, key_id, tail = raw.split("_")
    assert (prefix, env) == ("gw", "live")
    assert len(key_id) == KEY_ID_LEN
    assert len(tail) == SECRET_LEN + CHECKSUM_LEN
    assert set(key_id + tail) <= set(ALPHABET)
    body = raw[:-CHECKSUM_LEN]
    assert raw[-CHECKSUM_LEN:] == b62encode(zlib.crc32(body.encode()), CHECKSUM_LEN)
    assert fmt.parse(raw) == parsed
    assert parsed.secret == tail[:SECRET_LEN]


def test_secret_carries_at_least_256_bits() -> None:
    assert 62**SECRET_LEN >= 2**256


def test_keys_are_unique_and_test_env_works() -> None:
    fmt = KeyFormat("acme")
    keys = {fmt.generate("test")[0] for _ in range(200)}
    assert len(keys) == 200
    assert all(k.startswith("acme_test_") for k in keys)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda k: k[:-1] + ("0" if k[-1] != "0" else "1"),  # checksum
        lambda k: k[:20] + ("0" if k[20] != "0" else "1") + k[21:],  # key id
        lambda k: k[:40] + ("0" if k[40] != "0" else "1") + k[41:],  # secret
        lambda k: k.replace("gw_live_", "gw_prod_"),
        lambda k: k.replace("gw_", "xx_"),
        lambda k: k + "a",
        lambda k: k[:-1],
        lambda k: k.replace("_", "-"),
        lambda k: " " + k,
        lambda k: k[:30] + "+" + k[31:],
    ],
)
def test_parse_refuses_bad_shape_or_checksum(mutate: object) -> None:
    fmt = KeyFormat("gw")
    raw, _ = fmt.generate("live")
    assert callable(mutate)
    assert fmt.parse(mutate(raw)) is None


def test_checksum_is_six_base62_chars() -> None:
    assert len(checksum("")) == CHECKSUM_LEN
    assert len(checksum("gw_live_x")) == CHECKSUM_LEN


def test_checksum_is_crc32_in_base62() -> None:
    """The table-driven checksum is exactly the documented one: CRC32 as six base62 digits."""
    bodies = ["", "gw_live_x", *(f"gw_test_{i:016d}_{'z' * (i % 43)}" for i in range(2000))]
    for body in bodies:
        assert checksum(body) == b62encode(zlib.crc32(body.encode()), CHECKSUM_LEN), body


def test_digest_is_keyed_by_pepper() -> None:
    assert digest(b"a" * 32, "k") != digest(b"b" * 32, "k")
    assert "k" not in digest(b"a" * 32, "k")
    assert digest(b"a" * 32, "k") == digest(b"a" * 32, "k") and len(digest(b"p" * 100, "k")) == 64
    assert digest(b"a" * 32, "k1") != digest(b"a" * 32, "k2")


def test_parsed_key_repr_hides_secret() -> None:
    _, parsed = KeyFormat("gw").generate("live")
    assert parsed.secret not in repr(parsed)


def test_default_argon2_parameters_are_owasp() -> None:
    hasher = SecretHasher(Argon2Config(), 1)
    try:
        h = hasher.hash_sync("s3cret")
        assert h.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
        assert hasher.verify_sync(h, "s3cret")
        assert not hasher.verify_sync(h, "other")
        assert not hasher.verify_sync("not a hash", "s3cret")
        PasswordHasher().verify(h, "s3cret")
    finally:
        hasher.close()


async def test_hashing_runs_off_the_event_loop() -> None:
    hasher = SecretHasher(Argon2Config(memory_kib=1024, time_cost=1), 2)
    try:
        h = await hasher.hash("x")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        results = await asyncio.gather(*(hasher.verify(h, "x") for _ in range(20)))
        t.cancel()
        assert all(results)
        assert ticks > 0  # the loop kept running while hashes were computed
    finally:
        hasher.close()


async def test_verifications_beyond_threads_and_queue_are_refused_at_once() -> None:
    """One thread, one waiting: of five verifications at once two are admitted, three refused without
    waiting; once they finish, verifications are admitted again."""
    hasher = SecretHasher(Argon2Config(memory_kib=1024, time_cost=1), 1, queue=1)
    try:
        h = await hasher.hash("x")
        results = await asyncio.gather(*(hasher.verify(h, "x") for _ in range(5)), return_exceptions=True)
        assert results[:2] == [True, True]
        assert all(isinstance(r, VerifierBusy) for r in results[2:])
        assert hasher.admitted == 0 and not hasher.saturated
        assert await hasher.verify(h, "x")
    finally:
        hasher.close()


async def test_argon2_threads_run_at_the_lowest_cpu_priority() -> None:
    """A flood of uncached keys must not take the core from the event loop that answers cached ones:
    the hashing threads run only when the loop does not want the CPU (SCHED_IDLE, nice 19), the loop's
    thread as it was."""
    hasher = SecretHasher(Argon2Config(memory_kib=1024, time_cost=1), 2)
    try:
        await hasher.hash("x")  # starts a thread
        loop = asyncio.get_running_loop()

        def own_nice() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        def own_policy() -> int:
            return os.sched_getscheduler(threading.get_native_id())

        assert await loop.run_in_executor(hasher._pool, own_nice) == 19
        assert await loop.run_in_executor(hasher._pool, own_policy) == os.SCHED_IDLE
        assert own_nice() == os.getpriority(os.PRIO_PROCESS, 0) < 19
        assert own_policy() == os.SCHED_OTHER
    finally:
        hasher.close()
