"""deploy/grafana/gateway-dashboard.json: a Grafana dashboard model whose every query names series the
gateway really exports, with labels they really carry, counters only under rate()/increase().

What is exported is read from the real app's /metrics after requests that make each labelled series
appear (a Redis outage included, for the breaker, error and fallback series), not from a list kept here.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from gateway.typedefs import REDIS_BREAKER
from tests.conftest import ROOT, Client, World, corrupt, nginx_headers

DASHBOARD: Final = ROOT / "deploy" / "grafana" / "gateway-dashboard.json"
README: Final = ROOT / "deploy" / "grafana" / "README.md"

# Labels Prometheus adds to every series of a scrape target.
TARGET_LABELS: Final = frozenset({"job", "instance"})
RATE_FUNCTIONS: Final = frozenset({"rate", "irate", "increase"})
FUNCTIONS: Final = RATE_FUNCTIONS | frozenset(
    {
        "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp", "clamp_max",
        "clamp_min", "count_over_time", "delta", "deriv", "floor", "histogram_quantile", "label_replace",
        "last_over_time", "max_over_time", "min_over_time", "resets", "round", "scalar", "sort",
        "sort_desc", "sum_over_time", "time", "timestamp", "vector",
    }
)  # fmt: skip
AGGREGATIONS: Final = frozenset(
    {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values"}
)
GROUPING: Final = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS: Final = GROUPING | frozenset({"and", "or", "unless", "bool", "offset"})
# Grafana's range variables: $__rate_interval is at least four scrape intervals, so rate() always has points.
RANGES: Final = frozenset({"[$__rate_interval]", "[$__range]"})

TOKEN: Final = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<matchers>\{(?:[^}"]|"(?:[^"\\]|\\.)*")*\})
    | (?P<range>\[[^\]]*\])
    | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<punct>[^\s\w])
    """,
    re.VERBOSE,
)
MATCHER_LABEL: Final = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
LEGEND_LABEL: Final = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
LABEL_VALUES: Final = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\)$")


@dataclass
class Exported:
    """Sample names as scraped, with the labels their samples carry and whether they are counted (a
    counter's `_total`, a histogram's `_bucket`, `_count`, `_sum`): those are only read through a rate."""

    labels: dict[str, frozenset[str]] = field(default_factory=dict)
    counted: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)  # every sample name the families declare, with or without samples


def exported(text: str) -> Exported:
    out = Exported()
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            out.names.update({family.name + "_total", family.name + "_created"})
            out.counted.add(family.name + "_total")
        elif family.type == "histogram":
            suffixes = ("_bucket", "_count", "_sum")
            out.names.update([family.name + s for s in suffixes] + [family.name + "_created"])
            out.counted.update(family.name + s for s in suffixes)
        else:
            out.names.add(family.name)
        for sample in family.samples:
            out.names.add(sample.name)
            out.labels[sample.name] = out.labels.get(sample.name, TARGET_LABELS) | frozenset(sample.labels)
    return out


@dataclass(frozen=True)
class Token:
    kind: str
    text: str


def tokens(expr: str) -> list[Token]:
    found = [Token(m.lastgroup or "", m.group()) for m in TOKEN.finditer(expr)]
    return [t for t in found if t.kind != "string"]  # label values and variables in them: not names


