"""What zddctl says to a first-time user, against a real zddd (issue 8, first contact)."""

from __future__ import annotations

import json
import subprocess
import time

from zdddlab import APP_V4, VENV_BIN, HeldConnection, LabError, wait_for


def test_switch_off_while_off_says_already_off(lab):
    z = lab.start_zddd()
    r = z.zddctl("switch", "off", "--force")
    assert r.returncode == 0 and r.stdout == "switched to off\n", r
    for args in (("switch", "off"), ("switch", "off", "--wait-drained"),
                 ("switch", "off", "--wait-drained=5"), ("switch", "off", "--force")):
        r = z.zddctl(*args)
        assert (r.returncode, r.stdout, r.stderr) == (0, "already off: nothing to drain\n", ""), \
            (args, r)
    assert z.prop("ActiveTarget") == "off" and z.prop("Draining") == ""


def test_switch_off_from_main_still_says_what_it_drains(lab):
    z = lab.start_zddd()
    r = z.zddctl("switch", "off", "--wait-drained=10")
    assert r.returncode == 0, r
    assert r.stdout == "draining main towards off\nmain is drained\n", r.stdout


def test_non_ascii_target_is_a_clean_invalid_target(lab):
    z = lab.start_zddd()
    r = z.zddctl("switch", "été", "--wait-drained")
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr.startswith("zddctl: InvalidTarget: ") and "été" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert z.prop("ActiveTarget") == "main"


# ---- --json on every command, success and failure (SPEC "Operator commands") -----------------

def zddctl_json(z, *args: str, **kw):
    """zddctl with --json: (exit status, the one JSON object on stdout); stderr must be empty."""
    r = z.zddctl(*args, **kw)
    assert r.stderr == "" and len(r.stdout.splitlines()) >= 1, r
    return r.returncode, json.loads(r.stdout)


def test_status_json_carries_the_last_switch_as_zddd_has_it(lab):
    z = lab.start_zddd()
    assert zddctl_json(z, "--json", "switch", "backup")[0] == 0
    rc, st = zddctl_json(z, "status", "--json")
    assert rc == 0 and st["active_target"] == "backup"
    try:
        stamp, caller = z.prop("LastSwitchTimestamp"), z.prop("LastSwitchCaller")
    except LabError:  # a zddd without them: zddctl shows nothing
        stamp = caller = None
    assert (st["last_switch_timestamp_usec"], st["last_switch_caller"]) == (stamp, caller)
    if stamp is not None:
        assert abs(stamp / 1e6 - time.time()) < 60 and "uid=0" in caller, (stamp, caller)
    assert st["targets"]["main"]["connections"] == 0


def test_switch_json_success_and_refusals(lab):
    z = lab.start_zddd()
    assert zddctl_json(z, "switch", "backup", "--json") == (0, {
        "target": "backup", "previous": "main", "result": "switched", "drained": None})
    assert zddctl_json(z, "--json", "switch", "off", "--wait-drained=10") == (0, {
        "target": "off", "previous": "backup", "result": "draining", "drained": "backup"})
    assert zddctl_json(z, "--json", "switch", "off") == (0, {
        "target": "off", "previous": "off", "result": "already_off", "drained": None})
    rc, out = zddctl_json(z, "--json", "switch", "Main")
    assert rc == 1 and out["error"] == "org.zddd.Steering1.Error.InvalidTarget", out
    assert "Main" in out["message"]
    lab.main.stop()
    wait_for(lambda: not z.prop("TargetsUp")["main"], 10, "main's probe to fail")
    rc, out = zddctl_json(z, "--json", "switch", "main")
    assert rc == 1 and out["error"] == "org.zddd.Steering1.Error.TargetUnhealthy", out
    assert z.prop("ActiveTarget") == "off"


def test_wait_drained_json_success_and_timeout(lab):
    z = lab.start_zddd()
    assert zddctl_json(z, "wait-drained", "backup", "--json") == (
        0, {"target": "backup", "drained": True})
    held = HeldConnection(lab.client, APP_V4, 8888)
    try:
        rc, out = zddctl_json(z, "--json", "wait-drained", "main", "--timeout", "0.3")
    finally:
        held.close()
    assert rc == 1 and out == {"error": "timeout",
                               "message": "main still has 1 connection after 0.3 s"}, out


def test_reload_json_success_and_invalid_config(lab):
    z = lab.start_zddd()
    assert zddctl_json(z, "--json", "reload") == (0, {"reloaded": True})
    z.write_config(z.config_path.read_text() + "frobnicate = 1\n")
    rc, out = zddctl_json(z, "reload", "--json")
    assert rc == 1 and out["error"] == "org.zddd.Steering1.Error.InvalidConfig", out
    assert "frobnicate" in out["message"]


def test_usage_no_daemon_and_no_bus_are_json_errors(lab):
    z = lab.start_zddd()
    rc, out = zddctl_json(z, "--json", "switch")
    assert rc == 2 and out["error"] == "usage" and "TARGET" in out["message"], out
    rc, out = zddctl_json(z, "wait-drained", "main", "--timeout=-1", "--json")
    assert rc == 2 and out["error"] == "usage", out
    z.kill()
    for argv in (["status"], ["switch", "main"], ["wait-drained", "main"], ["reload"]):
        rc, out = zddctl_json(z, "--json", *argv)
        assert rc == 1 and out["error"] == "no_daemon" and "not running" in out["message"], \
            (argv, out)
    r = subprocess.run([str(VENV_BIN / "zddctl"), "--bus", f"unix:path={lab.tmp}/nope",
                        "status", "--json"], capture_output=True, text=True, timeout=20)
    assert (r.returncode, r.stderr) == (1, ""), r
    assert json.loads(r.stdout)["error"] == "no_bus"


def test_unprivileged_switch_is_the_bus_access_denied_in_json(public_lab):
    z = public_lab.start_zddd()
    rc, out = zddctl_json(z, "--json", "switch", "backup", user="nobody")
    assert rc == 1 and out["error"] == "org.freedesktop.DBus.Error.AccessDenied", out
    rc, st = zddctl_json(z, "--json", "status", user="nobody")
    assert rc == 0 and st["active_target"] == "main"
