"""The nftables backend with many services in one table, on the real kernel in lab namespaces:
a switch of one service leaves every other service's connections and steering alone, splits
are drawn once per connection, and the single-service table of layout v1 (what zddd built up
to d3fac13) is adopted as service "default" with its established flows kept.

The backend is driven directly (DRIVER, in the app namespace) where the test is about the data
plane; the upgrade is also checked through zddd itself."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from zdddlab import APP_V4, PYTHON, REPO, VENV_BIN, KeepAlive, Zddd, dbus_call, http_get, wait_for

# Service a: 8888 -> 8080/80 (the lab's vhosts "main" and "backup"); b: 9888 -> 9080/90.
A = {"name": "a", "listen": 8888, "ports": {"main": 8080, "backup": 80}}
B = {"name": "b", "listen": 9888, "ports": {"main": 9080, "backup": 90}}
MB10 = 10 * 1024 * 1024

DRIVER = r"""
import json, sys, time
from zddd.backends import Desired, ServiceLayout
from zddd.backends.nftables import NftablesBackend

services = {s["name"]: s for s in json.loads(sys.argv[1])}
weights = {}
backend = NftablesBackend()

def desired():
    return Desired(tuple(sorted(
        (ServiceLayout(n, s["listen"], tuple(sorted(s["ports"].items())), weights.get(n))
         for n, s in services.items()), key=lambda s: s.listen_port)))

def state(s):
    return None if s is None else {"weights": s.weights, "intact": s.intact,
                                   "problems": list(s.problems)}

print("ready", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if "services" in cmd:
            services = {s["name"]: s for s in cmd["services"]}
        weights.update(cmd.get("weights", {}))
        answer = {}
        current = backend.read(desired())
        answer["before"] = state(current)
        if cmd["op"] == "apply":
            plan = backend.plan(current, desired())
            started = time.perf_counter()
            backend.apply(plan)
            answer["usec"] = (time.perf_counter() - started) * 1e6
            answer["layout"], answer["flip"] = list(plan.layout), list(plan.flip or ())
            answer["after"] = state(backend.read(desired()))
        elif cmd["op"] == "flows":
            answer["flows"] = [[s, t, n] for (s, t), n in backend.flows_steered().items()]
        elif cmd["op"] == "leftover":
            answer["leftover"] = NftablesBackend().leftover(desired())
        elif cmd["op"] == "remove":
            backend.remove(desired())
    except Exception as e:
        answer = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(answer), flush=True)
"""

# A vhost that answers lines: "name" -> its name; "bytes N" -> its name, then N bytes.
BULK_VHOST = r"""
import socket, sys, threading
port, name = int(sys.argv[1]), sys.argv[2].encode()
chunk = b"x" * 65536

def serve(conn):
    with conn, conn.makefile("rb") as f:
        for line in f:
            words = line.split()
            conn.sendall(name + b"\n")
            if words[:1] == [b"bytes"]:
                left = int(words[1])
                while left > 0:
                    conn.sendall(chunk[:left])
                    left -= len(chunk)

s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", port))
s.listen(4096)
print("ready", flush=True)
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# Through the listen port: 10 MB transfers one after the other on one connection, and a
# keep-alive connection asked its vhost's name between them, until stdin closes.
B_CLIENT = r"""
import json, socket, sys, threading
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
bulk = socket.create_connection((host, port), timeout=10)
keep = socket.create_connection((host, port), timeout=10)
fb, fk = bulk.makefile("rb"), keep.makefile("rb")
result = {"transfers": 0, "bulk": [], "keep": [], "errors": []}
def ask(sock, f):
    sock.sendall(b"name\n")
    return f.readline().decode().strip()
result["keep"].append(ask(keep, fk))
print("started", flush=True)
try:
    while not stop.is_set():
        bulk.sendall(b"bytes %d\n" % size)
        name = fb.readline().decode().strip()
        got = 0
        while got < size:
            data = fb.read1(min(size - got, 1 << 20))
            if not data:
                raise ConnectionError(f"transfer cut after {got} bytes")
            got += len(data)
        result["bulk"].append(name)
        result["transfers"] += 1
        result["keep"].append(ask(keep, fk))
except Exception as e:
    result["errors"].append(f"{type(e).__name__}: {e}")
print(json.dumps(result), flush=True)
"""