def closing(toks: list[Token]) -> dict[int, int]:
    """The index of each `(`'s matching `)`; ValueError when they do not balance."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for i, t in enumerate(toks):
        if t.text == "(":
            stack.append(i)
        elif t.text == ")":
            if not stack:
                raise ValueError("unbalanced parentheses")
            pairs[stack.pop()] = i
    if stack:
        raise ValueError("unbalanced parentheses")
    return pairs


@dataclass
class Query:
    """One PromQL expression, cut into what the checks need."""

    expr: str
    toks: list[Token]
    pairs: dict[int, int]
    calls: list[tuple[str, int, int]]  # (function or aggregation, its "(", its ")")
    grouping: list[tuple[int, list[str]]]  # (index of by/without/on/..., its labels)
    selectors: list[int]  # indexes of metric names


def parse(expr: str) -> Query:
    toks = tokens(expr)
    q = Query(expr, toks, closing(toks), [], [], [])
    in_label_list: set[int] = set()
    for i, t in enumerate(toks):
        nxt = toks[i + 1].text if i + 1 < len(toks) else ""
        if t.kind != "ident" or i in in_label_list:
            continue
        if t.text in GROUPING and nxt == "(":
            close = q.pairs[i + 1]
            q.grouping.append((i, [toks[j].text for j in range(i + 2, close) if toks[j].kind == "ident"]))
            in_label_list.update(range(i + 2, close))
        elif nxt == "(":
            q.calls.append((t.text, i + 1, q.pairs[i + 1]))
        elif t.text in AGGREGATIONS and nxt in ("by", "without"):  # `sum by (x) (...)`
            argument = q.pairs[i + 2] + 1
            q.calls.append((t.text, argument, q.pairs[argument]))
        elif t.text not in KEYWORDS:
            q.selectors.append(i)
    return q


def query_problems(expr: str, legend: str, ex: Exported) -> list[str]:
    """What is wrong with one PromQL query against what the gateway exports (empty: nothing)."""
    try:
        q = parse(expr)
    except ValueError as exc:
        return [f"{exc} in {expr!r}"]
    problems = [f"unknown function {f}() in {expr!r}" for f, _, _ in q.calls if f not in FUNCTIONS | AGGREGATIONS]
    for i in q.selectors:
        problems += _selector_problems(q, i, ex)
    problems += [
        f"range {t.text} in {expr!r}: use $__rate_interval (or $__range over the whole range)"
        for t in q.toks
        if t.kind == "range" and t.text.replace(" ", "") not in RANGES
    ]
    problems += _quantile_problems(q)
    problems += _grouping_problems(q, ex)
    return problems + _legend_problems(q, legend, ex)


def _selector_problems(q: Query, i: int, ex: Exported) -> list[str]:
    """The name exported with samples, its matchers' labels on it, and read through a rate iff counted."""
    name = q.toks[i].text
    if name not in ex.names:
        return [f"{name} is not exported (in {q.expr!r})"]
    if name not in ex.labels:
        return [f"{name} had no sample in the test: its labels cannot be checked (in {q.expr!r})"]
    problems = []
    after = q.toks[i + 1] if i + 1 < len(q.toks) else None
    if after is not None and after.kind == "matchers":
        problems += [
            f"{name} has no label {label} (matched in {q.expr!r})"
            for label in MATCHER_LABEL.findall(after.text)
            if label not in ex.labels[name]
        ]
    rated = any(open_ < i < close and f in RATE_FUNCTIONS for f, open_, close in q.calls)
    if name in ex.counted and not rated:
        problems.append(f"{name} is a counter: read it through rate() or increase() (in {q.expr!r})")
    if name not in ex.counted and rated:
        problems.append(f"{name} is a gauge: rate() or increase() of it means nothing (in {q.expr!r})")
    return problems


def _quantile_problems(q: Query) -> list[str]:
    problems = []
    for f, open_, close in q.calls:
        if f != "histogram_quantile":
            continue
        inside = [q.toks[i].text for i in q.selectors if open_ < i < close]
        les = [labels for g, labels in q.grouping if open_ < g < close and "le" in labels]
        if not inside or not all(n.endswith("_bucket") for n in inside) or not les:
            problems.append(f"histogram_quantile over anything but sum by (le, ...) of _bucket: {q.expr!r}")
    return problems


def _grouping_problems(q: Query, ex: Exported) -> list[str]:
    """Each label grouped on is carried by every metric of the aggregation it groups."""
    problems = []
    for g, labels in q.grouping:
        first, last = _aggregated(q.toks, q.pairs, g)
        for i in q.selectors:
            name = q.toks[i].text
            if first < i < last and name in ex.labels:
                problems += [
                    f"{name} has no label {label} (grouped {q.toks[g].text} in {q.expr!r})"
                    for label in labels
                    if label not in ex.labels[name]
                ]
    return problems


