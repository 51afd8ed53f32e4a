"""Typed application keys: every shared object a decision may reach, declared in one place. The management
layer's own (KEYRING, DIRECTORY, AUDIT_LOG, INVITATIONS) live beside their classes, so nothing here
imports management code."""

from __future__ import annotations

import ipaddress

from aiohttp import web

from gateway._breaker import Breaker
from gateway.audit import FailureAuditor, UsageAuditor
from gateway.authz import KeyResolver, ProjectDirectory
from gateway.config import Config
from gateway.forward import ForwardAuth
from gateway.health import Lifecycle
from gateway.keys import KeyFormat, SecretHasher
from gateway.listener import InvalidationListener
from gateway.logs import RequestIds
from gateway.metrics import Metrics
from gateway.policy import Policy
from gateway.ratelimit import Limits, RateLimiter
from gateway.redis_client import RedisClient
from gateway.sessions import SessionStore
from gateway.signing import SigningKeys
from gateway.store import Store
from gateway.verifier import Verifier

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

CONFIG = web.AppKey("config", Config)
KEY_FORMAT = web.AppKey("key_format", KeyFormat)
HASHER = web.AppKey("hasher", SecretHasher)
METRICS = web.AppKey("metrics", Metrics)
POLICY = web.AppKey[Policy]("policy")
TRUSTED = web.AppKey[tuple[Network, ...]]("trusted_proxies")
STORE = web.AppKey("store", Store)
REDIS = web.AppKey[RedisClient]("redis")
RESOLVER = web.AppKey("resolver", KeyResolver)
AUDITOR = web.AppKey("auditor", FailureAuditor)
USAGE = web.AppKey("usage", UsageAuditor)
PROJECTS = web.AppKey("projects", ProjectDirectory)
LIMITS = web.AppKey("limits", Limits)
LIMITER = web.AppKey[RateLimiter | None]("limiter")
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
LISTENER = web.AppKey("listener", InvalidationListener)
# One breaker per store, shared by all its callers: Postgres's is the Store's own (STORE.breaker).
REDIS_BREAKER = web.AppKey("redis_breaker", Breaker)

# The one path from a credential to a decision, for every entry point.
VERIFIER = web.AppKey("verifier", Verifier)
# Browser sessions in Redis, and the JWT signing keys (published at /.well-known/jwks.json).
SESSIONS = web.AppKey("sessions", SessionStore)
SIGNING = web.AppKey("signing", SigningKeys)
# The proxy endpoints, bound to the objects a decision needs.
FORWARD = web.AppKey("forward", ForwardAuth)
REQUEST_IDS = web.AppKey("request_ids", RequestIds)
