"""Agent weights with real HAProxy 2.6 (SPEC "Weights, ramps and canaries"): in the health-port
usage with `[agent] weights = true`, main's weight N on one host makes its agent answer
`ready up N%`, and HAProxy gives that host N % of its normal share of requests, measured from
the client's side through the load balancer.

client --> lb (HAProxy :80, examples/haproxy/health-port.cfg) --> app1, app2 (nginx, zddd)
"""

from __future__ import annotations

import json
import sys

import pytest

import zdddlab

pytestmark = pytest.mark.e2e

OWN_PORT = 8081  # the health-port usage's own-port fix, as in test_haproxy.py

# New connections to the load balancer, one request each: who answered each.
REQUESTS = r"""
import http.client, json, sys
host, n = sys.argv[1], int(sys.argv[2])
seen = []
for _ in range(n):
    c = http.client.HTTPConnection(host, 80, timeout=5)
    c.request("GET", "/", headers={"Connection": "close"})
    seen.append(c.getresponse().read().decode().strip())
    c.close()
print(json.dumps(seen))
"""


@pytest.fixture
def weighted(need_root):
    lab = zdddlab.Lab(prefix="e2w")
    try:
        cluster = zdddlab.cluster(lab, "health-port", {"agent": {"weights": True}},
                                  own_port=OWN_PORT)
        yield lab, cluster
    finally:
        if "cluster" in locals():
            for app in cluster.apps.values():
                print(f"--- {app.name} zddd ---\n{app.zddd.log()[-3000:]}", file=sys.stderr)
            print(f"--- haproxy ---\n{cluster.haproxy.proc.log_text()[-3000:]}",
                  file=sys.stderr)
        lab.close()


def share_of_app1(lab, cluster, n: int) -> float:
    out = lab.exec(cluster.client, [zdddlab.PYTHON, "-c", REQUESTS, zdddlab.LB_CLIENT_ADDR,
                                    str(n)], timeout=120).stdout
    seen = json.loads(out)
    assert all(body in ("app1 main", "app2 main") for body in seen), set(seen)
    return seen.count("app1 main") / n


def test_a_hosts_share_follows_main_weight(weighted):
    lab, cluster = weighted
    app1 = cluster.apps["app1"]
    stat = cluster.haproxy.stat
    full = int(stat()["app1"]["weight"])
    assert full > 0 and int(stat()["app2"]["weight"]) == full
    shares = []
    # Back to 100 at the end: HAProxy keeps the last percentage it was given, so the agent
    # must say 100 % too (a bare "ready up" would leave app1 at 10 %).
    for n in (100, 50, 10, 100):
        app1.zddd.ctl("weights", f"main={n}")
        assert zdddlab.agent_ask(cluster.lb, app1.addr) == f"ready up {n}%"
        # HAProxy asks the agent every second: wait until the server's weight says N %.
        zdddlab.wait_for(lambda n=n: int(stat()["app1"]["weight"]) == round(full * n / 100),
                         10, f"HAProxy to give app1 {n} % of its weight "
                             f"(now {stat()['app1']['weight']} of {full})")
        # Round robin by weight: app1 gets n / (n + 100) of the requests.
        share = share_of_app1(lab, cluster, 300)
        expected = n / (n + 100)
        shares.append((n, round(share, 3)))
        assert abs(share - expected) <= 0.06, (n, share, expected)
        assert cluster.haproxy.servers()["app1"] == "UP"
    print(f"app1's share of requests by main weight (weight, share): {shares}")
