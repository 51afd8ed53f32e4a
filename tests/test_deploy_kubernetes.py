"""deploy/kubernetes/: each kustomize overlay rendered with `kubectl kustomize` as `kubectl apply -k` would, every
object validated against the Kubernetes API schemas (kubernetes-validate, strict: an unknown field fails), the
custom resources against their CRDs' structure, and the manifests checked against the code: endpoints, identity
headers, probes and the drain, the image's user, the config, the Secret's keys, the ports.

kubernetes-validate has no schema for a custom resource (ServiceMonitor, Traefik's Middleware and IngressRoute):
its `validate` raises SchemaNotFoundError, which its command line reports as a WARN and passes
(`test_kubernetes_validate_passes_custom_resources_unchecked`). So those are checked here against the parts of
their CRDs' openAPIV3Schema the manifests use (CRD_SCHEMAS below), every other field refused, and any kind
without a schema fails. The `broken` tests show that each check catches what it is for.
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema_rs
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.cli import SHUTDOWN_TIMEOUT_S
from gateway.config import Config, config_from_mapping
from gateway.data.schema import migrate
from gateway.models import IDENTITY_HEADERS
from gateway.policy import compile_policy
from tests.conftest import ROOT

KUBE = ROOT / "deploy/kubernetes"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"  # scripts/system-deps.sh installs it
OVERLAYS = ("plain", "ingress-nginx", "traefik")
# The oldest Kubernetes the manifests are for (kubectl here is 1.32), and the newest kubernetes-validate ships.
SCHEMA_VERSIONS = ("1.32.0", "1.37.0")
# The namespace whose pods may reach the gateway's http port (the NetworkPolicy), per overlay.
PROXY_NAMESPACE = {"plain": "proxy", "ingress-nginx": "ingress-nginx", "traefik": "traefik"}
SECRET = "gateway-secrets"
POSTGRES_MAX_CONNECTIONS = 100  # Postgres' default

Obj = dict[str, Any]


def kustomize(directory: Path) -> list[Obj]:
    done = subprocess.run(  # noqa: S603 (a fixed command)
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    version = subprocess.run(  # noqa: S603 (a fixed command)
        [KUBECTL, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60, check=False
    )
    kustomize_version = yaml.safe_load(version.stdout or "{}").get("kustomizeVersion", "none")
    if not re.match(r"v([5-9]|\d\d)\.", kustomize_version):
        pytest.fail(f"{KUBECTL}: kustomize {kustomize_version}; deploy/kubernetes/ needs kustomize v5 (kubectl 1.27+)")
    return {overlay: kustomize(KUBE / "overlays" / overlay) for overlay in OVERLAYS}


def find(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def pod_spec(objs: list[Obj]) -> Obj:
    spec: Obj = find(objs, "Deployment", "gateway")["spec"]["template"]["spec"]
    return spec


def gateway_container(objs: list[Obj]) -> Obj:
    return next(c for c in pod_spec(objs)["containers"] if c["name"] == "gateway")


def example_env() -> dict[str, str]:
    """components/secrets/secrets.env.example: the keys the Secret must hold, with values that make a valid config."""
    text = (KUBE / "components/secrets/secrets.env.example").read_text()
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {key: value for key, value in pairs}


def gateway_config(objs: list[Obj]) -> tuple[Config, Obj]:
    """The config the pods load (the ConfigMap's gateway.yaml and the Secret's keys), and its ConfigMap."""
    volume = next(v for v in pod_spec(objs)["volumes"] if v["name"] == "config")
    cm = find(objs, "ConfigMap", volume["configMap"]["name"])
    return config_from_mapping(yaml.safe_load(cm["data"]["gateway.yaml"]), env=example_env()), cm


# --- The custom resources' schemas: the parts of their CRDs' openAPIV3Schema these manifests use, with the
# CRDs' types, enums, patterns and required fields; any other field is refused (the API server prunes or, with
# kubectl's default strict field validation, refuses fields a CRD does not declare).


def _obj(properties: dict[str, Any], required: tuple[str, ...] = (), **more: Any) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}
    return schema | more


STRING: dict[str, Any] = {"type": "string"}
STRINGS: dict[str, Any] = {"type": "array", "items": STRING}
BOOLEAN: dict[str, Any] = {"type": "boolean"}
INT_OR_STRING: dict[str, Any] = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": STRING}
# monitoring.coreos.com_servicemonitors.yaml: interval and scrapeTimeout
DURATION: dict[str, Any] = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
LABEL_SELECTOR = _obj(
    {
        "matchLabels": STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": _obj({"key": STRING, "operator": STRING, "values": STRINGS}, ("key", "operator")),
        },
    }
)


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    # metadata is checked as an ObjectMeta by kubernetes-validate (validate() below).
    top = {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": {"type": "object"}, "spec": spec}
    return _obj(top, ("apiVersion", "kind", "metadata", "spec"))


# prometheus-operator example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml (v1; v0.84)
SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    _obj(
        {
            "selector": LABEL_SELECTOR,
            "namespaceSelector": _obj({"any": BOOLEAN, "matchNames": STRINGS}),
            "jobLabel": STRING,
            "endpoints": {
                "type": "array",
                "items": _obj(
                    {
                        "port": STRING,
                        "targetPort": INT_OR_STRING,
                        "path": STRING,
                        "scheme": {"type": "string", "enum": ["http", "https"]},
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                        "honorLabels": BOOLEAN,
                    }
                ),
            },
        },
        ("endpoints", "selector"),
    ),
)
# traefik docs/content/reference/dynamic-configuration/traefik.io_middlewares.yaml (v1alpha1): the fields of
# forwardAuth and headers that Traefik v2.11 and v3 both have. One middleware type per object: Traefik refuses
# a Middleware with two ("multi-types middleware not supported") or none.
MIDDLEWARE = _resource(
    "traefik.io/v1alpha1",
    "Middleware",
    _obj(
        {
            "forwardAuth": _obj(
                {
                    "address": STRING,
                    "trustForwardHeader": BOOLEAN,
                    "authResponseHeaders": STRINGS,
                    "authResponseHeadersRegex": STRING,
                    "authRequestHeaders": STRINGS,
                    "tls": {"type": "object"},
                }
            ),
            "headers": _obj({"customRequestHeaders": STRING_MAP, "customResponseHeaders": STRING_MAP}),
        },
        minProperties=1,
        maxProperties=1,
    ),
)
# traefik docs/content/reference/dynamic-configuration/traefik.io_ingressroutes.yaml (v1alpha1)
INGRESS_ROUTE = _resource(
    "traefik.io/v1alpha1",
    "IngressRoute",
    _obj(
        {
            "entryPoints": STRINGS,
            "routes": {
                "type": "array",
                "items": _obj(
                    {
                        "kind": {"type": "string", "enum": ["Rule"]},
                        "match": STRING,
                        "priority": {"type": "integer"},
                        "middlewares": {
                            "type": "array",
                            "items": _obj({"name": STRING, "namespace": STRING}, ("name",)),
                        },
                        "services": {
                            "type": "array",
                            "items": _obj(
                                {
                                    "kind": {"type": "string", "enum": ["Service", "TraefikService"]},
                                    "name": STRING,
                                    "namespace": STRING,
                                    "port": INT_OR_STRING,
                                    "scheme": STRING,
                                    "passHostHeader": BOOLEAN,
                                },
                                ("name",),
                            ),
                        },
                    },
                    ("match",),
                ),
            },
            "tls": {"type": "object"},
        },
        ("routes",),
    ),
)
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("traefik.io/v1alpha1", "Middleware"): MIDDLEWARE,
    ("traefik.io/v1alpha1", "IngressRoute"): INGRESS_ROUTE,
}


class InvalidManifest(AssertionError):
    pass


def validate(obj: Obj, version: str) -> None:
    """Raise InvalidManifest unless `obj` is valid for that Kubernetes version: its API schema (strict), or for a
    custom resource its CRD's schema above and ObjectMeta. A kind with neither fails."""
    what = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')} ({obj.get('apiVersion')}, {version})"
    crd = CRD_SCHEMAS.get((obj.get("apiVersion", ""), obj.get("kind", "")))
    try:
        if crd is None:
            kubernetes_validate.validate(obj, version, strict=True)
            return
        errors = [f"{'.'.join(map(str, e.instance_path))}: {e.message}" for e in _validator(crd).iter_errors(obj)]
        if errors:
            raise InvalidManifest(f"{what}: {'; '.join(errors)}")
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, version, True
        )
    except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
        path = ".".join(map(str, getattr(exc, "path", [])))
        raise InvalidManifest(f"{what}: {path}: {exc.message}") from exc


