"""Route policy: what a route requires, decided from the original request.

A YAML file of ordered rules, first match wins; unmatched requests get the policy's `default`. Rules are
compiled once into a trie of path segments, so a decision costs a walk down the request's own path
instead of a test of every rule.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from multidict import CIMultiDictProxy

from gateway import constants as C
from gateway._paths import segments
from gateway.config import RolesConfig, read_yaml
from gateway.errors import ConfigError, InvalidRequest
from gateway.formats import ID_RE, PERMISSION_RE

log = logging.getLogger("gateway.policy")

ORG_HEADER = "X-Org-Id"
_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,31})\}")
# Plain characters only: a request may not percent-encode them (see _paths), so every router reads a literal alike.
_LITERAL_SEG_RE = re.compile(r"[A-Za-z0-9._~-]+")
_HOST_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HEADER_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
_METHOD_RE = re.compile(r"[A-Z]{1,20}")

Headers = CIMultiDictProxy[str]
Auth = Literal["public", "required", "deny"]


@dataclass(frozen=True, slots=True)  # shared: ForwardAuth remembers one per distinct set of proxy headers
class OriginalRequest:
    """The client's request as the proxy describes it; `path` is checked canonical before any policy sees it."""

    method: str
    host: str
    path: str
    query: str


@dataclass(slots=True)  # made per request: a frozen init costs a setattr per field
class RouteDecision:
    auth: Auth = "required"
    permission: str | None = None
    role: str | None = None
    org: str | None = None  # the org the request names, if any
    project: str | None = None
    rule: str = ""


class Policy(Protocol):
    def decide(self, request: OriginalRequest, headers: Headers) -> RouteDecision: ...


def checked_id(value: str, what: str) -> str:
    if not ID_RE.fullmatch(value):
        raise InvalidRequest(f"{what} is not a valid id")
    return value


def header_org(headers: Headers, name: str = ORG_HEADER) -> str | None:
    values = headers.getall(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"{name} must be sent at most once")
    return checked_id(values[0], name) if values else None


class HeaderOrgPolicy:
    """Without a policy file: every route requires a valid key; the org comes from `X-Org-Id`."""

    def decide(self, request: OriginalRequest, headers: Headers) -> RouteDecision:
        return RouteDecision(org=header_org(headers), rule="(no policy file)")


# --- rules -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """Where a rule takes the org or project from."""

    kind: Literal["path", "host", "header"]
    name: str


@dataclass(frozen=True)
class Rule:
    index: int
    name: str
    host: tuple[str, ...] | None  # labels; `{param}` labels match any one label
    path: tuple[str, ...]  # segments; `{param}` one non-empty segment, trailing `**` the rest
    methods: frozenset[str] | None
    auth: Auth
    permission: str | None = None
    role: str | None = None
    org: Source | None = None
    project: Source | None = None
    label: str = field(init=False, compare=False)  # how errors and decisions name the rule

    def __post_init__(self) -> None:
        named = f"rules[{self.index}] ({self.name})" if self.name else f"rules[{self.index}]"
        object.__setattr__(self, "label", "default" if self.index < 0 else named)


def _is_param(seg: str) -> bool:
    return seg.startswith("{")


def _param(seg: str) -> str:
    return seg[1:-1]


