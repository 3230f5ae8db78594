"""The tc and xdp backends driven directly (no daemon) in a namespace pair, on the real kernel.

The backend runs in the app namespace in a driver process (zdddlab.driver, one JSON command
per line), as zddd would. Pins go to a bpffs the test mounts in a temporary directory of the
host's mount namespace: `ip netns exec` gives each process a private mount namespace with its
own /sys, so a bpffs mounted from inside it would vanish with the process, while one mounted
outside is shared by every driver the test starts (a restarted zddd).
Namespaces, the mount and its pins go when the test ends, also on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zddd.kernel import bpf as kbpf
from zddd.backends.rewrite import pinned_active_port

from zdddlab import (APP_V4, APP_V6, CLIENT_V4, CLIENT_V6, PYTHON, REPO, KeepAlive, NetNS, Vhost,
                 connect_error, http_get, link)
from zdddlab.driver import DriverClient, DriverError

BACKENDS = ("tc", "xdp")
ZERO = struct.pack("=I", 0)
VENV_PYTHON = str(REPO / ".venv" / "bin" / "python")


class Driver(DriverClient):
    """A backend instance in its own process in `ns`, with the two calls these tests make most."""

    def __init__(self, ns: NetNS, backend: str, desired: dict):
        super().__init__(ns.popen, backend, desired)

    def read(self, **overrides):
        return self("read", desired=overrides)["state"]

    def sync(self, target="main", service=None, **overrides):
        by_service = {"service": service} if service else {}
        return self("switch", target=target, desired=overrides, **by_service)


class BpfLab:
    """Client and app namespaces joined by a veth; main (8080) and backup (80) vhosts in app;
    a private bpffs; drivers started with `driver()`."""

    def __init__(self, backend: str):
        self.backend = backend
        self.closers = []
        self.mount = f"/tmp/zt-bpf-{secrets.token_hex(4)}"
        os.makedirs(self.mount)
        self.closers.append(lambda: os.rmdir(self.mount))
        subprocess.run(["mount", "-t", "bpf", "bpf", self.mount], check=True)
        self.closers.append(lambda: subprocess.run(["umount", self.mount], check=True))
        self.client = self._own(NetNS("cli"))
        self.app = self._own(NetNS("app"))
        link(self.client, self.app, (CLIENT_V4, CLIENT_V6), (APP_V4, APP_V6))
        self.veth = next(d["ifname"] for d in json.loads(
            self.app.run("ip", "-j", "link", "show", "type", "veth").stdout))
        self.main = Vhost(self.app, 8080, "main")
        self.closers.append(self.main.stop)
        self.backup = Vhost(self.app, 80, "backup")
        self.closers.append(self.backup.stop)
        self.pin_dir = f"{self.mount}/zddd"
        self.desired = {"listen_port": 8888, "ports": [["backup", 80], ["main", 8080]],
                        "interfaces": None, "pin_dir": self.pin_dir,
                        "flow_entries": 4096, "xdp_mode": "native"}

    def _own(self, thing):
        self.closers.append(thing.close)
        return thing

    def driver(self, **overrides) -> Driver:
        return self._own(Driver(self.app, self.backend, {**self.desired, **overrides}))

    def get(self, host: str, port: int = 8888, ns: NetNS | None = None) -> str:
        return http_get(ns or self.client, host, port, timeout=3)

    def refused(self, host: str, port: int = 8888) -> bool:
        return connect_error(self.client, host, port)[0] == "ECONNREFUSED"

    def pins(self) -> list[str]:
        return sorted(str(p.relative_to(self.mount)) for p in Path(self.mount).rglob("*")
                      if not p.name.endswith(".debug"))

    def hooks(self) -> str:
        """Every BPF program attached in the app namespace (tc filters and XDP), as text."""
        out = []
        for dev in ("lo", self.veth):
            for direction in ("ingress", "egress"):
                r = self.app.run("tc", "filter", "show", "dev", dev, direction, check=False)
                out.append(r.stdout)
            out.append(self.app.run("ip", "link", "show", "dev", dev).stdout)
        return "".join(out)

    def close(self):
        for close in reversed(self.closers):
            try:
                close()
            except Exception as e:  # keep cleaning up
                print(f"cleanup: {e}", file=sys.stderr)


@pytest.fixture(params=BACKENDS)
def bpflab(request, need_root):
    lab = BpfLab(request.param)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def steering(bpflab):
    """A lab whose driver has built the data plane, steering to main."""
    driver = bpflab.driver()
    result = driver.sync("main")
    assert result["after"] == {"active": "main", "intact": True, "problems": []}, result
    return bpflab, driver


# ---- steering --------------------------------------------------------------------------------

def test_probe_build_and_steer_main_backup_off(bpflab):
    driver = bpflab.driver()
    compile_seconds = driver("probe")["seconds"]
    assert compile_seconds < 30
    assert driver.read() is None  # nothing of zddd's before the first build
    result = driver.sync("main")
    assert result["before"] is None
    assert result["steps"][0] == "build" and result["flip"]
    assert result["after"] == {"active": "main", "intact": True, "problems": []}
    for target, name in (("main", "main"), ("backup", "backup"), ("main", "main")):
        result = driver.sync(target)
        assert result["steps"] == []  # an intact layout: the switch is the flip alone
        for host in (APP_V4, APP_V6):
            assert bpflab.get(host) == name, (target, host)
        for host in ("127.0.0.1", "::1"):  # lo is an interface like any other
            assert bpflab.get(host, ns=bpflab.app) == name, (target, host)
        assert pinned_active_port(bpflab.pin_dir, bpflab.backend) == dict(
            bpflab.desired["ports"])[target]  # read from outside the namespace
    result = driver.sync(None)
    assert result["steps"] == [] and result["after"]["active"] is None
    assert pinned_active_port(bpflab.pin_dir, bpflab.backend) == 0
    for host in (APP_V4, APP_V6):
        assert bpflab.refused(host)
    with pytest.raises(ConnectionError):
        bpflab.get("127.0.0.1", ns=bpflab.app)
    # The vhosts themselves are untouched throughout.
    assert bpflab.get(APP_V4, 8080) == "main" and bpflab.get(APP_V6, 80) == "backup"
    counters = driver("flows")
    assert counters["steered"]["main"] >= 8 and counters["steered"]["backup"] >= 4
    used, capacity = counters["table"]
    assert capacity == 4096 and 1 <= used <= 4096


@pytest.mark.parametrize("mmapable", [True, False], ids=["mapped", "syscall"])
def test_active_slot_writes_every_value_whole(mmapable):
    """A switch is one store through a mapping of `active`; a map pinned by an older zddd
    (no BPF_F_MMAPABLE, kept across an upgrade) is written with BPF_MAP_UPDATE_ELEM."""
    flags = kbpf.BPF_F_MMAPABLE if mmapable else 0
    fd = kbpf.map_create(kbpf.BPF_MAP_TYPE_ARRAY, 4, 4, 1, flags)
    try:
        slot = kbpf.ActiveSlot(fd)
        assert slot.mapped is mmapable
        for value in (8080, 80, 0, 0xFFFFFFFF, 8888):
            slot.write(value)
            assert kbpf.map_lookup(fd, ZERO, 4) == struct.pack("=I", value)
        slot.close()
        slot.close()  # twice is harmless
    finally:
        os.close(fd)


@pytest.mark.parametrize("mmapable", [True, False], ids=["mapped", "syscall"])
def test_slot_writer_stores_each_service_in_its_own_element(mmapable, tmp_path):
    """The many-service `active` array: a store to one slot lands in that element (the
    kernel lays array elements out 8 bytes apart) and in no other."""
    from zddd.backends.pinned import ActiveWriter
    from zddd.backends.rewrite import MAX_SERVICES

    flags = kbpf.BPF_F_MMAPABLE if mmapable else 0
    fd = kbpf.map_create(kbpf.BPF_MAP_TYPE_ARRAY, 4, 4, MAX_SERVICES, flags)
    writer = ActiveWriter()
    try:
        writer.adopt(fd)
        for slot in range(MAX_SERVICES):
            writer.write("", slot + 1, slot)
        writer.write("", 0, 7)
        writer.write("", 101, MAX_SERVICES - 1)
        want = [0 if slot == 7 else 101 if slot == MAX_SERVICES - 1 else slot + 1
                for slot in range(MAX_SERVICES)]
        got = [struct.unpack("=I", kbpf.map_lookup(fd, struct.pack("=I", slot), 4))[0]
               for slot in range(MAX_SERVICES)]
        assert got == want
        assert [writer.read(slot) for slot in range(MAX_SERVICES)] == want
    finally:
        writer.forget()
        os.close(fd)


def test_a_hash_map_is_read_whole_in_one_batch(need_root):
    from zddd.backends.rewrite import BPF_MAP_TYPE_HASH, _entries

    fd = kbpf.map_create(BPF_MAP_TYPE_HASH, 4, 8, 256)
    try:
        assert _entries(fd, 4, 8, 256) == []
        want = {struct.pack("=I", 10000 + i): struct.pack("=IHH", i, 30000 + i, 20000 + i)
                for i in range(256)}
        for key, value in want.items():
            kbpf.map_update(fd, key, value)
        assert dict(_entries(fd, 4, 8, 256)) == want
    finally:
        os.close(fd)


def test_the_active_map_is_mapped(steering):
    bpflab, _ = steering
    fd = kbpf.obj_get(f"{bpflab.pin_dir}/{bpflab.backend}/active")
    try:
        assert kbpf.map_info(fd).flags & kbpf.BPF_F_MMAPABLE
    finally:
        os.close(fd)


def test_only_listed_interfaces_steer(bpflab):
    driver = bpflab.driver(interfaces=[bpflab.veth])
    driver.sync("backup")
    assert bpflab.get(APP_V4) == "backup"
    with pytest.raises(ConnectionError):  # lo is not configured: 8888 there is nobody's
        bpflab.get("127.0.0.1", ns=bpflab.app)
    assert "zddd" not in bpflab.app.run("tc", "filter", "show", "dev", "lo", "ingress").stdout


@pytest.fixture
def xdplab(need_root):
    lab = BpfLab("xdp")
    try:
        yield lab
    finally:
        lab.close()


def test_xdp_mode_generic_and_back_to_native(xdplab):
    bpflab = xdplab
    driver = bpflab.driver(xdp_mode="generic")
    driver.sync("main")
    assert "xdpgeneric" in bpflab.app.run("ip", "link", "show", "dev", bpflab.veth).stdout
    assert bpflab.get(APP_V4) == "main"
    state = driver.read(xdp_mode="native")
    assert state["problems"] == [f"xdp program on {bpflab.veth} in the wrong mode"]
    result = driver.sync("backup", xdp_mode="native")
    assert result["steps"] == ["attach"] and result["after"]["intact"], result
    shown = bpflab.app.run("ip", "link", "show", "dev", bpflab.veth).stdout
    assert "xdpgeneric" not in shown and "prog/xdp" in shown
    # lo stays generic whatever the mode says.
    assert "xdpgeneric" in bpflab.app.run("ip", "link", "show", "dev", "lo").stdout
    assert bpflab.get(APP_V6) == "backup"


def test_a_pin_dir_that_needs_a_private_bpffs_is_refused(bpflab, tmp_path):
    """A pin dir on no bpffs would need one mounted in the driver's private mount namespace
    (from `ip netns exec`), which goes with it, and the pins with it: refused before anything
    is built or attached."""
    plain = tmp_path / "pins"
    driver = bpflab.driver(pin_dir=str(plain))
    with pytest.raises(DriverError) as e:
        driver.sync("backup")
    assert "BackendUnavailable" in str(e.value) and "bpf_pin_dir" in str(e.value), e.value
    assert not plain.exists() and "zddd" not in bpflab.hooks()
    assert bpflab.refused(APP_V4)


def test_pins_of_a_namespace_that_is_gone_are_taken_over(bpflab):
    """A pin dir stamped by a network namespace that no longer exists is no conflict: its zddd
    is gone and its programs went with the namespace. This one stamps the directory as its
    own and attaches the pinned programs, without a rebuild."""
    gone = NetNS("gone")
    try:
        first = Driver(gone, bpflab.backend, bpflab.desired)
        try:
            assert first.sync("backup")["after"]["intact"]
        finally:
            first.close()
    finally:
        gone.close()
    driver = bpflab.driver()
    assert "pin directory not stamped with this network namespace" in driver.read()["problems"]
    result = driver.sync("main")
    assert result["after"]["intact"], result
    assert "claim" in result["steps"] and "build" not in result["steps"], result
    assert bpflab.get(APP_V4) == "main"


def test_missing_interface_fails_before_any_change(bpflab):
    driver = bpflab.driver(interfaces=["lo", "zt-nonexistent"])
    with pytest.raises(DriverError) as e:
        driver.sync("main")
    assert "zt-nonexistent" in str(e.value) and e.value.changed is False
    assert bpflab.pins() == [] and "zddd" not in bpflab.hooks()


def test_other_traffic_untouched(steering):
    bpflab, driver = steering
    # UDP to the listen port reaches whoever listens there, unchanged.
    udp = bpflab.app.popen(PYTHON, "-c", UDP_ECHO, stdout=subprocess.PIPE, text=True)
    assert udp.stdout.readline().strip() == "ready"
    for host in (APP_V4, APP_V6):
        assert _udp_ask(bpflab.client, host, 8888) == "udp 8888"
    # TCP to another port, and straight to the vhosts, is answered as if zddd were not there.
    other = Vhost(bpflab.app, 9999, "other")
    try:
        assert bpflab.get(APP_V4, 9999) == "other" and bpflab.get(APP_V6, 9999) == "other"
    finally:
        other.stop()
    for port, name in ((8080, "main"), (80, "backup")):
        for host in (APP_V4, APP_V6):
            assert bpflab.get(host, port) == name
    # A client port used for a steered flow, then straight to the vhost: replies keep 8080.
    for host in (APP_V4, APP_V6):
        assert _fixed_port_get(bpflab.client, host, 8888, 40123) == "main"
        assert _fixed_port_get(bpflab.client, host, 8080, 40123) == "main"
        assert _fixed_port_get(bpflab.client, host, 80, 40123) == "backup"


def test_routed_traffic_is_not_steered(steering):
    """With forwarding on, a connection to port 8888 of a host behind the app server passes
    through it untouched; the app server's own 8888 is still steered."""
    bpflab, driver = steering
    far = bpflab._own(NetNS("far"))
    link(bpflab.app, far, ("203.0.113.1", "2001:db8:1::1"), ("203.0.113.2", "2001:db8:1::2"))
    bpflab.app.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    bpflab.client.run("ip", "route", "add", "203.0.113.0/24", "via", APP_V4)
    bpflab.client.run("ip", "-6", "route", "add", "2001:db8:1::/64", "via", APP_V6)
    far.run("ip", "route", "add", "198.51.100.0/24", "via", "203.0.113.1")
    far.run("ip", "-6", "route", "add", "2001:db8::/64", "via", "2001:db8:1::1")
    far_vhost = Vhost(far, 8888, "far")
    try:
        driver.sync("main")  # the new veth gets the programs too
        assert "veth" not in " ".join(driver.read()["problems"])
        for host in ("203.0.113.2", "2001:db8:1::2"):
            assert bpflab.get(host) == "far"
        for host in (APP_V4, APP_V6):
            assert bpflab.get(host) == "main"
    finally:
        far_vhost.stop()


