"""deploy/compose/: the Compose file is valid Compose (the Compose Specification's JSON schema, and Debian's
docker-compose), names only images and files that exist, runs migrations once before both replicas, agrees
with its nginx and gateway configs on every address and port, and its nginx config (deploy/nginx/gateway.conf
unchanged, behind two relays) passes `nginx -t` and balances real requests across two replicas.

Docker itself cannot run here: no image is built or pulled, no container started."""

from __future__ import annotations

import asyncio
import copy
import importlib.resources
import ipaddress
import json
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from gateway._services import free_port
from gateway.cli import SHUTDOWN_TIMEOUT_S, build_parser
from gateway.config import config_from_mapping
from gateway.models import IDENTITY_HEADERS
from gateway.policy import compile_policy
from tests._proxies import fetch, stop_process, wait_port
from tests.conftest import ROOT

COMPOSE_DIR = ROOT / "deploy/compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
NGINX_CONF = COMPOSE_DIR / "nginx/nginx.conf"
APP_CONF = COMPOSE_DIR / "nginx/app.conf"
SHIPPED_NGINX = ROOT / "deploy/nginx/gateway.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

# The gateway's image: built from deploy/Dockerfile by the stack itself (`migrate` builds it, `pull_policy:
# build`; the replicas reuse it, `pull_policy: never`), so no registry's copy is ever pulled in its place.
GATEWAY_IMAGE = "gateway:local"
# Every other image must be one of these Docker official images (Docker Hub's `library/`: no registry, no
# namespace), pinned to a release line, never `latest` or no tag:
#   postgres  the database. Major version only: a new major cannot read an older data volume (pg_upgrade).
#   redis     caches, rate limits, sessions. Major version: the commands the gateway uses are 7's.
#   nginx     the proxy in front and the demo upstream. A stable minor line (1.28): the config needs >= 1.19.5.
OFFICIAL_IMAGES = {"postgres": r"[0-9]+", "redis": r"[0-9]+", "nginx": r"1\.[0-9]+"}
REQUIRED_SERVICES = ("postgres", "redis", "migrate", "gateway-1", "gateway-2", "nginx")
REPLICAS = ("gateway-1", "gateway-2")
# .env.example leaves these empty: the stack must not start on a secret written in the repository.
SECRETS = ("POSTGRES_PASSWORD", "GATEWAY_PEPPER", "GATEWAY_SIGNING_SECRET")


def load_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict)
    return doc


# --- the checker -----------------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _bind_sources(service: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(source, target) of each bind mount; named volumes are skipped."""
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            if entry.get("type") == "bind":
                yield str(entry["source"]), str(entry["target"])
            continue
        source, _, rest = str(entry).partition(":")
        if source.startswith((".", "/", "~")):
            yield source, rest.split(":")[0]


def _named_volumes(service: Mapping[str, Any]) -> Iterator[str]:
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            if entry.get("type") == "volume":
                yield str(entry["source"])
            continue
        source, sep, _ = str(entry).partition(":")
        if sep and not source.startswith((".", "/", "~")):
            yield source


