"""The metrics endpoint with a stand-in core: exactly SPEC's names, Prometheus conventions,
scrape-time reads whose failures are counted instead of failing the scrape."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zddd.core import Snapshot

from .metricsrig import serving

# SPEC "Metrics": sample name -> (type, label names)
SPEC = {
    "zddd_switches_total": ("counter", {"target", "result"}),
    "zddd_switch_duration_seconds": ("histogram", {"backend"}),
    "zddd_active_target": ("gauge", {"target"}),
    "zddd_draining": ("gauge", {"target"}),
    "zddd_target_up": ("gauge", {"target"}),
    "zddd_target_connections": ("gauge", {"target"}),
    "zddd_flows_steered_total": ("counter", {"target"}),
    "zddd_drift_repairs_total": ("counter", set()),
    "zddd_collection_errors_total": ("counter", set()),
    "zddd_build_info": ("gauge", {"version", "backend"}),  # an info metric, as text: a gauge
}
# Beyond SPEC, on every backend: when the last switch was committed (issue 18).
SPEC["zddd_last_switch_timestamp_seconds"] = ("gauge", set())
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


class StubBackend:
    name = "nftables"

    def __init__(self):
        self.fail = False

    def flows_steered(self):
        if self.fail:
            raise OSError("netlink said no")
        return {"main": 7, "backup": 2}


class StubCore:
    """What MetricsServer reads from the core, and nothing else."""

    def __init__(self):
        self.active = "main"
        self.draining = ""
        self.backend = StubBackend()
        self.observers = []
        self.counts_fail = False
        self.table = None
        self.last_switch_timestamp = 0

    def snapshot(self):
        return Snapshot(self.active, self.draining, "nftables", 8888,
                        {"main": 8080, "backup": 80}, {"main": True, "backup": False},
                        last_switch_timestamp=self.last_switch_timestamp)

    def connection_counts(self):
        if self.counts_fail:
            raise OSError("sock_diag said no")
        return {"main": 3, "backup": 0}

    def flows_steered(self):
        return self.backend.flows_steered()

    def flow_table(self):
        return self.table


@pytest.fixture
def served():
    core = StubCore()
    with serving(core) as (server, port):
        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()

        yield core, server, scrape


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
                    assert value in ("main", "backup", "off", "invalid")
                if key == "result":
                    assert value in ("ok", "refused", "failed")


def test_values_come_from_the_core_at_scrape_time(served):
    core, server, scrape = served
    v = samples(scrape())
    assert v[("zddd_target_connections", (("target", "main"),))] == 3
    assert v[("zddd_flows_steered_total", (("target", "main"),))] == 7
    assert v[("zddd_active_target", (("target", "main"),))] == 1
    assert v[("zddd_target_up", (("target", "backup"),))] == 0
    core.active, core.draining = "main", "main"
    v = samples(scrape())
    assert v[("zddd_draining", (("target", "main"),))] == 1
    core.active, core.draining = "off", ""
    v = samples(scrape())
    assert v[("zddd_active_target", (("target", "off"),))] == 1
    assert v[("zddd_active_target", (("target", "main"),))] == 0
    assert v[("zddd_draining", (("target", "main"),))] == 0
    assert v[("zddd_last_switch_timestamp_seconds", ())] == 0  # never
    core.last_switch_timestamp = 1_765_000_000_250_000
    v = samples(scrape())
    assert v[("zddd_last_switch_timestamp_seconds", ())] == 1_765_000_000.25


def test_switch_events_and_histogram_buckets_from_microseconds(served):
    core, server, scrape = served
    server.switch_result("backup", "ok", 120e-6)
    server.switch_result("invalid", "refused", None)
    server.switch_result("main", "failed", None)
    server.drift_repaired()
    v = samples(scrape())
    key = ("zddd_switches_total", (("result", "ok"), ("target", "backup")))
    assert v[key] == 1
    assert v[("zddd_switches_total", (("result", "refused"), ("target", "invalid")))] == 1
    assert v[("zddd_switches_total", (("result", "failed"), ("target", "main")))] == 1
    assert v[("zddd_switches_total", (("result", "ok"), ("target", "off")))] == 0
    assert v[("zddd_switch_duration_seconds_count", (("backend", "nftables"),))] == 1
    bucket = "zddd_switch_duration_seconds_bucket"
    assert v[(bucket, (("backend", "nftables"), ("le", "0.0001")))] == 0
    assert v[(bucket, (("backend", "nftables"), ("le", "0.00025")))] == 1
    assert v[("zddd_drift_repairs_total", ())] == 1


def test_failed_kernel_reads_are_counted_and_the_scrape_still_works(served):
    core, server, scrape = served
    core.counts_fail = True
    v = samples(scrape())
    assert v[("zddd_collection_errors_total", ())] == 1
    assert not any(name == "zddd_target_connections" for name, _ in v)
    assert v[("zddd_active_target", (("target", "main"),))] == 1  # the rest is there
    core.backend.fail = True
    v = samples(scrape())
    assert v[("zddd_collection_errors_total", ())] == 3
    assert not any(name == "zddd_flows_steered_total" for name, _ in v)
    core.counts_fail = core.backend.fail = False
    v = samples(scrape())
    assert v[("zddd_collection_errors_total", ())] == 3
    assert v[("zddd_target_connections", (("target", "main"),))] == 3


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
