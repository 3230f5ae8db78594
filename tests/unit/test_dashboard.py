"""packaging/grafana/zddd-dashboard.json: valid Grafana JSON whose queries use only metric names,
labels and label values that zddd's metrics endpoint really exports, and where every query of a
per-service metric (one with the label `service`) follows the Service variable."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zddd.core import Snapshot

from .metricsrig import serving

DASHBOARD = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "zddd-dashboard.json"
# Labels Prometheus itself adds to every scraped series.
SCRAPE_LABELS = {"instance", "job"}
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')


class _Core:
    """The smallest stand-in core the metrics server needs: the endpoint's names and labels do
    not depend on the values."""

    observers: list = []

    def snapshot(self):
        return Snapshot("main", "", "nftables", 8888, {"main": 8080, "backup": 80},
                        {"main": True, "backup": True})

    def connection_counts(self):
        return {"main": 0, "backup": 0}

    def flows_steered(self):
        return {"main": 0, "backup": 0}

    def flow_table(self):
        return (0, 1024)


@pytest.fixture(scope="module")
def exported() -> dict[str, dict[str, set[str]]]:
    """Sample name -> label name -> label values, from a real scrape of MetricsServer."""
    with serving(_Core()) as (server, port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    out: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = out.setdefault(s.name, {})
            for k, v in s.labels.items():
                labels.setdefault(k, set()).add(v)
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_is_an_importable_dashboard(dashboard):
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    assert dashboard.get("id") is None  # Grafana assigns it on import
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        assert p["targets"], p["title"]
        for t in [p] + p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "zddd_build_info" in variables["instance"]["query"]["query"]


def test_queries_are_balanced(dashboard):
    pairs = {")": "(", "]": "[", "}": "{"}
    for expr in exprs(dashboard):
        stack = []
        for c in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
            if c in "([{":
                stack.append(c)
            elif c in pairs:
                assert stack and stack.pop() == pairs[c], expr
        assert not stack, expr


def test_uses_only_exported_names_labels_and_values(dashboard, exported):
    used = set()
    queries = [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for expr in exprs(dashboard) + queries:
        names = set(re.findall(r"\bzddd_[a-z_]+", expr))
        assert names, f"no zddd metric in {expr!r}"
        for name in names:
            assert name in exported, f"{name} is not exported by zddd"
        used |= names
        for name, matchers in SELECTOR.findall(expr):
            assert name.startswith("zddd_"), expr
            for label, op, value in MATCHER.findall(matchers):
                if label in SCRAPE_LABELS:
                    continue
                assert label in exported[name], f"{name} has no label {label}"
                if op == "=":
                    assert value in exported[name][label], f"{name}{{{label}={value!r}}}"
        for grouping in re.findall(r"by\s*\(([^)]*)\)", expr):
            for label in (s.strip() for s in grouping.split(",")):
                assert label in SCRAPE_LABELS | {"le"} or any(
                    label in exported[n] for n in names), f"{label} in {expr!r}"
    # every metric SPEC lists is on the dashboard somewhere
    spec = {"zddd_switches_total", "zddd_switch_duration_seconds_bucket", "zddd_active_target",
            "zddd_draining", "zddd_target_up", "zddd_target_connections",
            "zddd_flows_steered_total", "zddd_drift_repairs_total",
            "zddd_collection_errors_total", "zddd_build_info",
            "zddd_last_switch_timestamp_seconds", "zddd_target_weight"}
    assert spec <= used


def test_has_the_views_the_issue_asks_for(dashboard):
    by_title = {p["title"]: p for p in dashboard["panels"]}
    active = by_title["Active target"]
    assert "zddd_active_target" in active["targets"][0]["expr"]
    shown = {o["text"] for m in active["fieldConfig"]["defaults"]["mappings"]
             for o in m["options"].values()}
    assert shown == {"main", "backup", "off"}
    quantiles = [t["expr"] for t in by_title["Switch duration quantiles"]["targets"]]
    assert [re.match(r"histogram_quantile\(([0-9.]+),", q).group(1) for q in quantiles] == [
        "0.5", "0.9", "0.99"]
    assert all("zddd_switch_duration_seconds_bucket" in q for q in quantiles)
    assert by_title["Switch duration quantiles"]["fieldConfig"]["defaults"]["unit"] == "s"
    assert "zddd_target_connections" in by_title["Connections per target"]["targets"][0]["expr"]
    assert "zddd_target_up" in by_title["Health"]["targets"][0]["expr"]


def test_every_per_service_query_follows_the_service_variable(dashboard, exported):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    service = variables["service"]
    assert service["type"] == "query" and service["multi"] and service["includeAll"]
    # The services of the hosts picked in the Host variable.
    assert re.fullmatch(r'label_values\(zddd_\w+\{instance=~"\$instance"\}, service\)',
                        service["query"]["query"]), service["query"]
    per_service = {name for name, labels in exported.items() if "service" in labels}
    assert {"zddd_active_target", "zddd_target_connections"} <= per_service, per_service
    for expr in exprs(dashboard):
        for name, matchers in SELECTOR.findall(expr):
            follows = ("service", "=~", "$service") in MATCHER.findall(matchers)
            assert follows == (name in per_service), (name, expr)
        # A sum over a per-service metric keeps the services apart.
        if set(re.findall(r"\bzddd_[a-z_]+", expr)) & per_service:
            for grouping in re.findall(r"by\s*\(([^)]*)\)", expr):
                assert "service" in grouping, expr
