"""The Prometheus endpoint of a real zddd, parsed with prometheus_client's own parser, and the
journal-style log lines of switches."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import pytest

import zddd
from zdddlab import APP_V4, HeldConnection, agent_ask, http_get, wait_for

TARGETS = ("main", "backup", "off")
RESULTS = ("ok", "refused", "failed")


class Scrape:
    """One scrape: families by name, and sample values by (sample name, sorted labels)."""

    def __init__(self, text: str):
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {}
        for family in self.families.values():
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def __call__(self, name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        if key not in self.samples and "service" not in labels:
            # A per-service metric, of the lab's one service (SPEC "Services": label service,
            # "default" in the single-service form).
            key = (name, tuple(sorted({**labels, "service": "default"}.items())))
        return self.samples[key]


def scrape(lab) -> Scrape:
    r = lab.app.run("curl", "-sS", "--max-time", "5", "http://127.0.0.1:9488/metrics")
    return Scrape(r.stdout)


@pytest.mark.backends
def test_every_metric_from_start(lab):
    z = lab.start_zddd()
    m = scrape(lab)
    for target in TARGETS + ("invalid",):
        for result in RESULTS:
            assert m("zddd_switches_total", target=target, result=result) == 0
    assert m("zddd_switch_duration_seconds_count", backend=z.backend) == 0
    buckets = {s.labels["le"] for s in m.families["zddd_switch_duration_seconds"].samples
               if s.name.endswith("_bucket")}
    assert {"1e-05", "0.0001", "0.001", "1.0", "60.0", "+Inf"} <= buckets
    assert [m("zddd_active_target", target=t) for t in TARGETS] == [1, 0, 0]
    assert m("zddd_draining", target="main") == m("zddd_draining", target="backup") == 0
    assert m("zddd_target_up", target="main") == m("zddd_target_up", target="backup") == 1
    assert m("zddd_target_connections", target="main") == 0
    assert m("zddd_target_connections", target="backup") == 0
    assert m("zddd_flows_steered_total", target="main") == 0
    assert m("zddd_flows_steered_total", target="backup") == 0
    assert m("zddd_drift_repairs_total") == 0
    assert m("zddd_collection_errors_total") == 0
    assert m("zddd_build_info", version=zddd.__version__, backend=z.backend) == 1
    if z.backend != "nftables":  # a flow map: its fill and its size
        assert m("zddd_flow_capacity") == 1048576
        assert m("zddd_flow_entries") == 0  # the probes go straight to the vhosts
        for _ in range(3):  # one flow each, through the listen port
            assert http_get(lab.client, APP_V4, 8888) == "main"
        assert scrape(lab)("zddd_flow_entries") == 3
    assert m.families["zddd_switches"].type == "counter"
    assert m.families["zddd_switch_duration_seconds"].type == "histogram"
    assert m.families["zddd_target_connections"].type == "gauge"


def test_values_follow_switches_connections_drains_and_repairs(lab):
    z = lab.start_zddd()

    # flows steered: one per new connection through the listen port, none for direct ones
    for _ in range(3):
        assert http_get(lab.client, APP_V4, 8888) == "main"
    assert http_get(lab.client, APP_V4, 8080) == "main"
    m = scrape(lab)
    assert m("zddd_flows_steered_total", target="main") == 3
    assert m("zddd_flows_steered_total", target="backup") == 0

    assert z.zddctl("switch", "backup").returncode == 0
    assert z.zddctl("switch", "Main").returncode == 1
    lab.main.stop()
    wait_for(lambda: scrape(lab)("zddd_target_up", target="main") == 0, 1.5, "main down")
    assert z.zddctl("switch", "main").returncode == 1
    http_get(lab.client, APP_V4, 8888)
    m = scrape(lab)
    assert m("zddd_switches_total", target="backup", result="ok") == 1
    assert m("zddd_switches_total", target="invalid", result="refused") == 1
    assert m("zddd_switches_total", target="main", result="refused") == 1
    assert m("zddd_switches_total", target="main", result="ok") == 0
    assert m("zddd_switch_duration_seconds_count", backend="nftables") == 1
    assert 0 < m("zddd_switch_duration_seconds_sum", backend="nftables") < 0.5
    assert [m("zddd_active_target", target=t) for t in TARGETS] == [0, 1, 0]
    assert m("zddd_flows_steered_total", target="backup") == 1
    lab.main.start()
    wait_for(lambda: scrape(lab)("zddd_target_up", target="main") == 1, 1.5, "main up")

    # connections, however they arrived; and a drain of backup
    via_listen = HeldConnection(lab.client, APP_V4, 8888)
    lab.closers.append(via_listen.close)
    direct = HeldConnection(lab.client, APP_V4, 8080)
    lab.closers.append(direct.close)
    m = scrape(lab)
    assert m("zddd_target_connections", target="backup") == 1
    assert m("zddd_target_connections", target="main") == 1
    assert z.zddctl("switch", "off").returncode == 0
    m = scrape(lab)
    assert m("zddd_draining", target="backup") == 1
    assert m("zddd_draining", target="main") == 0
    assert m("zddd_active_target", target="backup") == 1  # still steering during the drain
    assert m("zddd_switches_total", target="off", result="ok") == 0  # not committed yet
    via_listen.close()
    wait_for(lambda: z.prop("ActiveTarget") == "off", 3, "the drain to end")
    m = scrape(lab)
    assert m("zddd_draining", target="backup") == 0
    assert [m("zddd_active_target", target=t) for t in TARGETS] == [0, 0, 1]
    assert m("zddd_switches_total", target="off", result="ok") == 1
    assert m("zddd_switch_duration_seconds_count", backend="nftables") == 2
    assert m("zddd_target_connections", target="backup") == 0
    assert m("zddd_target_connections", target="main") == 1
    direct.close()

    # someone else changes the steering: repaired and counted
    assert z.zddctl("switch", "main").returncode == 0
    lab.app.run("nft", "flush", "map", "inet", "zddd", "steer")
    wait_for(lambda: scrape(lab)("zddd_drift_repairs_total") == 1, 3, "the repair to count")
    assert z.steered_to() == "main"
    assert scrape(lab)("zddd_collection_errors_total") == 0


# logfmt: a bare value has no space, quote or "=" (else it is JSON-quoted).
LOG_LINE = re.compile(r'^level=(info|warning|error) event=\w+( \w+=("([^"\\]|\\.)*"|[^\s"=]*))*$')


def test_each_switch_logs_one_key_value_line_with_who_asked(lab):
    z = lab.start_zddd({"drain_timeout": 0.5})
    assert z.zddctl("switch", "backup").returncode == 0
    assert z.zddctl("switch", "main").returncode == 0
    assert z.zddctl("switch", "bogus target").returncode == 1
    agent_ask(lab.client, APP_V4)
    assert z.zddctl("switch", "off").returncode == 0
    assert agent_ask(lab.client, APP_V4) == "drain"
    wait_for(lambda: z.prop("ActiveTarget") == "off", 3, "the drain to end")
    assert z.zddctl("switch", "main").returncode == 0
    assert z.zddctl("switch", "off", "--force").returncode == 0
    lab.main.stop()
    wait_for(lambda: 'event=health target=main up=no reason="Connection refused"' in z.log(),
             1.5, "the health change to be logged")
    assert z.zddctl("switch", "main").returncode == 1
    lab.main.start()
    wait_for(lambda: "event=health target=main up=yes" in z.log(), 1.5, "main up again")
    lines = z.log().splitlines()
    bad = [ln for ln in lines if ln.startswith("level=") and not LOG_LINE.match(ln)]
    assert bad == []
    switches = [ln for ln in lines if " event=switch " in ln]
    pairs = [re.search(r"from=(\S+) to=(\S+)", ln).groups() for ln in switches]
    assert pairs == [("main", "backup"), ("backup", "main"), ("main", "off"), ("off", "main"),
                     ("main", "off")]
    for ln in switches:
        assert re.search(r" duration_usec=\d+ ", ln), ln
        assert ln.endswith('caller="uid=0"') or ' caller="uid=0" ' in ln, ln
    refused = [ln for ln in lines if "event=switch_refused" in ln]
    assert refused == ['level=info event=switch_refused to="bogus target" reason=invalid_target '
                       'caller="uid=0"',
                       'level=info event=switch_refused to=main reason=unhealthy caller="uid=0"']


def test_a_failed_kernel_read_counts_as_a_collection_error_not_a_failed_scrape(lab):
    # Slow probes, so that nothing but the scrape wants a descriptor while they are scarce.
    z = lab.start_zddd({"health": {"interval": 5, "timeout": 0.5}})
    scrape(lab)
    pid = z.proc.pid
    # The fewest seen over a while: the reconciler opens a socket for a moment four times a
    # second, and one counted here would leave room for the sock_diag socket after all.
    open_fds = min(len(list(Path(f"/proc/{pid}/fd").iterdir()))
                   for _ in range(50) if time.sleep(0.005) is None)
    # Room for the scrape's own connection only: the sock_diag socket cannot be opened.
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={open_fds + 1}:"], check=True)
    try:
        m = scrape(lab)
    finally:
        subprocess.run(["prlimit", f"--pid={pid}", "--nofile=4096:"], check=True)
    assert z.proc.poll() is None, "zddd died"
    assert m("zddd_collection_errors_total") == 1
    assert not any(name == "zddd_target_connections" for name, _ in m.samples)
    assert m("zddd_active_target", target="main") == 1  # the rest of the scrape is there
    assert m("zddd_flows_steered_total", target="main") == 0
    m = scrape(lab)
    assert m("zddd_collection_errors_total") == 1
    assert m("zddd_target_connections", target="main") == 0
    assert 'event=collection_failed what=connections error="[Errno 24] Too many open files"' \
        in z.log()
    assert z.zddctl("switch", "backup").returncode == 0
