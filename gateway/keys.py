"""API key format, generation, parsing and hashing.

Format: `<prefix>_<env>_<key id>_<secret><checksum>`, base62 only so that a double-click selects the
whole key. The checksum is CRC32 over everything before it, as 6 base62 characters, so a mistyped or
truncated key is refused with no database or Redis access.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import os
import re
import secrets
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gateway import constants as C
from gateway.config import Argon2Config
from gateway.constants import DEFAULT_VERIFY_QUEUE

ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ENVS: Final = ("live", "test")
KEY_ID_LEN: Final = 16  # ~95 bits: public, unique, not guessable
SECRET_LEN: Final = 43  # 43 base62 chars carry 256 bits
CHECKSUM_LEN: Final = 6
MAX_KEY_LEN: Final = 128  # anything longer is not one of ours: refuse before any work

_B62 = f"[{ALPHABET}]"


def b62encode(data: bytes | int, width: int = 0) -> str:
    n = int.from_bytes(data, "big") if isinstance(data, bytes) else data
    out = []
    while n:
        n, r = divmod(n, 62)
        out.append(ALPHABET[r])
    return "".join(reversed(out)).rjust(width, "0")


def random_b62(length: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def new_secret() -> str:
    # 32 bytes from `secrets` = 256 bits; encoded in exactly SECRET_LEN characters.
    return b62encode(secrets.token_bytes(32), SECRET_LEN)


# Every two-character base62 string, by value: a 32-bit checksum is three look-ups (62**6 > 2**32).
_PAIRS: Final = tuple(a + b for a in ALPHABET for b in ALPHABET)
_PAIR: Final = len(_PAIRS)


def checksum(body: str) -> str:
    """CRC32 of `body` as CHECKSUM_LEN base62 characters (what `b62encode(crc, 6)` gives, faster)."""
    n = zlib.crc32(body.encode("ascii"))
    return _PAIRS[n // (_PAIR * _PAIR)] + _PAIRS[n // _PAIR % _PAIR] + _PAIRS[n % _PAIR]


@dataclass(slots=True)  # made per request: a frozen init costs a setattr per field
class ParsedKey:
    raw: str
    prefix: str
    env: str
    key_id: str
    secret: str

    def __repr__(self) -> str:  # never print the secret
        return f"ParsedKey(key_id={self.key_id!r}, env={self.env!r})"


class KeyFormat:
    """Builds and parses keys for one configured prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._marker = re.compile(rf"{re.escape(prefix)}_(?:live|test)_", re.IGNORECASE)
        self._re = re.compile(
            rf"{re.escape(prefix)}_(live|test)_({_B62}{{{KEY_ID_LEN}}})_({_B62}{{{SECRET_LEN}}})({_B62}{{{CHECKSUM_LEN}}})"
        )

    def build(self, env: str, key_id: str, secret: str) -> str:
        body = f"{self.prefix}_{env}_{key_id}_{secret}"
        return body + checksum(body)

    def generate(self, env: str) -> tuple[str, ParsedKey]:
        key_id, secret = random_b62(KEY_ID_LEN), new_secret()
        raw = self.build(env, key_id, secret)
        return raw, ParsedKey(raw, self.prefix, env, key_id, secret)

    def display_start(self, env: str, key_id: str) -> str:
        """What listings show: enough to recognise a key, nothing secret."""
        return f"{self.prefix}_{env}_{key_id[:4]}"

    def parse(self, raw: str) -> ParsedKey | None:
        """The parsed key, or None for a bad shape or checksum (no I/O is ever done for those)."""
        if len(raw) > MAX_KEY_LEN:
            return None
        m = self._re.fullmatch(raw)
        if m is None:
            return None
        env, key_id, secret, check = m.groups()
        body = raw[:-CHECKSUM_LEN]
        if not hmac.compare_digest(checksum(body), check):
            return None
        return ParsedKey(raw, self.prefix, env, key_id, secret)

    @property
    def key_marker(self) -> re.Pattern[str]:
        """Where a key of ours starts, anywhere in a text (`gw_live_`, `gw_test_`)."""
        return self._marker

    def looks_like_key(self, value: str) -> bool:
        return value.startswith((f"{self.prefix}_live_", f"{self.prefix}_test_"))


# Whatever follows `<prefix>_live_` or `<prefix>_test_`, for any prefix: what a log line must never hold.
_KEY_TAIL = re.compile(r"(_(?:live|test)_)[A-Za-z0-9_]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with anything key-shaped cut after its `_live_`/`_test_`, for logs."""
    return _KEY_TAIL.sub(r"\1[redacted]", text)


def digest(pepper: bytes, raw: str) -> str:
    """A keyed hash of the whole key under the server's pepper: what caches are keyed by (no key bytes)."""
    h = _keyed(pepper).copy()
    h.update(raw.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def _keyed(pepper: bytes) -> hashlib.blake2b:
    # Keyed BLAKE2b is a MAC by design (RFC 7693), as strong here as HMAC-SHA256 and a quarter of its
    # cost (OpenSSL sets HMAC up anew on every call; a copy of this is a memcpy). Its key is at most 64
    # bytes: the pepper, of any length, is hashed to that.
    return hashlib.blake2b(key=hashlib.blake2b(pepper).digest(), digest_size=32)


class VerifierBusy(Exception):
    """Every argon2 thread is busy and the verifications waiting for one fill the queue."""


def _yield_to_the_event_loop() -> None:
    """Run this argon2 thread only when the event loop does not want the CPU (Linux: SCHED_IDLE for this
    thread alone, else its lowest nice value). argon2 releases the GIL and would otherwise take its
    share of the core from the event loop, so a flood of uncached keys slowed every cached answer (hot
    p99 x9 in `make bench`); now it uses what is left, and a waking event loop preempts it at once."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or not allowed: run as is
        os.setpriority(os.PRIO_PROCESS, tid, C.ARGON2_NICE)
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


class SecretHasher:
    """argon2id hashing and verification, always off the event loop, on a bounded thread pool.

    Verifications are bounded twice: `threads` run at once, and at most `queue` more wait for a thread;
    past that `verify` refuses at once (VerifierBusy) rather than queueing without bound, so a flood
    costs neither unbounded memory nor an ever longer wait for everyone else.
    """

    def __init__(self, params: Argon2Config, threads: int, queue: int = DEFAULT_VERIFY_QUEUE) -> None:
        self._ph = PasswordHasher(
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            type=Type.ID,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="argon2", initializer=_yield_to_the_event_loop
        )
        self.threads = threads
        self.queue = queue
        self._capacity = threads + queue
        self._admitted = 0  # verifications running or waiting (only touched on the event loop)

    @property
    def admitted(self) -> int:
        """Verifications running or waiting for a thread."""
        return self._admitted

    @property
    def saturated(self) -> bool:
        """Would a verification be refused now?"""
        return self._admitted >= self._capacity

    def hash_sync(self, secret: str) -> str:
        return self._ph.hash(secret)

    def verify_sync(self, encoded: str, secret: str) -> bool:
        try:
            return self._ph.verify(encoded, secret)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def hash(self, secret: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.hash_sync, secret)

    async def verify(self, encoded: str, secret: str) -> bool:
        """Raises VerifierBusy when `threads + queue` verifications are already admitted."""
        # Callers collapse concurrent verifications of one key (KeyResolver's single flight).
        if self.saturated:
            raise VerifierBusy
        self._admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.verify_sync, encoded, secret)
        finally:
            # A waiter cancelled while its hash runs leaves that thread busy a little longer: the bound
            # is overshot by at most `threads`, never without limit.
            self._admitted -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
