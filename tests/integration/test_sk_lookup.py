"""The sk_lookup backend driven directly (zdddlab.driver) inside an app namespace:
steering in both families without rewriting, adoption, drift repair, listener changes, removal
and per-target connection counts. Each test has its own namespaces and its own bpffs mount
(pins in a host-visible bpffs, so a second driver process can adopt them), removed at the end.
"""

from __future__ import annotations

import os
import secrets
import struct
import subprocess
import time
from contextlib import suppress
from pathlib import Path

import pytest
from zdddlab.driver import DriverClient
from zdddlab import (APP_V4, APP_V6, CLIENT_V4, CLIENT_V6, HeldConnection, KeepAlive, NetNS, Vhost,
                 connect_error, http_get, link, wait_for)

from zddd.kernel import bpf as kbpf
from zddd.kernel import bpffs

pytestmark = pytest.mark.usefixtures("need_root")

LISTEN = 8888


def Driver(ns: NetNS, desired: dict, prefix: tuple[str, ...] = ()) -> DriverClient:
    """zdddlab.driver running the sk_lookup backend in `ns`."""
    return DriverClient(ns.popen, "sk_lookup", desired, prefix=prefix)


class SkLab:
    """Client and app namespaces, vhosts main (8080) and backup (80) in the app namespace, a
    bpffs of the test's own, and a driver for the sk_lookup backend in the app namespace."""

    def __init__(self):
        self.closers = []
        self.client = self._own(NetNS("cli"))
        self.app = self._own(NetNS("app"))
        link(self.client, self.app, (CLIENT_V4, CLIENT_V6), (APP_V4, APP_V6))
        self.main = Vhost(self.app, 8080, "main")
        self.closers.append(self.main.stop)
        self.backup = Vhost(self.app, 80, "backup")
        self.closers.append(self.backup.stop)
        self.bpffs = Path(f"/run/zt-bpf-{secrets.token_hex(3)}")
        self.bpffs.mkdir()
        self.closers.append(self._unmount)
        subprocess.run(["mount", "-t", "bpf", "bpf", str(self.bpffs)], check=True)
        self.pin_dir = self.bpffs / "zddd"
        self.desired = {"listen_port": LISTEN, "ports": {"main": 8080, "backup": 80},
                        "pin_dir": str(self.pin_dir), "flow_entries": 4096}
        self.driver = self.new_driver()

    def _own(self, thing):
        self.closers.append(thing.close)
        return thing

    def new_driver(self, prefix: tuple[str, ...] = (), **overrides) -> Driver:
        return self._own(Driver(self.app, {**self.desired, **overrides}, prefix=prefix))

    def _unmount(self) -> None:
        subprocess.run(["umount", str(self.bpffs)], capture_output=True)
        self.bpffs.rmdir()

    def get(self, host: str, path: str = "/") -> str:
        return http_get(self.client, host, LISTEN, path)

    def refused(self, host: str) -> bool:
        return connect_error(self.client, host, LISTEN)[0] == "ECONNREFUSED"

    def pins(self) -> set[str]:
        return set(os.listdir(self.pin_dir)) if self.pin_dir.exists() else set()

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception as e:  # keep cleaning up
                print(f"cleanup: {e}")


@pytest.fixture
def skl():
    lab = SkLab()
    try:
        yield lab
    finally:
        lab.close()


def test_main_backup_off_in_both_families(skl):
    skl.driver("probe")
    first = skl.driver("switch", target="main")
    assert first["layout"] == 1 and first["flip"]
    for host in (APP_V4, APP_V6):
        assert skl.get(host) == "main"
    skl.driver("switch", target="backup")
    for host in (APP_V4, APP_V6):
        assert skl.get(host) == "backup"
    # Local clients are steered too (the program runs on every socket lookup in the namespace).
    assert http_get(skl.app, "127.0.0.1", LISTEN) == "backup"
    assert http_get(skl.app, "::1", LISTEN) == "backup"
    skl.driver("switch", target=None)
    assert skl.refused(APP_V4) and skl.refused(APP_V6)
    # Direct traffic is never touched.
    assert http_get(skl.client, APP_V4, 8080) == "main"
    assert skl.driver("read")["state"] == {"active": None, "intact": True, "problems": []}
    fd = kbpf.obj_get(str(skl.pin_dir / "sk_lookup_active"))
    try:  # a switch is one store through zddd's mapping of it
        assert kbpf.map_info(fd).flags & kbpf.BPF_F_MMAPABLE
    finally:
        os.close(fd)


