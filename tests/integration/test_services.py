"""Many services in one data plane, as clients see them: a switch of one service never touches
another's steering or flows, and a reload adds and removes services around established
connections of the others (issue #16; SPEC "Services")."""

import pytest
from zdddlab import APP_V4, KeepAlive, Vhost, connect_error, http_get, wait_for

pytestmark = pytest.mark.backends

WEB = {"listen_port": 8888, "targets": {"main": {"port": 8080}, "backup": {"port": 80}}}
API = {"listen_port": 9888, "targets": {"main": {"port": 9080}, "backup": {"port": 90}}}

# Runs in the client namespace until `stop` exists: one kept-alive connection to web asking
# again and again, and 10 MB transfers on new connections to web, one after another. Every
# answer must come from `expect`; prints the counts, exits 1 at the first wrong answer.
TRAFFIC = r"""
import http.client, os, sys
host, port, expect, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
size = 10_000_000
kept = http.client.HTTPConnection(host, port, timeout=10)
asked = transfers = 0
while not os.path.exists(stop):
    kept.request("GET", "/")
    got = kept.getresponse().read().decode().strip()
    if got != expect:
        sys.exit(f"kept-alive answer {got!r} after {asked}")
    asked += 1
    bulk = http.client.HTTPConnection(host, port, timeout=10)
    bulk.request("GET", f"/bytes?n={size}")
    body = bulk.getresponse().read()
    bulk.close()
    if len(body) != size + len(expect) + 1 or not body.endswith(expect.encode() + b"\n"):
        sys.exit(f"transfer of {len(body)} bytes ending {body[-20:]!r} after {transfers}")
    transfers += 1
print(asked, transfers)
"""


def api_vhosts(lab) -> None:
    for port, name in ((9080, "api-main"), (90, "api-backup")):
        vhost = Vhost(lab.app, port, name)
        lab.closers.append(vhost.stop)


def switch(z, service: str, target: str) -> None:
    r = z.zddctl("-s", service, "switch", target, "--force")
    assert r.returncode == 0, r.stderr


def test_fifty_switches_of_one_service_leave_the_other_untouched(lab):
    api_vhosts(lab)
    z = lab.start_zddd({"services": {"web": WEB, "api": API}})
    wait_for(lambda: http_get(lab.client, APP_V4, 9888) == "api-main", 10, "api to answer")
    stop = lab.tmp / "stop-traffic"
    traffic = lab.client.popen("/usr/bin/python3", "-c", TRAFFIC, APP_V4, "8888", "main",
                               str(stop), stdout=-1, stderr=-1, text=True)
    try:
        for i in range(50):
            target = "backup" if i % 2 == 0 else "main"
            switch(z, "api", target)
            assert http_get(lab.client, APP_V4, 9888) == f"api-{target}"
            assert traffic.poll() is None, traffic.communicate()
    finally:
        stop.write_text("")
        out, err = traffic.communicate(timeout=60)
    assert traffic.returncode == 0, err
    asked, transfers = map(int, out.split())
    assert asked >= 5 and transfers >= 5, out  # web was busy during the switches
    assert z.status()["services"]["web"]["active_target"] == "main"


def test_reload_adds_and_removes_a_service_around_established_connections(lab):
    api_vhosts(lab)
    z = lab.start_zddd({"services": {"web": WEB}})
    kept = KeepAlive(lab.client, APP_V4, 8888)
    lab.closers.append(kept.close)
    assert kept.get() == "main"
    switch(z, "web", "backup")  # new connections elsewhere; the kept one stays on main
    assert connect_error(lab.client, APP_V4, 9888)[0] == "ECONNREFUSED"

    z.config["services"] = {"web": WEB, "api": API}
    z.write_config()
    r = z.zddctl("reload")
    assert r.returncode == 0, r.stderr
    assert http_get(lab.client, APP_V4, 9888) == "api-main"  # added, at its initial
    assert kept.get() == "main" and http_get(lab.client, APP_V4, 8888) == "backup"

    z.config["services"] = {"web": WEB}
    z.write_config()
    r = z.zddctl("reload")
    assert r.returncode == 1 and "switch it off first" in r.stderr, r
    assert http_get(lab.client, APP_V4, 9888) == "api-main"  # refused: nothing changed
    switch(z, "api", "off")
    r = z.zddctl("reload")
    assert r.returncode == 0, r.stderr
    assert connect_error(lab.client, APP_V4, 9888)[0] == "ECONNREFUSED"
    assert kept.get() == "main" and http_get(lab.client, APP_V4, 8888) == "backup"
    assert set(z.status()["services"]) == {"web"}