def _validator(schema: dict[str, Any]) -> jsonschema_rs.Validator:
    return jsonschema_rs.Draft202012Validator(schema)


# --- Schemas


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(rendered: dict[str, list[Obj]], overlay: str, version: str) -> None:
    for obj in rendered[overlay]:
        validate(obj, version)


def test_overlays_hold_the_objects_they_promise(rendered: dict[str, list[Obj]]) -> None:
    base = {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    }
    kinds = {overlay: sorted(o["kind"] for o in objs) for overlay, objs in rendered.items()}
    assert kinds["plain"] == sorted(base)
    assert kinds["ingress-nginx"] == sorted([*base, "Ingress"])
    assert kinds["traefik"] == sorted([*base, "Middleware", "Middleware", "IngressRoute"])
    for objs in rendered.values():
        for o in objs:
            if o["kind"] in base - {"Namespace"}:
                assert o["metadata"]["namespace"] == "gateway", o["kind"]
            elif o["kind"] != "Namespace":
                assert o["metadata"].get("namespace"), f"{o['kind']} without a namespace lands in kubectl's current one"
        assert find(objs, "Namespace")["metadata"]["name"] == "gateway"


def test_kubernetes_validate_passes_custom_resources_unchecked(rendered: dict[str, list[Obj]]) -> None:
    """Why the custom resources have their own schemas here: kubernetes-validate knows none, and its command
    line (validate_resource) passes them with a warning."""
    for obj in rendered["traefik"]:
        if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, SCHEMA_VERSIONS[0], strict=True)
            broken = copy.deepcopy(obj)
            broken["spec"]["no_such_field"] = 1
            assert kubernetes_validate.validate_resource(broken, "-", SCHEMA_VERSIONS[0], True, True, True) == 0