def _legend_problems(q: Query, legend: str, ex: Exported) -> list[str]:
    """A `{{label}}` in the legend is one the query keeps: grouped by, or (no `by`) on its metrics."""
    kept = {label for g, labels in q.grouping if q.toks[g].text == "by" for label in labels}
    kept = kept or {label for i in q.selectors for label in ex.labels.get(q.toks[i].text, ())}
    return [
        f"legend {legend!r} names {label}, which {q.expr!r} does not keep"
        for label in LEGEND_LABEL.findall(legend)
        if label not in kept
    ]


def _aggregated(toks: list[Token], pairs: dict[int, int], g: int) -> tuple[int, int]:
    """The span a grouping clause at `g` applies to: its aggregation's argument (`sum by (x) (...)` or
    `sum (...) by (x)`); for vector matching (`on`, `ignoring`, ...), the whole query."""
    if toks[g].text in ("by", "without"):
        labels_close = pairs[g + 1]
        if g > 0 and toks[g - 1].text in AGGREGATIONS and labels_close + 1 in pairs:
            return labels_close + 1, pairs[labels_close + 1]
        if g > 0 and toks[g - 1].text == ")":
            open_ = next(o for o, c in pairs.items() if c == g - 1)
            return open_, g - 1
    return -1, len(toks)


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside a collapsed row's `panels` included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_problems(dashboard: dict[str, Any], ex: Exported) -> list[str]:
    problems: list[str] = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            where = f"panel {panel['title']!r} {target.get('refId')}: "
            problems += [where + p for p in query_problems(target["expr"], target.get("legendFormat", ""), ex)]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        m = LABEL_VALUES.match(variable["query"])
        if m is None:
            problems.append(f"variable {variable['name']}: not a label_values(selector, label) query")
            continue
        where = f"variable {variable['name']}: "
        problems += [where + p for p in query_problems(m["selector"], "", ex)]
        name = tokens(m["selector"])[0].text
        if m["label"] not in ex.labels.get(name, ()):
            problems.append(f"{where}{name} has no label {m['label']}")
    return problems


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_the_dashboard_is_a_grafana_model() -> None:
    d = load()
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"] and d["id"] is None
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["query"].startswith("label_values(gateway_build_info")
    assert "$job" in variables["instance"]["query"]
    ds = {"type": "prometheus", "uid": "${datasource}"}
    rows = [p["title"] for p in panels(d) if p["type"] == "row"]
    assert rows == ["Overview", "Decisions", "Backends", "Cache & limits", "Management API", "Process"]
    for p in panels(d):
        x, w = p["gridPos"]["x"], p["gridPos"]["w"]
        assert x >= 0 and x + w <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == ds and p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds and t["expr"].strip(), p["title"]
            # Every selector is narrowed to the chosen job and instances.
            for m in re.finditer(r"\b(?:gateway|process|python)_\w+(\{[^}]*\})?", t["expr"]):
                assert m.group(1) and 'job=~"$job"' in m.group(1) and 'instance=~"$instance"' in m.group(1), (
                    p["title"],
                    m.group(),
                )
    # The build version(s) running, from the build info.
    stats = [p for p in panels(d) if p["type"] == "stat"]
    assert any("gateway_build_info" in t["expr"] and "version" in t["expr"] for p in stats for t in p["targets"])


def test_the_readme_names_the_file_and_the_metrics_port() -> None:
    text = README.read_text()
    assert DASHBOARD.name in text and "metrics.port" in text and "/metrics" in text
    assert "apiVersion: 1" in text and "providers:" in text  # a provisioning snippet


