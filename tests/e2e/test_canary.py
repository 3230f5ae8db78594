"""Canary deploys end to end: examples/ansible/rolling-deploy.yml with zddd_canary_steps, its
abort query asked of a real Prometheus (Debian's `prometheus`, started here in the load
balancer's namespace with a config of the test's own, scraping HAProxy's built-in exporter and
zddd's metrics on each app server every second), under steady client load through HAProxy in
the traffic-port usage (HAProxy sends to :8888, zddd splits each host's new connections).

A --check reports the steps and changes nothing. A good release (r2) is promoted through every
step on both hosts with no failed request. A release (r3) whose main vhost answers 500 to one
request in five (the test's nginx does so for a release holding the file `fail-one-in-five`) is
aborted at app1's first step: main's weight back to 0, r2 restored, the roll stopped naming
app1, the step and the query's value, app2 untouched; the failed requests the clients saw are
printed and bounded by the step's weight and length. In a health-port lab (`[agent] weights =
true`), a step of 20 % gives the host a fifth of HAProxy's normal weight and share.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

import zdddlab
from test_ansible import (HOSTS, ZDDD_CONFIG, answers, app_root, current, failed, playbook,
                          release, ssh_setup, start_sshd, switches_since, zddd_logs)

pytestmark = pytest.mark.e2e

PROMETHEUS = "/usr/bin/prometheus"
PROM_PORT = 9090
EXPORTER_PORT = 8405
METRICS_PORT = 9488
STEPS = [10, 50, 100]
STEP_SECONDS = 8
# Any 5xx HAProxy counted for the host's server within the last 20 s aborts the step.
ABORT_QUERY = ('sum by (server) (increase(haproxy_server_http_responses_total'
               '{proxy="app",server="{{ zddd_haproxy_server }}",code="5xx"}[20s])) > 0')

# A release holding this file answers 500 to one request in five on its main vhost (not on
# /healthz, so it passes zddd's probe and the rolling deploy's health wait: the canary is what
# must catch it).
FAILING_MAIN = """
split_clients "${request_id}" $zddd_test_one_in_five { 20% 1; * 0; }
"""
FAILING_LOCATION = """    location / {
        set $zddd_test_fail "";
        if (-f $document_root/fail-one-in-five) { set $zddd_test_fail $zddd_test_one_in_five; }
        if ($zddd_test_fail = 1) { return 500 "failing\\n"; }
        try_files $uri $uri/ =404;
    }"""

PROM_CONFIG = """global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: haproxy
    static_configs:
      - targets: ["127.0.0.1:{exporter}"]
  - job_name: zddd
    static_configs:
      - targets: [{zddd}]