def test_reused_client_port_follows_the_switch(steering):
    bpflab, driver = steering
    for host in (APP_V4, APP_V6):
        driver.sync("main")
        assert _fixed_port_get(bpflab.client, host, 8888, 40200) == "main"
        driver.sync("backup")
        assert _fixed_port_get(bpflab.client, host, 8888, 40200) == "backup"
        driver.sync(None)
        assert _fixed_port_get(bpflab.client, host, 8888, 40200) == "ECONNREFUSED"
        driver.sync("main")
        assert _fixed_port_get(bpflab.client, host, 8888, 40200) == "main"


def test_retransmitted_syn_keeps_its_target(steering):
    """The first SYN's SYN-ACK is lost; the target is switched; the client's retransmitted SYN
    (same sequence number) still reaches the target the first SYN chose, counted once."""
    bpflab, driver = steering
    before = driver("flows")["steered"]
    bpflab.client.run("nft", "add table inet zt; add chain inet zt in { type filter hook input "
                      "priority 0; }; add rule inet zt in tcp sport 8888 tcp flags syn,ack drop")
    # (the client's own namespace: nothing of the host's or zddd's)
    script = ("import sys, urllib.request; print(urllib.request.urlopen("
              f"'http://{APP_V4}:8888/', timeout=10).read().decode().strip())")
    client = bpflab.client.popen(PYTHON, "-c", script, stdout=subprocess.PIPE, text=True)
    wait_for_steered(driver, "main", before["main"] + 1)  # the first SYN, SYN-ACK dropped
    driver.sync("backup")
    bpflab.client.run("nft", "delete", "table", "inet", "zt")
    out, _ = client.communicate(timeout=15)  # after the SYN retransmission (about 1 s)
    assert out.strip() == "main"
    after = driver("flows")["steered"]
    assert after == {"main": before["main"] + 1, "backup": before["backup"]}, after
    assert bpflab.get(APP_V4) == "backup"


