"""Weights and ramps through the daemon, on every backend (SPEC "Weights, ramps and canaries"):
a split seen by the client's new connections, established connections keeping their target
through weight changes, 0 and 100 as plain switches, refusals that change nothing, the metrics
and status, ramps (steps, Switched once, surviving kill -9, replaced by a switch, slow start)
and a drain from a split."""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time

import pytest
from zdddlab import (APP_V4, PYTHON, VENV_BIN, KeepAlive, SignalWatcher, scrape_metrics,
                     wait_for)

from zddd.service.dbus import Variant

pytestmark = pytest.mark.backends

E = "org.zddd.Steering1.Error."

# New connections from the client, one request each: the local port and who answered.
CONNECT = r"""
import http.client, json, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen = []
for _ in range(n):
    c = http.client.HTTPConnection(host, port, timeout=5)
    c.request("GET", "/", headers={"Connection": "close"})
    body = c.getresponse().read().decode().strip()
    seen.append([c.sock.getsockname()[1] if c.sock else 0, body])
    c.close()
print(json.dumps(seen))
"""


def new_connections(lab, n: int, port: int = 8888) -> list[str]:
    """Who answered each of `n` new connections from the client to the listen port."""
    out = lab.client.run(PYTHON, "-c", CONNECT, APP_V4, str(port), str(n), timeout=120).stdout
    return [body for _, body in json.loads(out)]


def steered(z) -> str | None:
    """Where the kernel steers new connections (the lab's reader, independent of zddd's code;
    nftables' split chains read "split_N": here all splits are "split")."""
    found = z.steered_to()
    return "split" if found and found.startswith("split") else found


def set_weights(z, main: int, backup: int, **options):
    opts = {k: Variant("b" if isinstance(v, bool) else "t", v) for k, v in options.items()}
    return z.call("SetWeights", "a{su}a{sv}", {"main": main, "backup": backup}, opts)


def flows(lab) -> dict[str, float]:
    m = scrape_metrics(lab.app)
    return {t: m.get(f'zddd_flows_steered_total{{service="default",target="{t}"}}', 0.0)
            for t in ("main", "backup")}


def weight_metrics(lab) -> dict[str, float]:
    m = scrape_metrics(lab.app)
    return {t: m[f'zddd_target_weight{{service="default",target="{t}"}}']
            for t in ("main", "backup")}


def keepalives_on_both(lab, limit: int = 40) -> dict[str, KeepAlive]:
    """One kept-alive connection through 8888 on each target (the split picks, so open them
    until both were picked; the others are closed)."""
    held: dict[str, KeepAlive] = {}
    for _ in range(limit):
        ka = KeepAlive(lab.client, APP_V4, 8888)
        lab.closers.append(ka.close)
        target = ka.get("/")
        if target in held:
            ka.close()
        else:
            held[target] = ka
        if len(held) == 2:
            return held
    raise AssertionError(f"{limit} connections at a split all went to {set(held)}")


