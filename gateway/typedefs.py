"""Typed application keys: every shared object a handler may reach, declared in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    pass

CONFIG = web.AppKey["Config"]("config")
KEY_FORMAT = web.AppKey["KeyFormat"]("key_format")
HASHER = web.AppKey["SecretHasher"]("hasher")
METRICS = web.AppKey["Metrics"]("metrics")
POLICY = web.AppKey["Policy"]("policy")
TRUSTED = web.AppKey["tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]"]("trusted_proxies")
STORE = web.AppKey["Store"]("store")
REDIS = web.AppKey["aioredis.Redis"]("redis")
RESOLVER = web.AppKey["KeyResolver"]("resolver")
AUDITOR = web.AppKey["FailureAuditor"]("auditor")

# Per-request: the key id once the key is known, for the audit of a denial.
KEY_ID = web.RequestKey[str]("key_id")