def _depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    """Each dependency and its condition (the short list form means service_started)."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _command(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def _image_problems(name: str, service: Mapping[str, Any], builders: set[str]) -> list[str]:
    image = service.get("image")
    if image == GATEWAY_IMAGE:
        wanted = "build" if "build" in service else "never"
        if service.get("pull_policy") != wanted:
            return [f"{name}: {GATEWAY_IMAGE} must have pull_policy: {wanted} (it is built here, never pulled)"]
        if not builders:
            return [f"{name}: no service builds {GATEWAY_IMAGE}"]
        return []
    if "build" in service:
        return [f"{name}: a built image must be named {GATEWAY_IMAGE}, not {image!r}"]
    repo, sep, tag = str(image).partition(":")
    if repo not in OFFICIAL_IMAGES:
        return [f"{name}: image {image!r} is neither {GATEWAY_IMAGE} nor one of the official {sorted(OFFICIAL_IMAGES)}"]
    if not sep or not re.fullmatch(OFFICIAL_IMAGES[repo], tag):
        return [f"{name}: image {image!r} is not pinned to a release line ({repo}:{OFFICIAL_IMAGES[repo]})"]
    return []


def _build_problems(name: str, service: Mapping[str, Any], base: Path) -> list[str]:
    if "build" not in service:
        return []
    build = service["build"]
    build = {"context": build} if isinstance(build, str) else build
    context = base / build.get("context", ".")
    if not context.is_dir():
        return [f"{name}: build context {build.get('context')} does not exist"]
    if not _inside(context, ROOT):
        return [f"{name}: build context {build.get('context')} is outside the repository"]
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    if not dockerfile.is_file():
        return [f"{name}: dockerfile {build.get('dockerfile', 'Dockerfile')} does not exist in {context}"]
    return []


def _mount_problems(name: str, service: Mapping[str, Any], base: Path, volumes: Mapping[str, Any]) -> list[str]:
    problems = []
    for source, target in _bind_sources(service):
        path = base / source
        if not _inside(path, ROOT):
            problems.append(f"{name}: bind mount {source} is outside the repository")
        elif not path.exists():
            problems.append(f"{name}: bind mount {source} -> {target} does not exist")
    problems += [f"{name}: volume {v} is not declared" for v in _named_volumes(service) if v not in volumes]
    return problems


def _gateway_problems(name: str, service: Mapping[str, Any]) -> list[str]:
    """A container of the gateway's image: not root, read-only, no capabilities."""
    problems = []
    user = str(service.get("user", "")).split(":")[0]
    if user in ("", "0", "root"):
        problems.append(f"{name}: runs as root (user: {service.get('user')!r})")
    if service.get("read_only") is not True:
        problems.append(f"{name}: root file system not read_only")
    if "ALL" not in service.get("cap_drop", []):
        problems.append(f"{name}: cap_drop lacks ALL")
    if "/tmp" not in service.get("tmpfs", []):
        problems.append(f"{name}: no tmpfs on /tmp")
    return problems


def _replica_problems(name: str, service: Mapping[str, Any]) -> list[str]:
    problems = []
    wanted = {
        "migrate": "service_completed_successfully",
        "postgres": "service_healthy",
        "redis": "service_healthy",
    }
    deps = _depends_on(service)
    for dep, condition in wanted.items():
        if deps.get(dep) != condition:
            problems.append(f"{name}: must wait for {dep} with condition {condition} (has {deps.get(dep)})")
    if _command(service) != ["serve"]:
        problems.append(f"{name}: command must be serve, not {_command(service)}")
    if "/readyz" not in " ".join(service.get("healthcheck", {}).get("test", [])):
        problems.append(f"{name}: no healthcheck on /readyz")
    return problems


def compose_problems(doc: Mapping[str, Any], base: Path = COMPOSE_DIR) -> list[str]:
    """Everything wrong with a Compose document, as messages; [] when it is right. Relative paths are
    resolved from `base`, the directory of the Compose file."""
    problems = []
    if "version" in doc:
        problems.append("the obsolete top-level `version` key")
    services: Mapping[str, Any] = doc.get("services") or {}
    volumes: Mapping[str, Any] = doc.get("volumes") or {}
    networks: Mapping[str, Any] = doc.get("networks") or {}
    problems += [f"service {s} is missing" for s in REQUIRED_SERVICES if s not in services]
    builders = {n for n, s in services.items() if "build" in s and s.get("image") == GATEWAY_IMAGE}
    for name, service in services.items():
        problems += _image_problems(name, service, builders)
        problems += _build_problems(name, service, base)
        problems += _mount_problems(name, service, base, volumes)
        problems += [f"{name}: depends on {d}, which is no service" for d in _depends_on(service) if d not in services]
        problems += [f"{name}: network {n} is not declared" for n in service.get("networks", []) if n not in networks]
        if service.get("image") == GATEWAY_IMAGE:
            problems += _gateway_problems(name, service)
    migrate = services.get("migrate", {})
    if _command(migrate) != ["migrate"]:
        problems.append(f"migrate: command must be migrate, not {_command(migrate)}")
    if migrate.get("restart") != "no":
        problems.append(f'migrate: restart must be "no" (it runs once), not {migrate.get("restart")!r}')
    if migrate and "build" not in migrate:
        problems.append("migrate: must build the gateway image")
    for replica in REPLICAS:
        if replica in services:
            problems += _replica_problems(replica, services[replica])
    others = [n for n, s in services.items() if n != "migrate" and "migrate" in _command(s)]
    problems += [f"{n}: runs migrate; only the migrate service does" for n in others]
    return problems