def _set(path: str, value: Any) -> Callable[[Obj], None]:
    """A change to one field, `a.b.0.c` (a list index as a number); `value` None deletes the field."""

    def change(obj: Obj) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = obj
        for p in parents:
            node = node[p]
        if value is None:
            del node[last]
        else:
            node[last] = value

    return change


BROKEN_MANIFESTS = [
    # (overlay, kind, name, change, what the error names)
    ("plain", "Deployment", "gateway", _set("spec.template.spec.containers.0.readinessprobe", {}), "readinessprobe"),
    ("plain", "Deployment", "gateway", _set("spec.template.spec.securityContext.runAsNonRoot", "yes"), "runAsNonRoot"),
    (
        "plain",
        "Deployment",
        "gateway",
        _set("spec.template.spec.containers.0.lifecycle", {"preStop": {"exec": {"command": "sleep 5"}}}),
        "command",
    ),
    ("plain", "HorizontalPodAutoscaler", "gateway", _set("spec.targetCPUUtilizationPercentage", 70), "targetCPU"),
    ("plain", "PodDisruptionBudget", "gateway", _set("spec.maxUnavailable", [1]), "maxUnavailable"),
    ("plain", "NetworkPolicy", "gateway", _set("spec.ingress.0.from.0.namespace", "x"), "namespace"),
    ("plain", "Service", "gateway", _set("spec.ports.0.port", "http"), "port"),
    ("ingress-nginx", "Ingress", "api", _set("spec.rules.0.http.paths.0.backend.service.port.number", "80"), "number"),
    ("plain", "ServiceMonitor", "gateway", _set("spec.endpoints.0.targetport", "metrics"), "targetport"),
    ("plain", "ServiceMonitor", "gateway", _set("spec.endpoints.0.interval", "15 seconds"), "interval"),
    ("plain", "ServiceMonitor", "gateway", _set("spec.selector", None), "selector"),
    ("plain", "ServiceMonitor", "gateway", _set("metadata.labels", ["app"]), "labels"),
    ("traefik", "Middleware", "gateway-auth", _set("spec.forwardAuth.trustForwardHeaders", False), "trustForward"),
    ("traefik", "Middleware", "gateway-auth", _set("spec.forwardAuth.trustForwardHeader", "false"), "trustForward"),
    ("traefik", "Middleware", "strip-key", _set("spec.forwardAuth", {"address": "http://x"}), "spec"),
    ("traefik", "IngressRoute", "api", _set("spec.routes.0.match", None), "match"),
    ("traefik", "IngressRoute", "api", _set("spec.routes.0.kind", "Regexp"), "kind"),
    ("traefik", "IngressRoute", "api", _set("spec.routes.0.middlewares.0", {"namespace": "default"}), "name"),
]