def wait_for_steered(driver: Driver, target: str, count: int) -> None:
    deadline = time.monotonic() + 5
    while driver("flows")["steered"][target] < count:
        assert time.monotonic() < deadline, f"no SYN steered to {target}"
        time.sleep(0.02)


# ---- established flows -----------------------------------------------------------------------

def test_thousand_connections_survive_fifty_switches(steering):
    bpflab, driver = steering
    holder = bpflab.client.popen(PYTHON, "-c", HOLDER, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)

    def holder_ask(line: str):
        holder.stdin.write(line + "\n")
        holder.stdin.flush()
        return json.loads(holder.stdout.readline())

    cycle = ["main", "backup", None]
    sequence = [cycle[i % 3] for i in range(1, 51)]  # 50 switches, off every third
    per_switch = -(-1000 // sum(1 for t in sequence if t))
    opened = 0
    for i, target in enumerate(sequence):
        result = driver.sync(target)
        assert result["steps"] == []
        host = (APP_V4, APP_V6)[i % 2]
        if target is None:
            assert holder_ask(f"open {host} 1") == ["refused"]
            continue
        names = holder_ask(f"open {host} {per_switch}")
        assert names == [target] * per_switch, (i, target, names[:5])
        opened += per_switch
    assert opened >= 1000
    report = holder_ask("check")
    assert report == {"total": opened, "broken": 0, "moved": 0}, report
    holder.kill()


def test_bulk_transfers_intact_while_switching(bpflab):
    """10 MB each way per connection, through the listen port, while the target flips every
    few ms: checksums (offloaded, GSO/GRO on veth) and flows must survive."""
    driver = bpflab.driver(ports=[["backup", 9081], ["main", 9080]])
    servers = [bpflab.app.popen(PYTHON, "-c", BULK_SERVER, str(port), name,
                                stdout=subprocess.PIPE, text=True)
               for port, name in ((9080, "main"), (9081, "backup"))]
    for s in servers:
        assert s.stdout.readline().strip() == "ready"
    driver.sync("main")
    clients = [(ns, ns.popen(PYTHON, "-c", BULK_CLIENT, host, "8888", str(10 << 20),
                             stdout=subprocess.PIPE, text=True))
               for ns, host in ((bpflab.client, APP_V4), (bpflab.client, APP_V6),
                                (bpflab.app, "127.0.0.1"), (bpflab.app, APP_V6))]
    flips = 0
    while any(proc.poll() is None for _, proc in clients):
        driver.sync(("backup", "main")[flips % 2])
        flips += 1
        time.sleep(0.01)
    results = [json.loads(proc.stdout.read()) for _, proc in clients]
    assert all(r["up_ok"] and r["down_ok"] for r in results), results
    assert {r["name"] for r in results} <= {"main", "backup"}
    assert flips >= 5


# ---- adoption, drift, upgrade, removal ------------------------------------------------------

def test_fresh_instance_adopts_without_flip(steering):
    bpflab, first = steering
    first.sync("backup")
    held = KeepAlive(bpflab.client, APP_V4, 8888)
    assert held.get() == "backup"
    first.close()  # zddd stops: the data plane stays
    assert bpflab.get(APP_V4) == "backup"
    second = bpflab.driver()
    assert second.read() == {"active": "backup", "intact": True, "problems": []}
    result = second.sync("backup")
    assert result["steps"] == [] and not result["flip"]
    result = second.sync("main")  # the flip goes through the pinned map
    assert result["steps"] == [] and result["flip"]
    assert bpflab.get(APP_V6) == "main"
    assert held.get() == "backup"
    held.close()


def test_hand_detached_programs_are_reattached(steering):
    bpflab, driver = steering
    held = KeepAlive(bpflab.client, APP_V4, 8888)
    assert held.get() == "main"
    if bpflab.backend == "tc":
        bpflab.app.run("tc", "filter", "del", "dev", bpflab.veth, "ingress", "pref", "733")
    else:
        bpflab.app.run("ip", "link", "set", "dev", bpflab.veth, "xdp", "off")
    bpflab.app.run("tc", "filter", "del", "dev", "lo", "egress", "pref",
                   "733" if bpflab.backend == "tc" else "734")
    state = driver.read()
    assert not state["intact"] and state["active"] == "main"
    assert any(bpflab.veth in p for p in state["problems"]), state
    assert any("egress program missing on lo" == p for p in state["problems"]), state
    result = driver.sync("main")
    assert "build" not in result["steps"] and "attach" in result["steps"]
    assert result["after"]["intact"], result
    assert bpflab.get(APP_V4) == "main" and bpflab.get("::1", ns=bpflab.app) == "main"
    assert held.get() == "main"
    held.close()


def test_removed_pins_are_restored_and_flows_kept(steering):
    bpflab, driver = steering
    held = KeepAlive(bpflab.client, APP_V6, 8888)
    assert held.get() == "main"
    driver.sync("backup")
    for pin in ("flows", "active", "ingress"):
        os.unlink(f"{bpflab.pin_dir}/{bpflab.backend}/{pin}")
    state = driver.read()
    assert not state["intact"]
    assert {f"pin {p} missing" for p in ("flows", "active", "ingress")} <= set(state["problems"])
    result = driver.sync("backup")
    assert result["steps"][:2] == ["repin", "repin"] and "build" in result["steps"]
    assert result["after"] == {"active": "backup", "intact": True, "problems": []}
    assert held.get() == "main"  # the flow map survived the repair
    assert bpflab.get(APP_V4) == "backup"
    # Even with the whole directory gone, the maps the attached programs use come back.
    subprocess.run(["rm", "-r", f"{bpflab.pin_dir}/{bpflab.backend}"], check=True)
    assert driver.read()["intact"] is False
    result = driver.sync("backup")
    assert result["after"] == {"active": "backup", "intact": True, "problems": []}, result
    assert held.get() == "main"
    assert bpflab.get(APP_V6) == "backup"
    held.close()


def test_upgrade_keeps_established_flows(steering):
    bpflab, driver = steering
    held = [KeepAlive(bpflab.client, host, 8888) for host in (APP_V4, APP_V6)]
    assert [k.get() for k in held] == ["main", "main"]
    driver.sync("backup")
    driver.close()
    # A new zddd whose programs differ (a package upgrade): it rebuilds them over the pins.
    upgraded = bpflab.driver()
    upgraded("new", source_suffix="\n// upgraded\n")
    state = upgraded.read()
    assert state["problems"] == ["programs built from another source or configuration"]
    result = upgraded.sync("backup")
    assert result["steps"][0] == "build" and result["after"]["intact"], result
    assert [k.get() for k in held] == ["main", "main"]
    assert bpflab.get(APP_V4) == "backup"
    for k in held:
        k.close()


def test_new_target_ports_are_map_writes_and_keep_flows(steering):
    """New target ports are the service's entries written again (no build, no attachment);
    flows stay."""
    bpflab, driver = steering
    held = KeepAlive(bpflab.client, APP_V4, 8888)
    assert held.get() == "main"
    other = Vhost(bpflab.app, 9090, "other")
    try:
        ports = [["backup", 9090], ["main", 8080]]
        assert not driver.read(ports=ports)["intact"]
        result = driver.sync("backup", ports=ports)
        assert result["steps"] == ["dropservice", "setservice"], result
        assert result["after"]["intact"], result
        assert bpflab.get(APP_V4) == "other"
        assert held.get() == "main"
    finally:
        held.close()
        other.stop()


def test_a_new_flow_map_size_carries_the_flows_over(steering):
    """A restart with another bpf_flow_entries makes a new flow map (its size is part of the
    map): the established flows are copied into it, so their replies are still rewritten."""
    bpflab, driver = steering
    held = [KeepAlive(bpflab.client, host, 8888) for host in (APP_V4, APP_V6)]
    try:
        assert [k.get() for k in held] == ["main", "main"]
        driver.close()
        restarted = bpflab.driver(flow_entries=8192)
        assert "map flows has another layout" in restarted.read()["problems"]
        result = restarted.sync("backup")
        assert result["after"]["intact"], result
        assert [k.get() for k in held] == ["main", "main"]
        assert bpflab.get(APP_V4) == "backup"
        fd = kbpf.obj_get(f"{bpflab.pin_dir}/{bpflab.backend}/flows")
        try:
            assert kbpf.map_info(fd).max_entries == 8192
        finally:
            os.close(fd)
    finally:
        for k in held:
            k.close()


def test_leftover_and_remove(steering):
    bpflab, driver = steering
    text = driver("leftover")["leftover"]
    assert text.startswith(f"{bpflab.backend} programs on ") and "steering 8888 main" in text
    assert "zddd" in bpflab.hooks()
    driver("remove")
    assert driver("leftover")["leftover"] is None
    assert driver.read() is None
    assert bpflab.pins() == ["zddd"]
    hooks = bpflab.hooks()
    assert "zddd" not in hooks and "prog/xdp" not in hooks, hooks
    assert bpflab.refused(APP_V4)
    assert bpflab.get(APP_V4, 8080) == "main"


def test_leftover_needs_no_compiler(steering):
    """leftover and remove work in a process where bcc cannot even be imported."""
    bpflab, driver = steering
    code = (f"import sys; sys.modules['bcc'] = None\n{LEFTOVER_ONLY}")
    r = bpflab.app.run(VENV_PYTHON, "-c", code, bpflab.backend, bpflab.pin_dir)
    assert r.stdout.startswith(f"{bpflab.backend} programs on "), r.stdout + r.stderr
    assert "removed None" in r.stdout
    assert bpflab.pins() == ["zddd"]


def test_each_backend_owns_only_its_own(need_root):
    """tc and xdp on one host (a backend change): each reports and removes only its own."""
    lab = BpfLab("tc")
    try:
        tc = lab.driver()
        tc.sync("main")
        xdp = Driver(lab.app, "xdp", lab.desired)
        lab.closers.append(xdp.close)
        assert xdp("leftover")["leftover"] is None
        xdp.sync("backup")
        assert tc("leftover")["leftover"].startswith("tc programs")
        xdp("remove")
        assert tc.read() == {"active": "main", "intact": True, "problems": []}
        assert lab.get(APP_V4) == "main"
    finally:
        lab.close()


# ---- many services in one data plane ---------------------------------------------------------

A_SERVICE = {"name": "a", "listen_port": 8888, "ports": [["backup", 80], ["main", 8080]]}
B_SERVICE = {"name": "b", "listen_port": 9888, "ports": [["backup", 90], ["main", 9080]]}


def _mixed_servers(bpflab: BpfLab) -> None:
    """B's targets: HTTP keep-alive and bulk transfers on one port each."""
    for port, name in ((9080, "bmain"), (90, "bbackup")):
        server = bpflab.app.popen(PYTHON, "-c", MIXED_SERVER, str(port), name,
                                  stdout=subprocess.PIPE, text=True)
        bpflab.closers.append(server.kill)
        assert server.stdout.readline().strip() == "ready"


def test_two_services_one_switching_fifty_times_leaves_the_other_alone(bpflab):
    """A switches main <-> backup 50 times while B carries keep-alive connections and 10 MB
    transfers: every switch of A is a flip alone; B's connections stay with the vhost they
    started on and B's new connections keep going where B steers; A's follow its switches."""
    _mixed_servers(bpflab)
    driver = bpflab.driver(services=[A_SERVICE, B_SERVICE])
    result = driver("weights", weights={"a": 100, "b": 100})
    assert result["after"] == {"weights": {"a": 100, "b": 100}, "intact": True,
                               "problems": []}, result
    held = [KeepAlive(bpflab.client, host, 9888) for host in (APP_V4, APP_V6)]
    bulk = [(ns, ns.popen(PYTHON, "-c", BULK_CLIENT, host, "9888", str(10 << 20),
                          stdout=subprocess.PIPE, text=True))
            for ns, host in ((bpflab.client, APP_V4), (bpflab.client, APP_V6),
                             (bpflab.app, "127.0.0.1"))]
    try:
        assert [k.get() for k in held] == ["bmain", "bmain"]
        deadline = time.monotonic() + 10  # the transfers' connections are made on B's main
        while driver("flows")["steered"]["b/main"] < len(held) + len(bulk):
            assert time.monotonic() < deadline, driver("flows")
            time.sleep(0.02)
        assert driver("weights", weights={"b": 0})["steps"] == []
        assert bpflab.get(APP_V4, 9888) == "bbackup"
        during_transfers = 0
        for i in range(50):
            target = ("backup", "main")[i % 2]
            result = driver.sync(target, service="a")
            assert result["steps"] == [] and result["flip"], result
            assert result["after"]["weights"] == {"a": 100 if target == "main" else 0, "b": 0}
            during_transfers += any(proc.poll() is None for _, proc in bulk)
            assert bpflab.get((APP_V4, APP_V6)[i % 2]) == target, i
            if i % 5 == 0:
                assert [k.get() for k in held] == ["bmain", "bmain"], i
                assert bpflab.get(APP_V6, 9888) == "bbackup", i
        results = [json.loads(proc.stdout.read()) for _, proc in bulk]
        assert all(r["up_ok"] and r["down_ok"] and r["name"] == "bmain" for r in results), \
            results
        assert during_transfers >= 5, during_transfers
        assert [k.get() for k in held] == ["bmain", "bmain"]
        steered = driver("flows")["steered"]
        assert steered["a/main"] >= 25 and steered["a/backup"] >= 25, steered
        assert steered["b/main"] >= 5 and steered["b/backup"] >= 6, steered
    finally:
        for k in held:
            k.close()
        for _, proc in bulk:
            proc.kill()


def test_a_service_added_or_removed_is_map_writes_alone(bpflab):
    """No build and no attachment: the programs and the other service stay as they are."""
    _mixed_servers(bpflab)
    one = bpflab.driver(services=[A_SERVICE])
    one.sync("main")
    programs = bpflab.hooks()
    held = KeepAlive(bpflab.client, APP_V4, 8888)
    assert held.get() == "main"
    one.close()
    two = bpflab.driver(services=[A_SERVICE, B_SERVICE])
    assert two.read()["problems"] == ["service b missing"]
    result = two("weights", weights={"b": 100})
    assert result["steps"] == ["setservice"] and result["after"]["intact"], result
    assert bpflab.get(APP_V4, 9888) == "bmain" and bpflab.get(APP_V6) == "main"
    result = two("weights", weights={"b": None})
    assert result["steps"] == [] and bpflab.refused(APP_V4, 9888)
    two.close()
    again = bpflab.driver(services=[A_SERVICE])
    result = again.sync("main")
    assert result["steps"] == ["dropservice"] and result["after"]["intact"], result
    assert bpflab.hooks() == programs
    assert held.get() == "main" and bpflab.get(APP_V4) == "main"
    held.close()


def test_drift_of_one_service_is_reported_and_repaired_alone(bpflab):
    _mixed_servers(bpflab)
    driver = bpflab.driver(services=[A_SERVICE, B_SERVICE])
    driver("weights", weights={"a": 100, "b": 0})
    held = KeepAlive(bpflab.client, APP_V4, 8888)
    assert held.get() == "main"
    directory = f"{bpflab.pin_dir}/{bpflab.backend}"
    fd = kbpf.obj_get(f"{directory}/services")
    try:  # someone deletes B's entry: B's new connections go nowhere
        slot = struct.unpack("=IHH", kbpf.map_lookup(fd, struct.pack("=I", 9888), 8))[0]
        assert kbpf.map_delete(fd, struct.pack("=I", 9888))
    finally:
        os.close(fd)
    state = driver.read()
    assert state == {"weights": {"a": 100}, "intact": False,
                     "problems": ["service b missing"]}, state
    assert bpflab.refused(APP_V4, 9888)
    result = driver("weights", weights={"b": 0})
    assert result["steps"] == ["setservice"] and result["after"]["intact"], result
    assert bpflab.get(APP_V4, 9888) == "bbackup"
    fd = kbpf.obj_get(f"{directory}/active")
    try:  # someone stores another weight in B's slot: read says so, the plan stores it back
        slot = struct.unpack("=IHH", _lookup(directory, 9888))[0]
        kbpf.map_update(fd, struct.pack("=I", slot), struct.pack("=I", 101))
    finally:
        os.close(fd)
    assert driver.read()["weights"] == {"a": 100, "b": 100}
    assert bpflab.get(APP_V4, 9888) == "bmain"
    result = driver("weights", weights={"b": 0})
    assert result["steps"] == [] and result["flip"]
    assert bpflab.get(APP_V6, 9888) == "bbackup"
    assert held.get() == "main"
    held.close()


def test_one_client_port_to_two_services_is_two_flows(bpflab):
    """A client may use one port for connections to two listen ports at once (Linux picks
    ephemeral ports per destination): each is its own flow, steered and answered by its own
    service, in both directions."""
    _mixed_servers(bpflab)
    driver = bpflab.driver(services=[A_SERVICE, B_SERVICE])
    driver("weights", weights={"a": 100, "b": 0})
    for host in (APP_V4, APP_V6):
        out = bpflab.client.run(PYTHON, "-c", TWO_FROM_ONE_PORT, host, "40300").stdout
        assert json.loads(out) == [["main", "bbackup"]] * 4, out


def test_leftover_and_remove_take_every_service(bpflab):
    _mixed_servers(bpflab)
    driver = bpflab.driver(services=[A_SERVICE, B_SERVICE])
    driver("weights", weights={"a": 100, "b": 0})
    text = driver("leftover")["leftover"]
    assert "steering 8888 main, 9888 backup" in text, text
    driver("remove")
    assert driver("leftover")["leftover"] is None and driver.read() is None
    assert bpflab.pins() == ["zddd"]
    assert bpflab.refused(APP_V4) and bpflab.refused(APP_V4, 9888)
    assert bpflab.get(APP_V4, 9080) == "bmain"


def _lookup(directory: str, listen_port: int) -> bytes:
    fd = kbpf.obj_get(f"{directory}/services")
    try:
        return kbpf.map_lookup(fd, struct.pack("=I", listen_port), 8)
    finally:
        os.close(fd)


def test_a_split_weight_picks_each_connection_once(bpflab):
    """The kernel side of weights: 1..99 splits new connections at random by the weight;
    a connection keeps its pick."""
    driver = bpflab.driver()
    driver("weights", weights={"default": 30})
    assert driver.read() == {"active": "split", "intact": True, "problems": []}
    names = [bpflab.get(APP_V4) for _ in range(200)]
    share = names.count("main") / len(names)
    assert 0.15 <= share <= 0.45, share  # 30 %, binomial sd 3.2 points
    held = KeepAlive(bpflab.client, APP_V4, 8888)
    first = held.get()
    assert all(held.get() == first for _ in range(20))
    held.close()


# The one-service layout (v1) is what cd0a822 builds; cd0a822 itself changed only the backend
# contract (its backends do not run on it), so its parent runs that layout's code.
def test_ten_thousand_connections_at_ten_percent_split_within_a_point_and_a_half(bpflab):
    """SPEC "Weights": over 10,000 new connections at 10/90 the share is within ±1.5 points."""
    servers = [bpflab.app.popen(PYTHON, "-c", NAME_SERVER, str(port), name,
                                stdout=subprocess.PIPE, text=True)
               for port, name in ((9080, "m"), (9081, "b"))]
    for server in servers:
        bpflab.closers.append(server.kill)
        assert server.stdout.readline().strip() == "ready"
    driver = bpflab.driver(ports=[["backup", 9081], ["main", 9080]])
    driver("weights", weights={"default": 10})
    out = bpflab.client.run(PYTHON, "-c", MANY_CONNECTIONS, APP_V4, "8888", "10000",
                            timeout=300).stdout
    names = json.loads(out)
    assert names["m"] + names["b"] == 10000, names
    assert abs(names["m"] / 100 - 10) <= 1.5, names
    steered = driver("flows")["steered"]
    assert steered == {"main": names["m"], "backup": names["b"]}, steered


OLD_COMMIT = "cd0a822~1"


@pytest.fixture
def old_zddd(tmp_path):
    """The tree of the commit that built one service compiled in (layout v1)."""
    same = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", OLD_COMMIT, "cd0a822",
                           "--", "bpf", "zddd/backends/rewrite.py", "zddd/backends/pinned.py"])
    assert same.returncode == 0, "the old tree must build cd0a822's layout"
    tree = tmp_path / "old-zddd"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "zddd", "bpf",
                              "zdddlab", "tests/httpd.py"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def test_upgrade_from_the_one_service_layout_keeps_every_flow(bpflab, old_zddd):
    """cd0a822's data plane (one service compiled in, `active` holding a port) is adopted as
    service "default": a rebuild keeps its flows (held keep-alive connections keep answering
    from the vhost they started on, through the old programs' flow entries), writes the
    current steering before the new programs replace the old ones (no flip: a new connection
    goes where it went before), and from then on a switch is one store."""
    # Debian's python3 (bcc and pyroute2 are Debian's): the venv's would import this tree's
    # zddd through its editable install whatever PYTHONPATH says.
    old = Driver.__new__(Driver)
    DriverClient.__init__(old, bpflab.app.popen, bpflab.backend, bpflab.desired,
                          prefix=("env", "-C", str(old_zddd), f"PYTHONPATH={old_zddd}"),
                          python="/usr/bin/python3")
    bpflab.closers.append(old.close)
    old.sync("main")
    on_main = [KeepAlive(bpflab.client, host, 8888) for host in (APP_V4, APP_V6)]
    assert [k.get() for k in on_main] == ["main", "main"]
    old.sync("backup")
    on_backup = KeepAlive(bpflab.client, APP_V4, 8888)
    assert on_backup.get() == "backup"
    assert _stamp_version(bpflab) == 1
    old.close()
    new = bpflab.driver()
    state = new.read()
    assert state["active"] == "backup" and not state["intact"], state
    assert "layout version 1, this zddd builds 2" in state["problems"]
    result = new.sync("backup")
    assert result["steps"][0] == "build" and not result["flip"], result
    assert "attach" in result["steps"] and result["after"] == {
        "active": "backup", "intact": True, "problems": []}, result
    assert result["steps"][-1] == "carrylegacy", result
    assert _stamp_version(bpflab) == 2
    assert f"zddd/{bpflab.backend}/flows-v1" not in bpflab.pins()
    assert [k.get() for k in on_main] == ["main", "main"]
    assert on_backup.get() == "backup"
    assert bpflab.get(APP_V6) == "backup"
    result = new.sync("main")
    assert result["steps"] == [] and result["flip"]
    assert bpflab.get(APP_V4) == "main"
    assert [k.get() for k in on_main] == ["main", "main"] and on_backup.get() == "backup"
    for k in (*on_main, on_backup):
        k.close()