def test_compose_file_is_right() -> None:
    assert compose_problems(load_compose()) == []


def _drop_postgres(doc: dict[str, Any]) -> None:
    del doc["services"]["postgres"]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_set("services/nginx/volumes/0", "./nginx/missing.conf:/etc/nginx/nginx.conf:ro"), "missing.conf"),
        (_set("services/app/volumes/0", "/etc/passwd:/etc/nginx/conf.d/default.conf:ro"), "outside the repository"),
        (_set("services/migrate/build/dockerfile", "deploy/Nofile"), "dockerfile deploy/Nofile does not exist"),
        (_set("services/migrate/build/context", "../nowhere"), "build context ../nowhere does not exist"),
        (_set("services/redis/image", "redis:latest"), "not pinned"),
        (_set("services/redis/image", "redis"), "not pinned"),
        (_set("services/postgres/image", "bitnami/postgresql:17"), "neither"),
        (_set("services/gateway-2/image", "gateway:other"), "neither"),
        (_set("services/gateway-1/pull_policy", "always"), "pull_policy: never"),
        (_set("services/migrate/pull_policy", "missing"), "pull_policy: build"),
        (_drop_postgres, "service postgres is missing"),
        (_set("services/gateway-2/depends_on/migrate", {"condition": "service_started"}), "gateway-2: must wait"),
        (_set("services/migrate/restart", "unless-stopped"), "runs once"),
        (_set("services/gateway-1/command", ["migrate"]), "only the migrate service"),
        (_set("services/gateway-1/user", "0"), "runs as root"),
        (_set("services/gateway-2/read_only", False), "read_only"),
        (_set("services/gateway-1/healthcheck", {"test": ["CMD", "true"]}), "/readyz"),
        (_set("version", "3.8"), "version"),
    ],
)
def test_checker_catches_a_broken_compose_file(change: Callable[[dict[str, Any]], None], expected: str) -> None:
    doc = load_compose()
    broken = copy.deepcopy(doc)
    change(broken)
    assert broken != doc
    problems = compose_problems(broken)
    assert any(expected in p for p in problems), problems


