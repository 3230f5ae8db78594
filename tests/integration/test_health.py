"""Health probes of a real zddd against real vhosts: tcp, http:/path and none; switches to an
unhealthy target refused; probe connections never counted as the target's connections."""

from __future__ import annotations

import subprocess
import time

import pytest
from zdddlab import (APP_V4, APP_V6, CLIENT_V4, PYTHON, REPO, LabError, Vhost, http_get,
                     wait_for)

pytestmark = pytest.mark.backends

# interval 0.2 + timeout 0.5 (the lab's defaults) + margin
HEALTH_NOTICES_WITHIN = 1.5


def up(z) -> dict:
    return z.prop("TargetsUp")


def replace_vhost(lab, which: str, statuses: dict[str, int]) -> Vhost:
    old = getattr(lab, which)
    old.stop()
    vhost = Vhost(lab.app, old.port, which, statuses)
    lab.closers.append(vhost.stop)
    setattr(lab, which, vhost)
    return vhost


def test_a_dead_vhost_turns_down_and_a_switch_to_it_is_refused(lab):
    z = lab.start_zddd()
    assert up(z) == {"main": True, "backup": True}
    assert z.zddctl("switch", "backup").returncode == 0

    lab.main.stop()
    died = time.monotonic()
    wait_for(lambda: up(z)["main"] is False, HEALTH_NOTICES_WITHIN, "main to turn down")
    print(f"main seen down {(time.monotonic() - died) * 1000:.0f} ms after it died")
    r = z.zddctl("switch", "main")
    assert r.returncode == 1
    assert "TargetUnhealthy" in r.stderr and "main" in r.stderr
    assert "Connection refused" in r.stderr  # the probe's own reason
    assert z.prop("ActiveTarget") == "backup"
    assert z.steered_to() == "backup"
    assert http_get(lab.client, APP_V4, 8888) == "backup"
    assert 'event=switch_refused to=main reason=unhealthy caller="uid=0"' in z.log()
    st = z.zddctl("status", "--json")
    assert '"up": false' in st.stdout

    lab.main.start()
    wait_for(lambda: up(z)["main"] is True, HEALTH_NOTICES_WITHIN, "main to come back up")
    r = z.zddctl("switch", "main")
    assert r.returncode == 0, r.stderr
    assert http_get(lab.client, APP_V4, 8888) == "main"


def test_force_switches_to_an_unhealthy_target(lab):
    z = lab.start_zddd()
    lab.backup.stop()
    wait_for(lambda: up(z)["backup"] is False, HEALTH_NOTICES_WITHIN, "backup to turn down")
    assert z.zddctl("switch", "backup").returncode == 1
    r = z.zddctl("switch", "backup", "--force")
    assert r.returncode == 0, r.stderr
    assert z.prop("ActiveTarget") == "backup"
    assert z.steered_to() == "backup"


def test_http_health_needs_2xx_or_3xx_on_the_path(lab):
    replace_vhost(lab, "main", {"/health": 404})
    replace_vhost(lab, "backup", {"/health": 204, "/broken": 500})
    z = lab.start_zddd({"targets": {"main": {"health": "http:/health"},
                                    "backup": {"health": "http:/health"}}})
    # main answers its name with 200 on / but 404 on the probed path: down
    assert http_get(lab.client, APP_V4, 8080) == "main"
    assert up(z) == {"main": False, "backup": True}
    r = z.zddctl("switch", "backup")
    assert r.returncode == 0, r.stderr
    r = z.zddctl("switch", "main")
    assert r.returncode == 1 and "TargetUnhealthy" in r.stderr and "HTTP 404" in r.stderr

    # the same vhost, probed on a path answering 500: down after a reload
    z.config["targets"] = {"main": {"health": "http:/"}, "backup": {"health": "http:/broken"}}
    z.write_config()
    assert z.zddctl("reload").returncode == 0
    wait_for(lambda: up(z) == {"main": True, "backup": False}, HEALTH_NOTICES_WITHIN,
             "main up on /, backup down on /broken")


def test_health_none_is_always_up(lab):
    z = lab.start_zddd({"targets": {"backup": {"health": "none"}}})
    lab.backup.stop()
    lab.main.stop()
    wait_for(lambda: up(z)["main"] is False, HEALTH_NOTICES_WITHIN, "main to turn down")
    time.sleep(0.5)  # a few more rounds
    if z.backend == "sk_lookup":
        # No listener to hand connections to: down whatever the probe (the data plane's word).
        assert up(z)["backup"] is False
        assert z.zddctl("switch", "backup").returncode == 1
        return
    assert up(z)["backup"] is True
    r = z.zddctl("switch", "backup")
    assert r.returncode == 0, r.stderr
    assert z.prop("ActiveTarget") == "backup"


