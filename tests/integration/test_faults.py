"""Faults around zddd, and what wins:

- a corrupt state file at start: ignored with one warning line; the kernel's state wins when
  zddd's table is there, else `initial`; the file is then rewritten;
- a state file that cannot be read or written (a directory in its place): zddd refuses to start
  with one line naming the file (it could not save any switch), and leaves the kernel as it is;
- a save that fails (a full file system): the switch or drain is refused with BackendFailure,
  the kernel and the previous file stay as they were, no temporary file is left;
- SIGKILL at any point of a switch or a drain: the kernel holds one of the two states and the
  restarted zddd reports which;
- the kernel refusing zddd's batch (a table `inet zddd` owned by another process): start fails
  or the switch is refused with BackendFailure, traffic stays where it was, zddd keeps serving.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest
from zdddlab import (APP_V4, Bus, HeldConnection, NftMonitor, Zddd, connect_error, http_get,
                 wait_for, without_counters)

E = "org.zddd.Steering1.Error."


def serves(lab) -> str:
    """Where a fresh connection to 8888 goes: main, backup, or off (refused)."""
    try:
        return http_get(lab.client, APP_V4, 8888, timeout=2)
    except ConnectionError:
        what, _ = connect_error(lab.client, APP_V4, 8888)
        return "off" if what == "ECONNREFUSED" else f"?{what}"


def saved(z) -> dict:
    return json.loads(z.state_path.read_text())


def assert_consistent(lab, z) -> str:
    """What zddd reports (ActiveTarget, Draining, the state file) agrees with the kernel and with
    where a fresh connection goes; returns the active target. Read again when zddd's state
    changed during the reading (a resumed drain that ran out its deadline meanwhile)."""
    for _ in range(10):
        active, draining = z.prop("ActiveTarget"), z.prop("Draining")
        kernel, served, state = z.steered_to(), serves(lab), saved(z)
        if (z.prop("ActiveTarget"), z.prop("Draining")) == (active, draining):
            break
    assert kernel == active
    assert served == active
    if draining:
        assert draining == active and state["target"] == "off" and state["draining"] == active
    else:
        assert state["target"] == active and state.get("draining", "") == ""
    return active


def no_traceback(z) -> None:
    assert "Traceback" not in z.log(), z.log()[-3000:]


# ---- the state file ---------------------------------------------------------------------------

CORRUPT = [b"", b"{", b"\x00\xff\xfe", b'{"target": "Backup"}', b'{"target": 1}', b"[]",
           b'{"target": "off", "draining": "off"}']


@pytest.mark.parametrize("raw", CORRUPT, ids=lambda r: r.decode(errors="replace")[:20] or "empty")
def test_a_corrupt_state_file_at_start_gives_initial_with_a_warning(lab, raw):
    z = Zddd(lab.app, lab.bus, lab.tmp, {"initial": "backup"})
    lab.closers.append(z.close)
    z.state_path.write_bytes(raw)
    z.start()
    assert "event=state_file_ignored" in z.log() and "how=initial" in z.log(), z.log()
    assert assert_consistent(lab, z) == "backup"
    no_traceback(z)


def test_a_corrupt_state_file_at_start_loses_to_the_kernel(lab):
    z = lab.start_zddd()
    assert z.call("Switch", "s", "backup")[0] is None
    z.kill()
    z.state_path.write_bytes(b'{"target": "main", "draining": ')
    z.start()
    assert "event=state_file_ignored" in z.log() and "how=adopted" in z.log(), z.log()
    assert assert_consistent(lab, z) == "backup"
    no_traceback(z)


@pytest.mark.parametrize("with_table", [True, False], ids=["table", "no-table"])
def test_a_state_file_that_cannot_be_read_or_written_stops_the_start(lab, with_table):
    z = lab.start_zddd()
    assert z.call("Switch", "s", "backup")[0] is None
    z.kill()
    if not with_table:
        lab.app.run("nft", "delete", "table", "inet", "zddd")
    before = without_counters(z.nft())
    z.state_path.unlink()
    z.state_path.mkdir()  # a directory in its place: root cannot read or replace it either
    z.start(wait=False)
    assert z.proc.wait(timeout=15) == 1, z.log()
    last = z.log().strip().splitlines()[-1]
    assert "event=start_failed" in last and str(z.state_path) in last, last
    no_traceback(z)
    if with_table:
        assert without_counters(z.nft()) == before
        assert serves(lab) == "backup"


def test_a_start_that_cannot_save_leaves_no_table_behind(lab):
    z = Zddd(lab.app, lab.bus, lab.tmp)
    lab.closers.append(z.close)
    z.state_path.mkdir()
    z.start(wait=False)
    assert z.proc.wait(timeout=15) == 1, z.log()
    assert z.nft() == {}, "zddd programmed the kernel although it could not save the state"


class SmallFs:
    """A 16 KiB tmpfs on a directory of the test's own, unmounted on close (lazily, so a
    process still holding a file there cannot keep it)."""

    def __init__(self, where: Path):
        self.where = where
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0755", "zt-full",
                        str(where)], check=True)

    def fill(self) -> None:
        subprocess.run(["dd", "if=/dev/zero", f"of={self.where / 'filler'}", "bs=4k"],
                       capture_output=True)

    def free(self) -> None:
        (self.where / "filler").unlink(missing_ok=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.where)], capture_output=True)


def test_a_full_file_system_refuses_switches_and_drains_and_keeps_everything(lab):
    fs = SmallFs(lab.tmp / "full")
    lab.closers.append(fs.close)
    z = Zddd(lab.app, lab.bus, lab.tmp, {"state_file": str(fs.where / "state.json")})
    z.state_path = fs.where / "state.json"
    lab.closers.append(z.close)
    z.start()
    before, state_before = without_counters(z.nft()), z.state_path.read_bytes()
    fs.fill()
    for call in (("Switch", "s", "backup"), ("Switch", "s", "off")):
        started = time.monotonic()
        err, body = z.call(*call, timeout=10)
        assert err == E + "BackendFailure", (call, err, body)
        assert "No space left" in body[0] and str(z.state_path) in body[0], body
        assert time.monotonic() - started < 3
        assert without_counters(z.nft()) == before
        assert z.prop("ActiveTarget") == "main" and z.prop("Draining") == ""
        assert z.state_path.read_bytes() == state_before
        assert sorted(p.name for p in fs.where.iterdir()) == ["filler", "state.json"]
        assert serves(lab) == "main"
    fs.free()
    assert z.call("Switch", "s", "backup")[0] is None
    assert assert_consistent(lab, z) == "backup"
    no_traceback(z)


def test_no_file_zddd_writes_is_world_writable(lab):
    z = lab.start_zddd()
    for target in ("backup", "off", "main"):
        assert z.call("SwitchWithOptions", "sa{sv}", target, _force())[0] is None
    for path in [z.state_path, *z.state_path.parent.glob(".state.*")]:
        mode = path.stat().st_mode
        assert not mode & 0o022, (path, oct(mode))
    assert not list(z.state_path.parent.glob(".state.*")), "temporary state files left behind"


def _force():
    from zddd.service.dbus import Variant

    return {"force": Variant("b", True)}


# ---- SIGKILL in the middle ----------------------------------------------------------------------

SEED = random.randrange(1 << 30)


def test_sigkill_at_random_points_of_a_switch_leaves_one_state_that_zddd_reports(lab):
    rng = random.Random(SEED)
    print(f"seed {SEED}")
    z = lab.start_zddd()
    for i in range(8):
        old = z.prop("ActiveTarget")
        new = "backup" if old == "main" else "main"
        caller = subprocess.Popen(["busctl", f"--address={lab.bus.address}", "call",
                                   "org.zddd.Steering1", "/org/zddd/Steering1",
                                   "org.zddd.Steering1.Manager", "Switch", "s", new],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, 0.03))
        z.kill()
        caller.wait(timeout=10)
        kernel = z.steered_to()
        assert kernel in (old, new), (i, old, new, kernel)
        z.start()
        assert assert_consistent(lab, z) == kernel, i
    no_traceback(z)


def test_sigkill_at_random_points_of_a_drain_leaves_one_state_that_zddd_reports(lab):
    rng = random.Random(SEED)
    print(f"seed {SEED}")
    z = lab.start_zddd({"drain_timeout": 0.6, "agent": {"listen": ""}})
    for i in range(5):
        assert z.prop("ActiveTarget") == "main"
        held = HeldConnection(lab.client, APP_V4, 8888)  # keeps the drain going to its timeout
        caller = subprocess.Popen(["busctl", f"--address={lab.bus.address}", "call",
                                   "org.zddd.Steering1", "/org/zddd/Steering1",
                                   "org.zddd.Steering1.Manager", "Switch", "s", "off"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, 0.9))
        z.kill()
        caller.wait(timeout=10)
        kernel, state = z.steered_to(), saved(z)
        assert kernel in ("main", "off"), (i, kernel)
        z.start()
        active = assert_consistent(lab, z)
        # What the kernel had, unless a saved drain resumed and already ran out its deadline.
        assert active == kernel or (active == "off" and state["draining"] == kernel), (
            i, kernel, state, active)
        # A resumed drain runs to its saved deadline, then the steering goes.
        wait_for(lambda: z.prop("Draining") == "", 5, "the resumed drain to end")
        active = assert_consistent(lab, z)
        held.close()
        if active == "off":
            assert z.call("Switch", "s", "main")[0] is None
    no_traceback(z)


# ---- the kernel refusing zddd's batch -----------------------------------------------------------

class HostileTable:
    """`table inet zddd` created by another process with the owner flag (only that process may
    change or delete it) and objects zddd does not know: a chain and a set. The kernel deletes
    it when the process exits."""

    def __init__(self, ns):
        self.proc = ns.popen("nft", "-i", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        self.proc.stdin.write("add table inet zddd { flags owner; }\n"
                              "add chain inet zddd intruder\n"
                              "add set inet zddd blocked { type ipv4_addr; }\n")
        self.proc.stdin.flush()
        wait_for(lambda: "intruder" in ns.run("nft", "list", "table", "inet", "zddd",
                                               check=False).stdout, 5, "the hostile table")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)


def test_a_hostile_table_at_start_fails_the_start_and_is_left_alone(lab):
    hostile = HostileTable(lab.app)
    lab.closers.append(hostile.close)
    z = Zddd(lab.app, lab.bus, lab.tmp)
    lab.closers.append(z.close)
    before = without_counters(z.nft())
    z.start(wait=False)
    assert z.proc.wait(timeout=15) == 1, z.log()
    last = z.log().strip().splitlines()[-1]
    # nft 1.0.6 lists an owned table's flags as garbage, at times not JSON: either the read
    # or the write is refused, and zddd says which.
    assert "event=start_failed" in last and ("refused" in last or "cannot read" in last), last
    assert without_counters(z.nft()) == before
    assert not z.owns_name()
    no_traceback(z)


def test_a_hostile_table_while_running_gives_backend_failure_and_traffic_stays(lab):
    z = lab.start_zddd()
    lab.app.run("nft", "delete", "table", "inet", "zddd")
    hostile = HostileTable(lab.app)
    lab.closers.append(hostile.close)
    before = without_counters(z.nft())
    assert serves(lab) == "off"  # the intruder's table steers nothing
    err, body = z.call("Switch", "s", "backup", timeout=10)
    assert err == E + "BackendFailure", (err, body)
    assert "refused" in body[0]
    assert without_counters(z.nft()) == before
    assert serves(lab) == "off"
    assert saved(z)["target"] == "main", "the refused switch was left in the state file"
    assert z.proc.poll() is None and z.owns_name()
    no_traceback(z)
    # The intruder goes (its table with it): zddd restores its own steering by itself.
    hostile.close()
    wait_for(lambda: z.steered_to() == "main", 5, "zddd to repair its table")
    assert assert_consistent(lab, z) == "main"


def test_a_repair_the_kernel_refuses_is_not_retried_four_times_a_second(lab):
    z = lab.start_zddd()
    lab.app.run("nft", "delete", "table", "inet", "zddd")
    hostile = HostileTable(lab.app)
    lab.closers.append(hostile.close)
    time.sleep(3)
    failures = z.log().count("event=repair_failed")
    assert failures <= 3, f"{failures} repair_failed lines in 3 s"


def test_a_dormant_table_is_repaired(lab):
    """Debian 12's libnftables corrupts its heap when it lists a table with one flag as JSON
    (zddd once aborted here with "corrupted double-linked list"): zddd reads the flags over
    netlink and lists such a table object by object."""
    z = lab.start_zddd()
    for _ in range(5):
        lab.app.run("nft", "add", "table", "inet", "zddd", "{ flags dormant; }")
        wait_for(lambda: serves(lab) == "main", 3, "zddd to wake its table")
    assert z.proc.poll() is None and z.owns_name(), z.log()
    assert "table flags dormant" in z.log()
    assert z.call("Switch", "s", "backup")[0] is None and serves(lab) == "backup"
    no_traceback(z)


def test_another_dormant_table_is_left_alone(lab):
    """A dormant table of someone else's in the same family: zddd starts, steers and repairs
    beside it (its probe once listed every table, flags included), and never wakes it."""
    lab.app.run("nft", "add table inet other { flags dormant; }; "
                "add chain inet other input { type filter hook input priority 0; }")
    z = lab.start_zddd()
    assert z.call("Switch", "s", "backup")[0] is None and serves(lab) == "backup"
    lab.app.run("nft", "flush", "map", "inet", "zddd", "steer")
    wait_for(lambda: serves(lab) == "backup", 3, "zddd to repair its table")
    assert "flags dormant" in lab.app.run("nft", "list", "table", "inet", "other").stdout
    assert z.proc.poll() is None
    no_traceback(z)


# ---- one zddd per data plane ------------------------------------------------------------------

def test_a_second_zddd_on_another_bus_in_the_same_netns_refuses_to_start(lab):
    z = lab.start_zddd()
    assert z.call("Switch", "s", "backup")[0] is None
    before = without_counters(z.nft())
    monitor = NftMonitor(lab.app)
    lab.closers.append(monitor.close)
    other_dir = lab.tmp / "second"
    other_dir.mkdir()
    other_bus = Bus(other_dir)
    lab.closers.append(other_bus.close)
    second = Zddd(lab.app, other_bus, other_dir, {"initial": "main"})
    lab.closers.append(second.close)
    second.start(wait=False)
    try:
        rc = second.proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc not in (None, 0), f"the second zddd runs:\n{second.log()}"
    assert monitor.changes() == []
    assert without_counters(z.nft()) == before
    assert z.prop("ActiveTarget") == "backup" and serves(lab) == "backup"


# ---- listeners zddd was asked for ---------------------------------------------------------------

class Squatter:
    """A process in `ns` listening on `port` (all addresses), so zddd cannot bind there."""

    def __init__(self, ns, port: int):
        from zdddlab import PYTHON

        self.proc = ns.popen(PYTHON, "-c", (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_INET6)\n"
            "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
            f"s.bind(('::', {port})); s.listen()\n"
            "print('ready', flush=True); sys.stdin.read()\n"),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def close(self) -> None:
        self.proc.close()


def test_an_agent_port_in_use_at_start_fails_the_start_naming_it(lab):
    squatter = Squatter(lab.app, 8889)
    lab.closers.append(squatter.close)
    z = Zddd(lab.app, lab.bus, lab.tmp)
    lab.closers.append(z.close)
    z.start(wait=False)
    try:
        rc = z.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc not in (None, 0), f"zddd runs without its agent:\n{z.log()}"
    assert "agent" in z.log().strip().splitlines()[-1]


def test_a_reload_whose_agent_cannot_bind_fails_and_changes_nothing(lab):
    from zdddlab import agent_ask

    z = lab.start_zddd()
    squatter = Squatter(lab.app, 7009)
    lab.closers.append(squatter.close)
    z.config["agent"] = {"listen": "[::]:7009"}
    z.config["drain_timeout"] = 3
    z.write_config()
    err, body = z.call("Reload", timeout=10)
    assert err is not None, "Reload reported success with an agent that could not bind"
    assert "7009" in body[0] or "agent" in body[0]
    assert agent_ask(lab.app, "127.0.0.1", 8889) == "ready up"
    assert z.prop("DrainTimeoutUSec") == 10_000_000, "the rest of the new config was applied"
