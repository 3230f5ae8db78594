"""Drains towards off, WaitDrained and `zddctl wait-drained` / `switch --wait-drained`, with real
TCP connections held open from the client namespace through the listen port."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time

import pytest

from zdddlab import (APP_V4, APP_V6, VENV_BIN, HeldConnection, SignalWatcher, agent_ask, http_get,
                 wait_for)
from zdddlab.bus import INTERFACE, OBJECT_PATH, bus_call, connect, dbus_classes

pytestmark = pytest.mark.backends

# Measured from the close: SPEC's 200 ms plus a margin for a loaded two-core test machine.
DRAINED_WITHIN = 0.4


@pytest.fixture
def signals(lab):
    watcher = SignalWatcher(lab.bus)
    try:
        yield watcher
    finally:
        watcher.close()


class PropertiesWatcher:
    """Every PropertiesChanged of zddd's Manager on the bus, in order: `changes` is a list of
    {property: value} dicts, one per signal (a connection of its own, in a thread)."""

    def __init__(self, address: str):
        self.changes: list[dict] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bus = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._watch(address),),
                                        daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "PropertiesChanged watcher did not subscribe"

    async def _watch(self, address: str) -> None:
        _, MessageType, _ = dbus_classes()
        self._loop = asyncio.get_running_loop()
        self._bus = await connect(address)
        rule = (f"type='signal',interface='org.freedesktop.DBus.Properties',"
                f"member='PropertiesChanged',path='{OBJECT_PATH}'")
        err, _ = await bus_call(self._bus, "AddMatch", "s", [rule],
                                interface="org.freedesktop.DBus",
                                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus")
        assert err is None, err

        def on(msg):
            if (msg.message_type == MessageType.SIGNAL and msg.member == "PropertiesChanged"
                    and msg.body[0] == INTERFACE):
                self.changes.append({k: v.value for k, v in msg.body[1].items()})

        self._bus.add_message_handler(on)
        self._ready.set()
        await self._bus.wait_for_disconnect()

    def states(self, active: str, draining: str) -> list[tuple[str, str]]:
        """(ActiveTarget, Draining) after each signal, from the given starting values."""
        out = []
        for change in list(self.changes):
            active = change.get("ActiveTarget", active)
            draining = change.get("Draining", draining)
            out.append((active, draining))
        return out

    def close(self) -> None:
        if self._loop is not None and self._bus is not None:
            self._loop.call_soon_threadsafe(self._bus.disconnect)
        self._thread.join(5)


def held(lab, port: int = 8888) -> HeldConnection:
    conn = HeldConnection(lab.client, APP_V4, port)
    lab.closers.append(conn.close)
    return conn


def saved(z) -> dict:
    return json.loads(z.state_path.read_text())


def draining(z) -> str:
    return z.prop("Draining")


def wait_connections(z, target: str, n: int) -> None:
    wait_for(lambda: z.prop("Connections").get(target) == n, 5,
             f"{n} connection(s) on {target}")


def start_zddctl(z, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "zddctl"), "--bus", z.bus.address, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished_at(proc: subprocess.Popen, timeout: float) -> float:
    """Wait for `proc` to exit, polling finely; the monotonic time it was seen gone."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "zddctl did not return"
        time.sleep(0.005)
    return time.monotonic()


# ---- WaitDrained and zddctl wait-drained ------------------------------------------------------

def test_wait_drained_returns_soon_after_the_last_connection_closes(lab):
    z = lab.start_zddd()
    conn = held(lab)
    wait_connections(z, "main", 1)
    proc = start_zddctl(z, "wait-drained", "main", "--timeout", "20")
    time.sleep(1.0)  # zddctl is up and waiting; it must not return while the connection lives
    assert proc.poll() is None, proc.communicate()
    closed = conn.close()
    done = finished_at(proc, 5)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "main is drained" in out
    latency = done - closed
    print(f"wait-drained latency from close: {latency * 1000:.0f} ms")
    assert latency < DRAINED_WITHIN


