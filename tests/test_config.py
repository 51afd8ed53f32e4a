from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    Secret,
    ThreadCount,
    config_from_mapping,
    cores,
    host_port,
    load_config,
    redact_url,
    redis_mode,
)
from gateway.errors import ConfigError

BASE = {"database": {"url": "postgresql://u:pw@db/x"}, "redis": {"url": "redis://r:6379/0"}, "pepper": "p" * 32}


def _with(**over: object) -> dict[str, object]:
    data: dict[str, object] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for path, value in over.items():
        section, _, name = path.partition("__")
        if name:
            sub = data.setdefault(section, {})
            assert isinstance(sub, dict)
            sub[name] = value
        else:
            data[section] = value
    return data


def test_minimal_config_is_valid() -> None:
    cfg = config_from_mapping(BASE, env={})
    assert cfg.keys.prefix == "gw"
    assert cfg.roles.order == ("viewer", "member", "admin", "owner")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (_with(server__port=0), "server.port"),
        (_with(server__port="80"), "server.port"),
        (_with(server__bogus=1), "server.bogus"),
        (_with(server__header_timeout_s=0), "server.header_timeout_s"),
        (_with(server__body_timeout_s=301), "server.body_timeout_s"),
        (_with(bogus=1), "bogus"),
        (_with(database__url="mysql://x"), "database.url"),
        (_with(redis__url=""), "redis.url"),
        (_with(pepper="short"), "pepper"),
        (_with(keys__prefix="g_w"), "keys.prefix"),
        (_with(cache__local_ttl_s=-1), "cache.local_ttl_s"),
        (_with(cache__local_ttl_s=True), "cache.local_ttl_s"),
        (_with(forward_auth__proxy="haproxy"), "forward_auth.proxy"),
        (_with(forward_auth__trusted_proxies=["not-a-net"]), "forward_auth.trusted_proxies[0]"),
        (_with(roles={"order": ["a", "b"], "permissions": {"a": ["*"]}}), "roles.permissions.b"),
        (_with(keys={"argon2": {"time_cost": 0}}), "keys.argon2.time_cost"),
        (_with(keys={"verify_queue": -1}), "keys.verify_queue"),
        (_with(rate_limits={"failures_per_key_address": {"burst": 0}}), "rate_limits.failures_per_key_address.burst"),
        (_with(server=[1, 2]), "server"),
        (_with(log_level="LOUD"), "log_level"),
    ],
)
def test_bad_values_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_mapping(data, env={})
    assert str(exc.value).startswith(field)


def test_env_overrides_urls_and_pepper() -> None:
    cfg = config_from_mapping(
        {},
        env={"GATEWAY_DATABASE_URL": "postgresql://a/b", "GATEWAY_REDIS_URL": "redis://c", "GATEWAY_PEPPER": "q" * 40},
    )
    assert cfg.database.url.get() == "postgresql://a/b"
    assert cfg.redis.url.get() == "redis://c"
    assert cfg.pepper.get() == "q" * 40


def test_secrets_never_in_repr() -> None:
    cfg = config_from_mapping(BASE, env={})
    text = repr(cfg)
    assert "pw" not in text.replace("pwd", "")
    assert "p" * 32 not in text
    assert str(Secret("hunter2")) == repr(Secret("hunter2")) == "Secret('**********')"
    assert redact_url("postgresql://u:pw@db/x") == "postgresql://u:***@db/x"


def test_broken_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(str(bad), env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"), env={})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(scalar), env={})


def test_gateway_env_var_selects_the_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("server: {port: 9999}\n")
    cfg = load_config(
        None,
        env={
            "GATEWAY_CONFIG": str(f),
            **{
                k.upper(): v
                for k, v in {
                    "gateway_database_url": "postgresql://a/b",
                    "gateway_redis_url": "redis://c",
                    "gateway_pepper": "z" * 32,
                }.items()
            },
        },
    )
    assert cfg.server.port == 9999


def test_shipped_config_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(str(root / "config/gateway.yaml"), env={"GATEWAY_PEPPER": "x" * 32})
    assert cfg.keys.argon2.memory_kib == 19456
    assert cfg.server.workers == len(os.sched_getaffinity(0))  # shipped: `workers: auto`, one per core
    assert cfg.keys.verify_threads.per_process(cfg.server.workers) == 1  # shipped: auto, one per worker


@pytest.mark.parametrize(("value", "ok"), [("auto", True), (3, True), ("3", False), ("many", False), (True, False)])
def test_workers_is_a_number_or_auto(value: object, ok: bool) -> None:
    data = {"server": {"workers": value}, "pepper": "x" * 32, "database": {"url": "postgresql://h/d"}}
    data["redis"] = {"url": "redis://h"}
    if ok:
        workers = config_from_mapping(data, env={}).server.workers
        assert workers == (len(os.sched_getaffinity(0)) if value == "auto" else value)
    else:
        with pytest.raises(ConfigError, match=r"server\.workers: expected a whole number or auto"):
            config_from_mapping(data, env={})


@pytest.mark.parametrize(("value", "ok"), [("auto", True), (3, True), (0, False), ("2", False), (True, False)])
def test_verify_threads_is_a_number_or_auto(value: object, ok: bool) -> None:
    data = _with(keys__verify_threads=value)
    if not ok:
        with pytest.raises(ConfigError, match=r"keys\.verify_threads: expected a whole number of at least 1, or auto"):
            config_from_mapping(data, env={})
        return
    threads = config_from_mapping(data, env={}).keys.verify_threads
    cores = len(os.sched_getaffinity(0))
    for workers in (1, 2, 3, 64):
        # auto: the process's share of its cores, at least one (more only preempts the event loop).
        assert threads.per_process(workers) == (max(1, cores // workers) if value == "auto" else value)


def test_auto_threads_follow_the_cores_a_process_may_use() -> None:
    """`taskset -c 0 gateway serve`: one core, so one argon2 thread, whatever the machine has."""
    code = "import os; from gateway.config import ThreadCount as T; os.sched_setaffinity(0, {0}); "
    code += "print(T(0).per_process(1))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
    assert ThreadCount.parse("auto").per_process(1) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1), ("400000 100000", 4), ("junk", None), ("", None)],
)
def test_cores_are_capped_by_a_cgroup_cpu_limit(tmp_path: Path, cpu_max: str, expected: int | None) -> None:
    """A container's `limits.cpu` (cgroup v2 cpu.max), rounded up, caps the affinity count (which sees
    every core of the node); no limit, or none readable, leaves the affinity count."""
    affinity = len(os.sched_getaffinity(0))
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max + "\n")
    assert cores(path) == min(affinity, expected or affinity)
    assert cores(tmp_path / "absent") == affinity