def _stamp_version(bpflab: BpfLab) -> int:
    fd = kbpf.obj_get(f"{bpflab.pin_dir}/{bpflab.backend}/stamp")
    try:
        return struct.unpack_from("=I", kbpf.map_lookup(fd, ZERO, 56), 4)[0]
    finally:
        os.close(fd)


# ---- scripts run inside the namespaces ------------------------------------------------------

UDP_ECHO = r"""
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 8888))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(100)
    s.sendto(b"udp %d" % s.getsockname()[1], peer)
"""


def _udp_ask(ns: NetNS, host: str, port: int) -> str:
    script = r"""
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(b"hello", (sys.argv[1], int(sys.argv[2])))
print(s.recvfrom(100)[0].decode())
"""
    return ns.run(PYTHON, "-c", script, host, str(port)).stdout.strip()


def _fixed_port_get(ns: NetNS, host: str, port: int, local_port: int) -> str:
    """One HTTP/1.0 GET from a fixed client port; the body's first line, or the errno name.
    The connection ends with a RST from the client, so the port is free again at once."""
    script = r"""
import errno, socket, struct, sys
host, port, local = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.settimeout(3)
s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", local))
try:
    s.connect((host, port))
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
    sys.exit()
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
data = b""
while b"\n" not in data.partition(b"\r\n\r\n")[2]:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.split(b"\r\n\r\n", 1)[1].decode().strip())
s.close()
"""
    return ns.run(PYTHON, "-c", script, host, str(port), str(local_port)).stdout.strip()