def test_wait_drained_dbus_true_false_and_zero(lab):
    z = lab.start_zddd()
    assert z.call("WaitDrained", "st", "main", 0) == (None, [True])
    conn = held(lab)
    wait_connections(z, "main", 1)
    assert z.call("WaitDrained", "st", "main", 0) == (None, [False])
    started = time.monotonic()
    assert z.call("WaitDrained", "st", "main", 300_000) == (None, [False])
    assert 0.3 <= time.monotonic() - started < 0.3 + DRAINED_WITHIN
    assert z.call("WaitDrained", "st", "backup", 0) == (None, [True])
    err, _ = z.call("WaitDrained", "st", "Main", 0)
    assert err == "org.zddd.Steering1.Error.InvalidTarget"
    r = z.zddctl("wait-drained", "Main", "--timeout", "1")
    assert r.returncode == 1 and "InvalidTarget" in r.stderr
    assert z.zddctl("wait-drained", "main", "--timeout", "-1").returncode == 2
    err, _ = z.call("WaitDrained", "st", "main", 24 * 3600 * 1_000_000 + 1)
    assert err == "org.zddd.Steering1.Error.InvalidArgument"
    conn.close()
    assert z.call("WaitDrained", "st", "main", 2_000_000) == (None, [True])


def zddctl_cost(z) -> float:
    """Seconds one zddctl call takes here and now (Python's start-up, the bus, the machine's
    load): what a bound on a zddctl timeout must allow for beyond the timeout itself."""
    started = time.monotonic()
    assert z.zddctl("status").returncode == 0
    return time.monotonic() - started


def test_wait_drained_timeout_exits_1_promptly_saying_so(lab):
    z = lab.start_zddd()
    held(lab)
    wait_connections(z, "main", 1)
    startup = zddctl_cost(z)
    started = time.monotonic()
    r = z.zddctl("wait-drained", "main", "--timeout", "0.5")
    elapsed = time.monotonic() - started
    assert r.returncode == 1
    assert "main" in r.stderr and "0.5 s" in r.stderr and "connection" in r.stderr
    assert elapsed < 0.5 + startup + 1.0  # the timeout plus what any zddctl call costs here


def test_wait_drained_names_a_pending_drain(lab):
    z = lab.start_zddd()
    assert agent_ask(lab.client, APP_V4) == "ready up"  # HAProxy polled: the drain waits
    assert z.zddctl("switch", "off").returncode == 0
    r = z.zddctl("wait-drained", "main", "--timeout", "0.3")
    assert r.returncode == 1
    assert "main is not drained after 0.3 s: its drain towards off is pending" in r.stderr


def test_direct_connections_to_the_vhost_count_too(lab):
    z = lab.start_zddd()
    via_listen = held(lab, 8888)
    direct = held(lab, 8080)
    via_listen_v6 = HeldConnection(lab.client, APP_V6, 8888)
    lab.closers.append(via_listen_v6.close)
    wait_connections(z, "main", 3)
    assert z.prop("Connections")["backup"] == 0
    via_listen.close()
    via_listen_v6.close()
    wait_connections(z, "main", 1)
    proc = start_zddctl(z, "wait-drained", "main", "--timeout", "20")
    time.sleep(0.5)
    assert proc.poll() is None
    closed = direct.close()
    assert finished_at(proc, 5) - closed < DRAINED_WITHIN
    assert proc.returncode == 0


# ---- drains towards off -----------------------------------------------------------------------