@pytest.mark.parametrize(("overlay", "kind", "name", "change", "named"), BROKEN_MANIFESTS)
def test_broken_manifests_fail_validation(
    rendered: dict[str, list[Obj]], overlay: str, kind: str, name: str, change: Callable[[Obj], None], named: str
) -> None:
    obj = copy.deepcopy(find(rendered[overlay], kind, name))
    validate(obj, SCHEMA_VERSIONS[0])  # valid as shipped
    change(obj)
    for version in SCHEMA_VERSIONS:
        with pytest.raises(InvalidManifest, match=named):
            validate(obj, version)


def test_a_kind_without_a_schema_fails() -> None:
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}}
    with pytest.raises(InvalidManifest, match="Couldn't find schema"):
        validate(widget, SCHEMA_VERSIONS[0])
    # A custom kind's schema is chosen by apiVersion and kind together.
    old = {"apiVersion": "traefik.containo.us/v1alpha1", "kind": "Middleware", "metadata": {"name": "m"}, "spec": {}}
    with pytest.raises(InvalidManifest):
        validate(old, SCHEMA_VERSIONS[0])


# --- The manifests against the code. Each check is a function, so that the `broken` test below can show it
# catches a manifest gone wrong.


def check_probes_follow_the_drain(objs: list[Obj]) -> None:
    """SIGTERM: /readyz turns 503 and is seen by the probe well within the drain, /healthz stays 200, and the pod
    is given time for the preStop sleep (the endpoint's removal reaching every proxy while the pod serves as usual),
    the drain, the requests in flight and the clean-up before it is killed (README.md)."""
    cfg, cm = gateway_config(objs)
    assert "drain_s" in yaml.safe_load(cm["data"]["gateway.yaml"])["server"]  # explicit, not the default
    pod = pod_spec(objs)
    container = gateway_container(objs)
    ready, live, startup = container["readinessProbe"], container["livenessProbe"], container["startupProbe"]
    assert ready["httpGet"]["path"] == "/readyz"  # 503 while starting or draining
    assert startup["httpGet"]["path"] == "/readyz"  # 200 once the process can decide
    assert live["httpGet"]["path"] == "/healthz"  # 200 through the drain and a store outage
    for probe in (ready, live, startup):
        assert probe["httpGet"]["port"] == "http"
    assert ready["periodSeconds"] <= 2 and ready["failureThreshold"] <= 2 and ready["timeoutSeconds"] <= 2
    assert ready["periodSeconds"] * ready["failureThreshold"] < cfg.server.drain_s
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 1 <= pre_stop <= cfg.server.drain_s
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + cfg.server.drain_s + SHUTDOWN_TIMEOUT_S + 5
    # The listener closes after the drain, and the process exits within SHUTDOWN_TIMEOUT_S (+ clean-up): the
    # liveness probe, failing meanwhile, must not reach its threshold first. Start-up gets half a minute at least.
    assert live["periodSeconds"] * live["failureThreshold"] > cfg.server.drain_s + SHUTDOWN_TIMEOUT_S
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30


def check_ingress_nginx(objs: list[Obj]) -> None:
    ingress = find(objs, "Ingress")
    ann = ingress["metadata"]["annotations"]
    url = urlsplit(ann["nginx.ingress.kubernetes.io/auth-url"])
    assert url.path == "/auth/ingress-nginx"
    assert (url.scheme, url.hostname, url.port) == ("http", *service_address(objs, "http"))
    assert ann["nginx.ingress.kubernetes.io/auth-response-headers"].split(",") == list(IDENTITY_HEADERS)
    assert not any("snippet" in a for a in ann)
    # docs/proxies/ingress-nginx.md, troubleshooting: cached decisions, a login redirect, a rewritten path.
    for unwanted in ("auth-cache-key", "auth-signin", "rewrite-target", "enable-global-auth"):
        assert f"nginx.ingress.kubernetes.io/{unwanted}" not in ann