class Driver:
    """The nftables backend in the app namespace, for `services`; `call(op, **fields)`."""

    def __init__(self, lab, services: list[dict]):
        self.proc = lab.app.popen(str(VENV_BIN / "python"), "-c", DRIVER, json.dumps(services),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lab.closers.append(self.proc.close)
        assert self.proc.stdout.readline().strip() == "ready"

    def __call__(self, op: str, **fields) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        assert "error" not in answer, answer["error"]
        return answer

    def set(self, **weights) -> dict:
        answer = self("apply", weights=weights)
        assert answer["after"]["intact"], answer["after"]["problems"]
        return answer

    def flows(self) -> dict[tuple[str, str], int]:
        return {(s, t): n for s, t, n in self("flows")["flows"]}


def bulk_vhost(lab, port: int, name: str):
    proc = lab.app.popen(PYTHON, "-c", BULK_VHOST, str(port), name, stdout=subprocess.PIPE,
                         text=True)
    lab.closers.append(proc.close)
    assert proc.stdout.readline().strip() == "ready"


HELD = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = s.makefile("rb")
for _ in sys.stdin:
    s.sendall(b"name\n")
    print(f.readline().decode().strip(), flush=True)
"""


class Held:
    """A connection from the client to APP_V4:port held open; `name()` asks its vhost."""

    def __init__(self, lab, port: int):
        self.proc = lab.client.popen(PYTHON, "-c", HELD, APP_V4, str(port),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lab.closers.append(self.proc.close)

    def name(self) -> str:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()


def ask_name(lab, port: int) -> str:
    """A new connection from the client to APP_V4:port; the name its vhost answers."""
    script = ("import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])),"
              " timeout=5); s.sendall(b'name\\n'); print(s.makefile().readline().strip())")
    return lab.client.run(PYTHON, "-c", script, APP_V4, str(port)).stdout.strip()


def steer_keys(commands: list) -> set:
    """The steer map's keys that a list of nft commands touches."""
    keys = set()
    for command in commands:
        element = next(iter(command.values())).get("element")
        if element and element["name"] == "steer":
            keys.update(e[0] if isinstance(e, list) else e for e in element["elem"])
    return keys


def test_50_switches_of_one_service_leave_the_others_transfers_and_keepalive_alone(lab):
    bulk_vhost(lab, 9080, "b-main")
    bulk_vhost(lab, 90, "b-backup")
    driver = Driver(lab, [A, B])
    built = driver.set(a=100, b=100)
    assert built["after"]["weights"] == {"a": 100, "b": 100}
    client = lab.client.popen(PYTHON, "-c", B_CLIENT, APP_V4, "9888", str(MB10),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lab.closers.append(client.close)
    assert client.stdout.readline().strip() == "started"
    times = []
    for i in range(50):
        target = "backup" if i % 2 == 0 else "main"
        answer = driver.set(a=100 if target == "main" else 0)
        # One element of one service, nothing of the layout, nothing of b.
        assert answer["layout"] == [] and steer_keys(answer["flip"]) == {8888}, answer
        assert len(answer["flip"]) == 2  # delete + add of 8888's element, one transaction
        assert answer["after"]["weights"] == {"a": 100 if target == "main" else 0, "b": 100}
        assert http_get(lab.client, APP_V4, 8888) == target
        times.append(answer["usec"])
    client.stdin.close()
    result = json.loads(client.stdout.readline())
    assert result["errors"] == [], result["errors"]
    assert result["transfers"] >= 3, result  # transfers ran all through the switches
    assert set(result["bulk"]) == {"b-main"} and set(result["keep"]) == {"b-main"}, result
    assert ask_name(lab, 9888) == "b-main"  # b's steering untouched
    flows = driver.flows()
    assert flows[("b", "main")] == 3 and flows[("b", "backup")] == 0  # bulk, keep, ask_name
    assert flows[("a", "main")] == 25 and flows[("a", "backup")] == 25
    assert driver("leftover")["leftover"] == "table inet zddd steering a main, b main"
    driver("remove")
    assert lab.app.run("nft", "list", "tables").stdout.strip() == ""
    assert driver("leftover")["leftover"] is None
    print(f"50 switches of a beside b's {result['transfers']} x 10 MB: apply p50 "
          f"{sorted(times)[25]:.0f} us, max {max(times):.0f} us")


def test_adding_and_removing_a_service_leaves_the_others_alone(lab):
    bulk_vhost(lab, 9080, "b-main")
    bulk_vhost(lab, 90, "b-backup")
    driver = Driver(lab, [A])
    driver.set(a=0)
    kept = KeepAlive(lab.client, APP_V4, 8888)
    lab.closers.append(kept.close)
    assert kept.get() == "backup"
    handles = table_handles(lab)
    added = driver("apply", services=[A, B], weights={"b": 100})
    assert added["after"]["intact"] and added["after"]["weights"] == {"a": 0, "b": 100}
    assert steer_keys(added["layout"] + added["flip"]) == {9888}
    assert ask_name(lab, 9888) == "b-main"
    # Nothing of a's, nor anything shared, was re-created (same handles).
    after = table_handles(lab)
    assert {k: after[k] for k in handles} == handles
    removed = driver("apply", services=[A])
    assert removed["after"]["intact"] and removed["after"]["weights"] == {"a": 0}
    assert steer_keys(removed["layout"] + removed["flip"]) == {9888}
    assert table_handles(lab) == handles
    assert kept.get() == "backup" and http_get(lab.client, APP_V4, 8888) == "backup"
    refused = lab.client.run(PYTHON, "-c", "import socket; socket.create_connection(("
                             f"'{APP_V4}', 9888), timeout=3)", check=False)
    assert "ConnectionRefusedError" in refused.stderr


def table_handles(lab) -> dict[tuple[str, str], int]:
    """Every object of the table (and rule, by chain and position) -> its kernel handle."""
    listing = json.loads(lab.app.run("nft", "-j", "-a", "list", "table", "inet", "zddd")
                         .stdout)["nftables"]
    handles, position = {}, {}
    for item in listing:
        (kind, obj), = item.items()
        if kind == "rule":
            n = position[obj["chain"]] = position.get(obj["chain"], -1) + 1
            handles[("rule", f"{obj['chain']}#{n}")] = obj["handle"]
        elif "handle" in obj:
            handles[(kind, obj["name"])] = obj["handle"]
    return handles


def test_drift_of_one_service_is_repaired_alone(lab):
    bulk_vhost(lab, 9080, "b-main")
    bulk_vhost(lab, 90, "b-backup")
    driver = Driver(lab, [A, B])
    driver.set(a=100, b=0)
    handles = table_handles(lab)
    lab.app.run("nft", "delete element inet zddd steer { 9888 }")
    seen = driver("read")["before"]
    assert seen["intact"] and seen["weights"] == {"a": 100, "b": None}
    repaired = driver("apply")
    assert repaired["layout"] == [] and steer_keys(repaired["flip"]) == {9888}
    assert ask_name(lab, 9888) == "b-backup"
    lab.app.run("nft", "delete element inet zddd steer { 9888 }; "
                "add element inet zddd steer { 9888 : goto steer_main }")
    seen = driver("read")["before"]
    assert seen["intact"] and seen["weights"] == {"a": 100, "b": 100}
    repaired = driver("apply")
    assert repaired["layout"] == [] and steer_keys(repaired["flip"]) == {9888}
    assert ask_name(lab, 9888) == "b-backup"
    lab.app.run("nft", "delete element inet zddd steer { 9888 }; "
                "add element inet zddd steer { 9888 : jump steer_main }")
    seen = driver("read")["before"]
    assert not seen["intact"] and seen["weights"] == {"a": 100}
    assert seen["problems"] == ["map steer element 9888 foreign"]
    repaired = driver("apply")
    assert steer_keys(repaired["layout"] + repaired["flip"]) == {9888}
    assert repaired["after"]["intact"] and ask_name(lab, 9888) == "b-backup"
    # A port map emptied: its elements come back, every service's, and no steering changes.
    lab.app.run("nft", "flush map inet zddd backup_port")
    seen = driver("read")["before"]
    assert set(seen["problems"]) == {"map backup_port element 8888 missing",
                                     "map backup_port element 9888 missing"}
    repaired = driver("apply")
    assert repaired["flip"] == [] and len(repaired["layout"]) == 2
    assert ask_name(lab, 9888) == "b-backup"
    assert http_get(lab.client, APP_V4, 8888) == "main"
    assert table_handles(lab) == handles


CONNECT_MANY = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    s = socket.create_connection((host, port), timeout=5)
    s.close()
"""


def test_a_split_is_drawn_once_per_connection_and_kept_through_switches(lab):
    bulk_vhost(lab, 9080, "b-main")
    bulk_vhost(lab, 90, "b-backup")
    driver = Driver(lab, [B])
    driver.set(b=10)
    n = 10000
    started = time.monotonic()
    lab.client.run(PYTHON, "-c", CONNECT_MANY, APP_V4, "9888", str(n), timeout=120)
    took = time.monotonic() - started
    flows = driver.flows()
    assert flows[("b", "main")] + flows[("b", "backup")] == n
    share = 100 * flows[("b", "main")] / n
    assert abs(share - 10) <= 1.5, f"{share:.2f} % of {n} went to main at weight 10"
    driver.set(b=50)
    kept = []
    for _ in range(20):
        k = Held(lab, 9888)
        kept.append((k, k.name()))
    assert {name for _, name in kept} == {"b-main", "b-backup"}  # 2^-19 to fail by chance
    for weight in (100, 0, None, 73):
        driver.set(b=weight)
        assert all(k.name() == name for k, name in kept), f"one moved at weight {weight}"
    print(f"weight 10: {share:.2f} % of {n} new connections to main ({took:.1f} s)")


OLD_COMMIT = "d3fac13"  # the last commit whose zddd builds layout v1 (cd0a822 changed the
# backend contract under it); the layout is the same as at cd0a822.

OLD_BUILD = r"""
import sys
from zddd.backends import Desired, backend_class
desired = Desired(8888, (("backup", 80), ("main", 8080)), sys.argv[1])
backend = backend_class("nftables")()
backend.apply(backend.plan(backend.read(desired), desired))
assert backend.read(desired).intact
"""


@pytest.fixture
def old_zddd(tmp_path) -> Path:
    """The zddd package of OLD_COMMIT, for PYTHONPATH."""
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{OLD_COMMIT}^{{commit}}"],
                      capture_output=True).returncode != 0:
        pytest.skip(f"this checkout lacks {OLD_COMMIT} (a shallow clone)")
    top = tmp_path / "old-zddd"
    top.mkdir()
    subprocess.run(f"git -C {REPO} archive {OLD_COMMIT} zddd | tar -x -C {top}", shell=True,
                   check=True)
    return top


def build_v1(lab, old: Path, target: str) -> None:
    lab.app.run(str(VENV_BIN / "python"), "-c", OLD_BUILD, target, cwd="/",
                env={"PYTHONPATH": str(old), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def test_a_v1_table_is_upgraded_in_place_keeping_its_flows(lab, old_zddd):
    build_v1(lab, old_zddd, "backup")
    on_backup = KeepAlive(lab.client, APP_V4, 8888)
    lab.closers.append(on_backup.close)
    assert on_backup.get() == "backup"
    build_v1(lab, old_zddd, "main")
    on_main = KeepAlive(lab.client, APP_V4, 8888)
    lab.closers.append(on_main.close)
    assert on_main.get() == "main"
    listing = lab.app.run("nft", "list", "table", "inet", "zddd").stdout
    assert "layout_v1" in listing and "tcp dport 8888 fib daddr type local" in listing
    hooks = {k: v for k, v in table_handles(lab).items() if k[1] in ("prerouting", "output")}
    default = dict(A, name="default")
    driver = Driver(lab, [default])
    seen = driver("read")["before"]
    assert seen["weights"] == {"default": 100} and not seen["intact"]
    upgraded = driver("apply", weights={"default": 100})
    assert upgraded["flip"] == [] and upgraded["after"]["intact"], upgraded
    assert upgraded["after"]["weights"] == {"default": 100}
    listing = lab.app.run("nft", "list", "table", "inet", "zddd").stdout
    assert "layout_v2" in listing and "layout_v1" not in listing
    # The NAT chains were kept (their handles), only their rules rewritten.
    assert {k: v for k, v in table_handles(lab).items() if k in hooks} == hooks
    assert on_backup.get() == "backup" and on_main.get() == "main"
    assert http_get(lab.client, APP_V4, 8888) == "main"


def test_zddd_takes_over_from_the_zddd_of_layout_v1_without_a_flip(lab, old_zddd):
    """The old zddd itself (d3fac13's daemon) steers and is stopped; the new one adopts its
    table as service "default": no switch, held connections keep their vhost."""
    z = lab.own(Zddd(lab.app, lab.bus, lab.tmp, {"backend": "nftables", "initial": "main"}))
    with open(lab.tmp / "old-zddd.log", "w") as log:
        old = lab.app.popen(str(VENV_BIN / "python"), "-c",
                            "import sys; from zddd.daemon import main; sys.exit(main())",
                            "--config", str(z.config_path), "--bus", lab.bus.address, cwd="/",
                            env={**os.environ, "PYTHONPATH": str(old_zddd)}, stdout=log,
                            stderr=subprocess.STDOUT)
    wait_for(lambda: old.poll() is not None or z.owns_name(), 15, "the old zddd to start")
    on_main = KeepAlive(lab.client, APP_V4, 8888)
    lab.closers.append(on_main.close)
    assert on_main.get() == "main"
    assert dbus_call(lab.bus.address, "Switch", "s", ["backup"])[0] is None
    on_backup = KeepAlive(lab.client, APP_V4, 8888)
    lab.closers.append(on_backup.close)
    assert on_backup.get() == "backup"
    old.terminate()
    assert old.wait(timeout=10) == 0, (lab.tmp / "old-zddd.log").read_text()
    wait_for(lambda: not z.owns_name(), 10, "the old zddd to release its name")
    assert "layout_v1" in lab.app.run("nft", "list", "table", "inet", "zddd").stdout
    hooks = {k: v for k, v in table_handles(lab).items() if k[1] in ("prerouting", "output")}
    z.start()
    assert z.prop("ActiveTarget") == "backup"
    assert "how=adopted" in z.log() and "event=switch " not in z.log(), z.log()
    assert "older layout v1" in z.log()
    assert "layout_v2" in lab.app.run("nft", "list", "table", "inet", "zddd").stdout
    assert {k: v for k, v in table_handles(lab).items() if k in hooks} == hooks
    assert on_main.get() == "main" and on_backup.get() == "backup"
    assert http_get(lab.client, APP_V4, 8888) == "backup"
    assert z.zddctl("switch", "main").returncode == 0
    assert http_get(lab.client, APP_V4, 8888) == "main"
    assert on_backup.get() == "backup" and on_main.get() == "main"
