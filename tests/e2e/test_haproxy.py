"""End to end with real HAProxy 2.6, nginx and zddd: the demo's topology, in both HAProxy usages,
with the shipped HAProxy configs (examples/haproxy/) and steady client traffic.

client --> lb (HAProxy :80) --> app1, app2 (nginx :8080 "<host> main", :80 "<host> backup",
zddd :8888 with its agent on :8889, one dbus-daemon each). The client sends a new connection
per request from its own namespace; every request's start time (CLOCK_MONOTONIC, shared by all
namespaces) and answer are recorded, so a test can ask who answered between two moments.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import pytest

import zdddlab

pytestmark = pytest.mark.e2e


# The own-port fix that examples/haproxy/health-port.cfg asks for on every app server: the main
# vhost also listens on a port only zddd steers to, so HAProxy's checks through 8888 and its
# direct traffic to 8080 never share a TCP tuple.
OWN_PORT = 8081


def start_cluster(usage: str):
    lab = zdddlab.Lab(prefix="e2e")
    try:
        # The health-port usage with the own-port fix, as examples/haproxy/health-port.cfg says.
        cluster = zdddlab.cluster(lab, usage,
                                  own_port=OWN_PORT if usage == "health-port" else None)
    except BaseException:
        lab.close()
        raise
    return lab, cluster


def running_cluster(usage: str):
    lab, cluster = start_cluster(usage)
    try:
        yield lab, cluster
    finally:
        dump_logs(lab, cluster)
        lab.close()


@pytest.fixture
def traffic_port(need_root):
    yield from running_cluster("traffic-port")


@pytest.fixture
def health_port(need_root):
    yield from running_cluster("health-port")


def dump_logs(lab: zdddlab.Lab, cluster: zdddlab.Cluster) -> None:
    """Shown by pytest only when the test failed."""
    for app in cluster.apps.values():
        print(f"--- {app.name} zddd ---\n{app.zddd.log()[-3000:]}", file=sys.stderr)
    print(f"--- haproxy ---\n{cluster.haproxy.proc.log_text()[-3000:]}", file=sys.stderr)


def answers(records: list[dict], start: float, end: float = float("inf")) -> Counter:
    """Answers of the requests sent in [start, end); failures count under "ERROR"."""
    return Counter(r["body"] if r["ok"] else "ERROR" for r in records if start <= r["t"] < end)


def errors(records: list[dict]) -> list[dict]:
    return [r for r in records if not r["ok"]]


def hold(seconds: float) -> tuple[float, float]:
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic()


def haproxy_state(cluster: zdddlab.Cluster, server: str, accept, timeout: float = 10) -> str:
    return zdddlab.wait_for(lambda: (lambda s: s if accept(s) else None)(
        cluster.haproxy.servers()[server]), timeout, f"HAProxy's {server} state")


def out_of_rotation(status: str) -> bool:
    return status.startswith("MAINT") or status.startswith("DOWN")


# ---- traffic port: HAProxy -> :8888 -------------------------------------------------------

def test_traffic_port_flip_main_backup_under_load(traffic_port):
    lab, c = traffic_port
    app1 = c.apps["app1"].zddd
    load = lab.loadgen("load", c.client, c.url, workers=4, interval=0.02)
    try:
        before = hold(1.5)
        app1.ctl("switch", "backup")
        on_backup = hold(2.0)
        app1.ctl("switch", "main")
        back = hold(1.5)
    finally:
        records = load.finish()

    assert not errors(records), errors(records)[:5]
    seen = answers(records, *before)
    assert seen["app1 main"] > 0 and seen["app2 main"] > 0, seen
    assert seen["app1 backup"] == 0, seen
    # Every request sent after the switch returned reached app1's backup vhost, none its main.
    seen = answers(records, *on_backup)
    assert seen["app1 backup"] >= 5 and seen["app1 main"] == 0, seen
    assert seen["app2 main"] >= 5, seen
    seen = answers(records, *back)
    assert seen["app1 main"] > 0 and seen["app1 backup"] == 0, seen
    # HAProxy was never involved: both servers stayed UP throughout.
    assert c.haproxy.servers() == {"app1": "UP", "app2": "UP"}


def test_traffic_port_off_drains_host_and_haproxy_moves_traffic(traffic_port):
    lab, c = traffic_port
    app2 = c.apps["app2"].zddd
    load = lab.loadgen("load", c.client, c.url, workers=4, interval=0.02)
    try:
        before = hold(1.5)
        started = time.monotonic()
        result = app2.ctl("switch", "off", "--wait-drained=30")
        drained = time.monotonic()
        status = app2.status()
        haproxy_state(c, "app2", out_of_rotation)
        off = hold(2.0)
        app2.ctl("switch", "main")
        haproxy_state(c, "app2", lambda s: s == "UP", timeout=15)
        back = hold(1.5)
    finally:
        records = load.finish()

    assert "main is drained" in result.stdout, result.stdout
    # The drain ended because HAProxy was told "drain" and the connections ended, well before
    # the 20 s drain_timeout (an idle pooled connection would have held it about 26 s).
    assert drained - started < 10, f"drain took {drained - started:.1f} s"
    assert status["active_target"] == "off" and status["draining"] == "", status
    assert status["targets"]["main"]["connections"] == 0, status
    assert not errors(records), errors(records)[:5]
    seen = answers(records, *before)
    assert seen["app1 main"] > 0 and seen["app2 main"] > 0, seen
    seen = answers(records, drained, off[1])
    assert seen["app1 main"] >= 5, seen
    assert seen["app2 main"] == 0 and seen["app2 backup"] == 0, seen
    seen = answers(records, *back)
    assert seen["app2 main"] > 0 and seen["app1 main"] > 0, seen


def test_deploy_script_keeps_traffic_flowing(traffic_port):
    """examples/deploy.sh on app1 under load: backup while the deploy command runs, main
    after, not one failed request."""
    lab, c = traffic_port
    app1 = c.apps["app1"]
    marks = lab.tmp / "deploy-marks"
    mark = f"{sys.executable} -c 'import time; print(time.monotonic())' >> {marks}"
    load = lab.loadgen("load", c.client, c.url, workers=4, interval=0.02)
    try:
        hold(1.0)
        result = lab.exec(app1.netns, ["env", f"ZDDD_BUS={app1.zddd.bus.address}",
                                       f"ZDDCTL={zdddlab.VENV_BIN / 'zddctl'}",
                                       str(zdddlab.EXAMPLES / "deploy.sh"),
                                       "sh", "-c", f"{mark}; sleep 2; {mark}"],
                          check=False, timeout=120)
        finished = time.monotonic()
        after = hold(1.5)
    finally:
        records = load.finish()

    assert result.returncode == 0, result.stdout + result.stderr
    assert "done: main serves the new release" in result.stdout, result.stdout
    deploy_start, deploy_end = (float(x) for x in marks.read_text().split())
    assert not errors(records), errors(records)[:5]
    seen = answers(records, deploy_start, deploy_end)
    assert seen["app1 backup"] >= 5 and seen["app1 main"] == 0, seen
    seen = answers(records, finished, after[1])
    assert seen["app1 main"] > 0 and seen["app1 backup"] == 0, seen
    assert app1.zddd.status()["active_target"] == "main"


# ---- health port: HAProxy -> :8080, check port 8888, agent 8889, backups on :80 ------------

def test_health_port_off_fails_over_to_backups_and_main_restores(health_port):
    lab, c = health_port
    app1, app2 = c.apps["app1"].zddd, c.apps["app2"].zddd
    load = lab.loadgen("load", c.client, c.url, workers=4, interval=0.02)
    try:
        before = hold(1.5)
        app1.ctl("switch", "off", "--wait-drained=30")
        app1_out = haproxy_state(c, "app1", out_of_rotation)
        # Both of HAProxy's signals say "out": the agent put the server in MAINT (HAProxy
        # suspends checks then), and the check's port, 8888, now refuses connections.
        agent_said = c.haproxy.stat()["app1"]["agent_status"]
        check_port_open = zdddlab.port_open(lab, c.lb, 8888, host=zdddlab.APP_ADDRS["app1"])
        app1_off = hold(1.5)
        app2.ctl("switch", "off", "--wait-drained=30")
        app2_out = haproxy_state(c, "app2", out_of_rotation)
        both_off = hold(2.0)
        app1.ctl("switch", "main")
        app2.ctl("switch", "main")
        for name in ("app1", "app2"):
            haproxy_state(c, name, lambda s: s == "UP", timeout=15)
        restored = hold(1.5)
    finally:
        records = load.finish()

    assert not errors(records), errors(records)[:5]
    assert app1.prop("Targets")["main"] == OWN_PORT
    assert out_of_rotation(app1_out) and out_of_rotation(app2_out), (app1_out, app2_out)
    # Only the agent ("maint") or an admin puts a server in MAINT; failed checks give DOWN.
    assert app1_out.startswith("MAINT"), (app1_out, agent_said)
    assert not check_port_open
    seen = answers(records, *before)
    assert set(seen) == {"app1 main", "app2 main"}, seen
    # One main server out: the other main server takes everything; backups stay idle.
    seen = answers(records, *app1_off)
    assert set(seen) == {"app2 main"} and seen["app2 main"] >= 5, seen
    # Every main server out: HAProxy fails over to the backup vhosts (option allbackups).
    seen = answers(records, *both_off)
    assert set(seen) == {"app1 backup", "app2 backup"}, seen
    seen = answers(records, *restored)
    assert set(seen) == {"app1 main", "app2 main"}, seen