def test_drain_keeps_steering_while_a_connection_is_open_and_ends_when_it_closes(lab, signals):
    z = lab.start_zddd()
    conn = held(lab)
    wait_connections(z, "main", 1)
    r = z.zddctl("switch", "off")
    assert r.returncode == 0, r.stderr
    assert "draining main" in r.stdout
    # The drain runs: old target still steered, Draining names it, the agent says drain.
    assert draining(z) == "main"
    assert z.prop("ActiveTarget") == "main"
    assert z.steered_to() == "main"
    assert saved(z)["target"] == "off" and saved(z)["draining"] == "main"
    time.sleep(0.5)
    assert http_get(lab.client, APP_V4, 8888) == "main"  # a new connection still reaches main
    assert agent_ask(lab.client, APP_V4) == "drain"
    assert draining(z) == "main"
    assert signals.switched() == []

    closed = conn.close()
    wait_for(lambda: z.prop("ActiveTarget") == "off", 5, "the drain to end")
    print(f"drain ended {(time.monotonic() - closed) * 1000:.0f} ms after the close (upper bound)")
    assert time.monotonic() - closed < 1.0
    assert draining(z) == ""
    assert z.steered_to() == "off"
    assert agent_ask(lab.client, APP_V4) == "maint"
    wait_for(lambda: signals.switched(), 5, "the Switched signal")
    (old, new, usec), = signals.switched()
    assert (old, new) == ("main", "off") and usec > 0
    assert saved(z)["target"] == "off" and saved(z)["draining"] == ""
    line = [ln for ln in z.log().splitlines() if "event=switch " in ln][-1]
    assert "from=main to=off" in line and "drain=drained" in line and 'caller="uid=0"' in line
    with pytest.raises(ConnectionError):
        http_get(lab.client, APP_V4, 8888, timeout=2)


def test_drain_waits_for_a_drain_answer_when_haproxy_polls(lab):
    z = lab.start_zddd()
    assert agent_ask(lab.client, APP_V4) == "ready up"  # HAProxy polled: the rule applies
    assert z.zddctl("switch", "off").returncode == 0
    time.sleep(1.0)  # no connection at all, yet HAProxy has not been told "drain"
    assert draining(z) == "main"
    assert z.steered_to() == "main"
    assert agent_ask(lab.client, APP_V4) == "drain"
    wait_for(lambda: z.prop("ActiveTarget") == "off", 2, "the drain to end after the answer")
    assert agent_ask(lab.client, APP_V4) == "maint"


def test_drain_without_agent_polls_ends_at_once_when_nothing_is_open(lab):
    z = lab.start_zddd()
    started = time.monotonic()
    assert z.zddctl("switch", "off").returncode == 0
    wait_for(lambda: z.prop("ActiveTarget") == "off", 2, "the drain to end")
    assert time.monotonic() - started < 2.0
    assert z.steered_to() == "off"


def test_drain_timeout_turns_off_with_a_connection_still_open(lab, signals):
    z = lab.start_zddd({"drain_timeout": 1})
    held(lab)
    wait_connections(z, "main", 1)
    started = time.monotonic()
    assert z.zddctl("switch", "off").returncode == 0
    time.sleep(0.5)
    assert draining(z) == "main"
    wait_for(lambda: z.prop("ActiveTarget") == "off", 3, "the drain timeout")
    assert 1.0 <= time.monotonic() - started < 2.5
    assert draining(z) == ""
    assert z.steered_to() == "off"
    assert z.prop("Connections")["main"] == 1  # the established connection lives on
    wait_for(lambda: signals.switched(), 5, "the Switched signal")
    assert signals.switched()[0][:2] == ("main", "off")
    assert "drain=timeout" in z.log()


def test_a_later_switch_to_main_cancels_the_drain(lab, signals):
    z = lab.start_zddd()
    conn = held(lab)
    wait_connections(z, "main", 1)
    assert z.zddctl("switch", "off").returncode == 0
    assert draining(z) == "main"
    r = z.zddctl("switch", "main")
    assert r.returncode == 0, r.stderr
    assert draining(z) == ""
    assert z.prop("ActiveTarget") == "main"
    assert saved(z) == {"target": "main", "draining": "", "drain_deadline": 0.0,
                        "drain_answered": False, "drain_caller": "",
                        "last_switch_timestamp": 0, "last_switch_caller": ""}
    conn.close()
    time.sleep(0.5)  # a cancelled drain must not end in off once the connection is gone
    assert z.prop("ActiveTarget") == "main"
    assert z.steered_to() == "main"
    assert http_get(lab.client, APP_V4, 8888) == "main"
    assert agent_ask(lab.client, APP_V4) == "ready up"
    assert signals.switched() == []
    assert "event=drain_cancelled target=main" in z.log()