def _path_covers(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Does every path matching pattern `b` also match pattern `a`?"""
    for i, seg in enumerate(a):
        if seg == "**":
            return True
        if i >= len(b) or b[i] == "**":
            return False
        if _is_param(seg):
            if b[i] == "":
                return False
        elif seg.lower() != b[i].lower():
            return False
    return len(a) == len(b)


def _host_covers(a: tuple[str, ...] | None, b: tuple[str, ...] | None) -> bool:
    if a is None:
        return True
    if b is None or len(a) != len(b):
        return False
    return all(_is_param(x) or x == y for x, y in zip(a, b, strict=True))


def shadows(a: Rule, b: Rule) -> bool:
    methods_cover = a.methods is None or (b.methods is not None and b.methods <= a.methods)
    return methods_cover and _host_covers(a.host, b.host) and _path_covers(a.path, b.path)


# --- parsing and validation --------------------------------------------------------------------

_RULE_KEYS = {"name", "host", "path", "methods", "auth", "require", "org", "project"}


class _RuleParser:
    def __init__(self, roles: RolesConfig) -> None:
        self.roles = roles

    def parse(self, index: int, raw: Any, *, default: bool = False) -> Rule:
        where = "default" if default else f"rules[{index}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping")
        name = raw.get("name", "")
        if not isinstance(name, str):
            raise ConfigError(f"{where}: name must be a string")
        if name:
            where = f"{where} ({name})"
        allowed = {"auth", "require", "org", "name"} if default else _RULE_KEYS
        unknown = sorted(set(map(str, raw)) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
        path = ("**",) if default else self._path(raw.get("path"), where)
        host = None if default else self._host(raw.get("host"), where)
        auth = raw.get("auth", "required")
        if auth not in ("public", "required", "deny"):
            raise ConfigError(f"{where}: auth must be public, required or deny")
        permission, role = self._require(raw.get("require"), where)
        if auth != "required" and (permission or role):
            raise ConfigError(f"{where}: require only applies to auth: required")
        org = self._source(raw.get("org"), where, "org", path, host)
        project = self._source(raw.get("project"), where, "project", path, host)
        if project is not None and project.kind != "path":
            raise ConfigError(f"{where}: project can only come from a path parameter")
        return Rule(
            index=-1 if default else index,
            name=name,
            host=host,
            path=path,
            methods=None if default else self._methods(raw.get("methods"), where),
            auth=auth,
            permission=permission,
            role=role,
            org=org,
            project=project,
        )

    def _path(self, raw: Any, where: str) -> tuple[str, ...]:
        if not isinstance(raw, str) or not raw.startswith("/"):
            raise ConfigError(f"{where}: path must be a string starting with /")
        segs = tuple(raw[1:].split("/"))
        names: set[str] = set()
        for i, seg in enumerate(segs):
            if seg == "**":
                if i != len(segs) - 1:
                    raise ConfigError(f"{where}: ** may only end a path pattern")
            elif "{" in seg or "}" in seg:
                m = _PARAM_RE.fullmatch(seg)
                if m is None:
                    raise ConfigError(f"{where}: bad path parameter {seg!r}: use a whole segment like {{name}}")
                if m.group(1) in names:
                    raise ConfigError(f"{where}: path parameter {seg} appears twice")
                names.add(m.group(1))
            elif (seg and not _LITERAL_SEG_RE.fullmatch(seg)) or seg.endswith(".") or (seg == "" and i < len(segs) - 1):
                # A request with such a segment is refused (not canonical), so the rule could never match it.
                raise ConfigError(
                    f"{where}: bad path segment {seg!r} (literal segments are letters, digits and -._~, "
                    "not ending in a dot; no empty segment but a trailing one)"
                )
        return segs

    def _host(self, raw: Any, where: str) -> tuple[str, ...] | None:
        if raw is None:
            return None
        if not isinstance(raw, str) or not raw:
            raise ConfigError(f"{where}: host must be a host name or pattern")
        labels = tuple(raw.lower().split("."))
        for label in labels:
            if not (_PARAM_RE.fullmatch(label) or _HOST_LABEL_RE.fullmatch(label)):
                raise ConfigError(f"{where}: bad host label {label!r}")
        return labels

    def _methods(self, raw: Any, where: str) -> frozenset[str] | None:
        if raw is None:
            return None
        if not isinstance(raw, list) or not raw or not all(isinstance(m, str) for m in raw):
            raise ConfigError(f"{where}: methods must be a non-empty list of method names")
        methods = frozenset(m.upper() for m in raw)
        bad = sorted(m for m in methods if not _METHOD_RE.fullmatch(m))
        if bad:
            raise ConfigError(f"{where}: bad method {bad[0]!r}")
        return methods

    def _require(self, raw: Any, where: str) -> tuple[str | None, str | None]:
        if raw is None:
            return None, None
        if not isinstance(raw, dict) or set(map(str, raw)) - {"permission", "role"}:
            raise ConfigError(f"{where}: require takes permission and/or role")
        permission, role = raw.get("permission"), raw.get("role")
        if permission is not None and not (isinstance(permission, str) and PERMISSION_RE.fullmatch(permission)):
            raise ConfigError(
                f"{where}: require.permission must be resource:action (or a pattern, or *), such as projects:read"
            )
        if role is not None and role not in self.roles.order:
            raise ConfigError(f"{where}: require.role {role!r} is not a role ({', '.join(self.roles.order)})")
        return permission, role

    def _source(
        self, raw: Any, where: str, what: str, path: tuple[str, ...], host: tuple[str, ...] | None
    ) -> Source | None:
        if raw is None:
            return None
        if not isinstance(raw, dict) or len(raw) != 1:
            raise ConfigError(f"{where}: {what} must be one of {{path: NAME}}, {{host: NAME}}, {{header: NAME}}")
        ((kind, name),) = raw.items()
        if kind not in ("path", "host", "header") or not isinstance(name, str):
            raise ConfigError(f"{where}: {what} must be one of {{path: NAME}}, {{host: NAME}}, {{header: NAME}}")
        if kind == "path" and f"{{{name}}}" not in path:
            raise ConfigError(f"{where}: {what} names path parameter {{{name}}}, which the path does not have")
        if kind == "host" and (host is None or f"{{{name}}}" not in host):
            raise ConfigError(f"{where}: {what} names host parameter {{{name}}}, which the host does not have")
        if kind == "header" and not _HEADER_RE.fullmatch(name):
            raise ConfigError(f"{where}: {what} header name {name!r} is not valid")
        return Source(kind, name)


# --- compiled matcher --------------------------------------------------------------------------


@dataclass
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    param: _Node | None = None
    ends: list[int] = field(default_factory=list)  # rules whose pattern ends here
    rest: list[int] = field(default_factory=list)  # rules with `**` here


def _insert(root: _Node, rule: Rule) -> None:
    node = root
    for seg in rule.path:
        if seg == "**":
            node.rest.append(rule.index)
            return
        if _is_param(seg):
            node.param = node.param or _Node()
            node = node.param
        else:
            # Literals match case-insensitively: Express and IIS route in any case, so
            # `/V1/ORGS/B` must meet the rule for `/v1/orgs/{org}`. `{param}` values keep their case.
            node = node.literal.setdefault(seg.lower(), _Node())
    node.ends.append(rule.index)


def _collect(node: _Node, segs: list[str], i: int, out: list[int]) -> None:
    out.extend(node.rest)
    if i == len(segs):
        out.extend(node.ends)
        return
    child = node.literal.get(segs[i].lower())
    if child is not None:
        _collect(child, segs, i + 1, out)
    if node.param is not None and segs[i] != "":
        _collect(node.param, segs, i + 1, out)


def _host_params(pattern: tuple[str, ...], host: str) -> dict[str, str] | None:
    labels = host.split(".")
    if len(labels) != len(pattern):
        return None
    params = {}
    for p, label in zip(pattern, labels, strict=True):
        if _is_param(p):
            if not label:
                return None
            params[_param(p)] = label
        elif p != label:
            return None
    return params


class RoutePolicy:
    def __init__(self, rules: list[Rule], default: Rule, source: str = "") -> None:
        self.rules = rules
        self.default = default
        self.source = source
        self._root = _Node()
        for rule in rules:
            _insert(self._root, rule)
        # Matches by (method, host, path): a proxy sends the same few routes over and over. Emptied when
        # full, so a stream of distinct paths costs what it did without it; a reload builds a new policy.
        self._matched: dict[tuple[str, str, str], tuple[Rule, dict[str, str], dict[str, str]]] = {}

    def match(self, request: OriginalRequest) -> tuple[Rule, dict[str, str], dict[str, str]]:
        memo = (request.method, request.host, request.path)
        found = self._matched.get(memo)
        if found is None:
            if len(self._matched) >= C.POLICY_MATCH_MEMO:
                self._matched.clear()
            found = self._matched[memo] = self._match(request)
        return found

    def _match(self, request: OriginalRequest) -> tuple[Rule, dict[str, str], dict[str, str]]:
        segs = segments(request.path)
        candidates: list[int] = []
        _collect(self._root, segs, 0, candidates)
        host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
        for index in sorted(candidates):
            rule = self.rules[index]
            if rule.methods is not None and request.method not in rule.methods:
                continue
            host_params: dict[str, str] | None = {}
            if rule.host is not None:
                host_params = _host_params(rule.host, host)
                if host_params is None:
                    continue
            path_params = {_param(p): s for p, s in zip(rule.path, segs, strict=False) if _is_param(p)}
            return rule, path_params, host_params or {}
        return self.default, {}, {}

    def decide(self, request: OriginalRequest, headers: Headers) -> RouteDecision:
        rule, path_params, host_params = self.match(request)
        org = project = None
        if rule.org is not None:
            org = _resolve(rule.org, "org", headers, path_params, host_params)
        if rule.project is not None:
            project = _resolve(rule.project, "project", headers, path_params, host_params)
        return RouteDecision(rule.auth, rule.permission, rule.role, org, project, rule.label)


def _resolve(
    src: Source, what: str, headers: Headers, path_params: dict[str, str], host_params: dict[str, str]
) -> str | None:
    if src.kind == "header":
        return header_org(headers, src.name)
    value = (path_params if src.kind == "path" else host_params)[src.name]
    return checked_id(value, f"the {what} in the {src.kind}")


def compile_policy(data: Any, roles: RolesConfig, source: str = "") -> RoutePolicy:
    if not isinstance(data, dict):
        raise ConfigError("policy: the file must hold a mapping with rules and default")
    unknown = sorted(set(map(str, data)) - {"rules", "default"})
    if unknown:
        raise ConfigError(f"policy: unknown key {unknown[0]!r}")
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ConfigError("policy: rules must be a list")
    parser = _RuleParser(roles)
    rules = [parser.parse(i, r) for i, r in enumerate(raw_rules)]
    default = parser.parse(-1, data.get("default", {"auth": "deny"}), default=True)
    for later in rules:
        for earlier in rules[: later.index]:
            if shadows(earlier, later):
                raise ConfigError(f"{later.label}: can never match: {earlier.label} matches everything it does")
    return RoutePolicy(rules, default, source)


def load_policy(path: str, roles: RolesConfig) -> RoutePolicy:
    return compile_policy(read_yaml(Path(path), "policy file"), roles, path)


class ReloadablePolicy:
    """The policy in force; `reload()` swaps in a new one only if it compiles, else keeps the old."""

    def __init__(self, path: str, roles: RolesConfig) -> None:
        self.path = path
        self.roles = roles
        self.current = load_policy(path, roles)

    def decide(self, request: OriginalRequest, headers: Headers) -> RouteDecision:
        return self.current.decide(request, headers)

    def reload(self) -> bool:
        try:
            new = load_policy(self.path, self.roles)
        except ConfigError as exc:
            log.error("policy reload refused, keeping the running policy: %s", exc)
            return False
        self.current = new
        log.info("policy reloaded from %s: %d rules", self.path, len(new.rules))
        return True


def describe(policy: RoutePolicy) -> list[dict[str, Any]]:
    """A readable summary for `gateway policy check`."""

    def row(r: Rule) -> dict[str, Any]:
        return {
            "rule": r.label,
            "host": ".".join(r.host) if r.host else "*",
            "path": "/" + "/".join(r.path),
            "methods": ",".join(sorted(r.methods)) if r.methods else "*",
            "auth": r.auth,
            "permission": r.permission,
            "role": r.role,
        }

    return [row(r) for r in [*policy.rules, policy.default]]