"""


def start_nginx_failable(lab: zdddlab.Lab, name: str, ns, app_root_: Path) -> zdddlab.Proc:
    """The shipped vhosts, roots moved to the host's layout, main's `location /` answering 500
    to one request in five while the current release holds `fail-one-in-five`."""
    root = lab.tmp / f"{name}-nginx"
    (root / "temp").mkdir(parents=True)
    main = (zdddlab.REPO / "examples" / "nginx" / "main.conf").read_text()
    main = re.sub(r"    location / \{\n.*?\n    \}", lambda m: FAILING_LOCATION, main, flags=re.S)
    assert "fail-one-in-five" in main
    backup = (zdddlab.REPO / "examples" / "nginx" / "backup.conf").read_text()
    servers = FAILING_MAIN + (main + backup).replace("/srv/app/", f"{app_root_}/")
    conf = root / "nginx.conf"
    conf.write_text("user root;\n" + zdddlab.NGINX_CONF.format(root=root, workers=1,
                                                               servers=servers))
    proc = lab.spawn(f"{name}-nginx", ns, ["nginx", "-p", str(root), "-e",
                                           str(root / "error.log"), "-c", str(conf)])
    for port in (8080, 80):
        zdddlab.wait_for(lambda p=port: proc.check_alive() or zdddlab.port_open(lab, ns, p), 10,
                         f"{name}'s nginx on {port}")
    return proc


def canary_cluster(lab: zdddlab.Lab, usage: str = "traffic-port") -> zdddlab.Cluster:
    """test_ansible's fleet, zddd's metrics on each host's address (and, for the health-port
    usage, agent weights), HAProxy's exporter on the load balancer's loopback."""
    lb = lab.netns("lb")
    client = lab.netns("client")
    lab.bridge(lb, f"{zdddlab.LB_APP_ADDR}/24")
    lab.link(lb, "client", client, "eth0", cidr_a=f"{zdddlab.LB_CLIENT_ADDR}/24",
             cidr_b=f"{zdddlab.CLIENT_ADDR}/24")
    ssh_dir = ssh_setup(lab, zdddlab.APP_ADDRS)
    apps = {}
    for name, addr in zdddlab.APP_ADDRS.items():
        ns = lab.netns(name)
        lab.link(lb, name, ns, "eth0", cidr_b=f"{addr}/24", master_a="br0")
        root = app_root(lab, name)
        for vhost, page in (("main", f"{name} main r1"), ("backup", f"{name} backup")):
            release(root, vhost, "r1", page)
            (root / vhost / "current").symlink_to("releases/r1")
        nginx = start_nginx_failable(lab, name, ns, root)
        bus = lab.dbus_daemon(f"{name}-bus")
        config = {**ZDDD_CONFIG, "metrics": {"listen": f"{addr}:{METRICS_PORT}"}}
        if usage == "health-port":
            config["agent"] = {"listen": "[::]:8889", "weights": True}
        zddd = lab.zddd(f"{name}-zddd", ns, bus, config)
        start_sshd(lab, name, ns, addr, ssh_dir)
        apps[name] = zdddlab.AppServer(name, ns, addr, zddd, nginx)
    text = zdddlab.HAPROXY_CONFIGS[usage].read_text()
    text += (f"\nfrontend prometheus\n    bind 127.0.0.1:{EXPORTER_PORT}\n"
             "    http-request use-service prometheus-exporter if { path /metrics }\n")
    haproxy = lab.haproxy("haproxy", lb, text)
    zdddlab.wait_for(lambda: set(haproxy.servers().values()) == {"UP"}, 30,
                     "HAProxy to see every server UP")
    return zdddlab.Cluster(lb, client, apps, haproxy)


def start_prometheus(lab: zdddlab.Lab, c: zdddlab.Cluster) -> str:
    directory = lab.tmp / "prometheus"
    (directory / "data").mkdir(parents=True)
    conf = directory / "prometheus.yml"
    conf.write_text(PROM_CONFIG.format(
        exporter=EXPORTER_PORT,
        zddd=", ".join(f'"{a.addr}:{METRICS_PORT}"' for a in c.apps.values())))
    lab.exec(c.lb, ["promtool", "check", "config", str(conf)])
    lab.spawn("prometheus", c.lb, [
        PROMETHEUS, f"--config.file={conf}", f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{PROM_PORT}", "--storage.tsdb.retention.time=1h"])
    url = f"http://127.0.0.1:{PROM_PORT}"
    # Ready when every target was scraped and is up (HAProxy's exporter and both zddds).
    zdddlab.wait_for(lambda: query(lab, c, url, "count(up == 1)") == [str(1 + len(c.apps))],
                     30, "Prometheus to scrape HAProxy and both zddds")
    return url


def query(lab: zdddlab.Lab, c: zdddlab.Cluster, url: str, promql: str) -> list[str]:
    """The values of an instant query, asked from the load balancer's namespace ([] on any
    error, so it can be waited for)."""
    r = lab.exec(c.lb, ["curl", "-sS", "--max-time", "3",
                        f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})],
                 check=False)
    try:
        return [s["value"][1] for s in json.loads(r.stdout)["data"]["result"]]
    except (ValueError, KeyError, TypeError):
        return []


@pytest.fixture(scope="module")
def canary_fleet():
    if not shutil.which(PROMETHEUS) and not Path(PROMETHEUS).exists():
        pytest.fail(f"{PROMETHEUS} is missing: make setup installs Debian's prometheus")
    lab = zdddlab.Lab(prefix="can")
    try:
        c = canary_cluster(lab)
        url = start_prometheus(lab, c)
        yield lab, c, url
    finally:
        for proc in lab.procs:
            if proc.name in ("prometheus", "haproxy") or not proc.alive():
                print(f"--- {proc.name} ---\n{proc.log_text()[-2000:]}", file=sys.stderr)
        lab.close()


def canary_roll(lab, c, url, release_name: str):
    """The playbook with the canary under steady load: (result, records, t_start, t_end)."""
    load = lab.loadgen("load", c.client, c.url, workers=4, interval=0.02)
    try:
        time.sleep(0.5)
        started = time.monotonic()
        result = playbook(lab, c, "traffic-port", "-e", f"zddd_release={release_name}",
                          "-e", canary_vars(url), timeout=170)
        finished = time.monotonic()
        time.sleep(1.0)
    finally:
        records = load.finish()
    return result, records, started, finished


def canary_vars(url: str) -> str:
    return json.dumps({"zddd_canary_steps": STEPS, "zddd_canary_step_seconds": STEP_SECONDS,
                       "zddd_canary_query_interval": 1, "zddd_canary_prometheus_url": url,
                       "zddd_canary_abort_query": ABORT_QUERY, "zddd_main_up_wait": 10})


def test_check_mode_reports_the_canary_and_changes_nothing(canary_fleet):
    lab, c, url = canary_fleet
    for host in HOSTS:
        release(app_root(lab, host), "main", "r2", f"{host} main r2")
    marks = zddd_logs(c)

    result = playbook(lab, c, "traffic-port", "--check", "-e", "zddd_release=r2",
                      "-e", canary_vars(url))

    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for host in HOSTS:
        assert re.search(rf"{host}.*run a canary \(zddctl weights main=N, N in 10, 50, 100, "
                         rf"each held {STEP_SECONDS} s, aborted by a sample of", out, re.S), \
            out[-3000:]
        assert current(app_root(lab, host)) == "releases/r1"
        assert c.apps[host].zddd.status()["active_target"] == "main"
    assert not re.search(r"TASK \[zddd_rolling_deploy : Canary step \(.*main=", out), out[-3000:]
    assert switches_since(c, marks) == {host: [] for host in HOSTS}


def test_a_good_release_is_promoted_through_every_step(canary_fleet):
    lab, c, url = canary_fleet
    for host in HOSTS:
        release(app_root(lab, host), "main", "r2", f"{host} main r2")

    result, records, started, finished = canary_roll(lab, c, url, "r2")

    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert not failed(records), failed(records)[:5]
    for host in HOSTS:
        held = re.findall(rf"{host}: canary step main=(\d+)% held .* \(the abort query asked "
                          rf"(\d+) times, no sample\)", out)
        assert [int(s) for s, _ in held] == STEPS, (host, held, out[-3000:])
        assert all(int(n) >= STEP_SECONDS // 2 for _, n in held), held
        assert current(app_root(lab, host)) == "releases/r2"
        assert c.apps[host].zddd.status()["active_target"] == "main"
    seen = answers(records, started, finished)
    print(f"answers during the good canary: {dict(seen)}", file=sys.stderr)
    # During the steps both releases of a host answered (split), and backup too.
    for host in HOSTS:
        assert seen[f"{host} main r2"] > 0 and seen[f"{host} backup"] > 0, seen
    assert set(answers(records, finished)) == {"app1 main r2", "app2 main r2"}


def test_a_release_failing_one_request_in_five_is_aborted_at_the_first_step(canary_fleet):
    lab, c, url = canary_fleet
    for host in HOSTS:
        bad = release(app_root(lab, host), "main", "r3", f"{host} main r3")
        (bad / "fail-one-in-five").write_text("")

    marks = zddd_logs(c)
    result, records, started, finished = canary_roll(lab, c, url, "r3")

    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    failures = re.findall(r"fatal: \[app1\]: FAILED! => (.*)", out)
    assert failures, out[-3000:]
    msg = json.loads(failures[-1])["msg"]
    print(f"the roll stopped with: {msg}", file=sys.stderr)
    assert msg.startswith("app1: deploying r3 failed"), msg
    value = re.search(r"app1: canary step main=10% aborted: the abort query returned "
                      r"([0-9.e+-]+) \{server=\"app1\"\}", msg)
    assert value and float(value.group(1)) > 0, msg
    assert "rolled back to releases/r2" in msg, msg
    # Never past the first step; app2 never touched.
    assert not re.search(r"TASK \[zddd_rolling_deploy : Canary step \(.*main=50\]", out), \
        out[-3000:]
    assert switches_since(c, marks)["app2"] == [], switches_since(c, marks)
    assert current(app_root(lab, "app1")) == "releases/r2"
    assert current(app_root(lab, "app2")) == "releases/r2"
    for host in HOSTS:
        assert c.apps[host].zddd.status()["active_target"] == "main"
    # What the clients saw: every failure is r3's 500, and few.
    bad = failed(records)
    total = len([r for r in records if started <= r["t"] < finished])
    assert all(r["body"].startswith("HTTP 500") for r in bad), bad[:5]
    # app1 gets half of HAProxy's requests, its main 10 % of those, and r3 fails one in five:
    # over at most the step's length (the abort ends it early) that is 1 % of the requests of
    # STEP_SECONDS. Twice that, for the randomness of a small count and the abort's own time.
    rate = total / (finished - started)
    bound = 2 * rate * STEP_SECONDS * 0.5 * 0.10 * 0.2
    print(f"bad canary: {len(bad)} failed requests of {total} during the roll "
          f"({rate:.0f} req/s), bound {bound:.1f}", file=sys.stderr)
    assert 0 < len(bad) <= max(bound, 3), (len(bad), bound)
    assert set(answers(records, finished)) == {"app1 main r2", "app2 main r2"}


# ---- the health-port usage: the step's share is HAProxy's, through the agent ---------------

@pytest.fixture(scope="module")
def health_port_fleet():
    lab = zdddlab.Lab(prefix="canh")
    try:
        yield lab, canary_cluster(lab, "health-port")
    finally:
        lab.close()


def test_health_port_a_step_gives_the_host_its_weight_of_haproxys_share(health_port_fleet):
    """`[agent] weights = true`: at main=20 the agent answers `ready up 20%`, HAProxy's weight
    for app1 drops to a fifth of app2's, and the clients' answers follow it (timed canary, no
    query: app1 only, one step and 100). Needs the shipped health-port.cfg's `weight 100` on
    the main servers (branch weights): from HAProxy's default weight 1, 20 % is 0."""
    lab, c = health_port_fleet
    release(app_root(lab, "app1"), "main", "r2", "app1 main r2")
    weights: list[tuple[float, str]] = []
    stopping = threading.Event()

    def sample() -> None:
        while not stopping.is_set():
            try:
                weights.append((time.monotonic(), c.haproxy.stat()["app1"]["weight"]))
            except (OSError, KeyError):
                pass
            stopping.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    load = lab.loadgen("load", c.client, c.url, workers=4, interval=0.02)
    sampler.start()
    try:
        result = playbook(lab, c, "health-port", "-e", "zddd_release=r2", "-e", "zddd_hosts=app1",
                          "-e", json.dumps({"zddd_canary_steps": [20, 100],
                                            "zddd_canary_step_seconds": 8,
                                            "zddd_main_up_wait": 10}), timeout=120)
        time.sleep(1.0)
    finally:
        stopping.set()
        sampler.join()
        records = load.finish()
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "app1: canary step main=20% held 8 s (no abort query)" in out, out[-3000:]
    assert not failed(records), failed(records)[:5]
    full = weights[0][1]
    low = [t for t, w in weights if 0 < int(w) < int(full)]
    assert low, sorted(set(w for _, w in weights))
    print(f"HAProxy's weight for app1: {full} normally, "
          f"{sorted(set(w for _, w in weights if 0 < int(w) < int(full)))} during the step",
          file=sys.stderr)
    # The step's window as HAProxy had it (its weight reduced), less a second at each edge.
    seen = answers(records, low[0] + 1, low[-1] - 1)
    app1, app2 = seen["app1 main r2"], seen["app2 main r1"]
    share = app1 / (app1 + app2)
    print(f"health-port step main=20%: app1 served {app1}, app2 {app2}: app1's share "
          f"{100 * share:.1f} % (20 % of a normal share: {100 * 0.2 / 1.2:.1f} %)",
          file=sys.stderr)
    assert 0.08 < share < 0.27, (share, seen)
    assert current(app_root(lab, "app1")) == "releases/r2"
    assert c.apps["app1"].zddd.status()["active_target"] == "main"