def test_a_later_switch_to_backup_cancels_the_drain(lab, signals):
    z = lab.start_zddd()
    held(lab)
    wait_connections(z, "main", 1)
    assert z.zddctl("switch", "off").returncode == 0
    assert z.zddctl("switch", "backup").returncode == 0
    assert draining(z) == ""
    assert z.prop("ActiveTarget") == "backup"
    assert http_get(lab.client, APP_V4, 8888) == "backup"
    wait_for(lambda: signals.switched(), 5, "the Switched signal")
    assert signals.switched()[0][:2] == ("main", "backup")


def test_force_skips_the_drain(lab, signals):
    z = lab.start_zddd()
    held(lab)
    wait_connections(z, "main", 1)
    r = z.zddctl("switch", "off", "--force")
    assert r.returncode == 0, r.stderr
    assert z.prop("ActiveTarget") == "off"
    assert draining(z) == ""
    assert z.steered_to() == "off"
    wait_for(lambda: signals.switched(), 5, "the Switched signal")
    assert signals.switched()[0][:2] == ("main", "off")


def test_switch_with_options_drain_timeout_usec(lab):
    from zddd.service.dbus import Variant

    z = lab.start_zddd()
    held(lab)
    wait_connections(z, "main", 1)
    started = time.monotonic()
    err, _ = z.call("SwitchWithOptions", "sa{sv}", "off",
                    {"drain_timeout_usec": Variant("t", 300_000)})
    assert err is None
    assert draining(z) == "main"
    wait_for(lambda: z.prop("ActiveTarget") == "off", 3, "the 300 ms drain timeout")
    assert 0.3 <= time.monotonic() - started < 1.5

    assert z.zddctl("switch", "main").returncode == 0
    err, _ = z.call("SwitchWithOptions", "sa{sv}", "off", {"drain_timeout_usec": Variant("t", 0)})
    assert err is None
    assert z.prop("ActiveTarget") == "off"  # 0: no drain at all, off on return
    assert draining(z) == ""

    for bad in ({"drain_timeout_usec": Variant("u", 5)}, {"drain_timeout": Variant("t", 5)},
                {"force": Variant("s", "yes")},
                {"drain_timeout_usec": Variant("t", 24 * 3600 * 1_000_000 + 1)}):
        err, _ = z.call("SwitchWithOptions", "sa{sv}", "off", bad)
        assert err == "org.zddd.Steering1.Error.InvalidArgument", bad


def test_kill_9_during_a_drain_then_restart_resumes_it(lab):
    z = lab.start_zddd()
    conn = held(lab)
    wait_connections(z, "main", 1)
    assert z.zddctl("switch", "off").returncode == 0
    assert draining(z) == "main"
    z.kill()  # SIGKILL: no chance to clean up anything
    assert z.steered_to() == "main"  # the data plane outlives the daemon
    assert saved(z)["draining"] == "main"
    z.start()
    assert draining(z) == "main"
    assert z.prop("ActiveTarget") == "main"
    assert "resumed_drain=main" in z.log()
    time.sleep(0.5)
    assert draining(z) == "main"  # still waiting for the connection that outlived the kill
    assert http_get(lab.client, APP_V4, 8888) == "main"
    conn.close()
    # HAProxy was never told "drain" before the kill, and it may poll any moment: the resumed
    # drain waits for that answer even though nothing is open any more.
    time.sleep(1.0)
    assert draining(z) == "main"
    assert agent_ask(lab.client, APP_V4) == "drain"
    wait_for(lambda: z.prop("ActiveTarget") == "off", 3, "the resumed drain to end")
    assert draining(z) == ""
    assert z.steered_to() == "off"
    assert saved(z)["target"] == "off" and saved(z)["draining"] == ""


def test_a_drain_answered_before_a_kill_needs_no_new_answer_after_restart(lab):
    z = lab.start_zddd()
    conn = held(lab)
    wait_connections(z, "main", 1)
    assert z.zddctl("switch", "off").returncode == 0
    assert agent_ask(lab.client, APP_V4) == "drain"
    wait_for(lambda: saved(z).get("drain_answered"), 3, "the answered drain to be saved")
    z.kill()
    z.start()
    assert draining(z) == "main"
    closed = conn.close()
    wait_for(lambda: z.prop("ActiveTarget") == "off", 3, "the resumed drain to end")
    assert time.monotonic() - closed < 1.0  # no wait for another agent poll