# --- the Compose Specification ---------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    """The Compose Specification's own JSON schema (compose-spec/compose-spec, as vendored by the
    check-jsonschema package), which is what `docker compose` validates a file against."""
    import jsonschema_rs

    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    validator = jsonschema_rs.validator_for(json.loads(vendored.read_text()))
    doc = load_compose()
    assert [f"{list(e.instance_path)}: {e.message}" for e in validator.iter_errors(doc)] == []
    # The schema is strict: a misspelt key or an unknown condition is an error, not ignored.
    broken = copy.deepcopy(doc)
    broken["services"]["nginx"]["read_onyl"] = True
    broken["services"]["gateway-1"]["depends_on"]["migrate"]["condition"] = "service_completed"
    paths = {tuple(e.instance_path) for e in validator.iter_errors(broken)}
    assert ("services", "nginx") in paths and ("services", "gateway-1", "depends_on") in paths


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path.name}: not NAME=value: {line!r}"
            env[name.strip()] = value.strip()
    return env


def filled_env() -> dict[str, str]:
    """.env as the README has one made: .env.example with each empty secret filled in."""
    env = read_env_file(COMPOSE_DIR / ".env.example")
    return {k: v or f"{k.lower().replace('_', '')}0123456789abcdef0123456789abcdef" for k, v in env.items()}


_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ${NAME}, ${NAME:-default}, ${NAME:?error} and $$, strictly: an unset ${NAME} is an error
    here (Compose would warn and use an empty string)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name, op, arg = m["name"], m["op"] or "", m["arg"] or ""
        got = env.get(name)
        missing = got is None or (op.startswith(":") and got == "")
        if missing and op.endswith("?"):
            raise LookupError(f"{name}: {arg}")
        if missing and op.endswith("-"):
            return arg
        if got is None:
            raise LookupError(f"{name} is not set")
        return got

    return _VARIABLE.sub(one, value)


def test_secrets_come_from_dot_env_only() -> None:
    text = COMPOSE_FILE.read_text()
    used = {m["name"] for m in _VARIABLE.finditer(text) if m["name"]}
    # Compose would read any other `$` (`$NAME` in a shell command) as a variable too.
    assert "$" not in re.sub(r"\$\$|\$\{", "", text)
    example = read_env_file(COMPOSE_DIR / ".env.example")
    assert used - set(example) == set(), "every variable compose.yaml uses is in .env.example"
    assert {name for name in SECRETS if example[name] == ""} == set(SECRETS), "no secret value in the repository"
    # As copied, .env.example does not start the stack: each secret is asked for.
    for name in SECRETS:
        with pytest.raises(LookupError, match=f"{name}: set {name} in .env"):
            interpolate(load_compose(), {**filled_env(), name: ""})
    interpolate(load_compose(), filled_env())
    git = shutil.which("git")
    assert git is not None
    ignored = subprocess.run(  # noqa: S603
        [git, "check-ignore", "--no-index", "deploy/compose/.env", "deploy/compose/.env.example"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ignored.stdout.split() == ["deploy/compose/.env"]


def _docker_compose(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary is not None, "Debian's docker-compose is missing (scripts/system-deps.sh test installs it)"
    return subprocess.run(  # noqa: S603
        [binary, "-f", str(COMPOSE_FILE), *args], capture_output=True, text=True, check=False, timeout=60
    )


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    """Debian's docker-compose (1.29, no Docker daemon needed for `config`) parses the file, resolves its
    variables and build context, and refuses to go on while .env lacks a secret."""
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in filled_env().items()))
    ok = _docker_compose("--env-file", str(env_file), "config", "-q")
    assert ok.returncode == 0, ok.stderr
    services = _docker_compose("--env-file", str(env_file), "config", "--services")
    assert set(services.stdout.split()) == set(load_compose()["services"])
    refused = _docker_compose("--env-file", str(COMPOSE_DIR / ".env.example"), "config", "-q")
    assert refused.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in refused.stderr


# --- the stack agrees with itself -----------------------------------------------------------------


def _address(doc: Mapping[str, Any], service: str) -> str:
    return str(doc["services"][service]["networks"]["front"]["ipv4_address"])


def _upstream(conf: str, name: str) -> list[tuple[str, str]]:
    """(host:port, comment) of each server of an nginx upstream block."""
    block = re.search(rf"upstream {name} \{{(.*?)\}}", conf, re.DOTALL)
    assert block is not None, name
    return re.findall(r"^\s*server\s+(\S+?)[\s;][^\n]*?(?:#\s*(\S+))?$", block.group(1), re.MULTILINE)


def _listens(conf: str) -> list[str]:
    return re.findall(r"^\s*listen\s+([^;\s]+)", conf, re.MULTILINE)


def gateway_config_doc() -> dict[str, Any]:
    doc = yaml.safe_load((COMPOSE_DIR / "gateway.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def test_addresses_and_ports_agree() -> None:
    doc = load_compose()
    front = ipaddress.ip_network(doc["networks"]["front"]["ipam"]["config"][0]["subnet"])
    nginx_conf, shipped, app_conf = NGINX_CONF.read_text(), SHIPPED_NGINX.read_text(), APP_CONF.read_text()
    gw_port = gateway_config_doc()["server"]["port"]
    # nginx.conf reaches each replica, and the app, at its fixed address, each line naming its service.
    replicas = _upstream(nginx_conf, "gateway_replicas")
    assert replicas == [(f"{_address(doc, r)}:{gw_port}", r) for r in REPLICAS]
    (app_listen,) = _listens(app_conf)
    assert _upstream(nginx_conf, "demo_app") == [(f"{_address(doc, 'app')}:{app_listen}", "app")]
    assert all(ipaddress.ip_address(_address(doc, s)) in front for s in (*REPLICAS, "app", "nginx"))
    # The relays listen where the shipped gateway.conf sends its auth check and its allowed requests.
    (auth,) = _upstream(shipped, "gateway_auth")
    (app,) = _upstream(shipped, "gateway_app")
    assert sorted(_listens(nginx_conf)) == sorted([auth[0], app[0]])
    # The port nginx publishes is the one gateway.conf listens on.
    (published,) = doc["services"]["nginx"]["ports"]
    assert published.rsplit(":", 1)[1] == _listens(shipped)[0]
    # Each replica's health check asks its own port.
    for replica in REPLICAS:
        assert f"127.0.0.1:{gw_port}/readyz" in " ".join(doc["services"][replica]["healthcheck"]["test"])
    # Only nginx's X-Forwarded-For is believed.
    trusted = gateway_config_doc()["forward_auth"]["trusted_proxies"]
    assert trusted == [f"{_address(doc, 'nginx')}/32"]


def test_nginx_mounts_the_shipped_config_unchanged() -> None:
    nginx = load_compose()["services"]["nginx"]
    mounts = dict(_bind_sources(nginx))
    assert (COMPOSE_DIR / "../nginx/gateway.conf").resolve() == SHIPPED_NGINX.resolve()
    assert mounts["../nginx/gateway.conf"] == "/etc/nginx/gateway.conf"
    assert mounts["./nginx/nginx.conf"] == "/etc/nginx/nginx.conf"
    assert re.search(r"^\s*include /etc/nginx/gateway.conf;", NGINX_CONF.read_text(), re.MULTILINE)
    app_mounts = dict(_bind_sources(load_compose()["services"]["app"]))
    assert app_mounts["./nginx/app.conf"] == "/etc/nginx/conf.d/default.conf"
    # gateway.conf's access log is the file the container links to its stdout.
    log = re.search(r"access_log (\S+) gateway_no_query;", SHIPPED_NGINX.read_text())
    assert log is not None
    assert f"ln -sf /dev/stdout {log.group(1)} &&" in " ".join(_command(nginx))
    # The identity headers the gateway sends: set by the shipped file, and shown by the demo upstream.
    for header in IDENTITY_HEADERS:
        assert re.search(rf"proxy_set_header\s+{header}\s+\$gw_", SHIPPED_NGINX.read_text()), header
        assert re.search(rf"^{header}: \$http_{header.lower().replace('-', '_')}$", APP_CONF.read_text(), re.M)


def _duration_s(text: str) -> float:
    m = re.fullmatch(r"([0-9]+)(s|m)", text)
    assert m is not None, text
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def test_gateway_config_loads_with_the_compose_environment() -> None:
    doc = interpolate(load_compose(), filled_env())
    for name in ("migrate", *REPLICAS):
        service = doc["services"][name]
        env = service["environment"]
        # GATEWAY_CONFIG names the file mounted from gateway.yaml.
        assert dict(_bind_sources(service))["./gateway.yaml"] == env["GATEWAY_CONFIG"]
        cfg = config_from_mapping(gateway_config_doc(), env=env)
        assert cfg.database.url.get().startswith("postgresql://gateway:")
        assert cfg.server.host == "0.0.0.0"  # noqa: S104 - inside the container, reached over `front`
        assert cfg.forward_auth.proxy == "nginx"
        # policy_file is the image's copy of config/policy.yaml, beside the config file.
        assert "COPY config /etc/gateway" in (ROOT / "deploy/Dockerfile").read_text()
        compile_policy(yaml.safe_load((ROOT / "config" / cfg.policy_file).read_text()), cfg.roles)
        # docker compose stop gives the drain, the requests in flight and the clean-up their time.
        if name in REPLICAS:
            grace = _duration_s(service["stop_grace_period"])
            assert grace >= cfg.server.drain_s + SHUTDOWN_TIMEOUT_S + 5


def test_readme_agrees_with_the_stack() -> None:
    """deploy/compose/README.md: its table names each service with its image, its subnet is the file's, and
    each `gw ...` command it shows is one the gateway's command line takes."""
    readme = (COMPOSE_DIR / "README.md").read_text()
    doc = load_compose()
    table = {}
    for row in re.findall(r"^\| `.*", readme, re.M):
        names, image = row.split(" | ")[:2]
        table.update(dict.fromkeys(re.findall(r"`([\w-]+)`", names), image.split("`")[1]))
    assert table == {name: service["image"] for name, service in doc["services"].items()}
    assert doc["networks"]["front"]["ipam"]["config"][0]["subnet"] in readme
    parser = build_parser()
    commands = re.findall(r"\bgw ((?:--json )?[a-z-]+ [a-z-]+[^|)`\n]*)", readme)
    assert len(commands) >= 6
    for command in commands:
        args = [re.sub(r"^\$\w+$|^[A-Z_]+$", "x", a) for a in shlex.split(command)]
        parser.parse_args(args)  # exits (a failure) on an unknown command or option