def check_traefik(objs: list[Obj]) -> None:
    """The Middlewares mirror deploy/traefik/dynamic.yml (tested against the code in test_deploy_configs.py),
    the address aside."""
    dynamic = yaml.safe_load((ROOT / "deploy/traefik/dynamic.yml").read_text())["http"]
    auth = find(objs, "Middleware", "gateway-auth")
    fa = auth["spec"]["forwardAuth"]
    url = urlsplit(fa["address"])
    assert url.path == "/auth/traefik"
    assert (url.scheme, url.hostname, url.port) == ("http", *service_address(objs, "http"))
    assert fa["trustForwardHeader"] is False
    assert fa["authResponseHeaders"] == list(IDENTITY_HEADERS)
    assert "authRequestHeaders" not in fa  # the gateway needs the client's cookie, origin, X-Org-Id...
    file_fa = dynamic["middlewares"]["gateway-auth"]["forwardAuth"]
    assert {k: v for k, v in fa.items() if k != "address"} == {k: v for k, v in file_fa.items() if k != "address"}
    strip = find(objs, "Middleware", "strip-key")
    assert strip["spec"] == dynamic["middlewares"]["strip-key"]
    route = find(objs, "IngressRoute")
    [rule] = route["spec"]["routes"]
    assert [m["name"] for m in rule["middlewares"]] == dynamic["routers"]["api"]["middlewares"]
    # In the IngressRoute's namespace: Traefik refuses cross-namespace references by default.
    for ref in rule["middlewares"]:
        assert "namespace" not in ref
        assert find(objs, "Middleware", ref["name"])["metadata"]["namespace"] == route["metadata"]["namespace"]


def service_address(objs: list[Obj], port_name: str) -> tuple[str, int]:
    service = find(objs, "Service", "gateway")
    port = next(p for p in service["spec"]["ports"] if p["name"] == port_name)
    return f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local", port["port"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_follow_the_drain(rendered: dict[str, list[Obj]], overlay: str) -> None:
    check_probes_follow_the_drain(rendered[overlay])


def test_ingress_nginx_asks_its_endpoint(rendered: dict[str, list[Obj]]) -> None:
    check_ingress_nginx(rendered["ingress-nginx"])


def test_traefik_asks_its_endpoint(rendered: dict[str, list[Obj]]) -> None:
    check_traefik(rendered["traefik"])


def _container(obj: Obj) -> Obj:
    c: Obj = obj["spec"]["template"]["spec"]["containers"][0]
    return c


def _annotate(name: str, value: str) -> Callable[[Obj], None]:
    return lambda ingress: ingress["metadata"]["annotations"].update({f"nginx.ingress.kubernetes.io/{name}": value})


def _forward_auth(change: Callable[[Obj], None]) -> Callable[[Obj], None]:
    return lambda middleware: change(middleware["spec"]["forwardAuth"])


