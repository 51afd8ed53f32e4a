"""The per-decision metrics are plain increments exported at scrape time, as prometheus_client would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.metrics import Latency, Metrics


def test_tallies_export_as_counters() -> None:
    m = Metrics()
    for _ in range(3):
        m.decisions.inc("nginx", "ok")
    m.decisions.inc("caddy", "invalid_api_key")
    m.cache.inc("local")
    text = generate_latest(m.registry).decode()
    assert 'gateway_auth_decisions_total{code="ok",endpoint="nginx"} 3.0' in text
    assert 'gateway_auth_decisions_total{code="invalid_api_key",endpoint="caddy"} 1.0' in text
    assert "# TYPE gateway_auth_decisions_total counter" in text
    assert 'gateway_key_cache_total{tier="local"} 1.0' in text
    assert m.decisions.value("nginx", "ok") == 3


def test_latency_exports_what_a_prometheus_histogram_would() -> None:
    """Same buckets, same `le` spelling, bounds inclusive, `_count` and `_sum`: compared line by line
    with prometheus_client's own Histogram fed the same observations."""
    buckets = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = Latency("x_seconds", "help", "endpoint", buckets, ours_registry)
    theirs = Histogram("x_seconds", "help", ["endpoint"], registry=theirs_registry, buckets=buckets)
    for seconds in (0.0001, 0.0005, 0.001, 0.003, 0.003, 0.2, 1.0, 7.5):
        ours.observe("nginx", seconds)
        theirs.labels("nginx").observe(seconds)

    def samples(registry: CollectorRegistry) -> set[str]:
        return {
            line
            for line in generate_latest(registry).decode().splitlines()
            if line.startswith("x_seconds_") and "_created" not in line
        }

    assert samples(ours_registry) == samples(theirs_registry)
    assert 'x_seconds_bucket{endpoint="nginx",le="0.001"} 3.0' in samples(ours_registry)