def test_restart_after_the_saved_drain_deadline_turns_off(lab):
    z = lab.start_zddd({"drain_timeout": 1})
    held(lab)
    wait_connections(z, "main", 1)
    assert z.zddctl("switch", "off").returncode == 0
    z.kill()
    time.sleep(1.2)  # the saved deadline passes while zddd is down
    z.start()
    wait_for(lambda: z.prop("ActiveTarget") == "off", 3, "the overdue drain to end")
    assert z.steered_to() == "off"


# ---- zddctl switch --wait-drained -------------------------------------------------------------

def test_switch_off_wait_drained_returns_after_the_drain(lab):
    z = lab.start_zddd()
    conn = held(lab)
    wait_connections(z, "main", 1)
    proc = start_zddctl(z, "switch", "off", "--wait-drained")
    wait_for(lambda: draining(z) == "main", 5, "the drain to start")
    time.sleep(0.5)
    assert proc.poll() is None
    closed = conn.close()
    done = finished_at(proc, 5)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "main is drained" in out
    assert z.prop("ActiveTarget") == "off"
    assert done - closed < DRAINED_WITHIN + 0.2  # the drain's end, then WaitDrained's poll


def test_switch_backup_wait_drained_times_out_with_exit_1(lab):
    z = lab.start_zddd()
    held(lab)
    wait_connections(z, "main", 1)
    startup = zddctl_cost(z)
    started = time.monotonic()
    r = z.zddctl("switch", "backup", "--wait-drained=0.5")
    assert time.monotonic() - started < 0.5 + startup + 1.0
    assert r.returncode == 1
    assert "switched to backup" in r.stdout
    assert "main still has 1 connection after 0.5 s" in r.stderr
    assert z.prop("ActiveTarget") == "backup"  # the switch itself happened


def test_switch_backup_wait_drained_returns_when_main_empties(lab):
    z = lab.start_zddd()
    conn = held(lab)
    wait_connections(z, "main", 1)
    proc = start_zddctl(z, "switch", "backup", "--wait-drained=20")
    wait_for(lambda: z.prop("ActiveTarget") == "backup", 5, "the switch")
    assert http_get(lab.client, APP_V4, 8888) == "backup"
    time.sleep(0.3)
    assert proc.poll() is None  # main still has the connection made before the switch
    closed = conn.close()
    done = finished_at(proc, 5)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["switched to backup", "main is drained"]
    assert done - closed < DRAINED_WITHIN


@pytest.mark.backends("nftables")  # the core's transitions; the backend does not matter
def test_observers_never_see_a_state_that_does_not_exist(lab):
    """PropertiesChanged shows one state per transition: a drain's end and a switch during a
    drain never show ActiveTarget=off (or the new target) while Draining still names one."""
    z = lab.start_zddd()
    watcher = PropertiesWatcher(z.bus.address)
    lab.closers.append(watcher.close)
    conn = held(lab)
    wait_connections(z, "main", 1)
    assert z.zddctl("switch", "off").returncode == 0  # a drain ...
    conn.close()
    wait_for(lambda: z.prop("ActiveTarget") == "off", 5, "the drain to end")  # ... that ends
    assert z.zddctl("switch", "main").returncode == 0
    held(lab)
    wait_connections(z, "main", 1)
    assert z.zddctl("switch", "off").returncode == 0
    assert z.zddctl("switch", "backup").returncode == 0  # a switch during a drain
    assert z.zddctl("switch", "off").returncode == 0
    assert z.zddctl("switch", "off", "--force").returncode == 0  # forced off during a drain
    wait_for(lambda: len(watcher.states("main", "")) >= 7, 5, "the PropertiesChanged signals")
    states = [s for s in watcher.states("main", "")]
    assert all(not draining or active == draining for active, draining in states), states
    assert states == [("main", "main"), ("off", ""), ("main", ""), ("main", "main"),
                      ("backup", ""), ("backup", "backup"), ("off", "")]