def test_the_app_sees_the_listen_port(skl):
    skl.driver("switch", target="main")
    assert skl.get(APP_V4, "/sockname") == "main 8888"
    assert skl.get(APP_V6, "/sockname") == "main 8888"
    assert http_get(skl.client, APP_V4, 8080, "/sockname") == "main 8080"


SPLIT_SERVER = r"""
import selectors, socket, sys
port, name = int(sys.argv[1]), sys.argv[2]
v4 = socket.socket(socket.AF_INET)
v4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
v4.bind(("0.0.0.0", port))
v6 = socket.socket(socket.AF_INET6)
v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
v6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
v6.bind(("::", port))
sel = selectors.DefaultSelector()
for s in (v4, v6):
    s.listen(64)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        conn.settimeout(2)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        family = "v4" if key.fileobj is v4 else "v6"
        body = f"{name} {family} {conn.getsockname()[1]}\n".encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % len(body) + body)
        conn.close()
"""


def test_separate_ipv4_and_ipv6_only_listeners(skl):
    """nginx's default: one IPv4 socket and one IPv6-only socket. Each family goes to the socket
    that can take it."""
    skl.main.stop()
    proc = skl.app.popen("python3", "-c", SPLIT_SERVER, "8080", "split", stdout=subprocess.PIPE,
                         text=True)
    assert proc.stdout.readline().strip() == "ready"
    skl.driver("switch", target="main")
    assert skl.get(APP_V4) == "split v4 8888"
    assert skl.get(APP_V6) == "split v6 8888"
    assert skl.driver("read")["state"]["intact"]


NGINX = """worker_processes 9;
pid {root}/nginx.pid;
daemon off;
error_log {root}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;
  server {{ listen 8080 reuseport; listen [::]:8080 reuseport;
    location / {{ return 200 "nginx $server_port\\n"; }} }}
}}
"""


def test_nginx_with_reuseport_workers(skl, tmp_path):
    """nginx's usual listeners: IPv4 and IPv6-only sockets, one per worker with reuseport (18
    sockets, more than the map keeps per target). Both families are steered, and nginx's own
    $server_port says 8888."""
    skl.main.stop()
    (tmp_path / "nginx.conf").write_text(NGINX.format(root=tmp_path))
    skl.app.popen("nginx", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c",
                  str(tmp_path / "nginx.conf"))
    wait_for(lambda: connect_error(skl.app, "127.0.0.1", 8080)[0] == "ok", 10, "nginx")
    skl.driver("switch", target="main")
    for _ in range(5):
        assert skl.get(APP_V4) == "nginx 8888"
        assert skl.get(APP_V6) == "nginx 8888"
    assert skl.driver("read")["state"]["intact"]


def test_established_connections_survive_switches(skl):
    skl.driver("switch", target="main")
    kept = KeepAlive(skl.client, APP_V4, LISTEN)
    kept6 = KeepAlive(skl.client, APP_V6, LISTEN)
    try:
        assert kept.get() == "main" and kept6.get() == "main"
        skl.driver("switch", target="backup")
        assert skl.get(APP_V4) == "backup"
        assert kept.get() == "main" and kept6.get() == "main"
        skl.driver("switch", target=None)
        assert skl.refused(APP_V4)
        assert kept.get() == "main" and kept6.get() == "main"
        skl.driver("switch", target="main")
        assert kept.get() == "main"
    finally:
        kept.close()
        kept6.close()


def test_restarted_vhost_is_picked_up_and_a_missing_listener_reported(skl):
    skl.driver("switch", target="main")
    assert skl.driver("listener", target="main")["problem"] is None
    skl.driver("reconciler", target="main", interval=0.25)
    skl.main.stop()
    # The kernel drops the closed listener from the map: refused, not hanging.
    wait_for(lambda: skl.refused(APP_V4), 2, "8888 refused while main is down")
    problem = wait_for(lambda: skl.driver("listener", target="main")["problem"], 2,
                       "the missing listener to be reported")
    assert "nothing listens on port 8080" in problem
    assert skl.driver("listener", target="backup")["problem"] is None
    # Nothing to repair while nothing listens: no repair loop.
    assert skl.driver("read")["state"]["intact"]
    repairs_before = skl.driver("stop")["repairs"]
    skl.driver("reconciler", target="main", interval=0.25)
    skl.main.start()
    started = time.monotonic()

    def steered():
        with suppress(ConnectionError):
            return skl.get(APP_V4) == "main"
    wait_for(steered, 3, "the new listener to be steered to", interval=0.05)
    assert time.monotonic() - started < 1.0
    assert skl.driver("stop")["repairs"] == repairs_before + 1
    assert skl.driver("listener", target="main")["problem"] is None
    assert skl.get(APP_V6) == "main"