# --- nginx, for real ------------------------------------------------------------------------------


@dataclass
class Rendered:
    conf: Path
    port: int  # where the front nginx listens (8000 in the container)


def _swap(text: str, old: str, new: str, count: int = 1) -> str:
    assert text.count(old) == count, f"expected {old!r} {count} time(s)"
    return text.replace(old, new)


def render_nginx(root: Path, replica_ports: list[int], app_port: int) -> Rendered:
    """The compose nginx as a host nginx runs it: the container's paths moved into `root`, and each
    compose address (the replicas', the app's) and loopback relay on a free port of 127.0.0.1."""
    doc = load_compose()
    root.mkdir(parents=True, exist_ok=True)
    port, auth_relay, app_relay = free_port(), free_port(), free_port()
    shipped = SHIPPED_NGINX.read_text()
    shipped = _swap(shipped, "server 127.0.0.1:8080;", f"server 127.0.0.1:{auth_relay};")
    shipped = _swap(shipped, "server 127.0.0.1:9000;", f"server 127.0.0.1:{app_relay};")
    shipped = _swap(shipped, "listen 8000;", f"listen 127.0.0.1:{port};")
    shipped = _swap(shipped, "/var/log/nginx/gateway.access.log", str(root / "access.log"))
    (root / "gateway.conf").write_text(shipped)
    app = _swap(APP_CONF.read_text(), "listen 8080;", f"listen 127.0.0.1:{app_port};")
    (root / "app.conf").write_text(app)
    conf = NGINX_CONF.read_text()
    conf = _swap(conf, "listen 127.0.0.1:8080;", f"listen 127.0.0.1:{auth_relay};")
    conf = _swap(conf, "listen 127.0.0.1:9000;", f"listen 127.0.0.1:{app_relay};")
    for replica, replica_port in zip(REPLICAS, replica_ports, strict=True):
        conf = _swap(conf, f"server {_address(doc, replica)}:8080 ", f"server 127.0.0.1:{replica_port} ")
    conf = _swap(conf, f"server {_address(doc, 'app')}:8080;", f"server 127.0.0.1:{app_port};")
    conf = _swap(conf, "include /etc/nginx/gateway.conf;", f"include {root}/gateway.conf;\ninclude {root}/app.conf;")
    conf = _swap(conf, "pid /var/run/nginx.pid;", f"pid {root}/nginx.pid;\ndaemon off;")
    conf = _swap(conf, "error_log stderr warn;", f"error_log {root}/error.log warn;")
    temp = "".join(f"{d}_temp_path {root}/{d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = _swap(conf, "http {\n", "http {\n" + temp)
    (root / "nginx.conf").write_text(conf)
    return Rendered(root / "nginx.conf", port)


def _nginx(conf: Path, *args: str) -> list[str]:
    return [NGINX, "-p", str(conf.parent), "-c", str(conf), "-e", str(conf.parent / "e.log"), *args]


def start_nginx(rendered: Rendered) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(_nginx(rendered.conf))  # noqa: S603
    try:
        wait_port(rendered.port, proc, "nginx")
    except RuntimeError:
        stop_process(proc)
        raise
    return proc


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    rendered = render_nginx(tmp_path, [free_port(), free_port()], free_port())
    check = subprocess.run(_nginx(rendered.conf, "-t"), capture_output=True, text=True, check=False)  # noqa: S603
    assert check.returncode == 0, check.stderr
    # And nginx -t is no formality here: a directive it does not know fails it.
    broken = rendered.conf.read_text().replace("keepalive 32;", "keepalive 32;\n        least_conn_typo;", 1)
    rendered.conf.write_text(broken)
    check = subprocess.run(_nginx(rendered.conf, "-t"), capture_output=True, text=True, check=False)  # noqa: S603
    assert check.returncode != 0 and "least_conn_typo" in check.stderr


@dataclass
class Replica:
    """A stand-in for one gateway replica: allows `Bearer good`, denies the rest, and notes what it saw."""

    name: str
    seen: list[dict[str, str]]

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append({k.lower(): v for k, v in request.headers.items()})
        auth = request.headers.get("Authorization", "")
        if auth == "Bearer limited":
            headers = {"X-Auth-Error": "rate_limited", "Retry-After": "7"}
            return web.json_response({"error": {"code": "rate_limited"}}, status=429, headers=headers)
        if auth != "Bearer good":
            headers = {"X-Auth-Error": "invalid_api_key", "WWW-Authenticate": 'Bearer error="invalid_api_key"'}
            return web.json_response({"error": {"code": "invalid_api_key"}}, status=401, headers=headers)
        identity = {h: f"{self.name}-{h.lower()}" for h in IDENTITY_HEADERS}
        identity["X-Project"] = ""  # empty: nginx sends the upstream no header at all
        return web.Response(status=200, headers=identity)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/auth/nginx", self.handle)
        return app


def _echoed(text: str) -> dict[str, str]:
    """The demo upstream's answer: the request line, then `Name: value` lines."""
    first, *rest = text.splitlines()
    echoed = {"request": first}
    for line in rest:
        name, _, value = line.partition(":")
        echoed[name] = value.strip()
    return echoed


async def test_requests_are_balanced_across_both_replicas_and_survive_one(aiohttp_server: Any, tmp_path: Path) -> None:
    replicas = [Replica(name, []) for name in REPLICAS]
    servers = [await aiohttp_server(r.app()) for r in replicas]
    app_port = free_port()
    rendered = render_nginx(tmp_path, [s.port for s in servers], app_port)
    proc = await asyncio.to_thread(start_nginx, rendered)
    try:
        url = f"http://127.0.0.1:{rendered.port}"
        forged = {"Authorization": "Bearer good", "X-Role": "owner", "X-Org": "org_evil", "X-Project": "prj_evil"}
        answers = [
            await fetch(url, "/v1/things?page=2", {**forged, "X-Forwarded-For": "203.0.113.7"}) for _ in range(8)
        ]
        assert {status for status, _, _ in answers} == {200}
        assert all(len(r.seen) >= 1 for r in replicas), "both replicas answer"
        for _, _, body in answers:
            echoed = _echoed(body["text"])
            assert echoed["request"] == "GET /v1/things?page=2"
            replica = echoed["X-Org"].split("-x-")[0]
            assert replica in REPLICAS
            for header in IDENTITY_HEADERS:
                expected = "" if header == "X-Project" else f"{replica}-{header.lower()}"
                assert echoed[header] == expected, header
            assert echoed["Authorization"] == "" and echoed["X-API-Key"] == ""
            assert echoed["X-Forwarded-For"] == "127.0.0.1"
        # The relay hop changes nothing the gateway judges: the original target, method, Host and client.
        for seen in replicas[0].seen + replicas[1].seen:
            assert seen["x-original-uri"] == "/v1/things?page=2"
            assert seen["x-original-method"] == "GET"
            assert seen["host"] == "127.0.0.1"
            assert seen["x-forwarded-for"] == "127.0.0.1"
        # Denials come back as gateway.conf rebuilds them, through the relay.
        status, headers, body = await fetch(url, "/v1/things", {"Authorization": "Bearer bad"})
        assert (status, headers["X-Auth-Error"], body["error"]["code"]) == (401, "invalid_api_key", "invalid_api_key")
        status, headers, body = await fetch(url, "/v1/things", {"Authorization": "Bearer limited"})
        assert (status, headers["Retry-After"], body["error"]["code"]) == (429, "7", "rate_limited")
        # One replica down: every request still answered, by the other.
        await servers[0].close()
        before = len(replicas[1].seen)
        answers = [await fetch(url, "/v1/things", {"Authorization": "Bearer good"}) for _ in range(4)]
        assert [status for status, _, _ in answers] == [200] * 4
        assert len(replicas[1].seen) == before + 4
        # Both down: 503 auth_unavailable, never a 401 or the relay's 502.
        await servers[1].close()
        status, headers, body = await fetch(url, "/v1/things", {"Authorization": "Bearer good"})
        assert (status, headers["X-Auth-Error"], body["error"]["code"]) == (503, "auth_unavailable", "auth_unavailable")
    finally:
        await asyncio.to_thread(stop_process, proc, signal.SIGQUIT)  # graceful; `daemon off`: this is the master