PROBES, INGRESS, TRAEFIK = check_probes_follow_the_drain, check_ingress_nginx, check_traefik
GATEWAY = "http://gateway.gateway.svc.cluster.local:8080"
BROKEN_SETUPS = [
    # (overlay, check, kind, name, change)
    pytest.param(
        "plain",
        PROBES,
        "Deployment",
        "gateway",
        lambda d: _container(d)["readinessProbe"]["httpGet"].update(path="/healthz"),
        id="readiness-on-healthz",
    ),
    pytest.param(
        "plain",
        PROBES,
        "Deployment",
        "gateway",
        lambda d: _container(d)["livenessProbe"]["httpGet"].update(path="/readyz"),
        id="liveness-on-readyz",
    ),
    pytest.param(
        "plain",
        PROBES,
        "Deployment",
        "gateway",
        lambda d: _container(d)["readinessProbe"].update(periodSeconds=10),
        id="readiness-slower-than-the-drain",
    ),
    pytest.param(
        "plain",
        PROBES,
        "Deployment",
        "gateway",
        lambda d: _container(d).update(lifecycle={"preStop": {"sleep": {"seconds": 20}}}),
        id="prestop-sleep-longer-than-the-grace-allows",
    ),
    pytest.param(
        "plain",
        PROBES,
        "Deployment",
        "gateway",
        _set("spec.template.spec.terminationGracePeriodSeconds", 20),
        id="grace-shorter-than-drain-and-requests",
    ),
    pytest.param(
        "ingress-nginx",
        INGRESS,
        "Ingress",
        "api",
        _annotate("auth-url", f"{GATEWAY}/auth/nginx"),
        id="auth-url-to-another-proxys-endpoint",
    ),
    pytest.param(
        "ingress-nginx",
        INGRESS,
        "Ingress",
        "api",
        _annotate("auth-url", "http://gateway.default.svc.cluster.local:8080/auth/ingress-nginx"),
        id="auth-url-to-another-namespace",
    ),
    pytest.param(
        "ingress-nginx",
        INGRESS,
        "Ingress",
        "api",
        _annotate("auth-response-headers", "X-Org,X-Role,X-User"),
        id="identity-headers-missing",
    ),
    pytest.param(
        "ingress-nginx",
        INGRESS,
        "Ingress",
        "api",
        _annotate("auth-snippet", "proxy_set_header X-Role owner;"),
        id="snippet",
    ),
    pytest.param(
        "traefik",
        TRAEFIK,
        "Middleware",
        "gateway-auth",
        _forward_auth(lambda fa: fa.update(trustForwardHeader=True)),
        id="trust-forward-header",
    ),
    pytest.param(
        "traefik",
        TRAEFIK,
        "Middleware",
        "gateway-auth",
        _forward_auth(lambda fa: fa["authResponseHeaders"].remove("X-Role")),
        id="identity-header-missing",
    ),
    pytest.param(
        "traefik",
        TRAEFIK,
        "Middleware",
        "gateway-auth",
        _forward_auth(lambda fa: fa.update(address=f"{GATEWAY}/auth/caddy")),
        id="address-to-another-proxys-endpoint",
    ),
    pytest.param(
        "traefik",
        TRAEFIK,
        "IngressRoute",
        "api",
        lambda r: r["spec"]["routes"][0]["middlewares"].reverse(),
        id="key-stripped-before-the-check",
    ),
]


@pytest.mark.parametrize(("overlay", "check", "kind", "name", "change"), BROKEN_SETUPS)
def test_broken_setups_fail_their_check(
    rendered: dict[str, list[Obj]],
    overlay: str,
    check: Callable[[list[Obj]], None],
    kind: str,
    name: str,
    change: Callable[[Obj], None],
) -> None:
    objs = copy.deepcopy(rendered[overlay])
    check(objs)  # passes as shipped
    change(find(objs, kind, name))
    with pytest.raises(AssertionError):
        check(objs)


