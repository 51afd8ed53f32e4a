"""The shipped proxy configs agree with the code: endpoints, identity headers, denials. The Kubernetes manifests
(deploy/kubernetes/) are checked in tests/test_deploy_kubernetes.py."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import yaml

from gateway.errors import Forbidden, GatewayError, Unauthenticated
from gateway.forward import ENVOY_PREFIX
from gateway.models import IDENTITY_HEADERS
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def test_traefik_forward_auth() -> None:
    mw = yaml.safe_load((DEPLOY / "traefik/dynamic.yml").read_text())["http"]["middlewares"]["gateway-auth"]
    fa = mw["forwardAuth"]
    assert urlsplit(fa["address"]).path == "/auth/traefik"
    assert fa["trustForwardHeader"] is False
    assert fa["authResponseHeaders"] == list(IDENTITY_HEADERS)


def test_envoy_ext_authz() -> None:
    text = (DEPLOY / "envoy/envoy.yaml").read_text()
    cfg = yaml.safe_load(text)
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    authz = hcm["http_filters"][0]["typed_config"]
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"]["code"] == "ServiceUnavailable"
    http = authz["http_service"]
    assert http["path_prefix"] == ENVOY_PREFIX
    upstream = {p["exact"] for p in http["authorization_response"]["allowed_upstream_headers"]["patterns"]}
    assert upstream == {h.lower() for h in IDENTITY_HEADERS}
    assert hcm["use_remote_address"] is True and hcm["normalize_path"] is True
    # Issue 12: Envoy sends the check only the headers it is told to; sessions need the cookie, and the
    # CSRF rule the request's Origin and Sec-Fetch-Site.
    sent = {p["exact"] for p in http["authorization_request"]["allowed_headers"]["patterns"]}
    assert {"cookie", "origin", "sec-fetch-site", "x-api-key", "x-org-id"} <= sent


def test_nginx_and_caddy_set_every_identity_header() -> None:
    nginx = (DEPLOY / "nginx/gateway.conf").read_text()
    for h in IDENTITY_HEADERS:
        assert re.search(rf"proxy_set_header\s+{h}\s+\$gw_", nginx), h
    caddy = (DEPLOY / "caddy/Caddyfile").read_text()
    copied = re.search(r"copy_headers ([^\n]+)", caddy)
    assert copied is not None and copied.group(1).split() == list(IDENTITY_HEADERS)


def _codes(base: type[GatewayError]) -> set[str]:
    found: set[str] = set()
    for cls in base.__subclasses__():
        if "code" in cls.__dict__:
            found.add(cls.code)
        found |= _codes(cls)
    return found


def test_nginx_rebuilds_every_denial_with_its_status() -> None:
    """nginx's auth_request turns any answer it was not told of into a 503: each 401 and 403 code the
    gateway can send (invalid_token, expired_token and csrf_failed came with sessions and tokens) must be
    in the conf's lists, with its message."""
    conf = (ROOT / "deploy/nginx/gateway.conf").read_text()
    unauthenticated = re.search(r"if \(\$gw_error ~ \^\(([a-z_|]+)\)\$\) \{\s*return 401", conf)
    forbidden = re.search(r"if \(\$gw_error ~ \^\(([a-z_|]+)\)\$\) \{\s*return 403", conf)
    assert unauthenticated is not None and forbidden is not None
    assert set(unauthenticated.group(1).split("|")) == _codes(Unauthenticated) | {"invalid_request"}
    assert set(forbidden.group(1).split("|")) == _codes(Forbidden)
    for code in _codes(Unauthenticated) | _codes(Forbidden):
        assert re.search(rf"^\s+{code}\s+\"", conf, re.MULTILINE), f"no message for {code}"