HOLDER = r"""
import json, socket, sys

def ask(s):
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return None
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int([l.split(b":")[1] for l in head.split(b"\r\n")
                  if l.lower().startswith(b"content-length")][0])
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            return None
        body += chunk
    return body.decode().strip()

conns = []
for line in sys.stdin:
    words = line.split()
    if words[0] == "open":
        host, n = words[1], int(words[2])
        names = []
        for _ in range(n):
            try:
                s = socket.create_connection((host, 8888), timeout=5)
            except ConnectionRefusedError:
                names.append("refused")
                continue
            name = ask(s)
            conns.append((s, name))
            names.append(name)
        print(json.dumps(names), flush=True)
    elif words[0] == "check":
        broken = moved = 0
        for s, name in conns:
            try:
                now = ask(s)
            except OSError:
                now = None
            broken += now is None
            moved += now is not None and now != name
        print(json.dumps({"total": len(conns), "broken": broken, "moved": moved}), flush=True)
"""

BULK_SERVER = r"""
import hashlib, socket, sys, threading
port, name = int(sys.argv[1]), sys.argv[2].encode()
BLOB = hashlib.sha256(b"zddd").digest() * 2048

def serve(c):
    with c:
        f = c.makefile("rb")
        size = int(f.readline())
        h, left = hashlib.sha256(), size
        while left:
            chunk = f.read(min(65536, left))
            if not chunk:
                return
            h.update(chunk)
            left -= len(chunk)
        c.sendall(name + b" " + h.hexdigest().encode() + b"\n")
        sent = 0
        while sent < size:
            n = min(len(BLOB), size - sent)
            c.sendall(BLOB[:n])
            sent += n

s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

TWO_FROM_ONE_PORT = r"""
import json, socket, sys
host, local = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET

