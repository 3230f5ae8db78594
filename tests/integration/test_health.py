"""Health probes of a real zddd against real vhosts: tcp, http:/path and none; switches to an
unhealthy target refused; probe connections never counted as the target's connections."""

from __future__ import annotations

import time

import pytest
from zdddlab import APP_V4, Vhost, http_get, wait_for

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