def test_a_fresh_instance_adopts_without_a_flip(skl):
    skl.driver("switch", target="backup")
    link_before = _link_id(skl)
    skl.driver.close()  # the data plane outlives the process that built it
    assert skl.get(APP_V4) == "backup"
    again = skl.new_driver()
    state = again("read")["state"]
    assert state == {"active": "backup", "intact": True, "problems": []}
    change = again("switch", target="backup")
    assert change["layout"] == 0 and not change["flip"]
    assert _link_id(skl) == link_before
    flip = again("switch", target="main")
    assert flip["layout"] == 0 and flip["flip"]
    assert skl.get(APP_V6) == "main"


def _link_id(skl) -> int:
    fd = kbpf.obj_get(str(skl.pin_dir / "sk_lookup_link"))
    try:
        return kbpf.link_info(fd).id
    finally:
        os.close(fd)


def _netns_links(ns: NetNS) -> list[int]:
    """Ids of the BPF links attached to `ns`."""
    ino = os.stat(f"/run/netns/{ns.name}").st_ino
    found = []
    for link_id in kbpf.link_ids():
        with suppress(OSError):
            fd = kbpf.link_fd_by_id(link_id)
            try:
                info = kbpf.link_info(fd)
                if info.type == kbpf.BPF_LINK_TYPE_NETNS and info.netns_ino == ino:
                    found.append(link_id)
            finally:
                os.close(fd)
    return found


def _repair(skl, expect_problem: str) -> None:
    state = skl.driver("read")["state"]
    assert not state["intact"] and any(expect_problem in p for p in state["problems"]), state
    assert skl.driver("reconcile", target="main")["repaired"]
    assert skl.driver("read")["state"] == {"active": "main", "intact": True, "problems": []}
    assert skl.get(APP_V4) == "main" and skl.get(APP_V6) == "main"


def test_drift_is_repaired(skl):
    skl.driver("switch", target="main")
    assert len(_netns_links(skl.app)) == 1
    held = HeldConnection(skl.client, APP_V4, LISTEN)

    os.unlink(skl.pin_dir / "sk_lookup_link")  # the only reference: the link goes
    assert skl.refused(APP_V4)
    _repair(skl, "link not pinned")

    fd = kbpf.obj_get(str(skl.pin_dir / "sk_lookup_link"))
    try:
        kbpf.link_detach(fd)
    finally:
        os.close(fd)
    assert skl.refused(APP_V4)
    _repair(skl, "link detached")
    assert len(_netns_links(skl.app)) == 1

    fd = kbpf.obj_get(str(skl.pin_dir / "sk_lookup_sockets"))
    try:
        for key in range(32):
            if kbpf.map_lookup(fd, struct.pack("=I", key), 8):
                kbpf.map_delete(fd, struct.pack("=I", key))
    finally:
        os.close(fd)
    assert skl.refused(APP_V4)
    _repair(skl, "socket map for default main")

    fd = kbpf.obj_get(str(skl.pin_dir / "sk_lookup_active"))
    try:
        kbpf.map_update(fd, struct.pack("=I", 0), struct.pack("=I", 0))
    finally:
        os.close(fd)
    assert skl.driver("read")["state"] == {"active": None, "intact": True, "problems": []}
    assert skl.driver("reconcile", target="main")["repaired"]
    assert skl.get(APP_V4) == "main"

    # A layout stamped by an older version is rebuilt, not adopted (a newer one is refused:
    # test_bpf_pin_dir).
    fd = kbpf.obj_get(str(skl.pin_dir / "sk_lookup_meta"))
    try:
        raw = bytearray(kbpf.map_lookup(fd, struct.pack("=I", 0), 24))
        struct.pack_into("=I", raw, 4, 0)
        kbpf.map_update(fd, struct.pack("=I", 0), bytes(raw))
    finally:
        os.close(fd)
    _repair(skl, "layout version 0")
    assert len(_netns_links(skl.app)) == 1, "the old link must go with its pins"
    # The rebuilt layout still knows where the connection made before it went.
    assert skl.driver("count")["counts"] == {"main": 1, "backup": 0}
    assert skl.driver("flows")["steered"]["main"] >= 1
    held.close()