class PropertyWatcher:
    """PropertiesChanged of the Manager, with the monotonic time each arrived (a child
    process subscribed with AddMatch, so blocking calls in the test never stall it)."""

    SCRIPT = r"""
import asyncio, json, sys, time
from zdddlab.bus import connect, bus_call, dbus_classes

async def main():
    _, MessageType, _ = dbus_classes()
    bus = await connect(sys.argv[1])
    await bus_call(bus, "AddMatch", "s",
                   ["type='signal',interface='org.freedesktop.DBus.Properties',"
                    "member='PropertiesChanged'"],
                   interface="org.freedesktop.DBus", destination="org.freedesktop.DBus",
                   path="/org/freedesktop/DBus")

    def on(msg):
        if msg.message_type == MessageType.SIGNAL and msg.member == "PropertiesChanged":
            changed = {k: v.value for k, v in msg.body[1].items()
                       if k in ("Weights", "ActiveTarget", "Ramp")}
            if changed:
                print(json.dumps([time.monotonic(), msg.path, changed]), flush=True)

    bus.add_message_handler(on)
    print("ready", flush=True)
    await bus.wait_for_disconnect()

asyncio.run(main())
"""

    def __init__(self, address: str):
        self.proc = subprocess.Popen([str(VENV_BIN / "python"), "-c", self.SCRIPT, address],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.seen: list[tuple[float, dict]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            t, path, changed = json.loads(line)
            if path == "/org/zddd/Steering1":
                self.seen.append((t, changed))

    def weights(self) -> list[tuple[float, dict]]:
        return [(t, c["Weights"]) for t, c in self.seen if "Weights" in c]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def watch(lab) -> tuple[SignalWatcher, PropertyWatcher]:
    switched = SignalWatcher(lab.bus)
    lab.closers.append(switched.close)
    props = PropertyWatcher(lab.bus.address)
    lab.closers.append(props.close)
    return switched, props


# ---- weights ---------------------------------------------------------------------------------

def test_a_20_80_split_is_what_new_connections_see_and_what_the_metrics_count(lab):
    z = lab.start_zddd()
    before = flows(lab)
    r = z.zddctl("weights", "main=20")
    assert r.returncode == 0, r.stderr
    assert z.prop("Weights") == {"main": 20, "backup": 80}
    assert z.prop("ActiveTarget") == "split"
    assert steered(z) == "split"
    n = 600
    seen = new_connections(lab, n)
    main = seen.count("main")
    assert main + seen.count("backup") == n, set(seen)
    # Binomial(600, 0.2): mean 120, sd 9.8; 70..170 is beyond 5 sd either side.
    assert 70 <= main <= 170, f"main served {main} of {n} at 20/80"
    after = flows(lab)
    # The kernel's count per target is the client's (a retransmitted SYN may count again
    # where the choice is made at each socket lookup: allow a few).
    assert 0 <= after["main"] - before["main"] - main <= 3, (before, after, main)
    assert 0 <= after["backup"] - before["backup"] - (n - main) <= 3, (before, after, main)
    assert weight_metrics(lab) == {"main": 20, "backup": 80}
    st = z.status()
    assert st["active_target"] == "split"
    assert st["services"]["default"]["weights"] == {"main": 20, "backup": 80}
    assert "weights:       main 20 %, backup 80 %" in z.zddctl("status").stdout


def test_established_connections_keep_their_target_through_weight_changes(lab):
    z = lab.start_zddd()
    assert set_weights(z, 50, 50)[0] is None
    held = keepalives_on_both(lab)
    for main in (100, 0, 10, 90, 30, 100):
        err, body = set_weights(z, main, 100 - main)
        assert err is None, body
        assert z.prop("Weights") == {"main": main, "backup": 100 - main}
        for target, ka in held.items():
            for _ in range(3):
                assert ka.get("/") == target, f"a {target} connection at {main}/{100 - main}"
    # And what is new follows the last weights.
    assert set(new_connections(lab, 10)) == {"main"}


def test_weights_0_and_100_are_switches(lab):
    z = lab.start_zddd()
    switched, _ = watch(lab)
    assert set_weights(z, 40, 60)[0] is None
    assert z.prop("ActiveTarget") == "split"
    assert set_weights(z, 0, 100)[0] is None
    assert z.prop("ActiveTarget") == "backup"
    assert steered(z) == "backup"
    assert set(new_connections(lab, 20)) == {"backup"}
    assert set_weights(z, 100, 0)[0] is None
    assert z.prop("ActiveTarget") == "main"
    assert steered(z) == "main"
    assert set(new_connections(lab, 20)) == {"main"}
    assert weight_metrics(lab) == {"main": 100, "backup": 0}
    # A split is a switch too (Switched names "split"); the same weights again change nothing.
    assert set_weights(z, 100, 0)[0] is None
    wait_for(lambda: len(switched.switched()) >= 3, 5, "three Switched signals")
    time.sleep(0.3)
    assert [tuple(s[:2]) for s in switched.switched()] == [
        ("main", "split"), ("split", "backup"), ("backup", "main")]
    # A plain switch from a split lands the same way.
    assert set_weights(z, 70, 30)[0] is None
    assert z.zddctl("switch", "backup").returncode == 0
    assert z.prop("Weights") == {"main": 0, "backup": 100}
    assert steered(z) == "backup"


@pytest.mark.parametrize("weights", [
    {"main": 50, "backup": 60}, {"main": 101, "backup": 0}, {"main": 100},
    {"main": 50, "backup": 50, "other": 0}, {"main": 0, "backup": 0}, {"Main": 100, "backup": 0},
])
def test_bad_weights_are_invalid_and_change_nothing(lab, weights):
    z = lab.start_zddd()
    assert set_weights(z, 30, 70)[0] is None
    plane = z.data_plane()
    err, body = z.call("SetWeights", "a{su}a{sv}", weights, {})
    assert err == E + "InvalidArgument", (err, body)
    assert z.prop("Weights") == {"main": 30, "backup": 70}
    assert z.data_plane() == plane
    # An unknown option, or one of the wrong type, too.
    for opts in ({"ramp": Variant("t", 1)}, {"force": Variant("s", "yes")}):
        err, _ = z.call("SetWeights", "a{su}a{sv}", {"main": 10, "backup": 90}, opts)
        assert err == E + "InvalidArgument", opts
    assert z.prop("Weights") == {"main": 30, "backup": 70}
    # zddctl refuses what cannot be before asking (usage, exit 2).
    for argv in (["main=120"], ["main=50", "backup=60"], ["other=5"]):
        r = z.zddctl("weights", *argv)
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
    assert z.data_plane() == plane


def test_a_weight_on_an_unhealthy_target_is_refused_unless_forced(lab):
    z = lab.start_zddd()
    lab.backup.stop()
    wait_for(lambda: scrape_metrics(lab.app).get(
        'zddd_target_up{service="default",target="backup"}') == 0, 10, "backup's probe to fail")
    plane = z.data_plane()
    err, body = set_weights(z, 90, 10)
    assert err == E + "TargetUnhealthy", (err, body)
    assert z.prop("Weights") == {"main": 100, "backup": 0}
    assert z.data_plane() == plane
    r = z.zddctl("weights", "main=90")
    assert r.returncode == 1 and "backup" in r.stderr, r.stderr
    # Weight 0 on the unhealthy one is fine: it gets nothing.
    assert set_weights(z, 100, 0)[0] is None
    r = z.zddctl("weights", "main=90", "--force")
    assert r.returncode == 0, r.stderr
    assert z.prop("Weights") == {"main": 90, "backup": 10}
    assert steered(z) == "split"


# ---- ramps -----------------------------------------------------------------------------------

def test_a_ramp_moves_the_weights_every_second_and_switches_once_at_its_end(lab):
    z = lab.start_zddd({"initial": "backup"})
    switched, props = watch(lab)
    started = time.monotonic()
    r = z.zddctl("switch", "main", "--ramp", "4")
    assert r.returncode == 0, r.stderr
    ramp = z.status()["services"]["default"]["ramp"]
    assert ramp and ramp["main_to"] == 100, ramp
    wait_for(lambda: z.prop("ActiveTarget") == "main", 10, "the ramp to end")
    ended = time.monotonic()
    assert 3.5 <= ended - started <= 6, ended - started
    wait_for(lambda: props.weights() and props.weights()[-1][1]["main"] == 100, 5,
             "PropertiesChanged with main's 100")
    wait_for(lambda: switched.switched(), 5, "Switched")
    time.sleep(0.3)
    steps = [(t, w["main"]) for t, w in props.weights() if t >= started]
    mains = [w for _, w in steps]
    assert mains == sorted(mains), mains  # only ever up
    assert mains[-1] == 100 and len(set(mains)) >= 4, mains
    times = [started] + [t for t, _ in steps]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) <= 1.5, gaps  # at least one step a second (with scheduling slack)
    assert [tuple(s[:2]) for s in switched.switched()] == [("backup", "main")]
    assert z.status()["services"]["default"]["ramp"] is None
    assert set(new_connections(lab, 10)) == {"main"}


def test_a_ramp_survives_kill_9_and_resumes_where_it_would_have_been(lab):
    z = lab.start_zddd({"initial": "backup"})
    seconds = 12.0
    r = z.zddctl("switch", "main", "--ramp", str(seconds))
    assert r.returncode == 0, r.stderr
    ramp = z.status()["services"]["default"]["ramp"]
    start = ramp["started_usec"] / 1e6
    assert (ramp["main_from"], ramp["main_to"], ramp["seconds"]) == (0, 100, seconds), ramp
    assert "ramp:          main 0 % \u2192 100 % over 12 s" in z.zddctl("status").stdout
    time.sleep(2)
    z.kill()
    # The data plane outlives the daemon: still split, at the weight it had.
    assert steered(z) == "split"
    time.sleep(2)
    z.start()
    weight = z.prop("Weights")["main"]
    expected = 100 * (time.time() - start) / seconds
    # Within a step of the schedule (a step a second is 100/12 points; it steps per point).
    assert abs(weight - expected) <= 100 / seconds, (weight, expected)
    assert z.prop("ActiveTarget") == "split"
    wait_for(lambda: z.prop("ActiveTarget") == "main", seconds + 5, "the resumed ramp to end")
    assert time.time() >= start + seconds - 0.5
    assert z.prop("Weights") == {"main": 100, "backup": 0}
    assert "resumed_ramp=100" in z.log()
    # The restart itself moved the kernel to the schedule: nothing for the reconciler to find.
    assert "drift_repaired" not in z.log()
    assert scrape_metrics(lab.app)["zddd_drift_repairs_total"] == 0


def test_a_switch_during_a_ramp_replaces_it(lab):
    z = lab.start_zddd({"initial": "backup"})
    switched, props = watch(lab)
    assert z.zddctl("switch", "main", "--ramp", "10").returncode == 0
    wait_for(lambda: 0 < z.prop("Weights")["main"], 5, "the ramp's first steps")
    r = z.zddctl("switch", "backup")
    assert r.returncode == 0, r.stderr
    assert z.prop("Weights") == {"main": 0, "backup": 100}
    assert z.status()["services"]["default"]["ramp"] is None
    changes = len(props.weights())
    time.sleep(2.5)
    assert z.prop("Weights") == {"main": 0, "backup": 100}
    assert len(props.weights()) == changes, props.weights()[changes:]
    assert steered(z) == "backup"
    # The replaced ramp never reached its end: one Switched, split -> backup.
    assert [tuple(s[:2]) for s in switched.switched()] == [("split", "backup")]
    # SetWeights replaces a ramp as well.
    assert z.zddctl("weights", "main=100", "--ramp", "10").returncode == 0
    wait_for(lambda: 0 < z.prop("Weights")["main"], 5, "the second ramp's first steps")
    assert set_weights(z, 25, 75)[0] is None
    time.sleep(1.5)
    assert z.prop("Weights") == {"main": 25, "backup": 75}


def test_switch_with_options_ramp_usec_is_a_slow_start(lab):
    z = lab.start_zddd({"initial": "backup"})
    switched, props = watch(lab)
    started = time.monotonic()
    err, body = z.call("SwitchWithOptions", "sa{sv}", "main",
                       {"ramp_usec": Variant("t", 3_000_000)})
    assert err is None, body
    # The call returns at once, the ramp still going, main's share small.
    assert time.monotonic() - started < 1.5
    assert z.prop("Weights")["main"] < 50
    wait_for(lambda: z.prop("ActiveTarget") == "main", 10, "the slow start to end")
    # The signal may come a moment after the property reads main.
    wait_for(lambda: props.weights() and props.weights()[-1][1]["main"] == 100, 5,
             "PropertiesChanged with main's 100")
    mains = [w["main"] for _, w in props.weights()]
    assert mains == sorted(mains) and mains[-1] == 100 and len(mains) >= 3, mains
    wait_for(lambda: switched.switched(), 5, "Switched")
    time.sleep(0.3)
    assert [tuple(s[:2]) for s in switched.switched()] == [("backup", "main")]
    # A ramp of off is refused: a switch to off drains.
    err, _ = z.call("SwitchWithOptions", "sa{sv}", "off", {"ramp_usec": Variant("t", 10)})
    assert err == E + "InvalidArgument"


# ---- off from a split ------------------------------------------------------------------------

def test_off_from_a_split_drains_both_targets(lab):
    z = lab.start_zddd({"drain_timeout": 30})
    switched, _ = watch(lab)
    assert set_weights(z, 50, 50)[0] is None
    held = keepalives_on_both(lab)
    r = z.zddctl("switch", "off")
    assert r.returncode == 0, r.stderr
    assert z.prop("Draining") != ""
    time.sleep(1)
    assert z.prop("ActiveTarget") == "split"  # the kernel still steers to both
    held["main"].close()
    time.sleep(1.5)
    # backup still has its connection: the drain goes on, new connections still split.
    assert z.prop("ActiveTarget") == "split" and z.prop("Draining") != ""
    assert held["backup"].get("/") == "backup"
    closed = time.monotonic()
    held["backup"].close()
    wait_for(lambda: z.prop("ActiveTarget") == "off", 10, "the drain to end")
    assert time.monotonic() - closed < 5
    assert z.prop("Draining") == ""
    assert z.prop("Weights") == {"main": 0, "backup": 0}
    assert steered(z) == "off"
    wait_for(lambda: len(switched.switched()) >= 2, 5, "Switched to off")
    assert tuple(switched.switched()[-1][:2]) == ("split", "off")


def test_a_ramp_that_gives_an_unhealthy_target_a_share_is_refused_unless_forced(lab):
    # From off, a ramp to main starts all on backup (main's weight from 0): backup gets a share
    # on the way, so it must pass its probe like any target given more than 0.
    z = lab.start_zddd({"initial": "off"})
    lab.backup.stop()
    wait_for(lambda: scrape_metrics(lab.app).get(
        'zddd_target_up{service="default",target="backup"}') == 0, 10, "backup's probe to fail")
    plane = z.data_plane()
    err, body = z.call("SwitchWithOptions", "sa{sv}", "main",
                       {"ramp_usec": Variant("t", 3_000_000)})
    assert err == E + "TargetUnhealthy", (err, body)
    assert z.prop("ActiveTarget") == "off" and z.data_plane() == plane
    r = z.zddctl("weights", "main=100", "--ramp", "3")
    assert r.returncode == 1 and "backup" in r.stderr, (r.stdout, r.stderr)
    assert z.prop("ActiveTarget") == "off" and z.data_plane() == plane
    # Straight to main gives backup nothing: no probe of backup needed.
    assert z.zddctl("switch", "main").returncode == 0
    assert z.prop("Weights") == {"main": 100, "backup": 0}


@pytest.mark.backends("nftables")  # its split chains name the weight: the kernel's, exactly
def test_a_resumed_slow_ramp_puts_its_weight_in_the_kernel_at_start(lab):
    # 200 s from 0 to 100: a point every 2 s. A restart 6 s in must give the kernel the
    # ramp's weight at once, not leave the weight of before the kill for the reconciler to
    # "repair" as drift.
    z = lab.start_zddd({"initial": "backup"})
    assert z.zddctl("switch", "main", "--ramp", "200").returncode == 0
    wait_for(lambda: z.prop("Weights")["main"] >= 1, 5, "the ramp's first point")
    z.kill()
    before = z.steered_to()
    time.sleep(5)
    z.start()
    weight = z.prop("Weights")["main"]
    assert weight >= 3, weight
    assert z.steered_to() == f"split_{weight}", (before, weight)
    time.sleep(1)
    assert "drift_repaired" not in z.log()
