"""The metrics endpoint with a stand-in core: exactly SPEC's names, Prometheus conventions,
scrape-time reads whose failures are counted instead of failing the scrape."""

from __future__ import annotations

import re
from dataclasses import replace
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .fakecore import FakeCore
from .metricsrig import serving

# SPEC "Metrics" and "Services": sample name -> (type, label names). Every per-service metric has
# the label `service`.
SPEC = {
    "zddd_switches_total": ("counter", {"service", "target", "result"}),
    # One for all services: a commit's time is the backend's (see metrics.py).
    "zddd_switch_duration_seconds": ("histogram", {"backend"}),
    "zddd_active_target": ("gauge", {"service", "target"}),
    "zddd_draining": ("gauge", {"service", "target"}),
    "zddd_target_up": ("gauge", {"service", "target"}),
    "zddd_target_connections": ("gauge", {"service", "target"}),
    "zddd_flows_steered_total": ("counter", {"service", "target"}),
    "zddd_target_weight": ("gauge", {"service", "target"}),
    "zddd_drift_repairs_total": ("counter", set()),
    "zddd_collection_errors_total": ("counter", set()),
    "zddd_build_info": ("gauge", {"version", "backend"}),  # an info metric, as text: a gauge
}
# Beyond SPEC, on every backend: when the service's last switch was committed (issue 18).
SPEC["zddd_last_switch_timestamp_seconds"] = ("gauge", {"service"})
# Beyond SPEC, for backends with a flow map (tc, xdp, sk_lookup): its fill and its size.
FLOW_MAP = {
    "zddd_flow_entries": ("gauge", set()),
    "zddd_flow_capacity": ("gauge", set()),
}

def exported_names(text: str) -> set[str]:
    """Sample names in a scrape, with the histogram/counter bookkeeping suffixes folded back."""
    names = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name
            if family.type == "histogram" and name != family.name:
                name = family.name
            names.add(name)
    return names


def stub_core(*services) -> FakeCore:
    core = FakeCore(*services)
    for svc in core.services.values():
        svc.counts = {"main": 3, "backup": 0}
        svc.snap = replace(svc.snap, up={"main": True, "backup": False})
    core.flows = {(name, "main"): 7 for name in core.services} | {
        (name, "backup"): 2 for name in core.services}
    return core


@pytest.fixture
def served():
    core = stub_core()
    with serving(core) as (server, port):
        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()

        yield core, server, scrape


D = (("service", "default"),)


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exactly_the_spec_names_with_their_types_and_labels(served):
    core, server, scrape = served
    text = scrape()
    assert exported_names(text) == set(SPEC)
    assert "_created" not in text  # prometheus-client's extra series are left out
    for family in text_string_to_metric_families(text):
        full = family.name + ("_total" if family.type == "counter" else "")
        kind, labels = SPEC[full]
        assert family.type == kind, full
        for s in family.samples:
            assert set(s.labels) - {"le"} == labels, (s.name, s.labels)


def test_names_follow_prometheus_conventions(served):
    _, _, scrape = served
    for family in text_string_to_metric_families(scrape()):
        assert re.fullmatch(r"zddd_[a-z]+(_[a-z]+)*", family.name), family.name
        assert not family.name.endswith("_total")  # the parser strips it from counters
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith("_seconds")  # base unit
        assert family.documentation, family.name
        # few label values: targets, results, one backend
        for s in family.samples:
            for key, value in s.labels.items():
                if key == "target":
                    assert value in ("main", "backup", "off", "split", "invalid", "weights")
                if key == "result":
                    assert value in ("ok", "refused", "failed")
                if key == "service":
                    assert value == "default"  # the single-service form's one service


def test_values_come_from_the_core_at_scrape_time(served):
    core, server, scrape = served
    svc = core.services["default"]
    v = samples(scrape())
    assert v[("zddd_target_connections", D + (("target", "main"),))] == 3
    assert v[("zddd_flows_steered_total", D + (("target", "main"),))] == 7
    assert v[("zddd_active_target", D + (("target", "main"),))] == 1
    assert v[("zddd_target_up", D + (("target", "backup"),))] == 0
    assert v[("zddd_target_weight", D + (("target", "main"),))] == 100
    assert v[("zddd_target_weight", D + (("target", "backup"),))] == 0
    svc.snap = replace(svc.snap, draining="main")
    v = samples(scrape())
    assert v[("zddd_draining", D + (("target", "main"),))] == 1
    svc.snap = replace(svc.snap, active="off", draining="", weights={"main": 0, "backup": 0})
    v = samples(scrape())
    assert v[("zddd_active_target", D + (("target", "off"),))] == 1
    assert v[("zddd_active_target", D + (("target", "main"),))] == 0
    assert v[("zddd_draining", D + (("target", "main"),))] == 0
    assert v[("zddd_target_weight", D + (("target", "main"),))] == 0
    assert v[("zddd_last_switch_timestamp_seconds", D)] == 0  # never
    svc.snap = replace(svc.snap, last_switch_timestamp=1_765_000_000_250_000)
    v = samples(scrape())
    assert v[("zddd_last_switch_timestamp_seconds", D)] == 1_765_000_000.25