# --- The pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_and_policy_are_the_codes(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """The ConfigMap's gateway.yaml, with the Secret's keys, is a valid config that serves on the container's
    ports, one process per pod; its policy.yaml is the shipped example's rules, and compiles."""
    objs = rendered[overlay]
    cfg, cm = gateway_config(objs)
    container = gateway_container(objs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert cfg.server.host == "0.0.0.0" and cfg.server.port == ports["http"]  # noqa: S104 (every pod address)
    assert cfg.metrics.port == ports["metrics"] != cfg.server.port  # /metrics apart, for the NetworkPolicy
    assert cfg.server.workers == 1  # one process per pod: each pod is one scrape target
    assert cfg.database.url.get() == example_env()["GATEWAY_DATABASE_URL"]
    policy = yaml.safe_load(cm["data"]["policy.yaml"])
    assert policy == yaml.safe_load((ROOT / "config/policy.yaml").read_text())
    compile_policy(policy, cfg.roles)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert container["args"] == ["--config", f"{mount['mountPath']}/gateway.yaml", "serve"]
    assert cfg.policy_file == "policy.yaml"  # next to gateway.yaml in the mount
    assert cm["metadata"]["name"].startswith("gateway-config-")  # hashed: a change rolls the pods


def _dockerfile_user() -> int:
    text = (ROOT / "deploy/Dockerfile").read_text()
    user = re.search(r"^USER (\d+)$", text, re.MULTILINE)
    created = re.search(r"useradd --uid (\d+)", text)
    assert user is not None and created is not None and user.group(1) == created.group(1)
    return int(user.group(1))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_unprivileged(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """The image's own non-root user, a read-only root file system, no privilege escalation, no capabilities,
    RuntimeDefault seccomp: the `restricted` Pod Security Standard, which the namespace enforces. No API token."""
    objs = rendered[overlay]
    pod = pod_spec(objs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _dockerfile_user() != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostPID" not in pod
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp
    for c in pod["initContainers"] + pod["containers"]:
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False, c["name"]
        assert ctx["capabilities"] == {"drop": ["ALL"]} and not ctx.get("privileged"), c["name"]
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], c["name"]
    assert pod["automountServiceAccountToken"] is False
    account = find(objs, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # no GATEWAY_PORT=tcp://... from the Service named gateway
    labels = find(objs, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migrations_run_before_the_gateway(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """`gateway migrate` in an init container of every pod, with the gateway's image, config and secrets: safe
    because concurrent runs wait on an advisory lock."""
    pod = pod_spec(rendered[overlay])
    [init] = pod["initContainers"]
    container = gateway_container(rendered[overlay])
    assert init["args"] == [*container["args"][:-1], "migrate"]
    for same in ("image", "envFrom", "volumeMounts"):
        assert init[same] == container[same], same
    assert "pg_advisory_lock" in inspect.getsource(migrate)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_not_inlined(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    assert not [o for o in objs if o["kind"] == "Secret"]
    pod = pod_spec(objs)
    for c in pod["initContainers"] + pod["containers"]:
        assert c["envFrom"] == [{"secretRef": {"name": SECRET}}], c["name"]
        assert not [e for e in c.get("env", []) if e["name"].startswith("GATEWAY_")], c["name"]
    env = example_env()
    assert {"GATEWAY_DATABASE_URL", "GATEWAY_REDIS_URL", "GATEWAY_PEPPER", "GATEWAY_SIGNING_SECRET"} <= set(env)


def test_no_secret_is_committed() -> None:
    for path in KUBE.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            assert not re.search(r"^kind:\s*Secret\b", path.read_text(), re.MULTILINE), path
    # components/secrets reads secrets.env, which git ignores anywhere under deploy/kubernetes/.
    assert "secrets.env" in (KUBE / ".gitignore").read_text().splitlines()


def test_secret_component_generates_the_referenced_secret(tmp_path: Path) -> None:
    """components/secrets with secrets.env (here: the example): the Secret in the gateway's namespace, under a
    hashed name that the Deployment's references follow."""
    component = tmp_path / "secrets"
    component.mkdir()
    shutil.copy(KUBE / "components/secrets/kustomization.yaml", component)
    shutil.copy(KUBE / "components/secrets/secrets.env.example", component / "secrets.env")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(KUBE / "overlays/plain", overlay)  # kustomize takes no absolute paths
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [base], "components": ["../secrets"]}))
    objs = kustomize(overlay)
    secret = find(objs, "Secret")
    assert secret["metadata"]["namespace"] == "gateway"
    assert secret["metadata"]["name"].startswith(f"{SECRET}-")
    assert set(secret["data"]) == set(example_env())
    pod = pod_spec(objs)
    for c in pod["initContainers"] + pod["containers"]:
        assert c["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    for version in SCHEMA_VERSIONS:
        validate(secret, version)


# --- Scaling, disruptions, the network, monitoring


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaling_and_disruptions(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    deployment = find(objs, "Deployment", "gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"] == {"matchLabels": labels}
    assert "replicas" not in deployment["spec"]  # the HPA's; an apply would reset it
    hpa = find(objs, "HorizontalPodAutoscaler", "gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    [metric] = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in gateway_container(objs)["resources"]["requests"]  # what utilization is measured against
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    cfg, _ = gateway_config(objs)
    assert hpa["maxReplicas"] * (cfg.database.pool_max + 1) < POSTGRES_MAX_CONNECTIONS  # + 1: the listener
    pdb = find(objs, "PodDisruptionBudget", "gateway")["spec"]
    assert pdb["selector"] == {"matchLabels": labels}
    assert pdb["maxUnavailable"] == 1 < hpa["minReplicas"]
    spread = {t["topologyKey"]: t for t in pod_spec(objs)["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for t in spread.values():
        assert t["labelSelector"] == {"matchLabels": labels} and t["maxSkew"] == 1
    # A cluster without zone labels must still schedule the pods.
    assert spread["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"


def _ports(rule: Obj) -> set[tuple[str, Any]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """In: the http port from the proxy's namespace, the metrics port from Prometheus, nothing else. Out: DNS,
    Postgres, Redis (and Sentinel)."""
    objs = rendered[overlay]
    policy = find(objs, "NetworkPolicy", "gateway")["spec"]
    labels = find(objs, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"] == {"matchLabels": labels}
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    proxy, prometheus = policy["ingress"]
    assert proxy["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": PROXY_NAMESPACE[overlay]}}}
    ]
    assert _ports(proxy) == {("TCP", "http")}
    [peer] = prometheus["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert "podSelector" in peer
    assert _ports(prometheus) == {("TCP", "metrics")}
    names = {p["name"] for p in gateway_container(objs)["ports"]}
    assert {"http", "metrics"} <= names
    dns, *stores = policy["egress"]
    assert _ports(dns) == {("UDP", 53), ("TCP", 53)}
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert set().union(*(_ports(r) for r in stores)) == {("TCP", 5432), ("TCP", 6379), ("TCP", 26379)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_service_monitor(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """The Service reaches the pods' http and metrics ports; the ServiceMonitor scrapes /metrics on the port the
    config serves it on."""
    objs = rendered[overlay]
    service = find(objs, "Service", "gateway")
    labels = find(objs, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == labels
    container_ports = {p["name"]: p["containerPort"] for p in gateway_container(objs)["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {name: p["targetPort"] for name, p in service_ports.items()} == {"http": "http", "metrics": "metrics"}
    monitor = find(objs, "ServiceMonitor", "gateway")["spec"]
    selector = monitor["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["endpoints"]
    assert endpoint["path"] == "/metrics"
    target = service_ports[endpoint["port"]]["targetPort"]
    cfg, _ = gateway_config(objs)
    assert container_ports[target] == cfg.metrics.port
    assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)([sm])", duration)
    assert match is not None, duration
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_set_the_image(rendered: dict[str, list[Obj]], overlay: str) -> None:
    pod = pod_spec(rendered[overlay])
    images = {c["image"] for c in pod["initContainers"] + pod["containers"]}
    assert images == {"registry.example.com/gateway:0.1.0"}  # the base's placeholder `gateway` replaced


def _doc_files() -> Iterator[Path]:
    yield ROOT / "README.md"
    yield from (ROOT / "docs").rglob("*.md")
    yield from (ROOT / "deploy").rglob("*.md")
    yield from KUBE.rglob("kustomization.yaml")


def test_docs_name_files_that_exist() -> None:
    """Every `deploy/kubernetes/...` path the docs name exists (the single-file manifests are gone)."""
    named = 0
    for doc in _doc_files():
        for path in re.findall(r"deploy/kubernetes/[\w./-]*[\w/]", doc.read_text()):
            named += 1
            assert (ROOT / path).exists(), f"{doc.relative_to(ROOT)} names {path}"
    assert named > 5
    assert not (KUBE / "gateway.yaml").exists() and not (KUBE / "ingress.yaml").exists()


def test_readme_overlay_without_service_monitor(tmp_path: Path) -> None:
    """deploy/kubernetes/README.md's overlay for a cluster without the Prometheus Operator renders, without the
    ServiceMonitor and nothing else missing."""
    readme = (KUBE / "README.md").read_text()
    block = re.search(r"```yaml\n(# my-overlay/kustomization.yaml.*?)```", readme, re.DOTALL)
    assert block is not None
    kustomization = yaml.safe_load(block.group(1))
    assert kustomization["resources"] == ["../deploy/kubernetes/overlays/plain"]
    kustomization["resources"] = [os.path.relpath(KUBE / "overlays/plain", tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    kinds = sorted(o["kind"] for o in kustomize(tmp_path))
    plain = sorted(o["kind"] for o in kustomize(KUBE / "overlays/plain"))
    assert kinds == sorted(set(plain) - {"ServiceMonitor"})


def test_docs_show_the_ingress_as_shipped() -> None:
    doc = (ROOT / "docs/proxies/ingress-nginx.md").read_text()
    block = re.search(r"In full:\n\n```yaml\n(.*?)```", doc, re.DOTALL)
    assert block is not None
    assert block.group(1) == (KUBE / "overlays/ingress-nginx/ingress.yaml").read_text()
