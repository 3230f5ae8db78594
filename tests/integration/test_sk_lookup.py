"""The sk_lookup backend driven directly (zdddlab.driver) inside an app namespace:
steering in both families without rewriting, adoption, drift repair, listener changes, removal
and per-target connection counts. Each test has its own namespaces and its own bpffs mount
(pins in a host-visible bpffs, so a second driver process can adopt them), removed at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import subprocess
import time
from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace

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


# ---- many services in one program ---------------------------------------------------------

BIG_VHOST = r"""
import socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, name = int(sys.argv[1]), sys.argv[2]
BIG = (name + "\n").encode() * (10 * 1024 * 1024 // (len(name) + 1))

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = BIG if self.path == "/big" else (name + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

server = Server(("::", port), Handler)
print("ready", flush=True)
server.serve_forever()
"""

# One connection kept alive, downloading 10 MB again and again until told to stop; each body
# must come from the vhost the first one came from. Prints a line per transfer, and one JSON
# line at the end.
TRANSFERS = r"""
import http.client, json, select, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=20)
names, done, size, error = set(), 0, 0, None
print("started", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    try:
        c.request("GET", "/big")
        body = c.getresponse().read()
    except Exception as e:
        error = repr(e)
        break
    lines = set(body.split(b"\n")) - {b""}
    names |= {l.decode() for l in lines}
    size = len(body)
    done += 1
    print("transfer", done, flush=True)
print(json.dumps({"transfers": done, "size": size, "names": sorted(names), "error": error}),
      flush=True)
sys.stdin.read()  # the connection stays open until the test is done (it counts it)
"""

B_LISTEN = 9888
A = {"name": "a", "listen_port": LISTEN, "ports": {"main": 8080, "backup": 80}}
B = {"name": "b", "listen_port": B_LISTEN, "ports": {"main": 9080, "backup": 90}}


class ServicesLab(SkLab):
    """SkLab with a second service b (9888 -> main 9080 / backup 90, vhosts that can send 10
    MB), and a driver in the services form (every service starts off)."""

    def __init__(self):
        super().__init__()
        for port, name in ((9080, "bmain"), (90, "bbackup")):
            proc = self.app.popen("python3", "-c", BIG_VHOST, str(port), name,
                                  stdout=subprocess.PIPE, text=True)
            self.closers.append(proc.close)
            assert proc.stdout.readline().strip() == "ready"
        self.driver.close()
        self.desired = {"services": [A, B], "pin_dir": str(self.pin_dir),
                        "flow_entries": 4096}
        self.driver = self.new_driver()

    def get_b(self, host: str = APP_V4) -> str:
        return http_get(self.client, host, B_LISTEN)


@pytest.fixture
def svl():
    lab = ServicesLab()
    try:
        yield lab
    finally:
        lab.close()


def _element(skl, pin: str, key: int) -> int | None:
    fd = kbpf.obj_get(str(skl.pin_dir / f"sk_lookup_{pin}"))
    try:
        raw = kbpf.map_lookup(fd, struct.pack("=I", key), 4)
        return struct.unpack("=I", raw)[0] if raw else None
    finally:
        os.close(fd)


def _prog_id(skl) -> int:
    fd = kbpf.obj_get(str(skl.pin_dir / "sk_lookup_prog"))
    try:
        return kbpf.prog_info(fd).id
    finally:
        os.close(fd)


def test_switching_one_service_50_times_leaves_the_other_untouched(svl):
    """Two services in one program. 50 switches of a (main <-> backup) while b holds a
    keep-alive connection and a connection that downloads 10 MB after 10 MB: every switch is
    one store, a's new connections follow it, and b's connections keep answering from the vhost
    they started on, with no new connection of b's steered meanwhile."""
    svl.driver("switch", service="a", target="main")
    svl.driver("switch", service="b", target="main")
    assert svl.get(APP_V4) == "main" and svl.get_b() == "bmain"
    link, prog = _link_id(svl), _prog_id(svl)
    kept = KeepAlive(svl.client, APP_V6, B_LISTEN)
    transfers = svl.client.popen("python3", "-c", TRANSFERS, APP_V4, str(B_LISTEN),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert transfers.stdout.readline().strip() == "started"
        assert kept.get() == "bmain"
        svl.driver("switch", service="b", target="backup")  # b's new connections: backup
        b_before = svl.driver("flows")["steered"]
        b_slot = _element(svl, "services", B_LISTEN)
        b_value = _element(svl, "active", b_slot)
        for i in range(50):
            target = "backup" if i % 2 == 0 else "main"
            change = svl.driver("switch", service="a", target=target)
            assert change["layout"] == 0 and change["flips"] == 1, change
            assert svl.get(APP_V4 if i % 3 else APP_V6) == target
            if i % 10 == 0:
                assert kept.get() == "bmain"
        assert kept.get() == "bmain"
        assert _element(svl, "active", b_slot) == b_value
        after = svl.driver("flows")["steered"]
        assert {k: v for k, v in after.items() if k.startswith("b/")} == \
            {k: v for k, v in b_before.items() if k.startswith("b/")}
        # (A SYN the kernel retransmits under load is looked up, and counted, again.)
        assert 25 <= after["a/main"] - b_before["a/main"] <= 27
        assert 25 <= after["a/backup"] - b_before["a/backup"] <= 27
        line = transfers.stdout.readline()  # at least two transfers (slow under load)
        while line.startswith("transfer") and line.split() != ["transfer", "2"]:
            line = transfers.stdout.readline()
        if line.startswith("transfer"):
            transfers.stdin.write("stop\n")
            transfers.stdin.flush()
            line = transfers.stdout.readline()
            while line.startswith("transfer"):
                line = transfers.stdout.readline()
        result = json.loads(line)  # its summary (at once, if it stopped on an error)
        assert result["error"] is None and result["transfers"] >= 2, result
        assert result["names"] == ["bmain"] and result["size"] >= 10 * 1024 * 1024 - 16
        # The established ones are counted where they started; b's new ones go to backup.
        counts = svl.driver("count")["counts"]
        assert counts["b/main"] == 2 and counts["b/backup"] == 0, counts
        assert svl.get_b() == "bbackup"
    finally:
        kept.close()
        transfers.close()
    assert (_link_id(svl), _prog_id(svl)) == (link, prog), "nothing re-linked or rebuilt"


def test_a_service_added_or_removed_is_inserts_and_deletes(svl):
    """Adding a service to the running program is its inserts (same program, same link);
    removing one deletes its entry (its listen port is refused) and touches no other."""
    one = {"services": [A]}
    svl.driver("switch", service="a", target="main", desired=one)
    link, prog = _link_id(svl), _prog_id(svl)
    held = KeepAlive(svl.client, APP_V4, LISTEN)
    assert held.get() == "main"
    assert connect_error(svl.client, APP_V4, B_LISTEN)[0] == "ECONNREFUSED"
    added = svl.driver("switch", service="b", target="backup")
    assert added["steps"] == ["addservice"] and added["flips"] == 1, added
    assert added["after"] == {"weights": {"a": 100, "b": 0}, "intact": True, "problems": []}
    assert svl.get_b() == "bbackup" and svl.get(APP_V4) == "main"
    kept_b = KeepAlive(svl.client, APP_V4, B_LISTEN)
    assert kept_b.get() == "bbackup"
    # a goes (the core removes only services that are off: switch it off first).
    svl.driver("switch", service="a", target=None)
    removed = svl.driver("switch", service="b", target="backup",
                         desired={"services": [B]})
    assert removed["steps"] == ["removeservice"] and removed["flips"] == 0, removed
    assert removed["after"]["intact"]
    assert svl.refused(APP_V4)
    assert held.get() == "main", "an established connection of a removed service stays"
    assert kept_b.get() == "bbackup" and svl.get_b() == "bbackup"
    assert (_link_id(svl), _prog_id(svl)) == (link, prog)
    held.close()
    kept_b.close()


def test_drift_of_one_service_is_reported_and_repaired_alone(svl):
    svl.driver("weights", weights={"a": 100, "b": 100})
    assert svl.get(APP_V4) == "main" and svl.get_b() == "bmain"
    a_slot, b_slot = _element(svl, "services", LISTEN), _element(svl, "services", B_LISTEN)
    # Someone flips b to backup: b's weight is reported wrong, a's is not; one store repairs.
    fd = kbpf.obj_get(str(svl.pin_dir / "sk_lookup_active"))
    try:
        kbpf.map_update(fd, struct.pack("=I", b_slot), struct.pack("=I", 1))
    finally:
        os.close(fd)
    assert svl.get_b() == "bbackup"
    state = svl.driver("read")["state"]
    assert state == {"weights": {"a": 100, "b": 0}, "intact": True, "problems": []}
    repair = svl.driver("switch", service="b", target="main")
    assert repair["layout"] == 0 and repair["flips"] == 1
    assert svl.get_b() == "bmain"
    # Someone deletes a's entry: a is refused and reported missing; b is not touched.
    fd = kbpf.obj_get(str(svl.pin_dir / "sk_lookup_services"))
    try:
        kbpf.map_delete(fd, struct.pack("=I", LISTEN))
    finally:
        os.close(fd)
    assert svl.refused(APP_V4) and svl.get_b() == "bmain"
    state = svl.driver("read")["state"]
    assert not state["intact"] and state["weights"] == {"b": 100}
    assert any("service a" in p for p in state["problems"]), state
    repair = svl.driver("switch", service="a", target="main")
    assert repair["steps"] == ["addservice"] and repair["flips"] == 1, repair
    assert svl.get(APP_V4) == "main" and svl.get_b() == "bmain"
    assert _element(svl, "services", B_LISTEN) == b_slot
    assert _element(svl, "services", LISTEN) != b_slot and a_slot is not None
    # Someone empties b's main sockets: only those are refilled.
    fd = kbpf.obj_get(str(svl.pin_dir / "sk_lookup_sockets"))
    try:
        for i in range(8):
            with suppress(OSError):
                kbpf.map_delete(fd, struct.pack("=I", (b_slot * 2 + 1) * 8 + i))
    finally:
        os.close(fd)
    state = svl.driver("read")["state"]
    assert [p for p in state["problems"] if "socket map" in p] == [
        "socket map for b main: holds 0 socket(s), 1 current listener(s) on port 9080"], state
    repair = svl.driver("switch", service="b", target="main")
    assert repair["steps"] == ["fillsockets"] and repair["flips"] == 0
    assert svl.get_b() == "bmain"


SHARE_CLIENT = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
failed = 0
for _ in range(n):
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()  # a reset: no TIME_WAIT left to collide with a later connection
    except OSError:
        failed += 1
print(failed, flush=True)
"""


ACCEPTOR = r"""
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen(4096)
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""


def test_a_split_assigns_each_new_connection_once_by_weight(svl):
    """main 10 %, backup 90 %: over 10,000 new connections the share of main is within 1.5
    points of 10 (the counters add up to the connections made)."""
    svl.main.stop()
    svl.backup.stop()
    for port in (8080, 80):  # listeners that keep up with 10,000 connections
        proc = svl.app.popen("python3", "-c", ACCEPTOR, str(port), stdout=subprocess.PIPE,
                             text=True)
        svl.closers.append(proc.close)
        assert proc.stdout.readline().strip() == "ready"
    svl.driver("weights", weights={"a": 10, "b": None})
    assert svl.driver("read")["state"]["weights"] == {"a": 10, "b": None}
    before = svl.driver("flows")["steered"]
    run = svl.client.run("python3", "-c", SHARE_CLIENT, APP_V4, str(LISTEN), "10000",
                         timeout=300)
    assert run.stdout.strip() == "0"
    after = svl.driver("flows")["steered"]
    main = after["a/main"] - before["a/main"]
    backup = after["a/backup"] - before["a/backup"]
    # A SYN the kernel retransmits under load is looked up (and counted) again.
    assert 10000 <= main + backup <= 10020
    assert abs(100 * main / (main + backup) - 10) <= 1.5, (main, backup)
    # A switch to 100 is one store again: every new connection to main.
    change = svl.driver("weights", weights={"a": 100})
    assert change["layout"] == 0 and change["flips"] == 1
    svl.client.run("python3", "-c", SHARE_CLIENT, APP_V4, str(LISTEN), "100")
    last = svl.driver("flows")["steered"]
    assert last["a/main"] - after["a/main"] == 100 and last["a/backup"] == after["a/backup"]


# ---- the upgrade from the single-service layout of cd0a822 ----------------------------------

OLD = "cd0a822^"  # the layout cd0a822 builds: its backends are the last before the contract


@pytest.fixture
def old_code(tmp_path):
    """The zddd and zdddlab of the single-service layout, from git, in a directory of its
    own (run from there, so its modules are the ones imported)."""
    repo = Path(__file__).resolve().parents[2]
    tree = tmp_path / "old-zddd"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(repo), "archive", OLD, "zddd", "zdddlab", "bpf"],
                             capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"no git history for {OLD}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def test_the_single_service_layout_is_adopted_without_a_flip_or_a_lost_flow(skl, old_code):
    old = skl.new_driver(prefix=("env", "-C", str(old_code), f"PYTHONPATH={old_code}"))
    old("switch", target="main")
    assert "steering main" in old("leftover")["leftover"]
    old.close()
    assert "sk_lookup_services" not in skl.pins()
    link = _link_id(skl)
    kept = KeepAlive(skl.client, APP_V4, LISTEN)
    kept6 = KeepAlive(skl.client, APP_V6, LISTEN)
    # New connections all through the upgrade: none refused, all to main.
    steady = skl.client.popen("python3", "-c", STEADY_CLIENT, APP_V4, str(LISTEN),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert kept.get() == "main" and kept6.get() == "main"
        assert steady.stdout.readline().strip() == "started"
        new = skl.new_driver()
        state = new("read")["state"]
        assert state["active"] == "main" and not state["intact"], state
        assert any("layout v1" in p for p in state["problems"]), state
        upgrade = new("switch", target="main")
        assert upgrade["steps"] == ["build"] and not upgrade["flip"], upgrade
        assert upgrade["after"] == {"active": "main", "intact": True, "problems": []}
        assert _link_id(skl) == link, "the program is replaced through the same link"
        assert len(_netns_links(skl.app)) == 1
        assert "sk_lookup_services" in skl.pins()
        assert kept.get() == "main" and kept6.get() == "main"
        assert skl.get(APP_V4) == "main"
        steady.stdin.write("stop\n")
        steady.stdin.flush()
        result = json.loads(steady.stdout.readline())
        assert result["failed"] == 0 and result["answers"] == ["main"], result
        assert result["made"] > 0
        # The connections made before the upgrade are still counted for main (the steady
        # client's are closed by now).
        assert new("count")["counts"] == {"main": 2, "backup": 0}
        assert new("flows")["steered"]["main"] >= 2
        # And it switches as any v2 layout: one store.
        flip = new("switch", target="backup")
        assert flip["layout"] == 0 and flip["flip"]
        assert skl.get(APP_V6) == "backup"
        assert kept.get() == "main" and kept6.get() == "main"
    finally:
        kept.close()
        kept6.close()
        steady.close()


STEADY_CLIENT = r"""
import http.client, json, select, sys
host, port = sys.argv[1], int(sys.argv[2])
made, failed, answers = 0, 0, set()
print("started", flush=True)
while not select.select([sys.stdin], [], [], 0.005)[0]:
    try:
        c = http.client.HTTPConnection(host, port, timeout=5)
        c.request("GET", "/")
        answers.add(c.getresponse().read().decode().strip())
        c.close()
        made += 1
    except OSError:
        failed += 1
print(json.dumps({"made": made, "failed": failed, "answers": sorted(answers)}), flush=True)
"""


OLD_ZDDD = "import sys; from zddd.daemon import main; sys.exit(main())"


@pytest.mark.parametrize("lab", ["sk_lookup"], indirect=True)
def test_zddd_started_on_the_single_service_layout_adopts_it(lab, old_code):
    """The same through the daemons: the zddd of cd0a822's layout steers backup and holds a
    keep-alive connection; it stops, and this zddd starts on its data plane: adopted (no
    flip, the same link), the held connection answered by backup and counted for it, new ones
    to backup; then a switch to main moves new connections only."""
    from zdddlab import VENV_BIN, Zddd, wait_for

    z = lab.own(Zddd(lab.app, lab.bus, lab.tmp, {"backend": "sk_lookup",
                                                  "bpf_pin_dir": lab.pin_dir,
                                                  "initial": "backup"}))
    lab.zddd = z
    with open(z.log_path, "a") as log:
        old = lab.app.popen("env", "-C", str(old_code), f"PYTHONPATH={old_code}",
                            str(VENV_BIN / "python"), "-c", OLD_ZDDD, "--config",
                            str(z.config_path), "--bus", lab.bus.address, stdout=log,
                            stderr=subprocess.STDOUT)
    lab.closers.append(old.close)
    wait_for(lambda: old.poll() is not None or z.owns_name(), 60, "the old zddd to start")
    assert old.poll() is None, z.log()
    assert http_get(lab.client, APP_V4, LISTEN) == "backup"
    pin_dir = Path(lab.pin_dir)
    assert not (pin_dir / "sk_lookup_services").exists(), "not the old layout"
    link = _link_id(SimpleNamespace(pin_dir=pin_dir))
    kept = KeepAlive(lab.client, APP_V4, LISTEN)
    try:
        assert kept.get() == "backup"
        old.terminate()
        assert old.wait(timeout=10) == 0, z.log()
        wait_for(lambda: not z.owns_name(), 10, "the old zddd's bus name to go")
        z.start()
        starts = [line for line in z.log().splitlines() if "event=start " in line]
        assert "how=adopted" in starts[-1] and "target=backup" in starts[-1], starts
        assert "event=flows_carried_over backend=sk_lookup from_layout=1 flows=1" in z.log()
        assert (pin_dir / "sk_lookup_services").exists()
        assert _link_id(SimpleNamespace(pin_dir=pin_dir)) == link
        assert z.prop("ActiveTarget") == "backup"
        assert kept.get() == "backup"
        assert http_get(lab.client, APP_V6, LISTEN) == "backup"
        status = json.loads(z.zddctl("status", "--json").stdout)
        assert status["targets"]["backup"]["connections"] == 1, status
        r = z.zddctl("switch", "main")
        assert r.returncode == 0, r.stderr
        assert http_get(lab.client, APP_V4, LISTEN) == "main"
        assert kept.get() == "backup"
    finally:
        kept.close()


@pytest.mark.parametrize("lab", ["sk_lookup"], indirect=True)
def test_zddd_with_two_services_and_a_third_added_at_reload(lab):
    """zddd with [services.a] and [services.b] on sk_lookup: one program steers both, each to
    its own initial target; a reload that adds c inserts it (same program, same link, b's
    held connection untouched) and c starts at its initial target."""
    from zdddlab import Vhost, Zddd

    for port, name in ((9080, "bmain"), (90, "bbackup"), (7080, "cmain"), (70, "cbackup")):
        vhost = Vhost(lab.app, port, name)
        lab.closers.append(vhost.stop)

    def spec(listen: int, main: int, backup: int, initial: str) -> dict:
        return {"listen_port": listen, "initial": initial,
                "targets": {"main": {"port": main}, "backup": {"port": backup}}}

    services = {"a": spec(LISTEN, 8080, 80, "main"), "b": spec(B_LISTEN, 9080, 90, "backup")}
    z = lab.own(Zddd(lab.app, lab.bus, lab.tmp, {
        "backend": "sk_lookup", "bpf_pin_dir": lab.pin_dir, "services": services,
        "metrics": {"listen": ""}}))  # the metrics adapter does not know services yet
    del z.config["drain_timeout"]  # a service key: per service in this form
    z.write_config()
    lab.zddd = z
    z.start()
    assert http_get(lab.client, APP_V4, LISTEN) == "main"
    assert http_get(lab.client, APP_V6, B_LISTEN) == "bbackup"
    pins = SimpleNamespace(pin_dir=Path(lab.pin_dir))
    link, prog = _link_id(pins), _prog_id(pins)
    kept = KeepAlive(lab.client, APP_V4, B_LISTEN)
    try:
        assert kept.get() == "bbackup"
        z.config["services"]["c"] = spec(7888, 7080, 70, "backup")
        z.write_config()
        r = z.zddctl("reload")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: connect_error(lab.client, APP_V4, 7888)[0] == "ok", 5,
                 "service c to be steered")
        assert http_get(lab.client, APP_V4, 7888) == "cbackup"
        assert (_link_id(pins), _prog_id(pins)) == (link, prog)
        assert kept.get() == "bbackup"
        assert http_get(lab.client, APP_V4, LISTEN) == "main"
    finally:
        kept.close()


SAME_TUPLE = r"""
import http.client, json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
seen = {}
for source in range(41000, 41030):
    for _ in range(3):
        c = http.client.HTTPConnection(host, port, timeout=5, source_address=("", source))
        c.request("GET", "/")
        seen.setdefault(source, set()).add(c.getresponse().read().decode().strip())
        # A reset: no TIME_WAIT keeps the next connection from the same port.
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        c.close()
print(json.dumps({str(k): sorted(v) for k, v in seen.items()}))
"""


def test_a_split_sends_the_same_addresses_and_ports_to_the_same_target(svl):
    """The split is a hash of the connection's addresses and ports, not a fresh random number:
    a connection made again from the same client port (as a retransmitted SYN is looked up
    again) goes where the first went; different client ports go to both targets."""
    svl.driver("weights", weights={"a": 50, "b": None})
    run = svl.client.run("python3", "-c", SAME_TUPLE, APP_V4, str(LISTEN))
    seen = json.loads(run.stdout)
    assert all(len(targets) == 1 for targets in seen.values()), seen
    assert {t for targets in seen.values() for t in targets} == {"main", "backup"}, seen


def test_a_link_given_another_program_gets_zddds_back_in_one_step(skl):
    """Someone replaces the program of zddd's link (BPF_LINK_UPDATE with a program that steers
    nothing): read says so, and the repair gives the same link zddd's program back, without a
    second link running beside it."""
    from bcc import BPF

    skl.driver("switch", target="main")
    link = _link_id(skl)
    other = BPF(text=b"int nothing(struct bpf_sk_lookup *ctx) { return SK_PASS; }")
    try:
        prog = other.load_func(b"nothing", kbpf.BPF_PROG_TYPE_SK_LOOKUP,
                               attach_type=kbpf.BPF_SK_LOOKUP)
        fd = kbpf.obj_get(str(skl.pin_dir / "sk_lookup_link"))
        try:
            kbpf.link_update(fd, prog.fd)
        finally:
            os.close(fd)
    finally:
        other.cleanup()
    assert skl.refused(APP_V4)
    state = skl.driver("read")["state"]
    assert state["problems"] == ["the pinned link is not of the pinned program"], state
    repair = skl.driver("switch", target="main")
    assert repair["steps"] == ["relink"] and not repair["flip"], repair
    assert _link_id(skl) == link and _netns_links(skl.app) == [link]
    assert skl.get(APP_V4) == "main"