def test_auto_threads_count_argon2_lanes() -> None:
    per_lane = len(os.sched_getaffinity(0))
    assert ThreadCount(0).per_process(1, 2) == max(1, per_lane // 2)
    assert ThreadCount(3).per_process(1, 2) == 3  # a number is taken as written


def test_bad_config_fails_at_start_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: {local_ttl_s: soon}\n")
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(bad), "serve"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "GATEWAY_PEPPER": "x" * 32},
    )
    assert r.returncode == 2
    assert "cache.local_ttl_s: expected a number" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_shipped_config_names_every_field() -> None:
    """README says config/gateway.yaml documents every field; five were missing (log.format among them)."""
    import dataclasses

    import yaml

    from gateway.config import Config

    shipped = yaml.safe_load((Path(__file__).resolve().parent.parent / "config/gateway.yaml").read_text())
    secrets = {"pepper", "database.url", "redis.url", "tokens.signing_secret"}  # from the environment

    def missing(defaults: object, data: dict[str, Any], where: str) -> list[str]:
        out = []
        for f in dataclasses.fields(defaults):  # type: ignore[arg-type]
            name = f"{where}{f.name}"
            if name in secrets or name.startswith(("roles.", "rate_limits.")):
                continue
            if f.name not in data:
                out.append(name)
            elif dataclasses.is_dataclass(default := getattr(defaults, f.name)) and isinstance(data[f.name], dict):
                out += missing(default, data[f.name], f"{name}.")
        return out

    assert missing(Config(), shipped, "") == []
    limits = {f.name for f in dataclasses.fields(type(Config().rate_limits))}
    assert limits <= set(shipped["rate_limits"])


def _redis(section: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    return config_from_mapping({**BASE, "redis": section}, env=env or {}).redis


def test_redis_sentinel_and_cluster_modes() -> None:
    sentinel = _redis({"sentinel": {"master": "gw", "addresses": ["10.0.0.1:26379", "[::1]:26380"]}})
    assert redis_mode(sentinel) == "sentinel"
    assert [host_port(a, "x") for a in sentinel.sentinel.addresses] == [("10.0.0.1", 26379), ("::1", 26380)]
    cluster = _redis({"cluster": {"addresses": ["a:7000"]}, "password": "pw"}, env={"GATEWAY_REDIS_PASSWORD": "envpw"})
    assert redis_mode(cluster) == "cluster"
    assert cluster.password == Secret("envpw") and "envpw" not in repr(cluster)
    assert redis_mode(_redis({"url": "redis://h:6379/0"})) == "single"


@pytest.mark.parametrize(
    ("section", "env", "error"),
    [
        ({"sentinel": {"addresses": ["s:26379"]}}, {}, "redis.sentinel.master: is required"),
        ({"sentinel": {"master": "gw"}}, {}, "redis.sentinel.addresses: name at least one"),
        ({"sentinel": {"master": "gw", "addresses": ["s"]}}, {}, "redis.sentinel.addresses[0]: expected host:port"),
        ({"cluster": {"addresses": ["c:99999"]}}, {}, "redis.cluster.addresses[0]: expected host:port"),
        ({"cluster": {"addresses": ["c:7000"]}, "sentinel": {"master": "gw"}}, {}, "not both"),
        ({"cluster": {"addresses": ["c:7000"]}}, {"GATEWAY_REDIS_URL": "redis://h/0"}, "redis.url: set either"),
        ({"url": "redis://h/0", "tls": True}, {}, "redis.tls: only for redis.sentinel and redis.cluster"),
        ({"url": "redis://h/0", "password": "x"}, {}, "redis.password: only for"),
        ({}, {}, "redis.url: is required"),
        ({"sentinel": {"master": "gw", "addresses": ["s:1"], "port": 1}}, {}, "redis.sentinel.port: unknown field"),
    ],
)
def test_redis_mode_errors_name_the_field(section: dict[str, Any], env: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _redis(section, env)
    assert error in str(exc.value)


def test_database_replica_url() -> None:
    data = _with(database__replica_url="postgresql://r/gw")
    assert config_from_mapping(data, env={}).database.replica_url == Secret("postgresql://r/gw")
    env = {"GATEWAY_DATABASE_REPLICA_URL": "postgresql://e/gw"}
    assert config_from_mapping(BASE, env=env).database.replica_url == Secret("postgresql://e/gw")
    with pytest.raises(ConfigError, match=r"database\.replica_url: must be a postgresql:// URL"):
        config_from_mapping(_with(database__replica_url="mysql://r"), env={})