def test_remove_leaves_nothing(skl):
    skl.driver("switch", target="main")
    assert "steering main" in skl.driver("leftover")["leftover"]
    assert {p for p in skl.pins() if p.startswith("sk_lookup_")} == {
        "sk_lookup_" + n for n in ("link", "prog", "services", "active", "meta", "sockets",
                                   "flows", "steered")}
    skl.driver("remove")
    assert skl.pins() == set()
    assert _netns_links(skl.app) == []
    assert skl.refused(APP_V4) and skl.refused(APP_V6)
    assert skl.driver("leftover")["leftover"] is None
    assert skl.driver("read")["state"] is None
    assert http_get(skl.client, APP_V4, 8080) == "main"


def test_connections_are_counted_per_target(skl):
    skl.driver("switch", target="main")
    held = [HeldConnection(skl.client, APP_V4, LISTEN), HeldConnection(skl.client, APP_V6, LISTEN),
            HeldConnection(skl.client, APP_V4, 8080)]
    skl.driver("switch", target="backup")
    held += [HeldConnection(skl.client, APP_V4, LISTEN), HeldConnection(skl.client, APP_V6, 80),
             HeldConnection(skl.client, APP_V6, 80)]
    # A local client on the loopback, steered too.
    local = skl.app.popen("python3", "-c", HeldConnection.SCRIPT, "::1", str(LISTEN),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert local.stdout.readline().startswith("open")
    try:
        counts = skl.driver("count")["counts"]
        assert counts == {"main": 3, "backup": 4}
        flows = skl.driver("flows")
        assert flows["steered"] == {"main": 2, "backup": 2}
        assert flows["table"] == [4, 4096]
        held[0].close()
        wait_for(lambda: skl.driver("count")["counts"] == {"main": 2, "backup": 4}, 3,
                 "a closed connection to be uncounted")
    finally:
        for h in held:
            h.close()


def test_a_pin_dir_that_needs_a_private_bpffs_is_refused(skl):
    """Under `ip netns exec`, /sys is the namespace's own sysfs with no bpffs: one mounted there
    would live in the driver's private mount namespace and take the link and every pin with it
    when the process goes (8888 refused until a restart). Refused before anything is built."""
    host_had_bpffs = bpffs.is_bpffs("/sys/fs/bpf")
    pin_dir = f"/sys/fs/bpf/zt-{secrets.token_hex(3)}"
    private = skl.new_driver(pin_dir=pin_dir)
    with pytest.raises(RuntimeError) as e:
        private("switch", target="main")
    assert "BackendUnavailable" in str(e.value) and "bpf_pin_dir" in str(e.value), e.value
    assert _netns_links(skl.app) == [] and skl.refused(APP_V4)
    assert bpffs.is_bpffs("/sys/fs/bpf") == host_had_bpffs


def test_probe_names_the_missing_capability(skl):
    weak = skl.new_driver(prefix=("setpriv", "--inh-caps=-sys_ptrace",
                                  "--bounding-set=-sys_ptrace"))
    with pytest.raises(RuntimeError) as probe:
        weak("probe")
    message = str(probe.value)
    assert "CAP_SYS_PTRACE" in message and 'backend = "nftables"' in message
    assert "\n" not in message
    # Without the probe (as a test can): the listener is reported, not silently unsteered.
    weak("switch", target="main")
    problem = weak("listener", target="main")["problem"]
    assert problem and "CAP_SYS_PTRACE" in problem
    assert weak("read")["state"]["intact"], "an untakeable listener must not cause repairs"


def test_without_headers_probe_says_so_and_leftover_and_remove_still_work(skl):
    """Where bcc cannot compile (no kernel headers: hidden here by a tmpfs in a private mount
    namespace), probe names what is missing in one line, and a data plane left by an earlier
    run is still described and removed."""
    skl.driver("switch", target="backup")
    hide = ("unshare", "--mount", "sh", "-c",
            'mount -t tmpfs none "/lib/modules/$(uname -r)" && exec "$@"', "sh")
    blind = skl.new_driver(prefix=hide)
    with pytest.raises(RuntimeError) as probe:
        blind("probe")
    message = str(probe.value)
    assert "no kernel headers" in message and 'backend = "nftables"' in message
    assert "\n" not in message
    assert "steering backup" in blind("leftover")["leftover"]
    blind("remove")
    assert skl.pins() == set() and _netns_links(skl.app) == []
    assert skl.refused(APP_V4)
