"""Prometheus collectors, registered on a registry owned by the app (no module-level state)."""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

M = TypeVar("M", Counter, Gauge, Histogram)


class Metrics:
    def __init__(self) -> None:
        # Children by (metric, labels): `labels()` validates and locks on every call, a cost the hot path
        # pays per request otherwise. Label values here are few (endpoints, codes, tiers, limit names).
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "gateway_auth_decisions",
            "Verify answers by endpoint and outcome code",
            ["endpoint", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "gateway_auth_seconds",
            "Time to answer a verify request",
            ["endpoint"],
            registry=r,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.cache = Counter("gateway_key_cache", "Key lookups by where they were answered", ["tier"], registry=r)
        self.argon2 = Counter("gateway_argon2_verifications", "argon2id verifications run", registry=r)
        self.argon2_busy = Counter(
            "gateway_argon2_busy",
            "Verifications refused (503) because every argon2 thread and queue slot was taken",
            registry=r,
        )
        self.backend_errors = Counter(
            "gateway_backend_errors", "Failed calls to a backing store", ["backend"], registry=r
        )
        self.invalidations = Counter("gateway_invalidations", "Keys invalidated by notification", registry=r)
        self.audit_dropped = Counter(
            "gateway_audit_failed_dropped", "auth.failed events not written because of the flood cap", registry=r
        )
        self.ratelimit = Counter(
            "gateway_ratelimit_decisions", "Rate-limit decisions by limit and outcome", ["limit", "outcome"], registry=r
        )
        self.ratelimit_fallback = Counter(
            "gateway_ratelimit_fallback",
            "Limit decisions made without Redis, by policy",
            ["limit", "policy"],
            registry=r,
        )
        self.backend_up = Gauge(
            "gateway_backend_up",
            "1 while the last call to the store worked (its breaker is closed)",
            ["backend"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "gateway_breaker_transitions",
            "Circuit breaker state changes by store and new state",
            ["backend", "state"],
            registry=r,
        )
        self.listener_up = Gauge(
            "gateway_invalidation_listener_up",
            "1 while invalidations reach this process (LISTEN connected)",
            registry=r,
        )
        self.local_entries = Gauge("gateway_local_cache_entries", "Entries in the in-process cache", registry=r)

    def child(self, metric: M, *labels: str) -> M:
        """`metric.labels(*labels)`, bound once."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found