def connect(port):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(5)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", local))
    s.connect((host, port))
    return s, s.makefile("rb")

def get(conn):
    s, f = conn
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return f.read(length).decode().strip()

a = connect(8888)
b = connect(9888)
print(json.dumps([[get(a), get(b)] for _ in range(4)]))
"""

NAME_SERVER = r"""
import socket, sys
port, name = int(sys.argv[1]), sys.argv[2].encode()
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port))
s.listen(1024)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(name)
    c.close()
"""

MANY_CONNECTIONS = r"""
import json, socket, struct, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
names = {}
for _ in range(n):
    c = socket.create_connection((host, port), timeout=5)
    name = c.recv(16).decode()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # no TIME_WAIT
    c.close()
    names[name] = names.get(name, 0) + 1
print(json.dumps(names))
"""

MIXED_SERVER = r"""
import hashlib, socket, sys, threading
port, name = int(sys.argv[1]), sys.argv[2].encode()
BLOB = hashlib.sha256(b"zddd").digest() * 2048

def serve(c):
    with c:
        f = c.makefile("rb")
        while True:
            line = f.readline()
            if not line:
                return
            if not line.startswith(b"GET "):
                break
            while f.readline() not in (b"\r\n", b"\n", b""):
                pass
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s\n"
                      % (len(name) + 1, name))
        size = int(line)
        h, left = hashlib.sha256(), size
        while left:
            chunk = f.read(min(65536, left))
            if not chunk:
                return
            h.update(chunk)
            left -= len(chunk)
        c.sendall(name + b" " + h.hexdigest().encode() + b"\n")
        sent = 0
        while sent < size:
            n = min(len(BLOB), size - sent)
            c.sendall(BLOB[:n])
            sent += n