def test_switch_events_and_histogram_buckets_from_microseconds(served):
    core, server, scrape = served
    server.switch_result("default", "backup", "ok", 120e-6)
    server.switch_result("default", "invalid", "refused", None)
    server.switch_result("default", "main", "failed", None)
    server.drift_repaired()
    v = samples(scrape())
    key = ("zddd_switches_total", (("result", "ok"), ("service", "default"), ("target", "backup")))
    assert v[key] == 1
    assert v[("zddd_switches_total", (("result", "refused"), *D, ("target", "invalid")))] == 1
    assert v[("zddd_switches_total", (("result", "failed"), *D, ("target", "main")))] == 1
    assert v[("zddd_switches_total", (("result", "ok"), *D, ("target", "off")))] == 0
    assert v[("zddd_switch_duration_seconds_count", (("backend", "nftables"),))] == 1
    bucket = "zddd_switch_duration_seconds_bucket"
    assert v[(bucket, (("backend", "nftables"), ("le", "0.0001")))] == 0
    assert v[(bucket, (("backend", "nftables"), ("le", "0.00025")))] == 1
    assert v[("zddd_drift_repairs_total", ())] == 1


def test_failed_kernel_reads_are_counted_and_the_scrape_still_works(served):
    core, server, scrape = served
    core.fail_counts = True
    v = samples(scrape())
    assert v[("zddd_collection_errors_total", ())] == 1
    assert not any(name == "zddd_target_connections" for name, _ in v)
    assert v[("zddd_active_target", D + (("target", "main"),))] == 1  # the rest is there
    core.fail_flows = True
    v = samples(scrape())
    assert v[("zddd_collection_errors_total", ())] == 3
    assert not any(name == "zddd_flows_steered_total" for name, _ in v)
    core.fail_counts = core.fail_flows = False
    v = samples(scrape())
    assert v[("zddd_collection_errors_total", ())] == 3
    assert v[("zddd_target_connections", D + (("target", "main"),))] == 3


def test_flow_map_gauges_only_where_the_backend_has_a_flow_map(served):
    core, server, scrape = served
    assert exported_names(scrape()) == set(SPEC)
    core.table = (12, 1048576)
    text = scrape()
    assert exported_names(text) == set(SPEC) | set(FLOW_MAP)
    v = samples(text)
    assert v[("zddd_flow_entries", ())] == 12 and v[("zddd_flow_capacity", ())] == 1048576


def test_other_paths_and_methods_get_http_errors(served):
    core, server, scrape = served
    port = server.port
    for path, code in (("/", 404), ("/metricsx", 404), ("/metrics?x=1", 200)):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                got = r.status
        except urllib.error.HTTPError as e:
            got = e.code
        assert got == code, path
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST")
    try:
        urllib.request.urlopen(req, timeout=5)
        raise AssertionError("POST answered")
    except urllib.error.HTTPError as e:
        assert e.code == 405


def test_a_stalled_client_does_not_hold_up_other_scrapes(served):
    import socket
    import time

    core, server, scrape = served
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
    for s in idle:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    try:
        t = time.monotonic()
        assert "zddd_active_target" in scrape()
        assert time.monotonic() - t < 1.0
    finally:
        for s in idle:
            s.close()


# ---- many services ------------------------------------------------------------------------------

class CountingCore(FakeCore):
    """Counts the kernel reads a scrape makes."""

    def __init__(self, *services):
        super().__init__(*services)
        self.reads = {"connections": 0, "flows": 0}

    def connection_counts(self):
        self.reads["connections"] += 1
        return super().connection_counts()

    def flows_steered(self):
        self.reads["flows"] += 1
        return super().flows_steered()


def test_every_service_has_its_series_from_one_kernel_read_each():
    names = [(f"s{i:02d}", 9000 + i) for i in range(64)]
    core = CountingCore(*names)
    core.services["s07"].snap = replace(core.services["s07"].snap, active="split",
                                        weights={"main": 10, "backup": 90})
    core.services["s07"].counts = {"main": 5, "backup": 1}
    core.flows = {("s07", "main"): 11, ("s07", "backup"): 99}
    with serving(core) as (server, port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        server.switch_result("s07", "off", "refused", None)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            again = samples(r.read().decode())
    assert core.reads == {"connections": 2, "flows": 2}  # one each per scrape, for all 64
    v = samples(text)
    s07 = (("service", "s07"),)
    assert v[("zddd_target_weight", s07 + (("target", "main"),))] == 10
    assert v[("zddd_target_weight", s07 + (("target", "backup"),))] == 90
    assert v[("zddd_target_connections", s07 + (("target", "main"),))] == 5
    assert v[("zddd_flows_steered_total", s07 + (("target", "backup"),))] == 99
    assert v[("zddd_active_target", s07 + (("target", "main"),))] == 0
    for family in ("zddd_active_target", "zddd_target_up", "zddd_target_weight",
                   "zddd_last_switch_timestamp_seconds"):
        assert {dict(labels)["service"] for name, labels in v if name == family} == \
            {n for n, _ in names}, family
    assert v[("zddd_switches_total", (("result", "ok"), ("service", "s63"),
                                      ("target", "main")))] == 0  # exported from start
    assert again[("zddd_switches_total", (("result", "refused"), ("service", "s07"),
                                          ("target", "off")))] == 1


def test_a_reload_adds_and_removes_a_services_counters():
    core = FakeCore(("web", 8888), ("api", 8890))
    with serving(core) as (server, port):
        def scrape():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return samples(r.read().decode())

        server.switch_result("api", "main", "ok", 1e-4)
        core.add("jobs", 8892)
        core.remove("api")
        v = scrape()
    services = {dict(labels).get("service") for name, labels in v
                if name == "zddd_switches_total"}
    assert services == {"web", "jobs"}
    assert {dict(labels)["service"] for name, labels in v if name == "zddd_active_target"} == \
        {"web", "jobs"}