def test_probe_connections_are_never_counted(lab):
    # Probe as often as the config allows, with HTTP so each probe connection lives a while.
    z = lab.start_zddd({"targets": {"main": {"health": "http:/slow?s=0.01"},
                                    "backup": {"health": "http:/"}},
                        "health": {"interval": 0.01, "timeout": 0.5}})
    seen_by_ss = 0
    for _ in range(100):
        assert z.prop("Connections") == {"main": 0, "backup": 0}
        # the kernel does see the probes now and then: the exclusion is what hides them
        ss = lab.app.run("ss", "-Htn", "state", "established", "( sport = :8080 )").stdout
        seen_by_ss += bool(ss.strip())
    print(f"ss saw a probe connection in {seen_by_ss} of 100 samples")
    assert seen_by_ss > 0
    assert up(z) == {"main": True, "backup": True}


# ---- rise and fall, the Host header, the probed address (issue 18 item 9) ----------------------

# tests/httpd.py's dual-stack server, answering the statuses given in turn, then 200; one line
# per request: its number, the status, the Host header.
SCRIPTED_VHOST = r"""
import sys
from http.server import BaseHTTPRequestHandler
sys.path.insert(0, sys.argv[3])
from httpd import Server

answers = [int(a) for a in sys.argv[2].split(",")]
served = 0


class Scripted(BaseHTTPRequestHandler):
    def do_GET(self):
        global served
        status = answers[served] if served < len(answers) else 200
        served += 1
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
        print(served, status, self.headers.get("Host", ""), flush=True)

    def log_message(self, *args):
        pass


server = Server(("::", int(sys.argv[1])), Scripted)
print("ready", flush=True)
server.serve_forever()
"""


class ScriptedVhost:
    """An HTTP vhost in `ns` on `port` that answers its GETs with the statuses of `answers` in
    turn, then 200; `served()` is what it answered, with the Host header of each request."""

    def __init__(self, ns, port: int, answers: list[int]):
        self.proc = ns.popen(PYTHON, "-c", SCRIPTED_VHOST, str(port),
                             ",".join(map(str, answers)), str(REPO / "tests"),
                             stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise LabError(f"scripted vhost on port {port} did not start")

    def close(self) -> list[tuple[int, str]]:
        if self.proc.poll() is None:
            self.proc.kill()
        out, _ = self.proc.communicate(timeout=5)
        return [(int(status), host) for _, status, host in
                (line.split() for line in out.splitlines() if line.count(" ") == 2)]


def health_events(z, target: str) -> list[str]:
    return [line.split(" up=")[1].split()[0] for line in z.log().splitlines()
            if f"event=health target={target} " in line]


@pytest.mark.backends("nftables")
def test_a_flapping_vhost_is_down_only_after_fall_failures_and_up_after_rise_passes(lab):
    lab.main.stop()
    # The first probe decides (up); 2 failures stay up (fall 3); a pass starts the count again;
    # the 3rd failure in a row is down; 1 pass stays down (rise 2), a failure starts it again;
    # the 2nd pass in a row is up.
    answers = [200, 500, 500, 200, 500, 500, 500, 200, 500, 200, 200]
    vhost = ScriptedVhost(lab.app, 8080, answers)
    lab.closers.append(vhost.close)
    z = lab.start_zddd({"health": {"interval": 0.1, "timeout": 0.5, "rise": 2, "fall": 3},
                        "targets": {"main": {"health": "http:/health",
                                             "health_host": "main.example"}}})
    wait_for(lambda: health_events(z, "main") == ["no", "yes"], 15,
             "main down once and up once")
    time.sleep(0.5)  # passes go on: nothing more changes
    assert health_events(z, "main") == ["no", "yes"] and up(z)["main"] is True
    served = vhost.close()
    assert [status for status, _ in served[:len(answers)]] == answers
    assert {host for _, host in served} == {"main.example"}


@pytest.mark.backends("nftables")
def test_while_fall_is_not_reached_the_target_stays_up_and_switchable(lab):
    z = lab.start_zddd({"health": {"fall": 1000}})
    assert z.zddctl("switch", "backup").returncode == 0
    lab.main.stop()
    time.sleep(1.0)  # about 5 failed probes
    assert up(z)["main"] is True
    assert z.zddctl("switch", "main").returncode == 0
    assert health_events(z, "main") == []


@pytest.mark.backends("nftables")
def test_the_probed_address_can_be_another_hosts_and_ipv6(lab):
    """backup probed at the client namespace's address (a host of its own), main at the app's
    IPv6 address: each is up exactly when something answers there."""
    lab.backup.stop()
    remote = Vhost(lab.client, 80, "remote")
    lab.closers.append(remote.stop)
    z = lab.start_zddd({"targets": {"main": {"health": "http:/", "health_address": APP_V6},
                                    "backup": {"health": "http:/",
                                               "health_address": CLIENT_V4}}})
    # Nothing listens on the app's own port 80: only the configured address answers.
    assert up(z) == {"main": True, "backup": True}
    remote.stop()
    wait_for(lambda: up(z)["backup"] is False, HEALTH_NOTICES_WITHIN, "backup to turn down")
    r = z.zddctl("switch", "backup")
    assert r.returncode == 1 and "Connection refused" in r.stderr, r
    lab.main.stop()
    wait_for(lambda: up(z)["main"] is False, HEALTH_NOTICES_WITHIN, "main to turn down")
    lab.main.start()
    wait_for(lambda: up(z)["main"] is True, HEALTH_NOTICES_WITHIN, "main to come back")
