"""Security: the shipped D-Bus policy on a bus configured like the system bus, and listeners that
bind only where configured and answer nothing beyond their protocol.

Group `zddd` is not created on the host: the bus daemon runs in a private mount namespace where
a copy of /etc/group with a group `zddd` (an unused gid, member nobody) is bind-mounted over the
real one, so the shipped policy file is used unchanged. The caller runs as nobody with that gid
as supplementary group (the bus may learn groups from the socket or from the group database;
both say the same here)."""

from __future__ import annotations

import grp
import os
import subprocess
from pathlib import Path

import pytest
from zdddlab import APP_V4, BUS_CONFIG, POLICY, Bus, Proc, connect_error, wait_for

DEST = ("org.zddd.Steering1", "/org/zddd/Steering1")
MANAGER = "org.zddd.Steering1.Manager"
PROPS = "org.freedesktop.DBus.Properties"
NOBODY = 65534
METHODS = [
    ("Switch", "s", "backup"),
    ("SwitchWithOptions", "sa{sv}", "off", "1", "force", "b", "true"),
    ("WaitDrained", "st", "main", "0"),
    ("Reload",),
]


def _free_gid() -> int:
    gid = 64990
    while True:
        try:
            grp.getgrgid(gid)
        except KeyError:
            return gid
        gid -= 1


class GroupBus(Bus):
    """A Bus whose daemon sees a group `zddd` (gid `gid`, member nobody) that the host lacks."""

    def __init__(self, tmp: Path):
        self.dir = tmp
        self.socket = tmp / "bus"
        self.gid = _free_gid()
        group = tmp / "group"
        group.write_text(Path("/etc/group").read_text() + f"zddd:x:{self.gid}:nobody\n")
        config = tmp / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.socket, policy=POLICY))
        os.chmod(tmp, 0o755)
        os.chmod(group, 0o644)
        self.proc = Proc([
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$1" /etc/group && exec dbus-daemon --nofork --nosyslog '
            '--config-file="$2"', "sh", str(group), str(config)])
        wait_for(self.socket.exists, 10, "dbus-daemon socket")
        self.address = f"unix:path={self.socket}"


def as_user(uid: int, gid: int, groups: list[int], *argv: str) -> subprocess.CompletedProcess:
    ids = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
    ids += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return subprocess.run([*ids, *argv], capture_output=True, text=True, timeout=20)


def busctl_as(bus: Bus, groups: list[int], *args: str) -> subprocess.CompletedProcess:
    return as_user(NOBODY, NOBODY, groups, "busctl", f"--address={bus.address}", *args)


@pytest.fixture
def group_lab(public_lab):
    lab = public_lab
    lab.bus.close()
    bus_dir = lab.tmp / "groupbus"
    bus_dir.mkdir()
    lab.bus = GroupBus(bus_dir)
    lab.closers.append(lab.bus.close)
    return lab


def test_anyone_reads_and_introspects_but_only_group_zddd_calls(group_lab):
    lab = group_lab
    z = lab.start_zddd()
    stranger, member = [], [lab.bus.gid]
    for groups in (stranger, member):
        r = busctl_as(lab.bus, groups, "get-property", *DEST, MANAGER, "ActiveTarget")
        assert r.returncode == 0 and r.stdout.strip() == 's "main"', r
        r = busctl_as(lab.bus, groups, "call", *DEST, PROPS, "GetAll", "s", MANAGER)
        assert r.returncode == 0 and "ActiveTarget" in r.stdout, r
        r = busctl_as(lab.bus, groups, "introspect", *DEST)
        assert r.returncode == 0 and "SwitchWithOptions" in r.stdout, r
        r = busctl_as(lab.bus, groups, "call", *DEST, "org.freedesktop.DBus.Peer", "Ping")
        assert r.returncode == 0, r
        # Writing a property is nobody's business (they are read-only anyway).
        r = busctl_as(lab.bus, groups, "call", *DEST, PROPS, "Set", "ssv", MANAGER,
                      "ActiveTarget", "s", "off")
        assert r.returncode != 0
    for method in METHODS:
        r = busctl_as(lab.bus, stranger, "call", *DEST, MANAGER, *method)
        assert r.returncode != 0 and "Access denied" in r.stderr, (method, r.stderr)
    assert z.prop("ActiveTarget") == "main" and z.prop("Draining") == ""
    # A member of group zddd: every method goes through.
    for method in METHODS:
        r = busctl_as(lab.bus, member, "call", *DEST, MANAGER, *method)
        assert r.returncode == 0, (method, r.stderr)
    assert 'caller="uid=65534"' in z.log()
    # Neither may own the name.
    for groups in (stranger, member):
        r = busctl_as(lab.bus, groups, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                      "org.freedesktop.DBus", "RequestName", "su", "org.zddd.Steering1", "0")
        assert r.returncode != 0 and "denied" in r.stderr.lower(), r


# ---- listeners --------------------------------------------------------------------------------

def listening(lab) -> set[str]:
    """zddd's listening TCP sockets in the app namespace, as "addr:port"."""
    r = lab.app.run("ss", "-ltnpH")
    pid = str(lab.zddd.proc.pid)
    found = set()
    for line in r.stdout.splitlines():
        if f"pid={pid}," in line:
            found.add(line.split()[3])
    return found


@pytest.mark.parametrize("config, expected", [
    ({}, {"*:8889", "127.0.0.1:9488"}),
    ({"agent": {"listen": ""}}, {"127.0.0.1:9488"}),
    ({"agent": {"listen": f"{APP_V4}:7001"}, "metrics": {"listen": "[::1]:7002"}},
     {f"{APP_V4}:7001", "[::1]:7002"}),
    ({"agent": {"listen": "127.0.0.1:7001"}, "metrics": {"listen": ""}}, {"127.0.0.1:7001"}),
], ids=["defaults", "no-agent", "addresses", "no-metrics"])
def test_listeners_bind_only_where_configured(lab, config, expected):
    z = lab.start_zddd(config)
    wait_for(lambda: listening(lab) == expected, 5, f"listeners {expected}")
    # 8888 is steered by the kernel, not listened on by zddd (nor anything else).
    assert not any(addr.endswith(":8888") for addr in listening(lab))
    if "metrics" not in config:
        # The default metrics endpoint is loopback only: the client host cannot reach it.
        assert connect_error(lab.client, APP_V4, 9488)[0] == "ECONNREFUSED"
    assert z.proc.poll() is None


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "TRACE", "OPTIONS", "CONNECT"])
def test_metrics_answers_only_get(lab, method):
    lab.start_zddd()
    r = lab.app.run("curl", "-sS", "-i", "--max-time", "3", "-X", method,
                    "http://127.0.0.1:9488/metrics", check=False)
    status = r.stdout.split("\r\n", 1)[0]
    assert r.returncode == 0 and status.startswith("HTTP/"), r
    assert status.split()[1][0] in "45", status
    assert "zddd_" not in r.stdout
