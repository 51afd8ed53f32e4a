"""The per-decision metrics are plain increments exported at scrape time, as prometheus_client would."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway._services import free_port
from gateway.metrics import Latency, Metrics
from tests.conftest import (
    ROOT,
    Client,
    Services,
    World,
    gateway_env,
    nginx_headers,
    start_gateway,
    write_test_config,
)


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


def test_a_latency_with_several_labels_exports_what_prometheus_would() -> None:
    buckets = (0.001, 0.01, 0.1)
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = Latency("y_seconds", "help", ("backend", "op"), buckets, ours_registry)
    theirs = Histogram("y_seconds", "help", ["backend", "op"], registry=theirs_registry, buckets=buckets)
    for labels, seconds in (
        (("redis", "cache_get"), 0.0004),
        (("postgres", "load_key"), 0.05),
        (("redis", "cache_get"), 2.0),
    ):
        ours.observe(labels, seconds)
        theirs.labels(*labels).observe(seconds)

    def samples(registry: CollectorRegistry) -> set[str]:
        text = generate_latest(registry).decode()
        return {line for line in text.splitlines() if line.startswith("y_seconds_") and "_created" not in line}

    assert samples(ours_registry) == samples(theirs_registry)


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample `name{labels...}` (labels in any order), or 0 when it is absent."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.rsplit(" ", 1)[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_what_an_operator_graphs_is_exported(client: Client, world: World) -> None:
    """Process and runtime, build info, store latency by call, /v1 latency by route template, lease and
    cache-tier counters: after a few real requests, each has samples."""
    k = await world.key(orgs=[world.org_a])
    for _ in range(3):
        assert (await client.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    assert (await client.get("/v1/me", headers={"Authorization": f"Bearer {k['key']}"})).status == 200
    assert (await client.get(f"/v1/keys/{k['id']}", headers={"Authorization": f"Bearer {k['key']}"})).status == 200
    assert (await client.get("/v1/keys/nope", headers={"Authorization": f"Bearer {k['key']}"})).status == 404
    text = await (await client.get("/metrics")).text()
    for family in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_gc_collections_total"):
        assert family in text
    assert _sample(text, "python_info") == 1
    assert _sample(text, "gateway_build_info", version="0.1.0") == 1
    assert _sample(text, "gateway_backend_seconds_count", backend="postgres", op="load_key") >= 1
    assert _sample(text, "gateway_backend_seconds_count", backend="postgres", op="management") >= 1
    assert _sample(text, "gateway_backend_seconds_count", backend="redis", op="cache_get") >= 1
    assert _sample(text, "gateway_backend_seconds_count", backend="redis", op="ratelimit") >= 1
    assert _sample(text, "gateway_http_seconds_count", method="GET", route="/v1/me") == 1
    assert _sample(text, "gateway_http_seconds_count", method="GET", route="/v1/keys/{key_id}") == 2
    assert _sample(text, "gateway_http_responses_total", method="GET", route="/v1/keys/{key_id}", status="404") == 1
    assert "/v1/keys/nope" not in text  # templates, never paths: a bounded set of series
    leased = _sample(text, "gateway_ratelimit_charges_total", limit="key", source="lease")
    redis = sum(_sample(text, "gateway_ratelimit_charges_total", limit="key", source=s) for s in ("refill", "exact"))
    assert redis >= 1 and leased + redis == 3 + 3  # three decisions and the three /v1/ calls made with the key
    assert _sample(text, "gateway_key_cache_total", tier="local") >= 2


async def test_metrics_on_their_own_port(services: Services, clean: None, world: World, tmp_path: Path) -> None:
    port = free_port()
    gw = await start_gateway(services, tmp_path, "m", config_yaml=f"metrics: {{port: {port}}}")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url + "/metrics") as r:
                assert r.status == 404  # not on the port proxies and clients reach
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200 and "gateway_build_info" in await r.text()
            async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 404  # that port serves the metrics alone
    finally:
        gw.stop()
    assert f"metrics on 127.0.0.1:{port}/metrics" in gw.logs()


def test_a_busy_metrics_port_is_one_line_before_serving(services: Services, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        config = write_test_config(tmp_path / "c.yaml", extra=f"metrics: {{port: {taken}}}")
        r = subprocess.run(  # noqa: S603 (our own command line)
            [sys.executable, "-m", "gateway", "--config", str(config), "serve", "--port", str(free_port())],
            capture_output=True, text=True, env=gateway_env(services), cwd=ROOT, timeout=60, check=False,
        )  # fmt: skip
    assert r.returncode == 1 and "serving" not in r.stderr
    assert (
        r.stderr.splitlines()[-1]
        == f"gateway: cannot listen on 127.0.0.1:{taken} (metrics.port): address already in use"
    )