s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

BULK_CLIENT = r"""
import hashlib, json, os, socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
BLOB = hashlib.sha256(b"zddd").digest() * 2048
s = socket.create_connection((host, port), timeout=20)
s.sendall(b"%d\n" % size)
up = hashlib.sha256()
for _ in range(size // 65536):
    chunk = os.urandom(65536)
    up.update(chunk)
    s.sendall(chunk)
    time.sleep(0.002)  # spread the transfer over many switches
f = s.makefile("rb")
name, digest = f.readline().decode().split()
down, expected, left = hashlib.sha256(), hashlib.sha256(), size
while left:
    chunk = f.read(min(65536, left))
    if not chunk:
        break
    down.update(chunk)
    left -= len(chunk)
sent = 0
while sent < size:
    n = min(len(BLOB), size - sent)
    expected.update(BLOB[:n])
    sent += n
print(json.dumps({"name": name, "up_ok": digest == up.hexdigest(),
                  "down_ok": left == 0 and down.digest() == expected.digest()}))
"""

LEFTOVER_ONLY = r"""
from zddd.backends import Desired, ServiceLayout, backend_class
backend = backend_class(sys.argv[1])()
desired = Desired((ServiceLayout("default", 8888, (("backup", 80), ("main", 8080)), None),),
                  None, sys.argv[2])
print(backend.leftover(desired))
print("removed", backend.remove(desired))
"""