def test_the_checker_finds_what_a_dashboard_gets_wrong() -> None:
    """On the real registry fed by hand: a misspelt name, a missing label, a counter read raw, a gauge
    rated, a quantile without `le`, a fixed range and a legend naming a label the sum dropped."""
    m = Metrics()
    m.decisions.inc("nginx", "ok")
    m.latency.observe("nginx", 0.001)
    ex = exported(generate_latest(m.registry).decode())
    s = '{job=~"$job"}'
    good = f"sum by (code) (rate(gateway_auth_decisions_total{s}[$__rate_interval]))"
    assert query_problems(good, "{{code}}", ex) == []
    quantile = (
        f"histogram_quantile(0.99, sum by (endpoint, le) (rate(gateway_auth_seconds_bucket{s}[$__rate_interval])))"
    )
    assert query_problems(quantile, "p99 {{endpoint}}", ex) == []
    assert query_problems("sum(gateway_local_cache_entries) or vector(0)", "", ex) == []
    bad = {
        "sum(rate(gateway_auth_decision_total[$__rate_interval]))": "gateway_auth_decision_total is not exported",
        "sum by (tier) (rate(gateway_auth_decisions_total[$__rate_interval]))": "has no label tier",
        'sum(rate(gateway_auth_decisions_total{cod="ok"}[$__rate_interval]))': "has no label cod",
        "sum(rate(gateway_auth_decisions_total[$__rate_interval])) by (endpont)": "has no label endpont",
        "sum(gateway_auth_decisions_total)": "is a counter",
        "rate(gateway_local_cache_entries[$__rate_interval])": "is a gauge",
        "histogram_quantile(0.5, sum by (endpoint) (rate(gateway_auth_seconds_bucket[$__rate_interval])))": "le",
        "histogram_quantile(0.5, rate(gateway_auth_seconds_sum[$__rate_interval]))": "histogram_quantile",
        "sum(rate(gateway_auth_decisions_total[5m]))": "use $__rate_interval",
        "sum(ratez(gateway_auth_decisions_total[$__rate_interval]))": "unknown function ratez()",
        # Exported, but no sample: its labels are unknown, so the test must make it appear.
        "sum by (backend) (rate(gateway_backend_errors_total[$__rate_interval]))": "had no sample",
    }
    for expr, expected in bad.items():
        problems = query_problems(expr, "", ex)
        assert any(expected in p for p in problems), (expr, problems)
    assert any("does not keep" in p for p in query_problems(good, "{{endpoint}}", ex))


async def test_every_query_names_series_the_gateway_exports(client: Client, world: World) -> None:
    """Requests that make every series the dashboard reads appear, then each query is checked against
    the scrape; a copy of the dashboard with one name misspelt is caught."""
    k = await world.key(orgs=[world.org_a])
    for _ in range(3):
        assert (await client.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    assert (await client.get("/auth/nginx", headers=nginx_headers(corrupt(k["key"])))).status == 401
    assert (await client.get("/v1/me", headers={"Authorization": f"Bearer {k['key']}"})).status == 200
    assert (await client.get("/v1/keys/nope", headers={"Authorization": f"Bearer {k['key']}"})).status == 404
    # A Redis call fails (told to its breaker, as every Redis caller does): the breaker opens (transition,
    # error, up 0), a key without a lease yet is limited without Redis (a fallback), then it closes again.
    other = await world.key("other", orgs=[world.org_a])
    breaker = client.app[REDIS_BREAKER]
    breaker.failed()
    assert (await client.get("/auth/nginx", headers=nginx_headers(other["key"]))).status in (200, 503)
    breaker.succeeded()
    text = await (await client.get("/metrics")).text()
    ex = exported(text)
    assert "gateway_ratelimit_fallback_total" in ex.labels and "gateway_breaker_transitions_total" in ex.labels

    d = load()
    assert dashboard_problems(d, ex) == []

    broken = copy.deepcopy(d)
    target = next(t for p in panels(broken) for t in p.get("targets", []) if "gateway_key_cache_total" in t["expr"])
    target["expr"] = target["expr"].replace("gateway_key_cache_total", "gateway_key_cache_hits_total", 1)
    problems = dashboard_problems(broken, ex)
    assert len(problems) == 1 and "gateway_key_cache_hits_total is not exported" in problems[0], problems
