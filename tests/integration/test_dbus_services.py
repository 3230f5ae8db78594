"""The D-Bus API of many services on a real dbus-daemon with zddd's shipped policy: an object per
service, the ObjectManager, the Manager with one service or several, SetWeights, and zddctl's
-s, status, services and weights against it. The daemon's adapter (zddd/service/dbus.py) serves
a stand-in core of many services (tests/unit/fakecore.py) that records what it is asked; the
real core behind the same adapter is tested with a real zddd in test_services_zddd.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from zdddlab import VENV_BIN, Bus, dbus_call

from unit.fakecore import FakeCore, FakeService
from zddd.service import dbus
from zddd.service.dbus import Message, MessageBus, MessageType, Variant

E = "org.zddd.Steering1.Error."
MANAGER = "org.zddd.Steering1.Manager"
SERVICE = "org.zddd.Steering1.Service"
ROOT = "/org/zddd/Steering1"
PROPS = "org.freedesktop.DBus.Properties"
OM = "org.freedesktop.DBus.ObjectManager"


class Served:
    """The adapter serving `core` on a private bus, its event loop in a thread."""

    def __init__(self, core, tmp: Path):
        self.core = core
        self.bus = Bus(tmp)
        self.address = self.bus.address
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.reloads = 0

        async def reload():
            self.reloads += 1

        for attempt in range(100):  # the socket file appears just before the daemon listens
            try:
                self.conn = asyncio.run_coroutine_threadsafe(
                    dbus.serve(core, self.address, reload), self.loop).result(10)
                break
            except ConnectionRefusedError:
                if attempt == 99:
                    raise
                time.sleep(0.05)

    def on_loop(self, fn, *args):
        """Run fn(*args) on the adapter's loop (where the core calls its observers)."""
        async def go():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.conn.disconnect)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.bus.close()


@pytest.fixture
def public_tmp(need_root):
    """A directory other users can reach (pytest's tmp dirs are private to root)."""
    tmp = Path(tempfile.mkdtemp(prefix="zddd-bus-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def two(public_tmp):
    served = Served(FakeCore(("web", 8888), ("api", 8890)), public_tmp)
    yield served
    served.close()


@pytest.fixture
def one(public_tmp):
    served = Served(FakeCore(), public_tmp)
    yield served
    served.close()


def call(served, member, sig="", body=(), *, path=ROOT, interface=MANAGER):
    return dbus_call(served.address, member, sig, list(body), 10, interface=interface, path=path)


def prop(served, name, *, path=ROOT, interface=MANAGER):
    err, body = call(served, "Get", "ss", [interface, name], path=path, interface=PROPS)
    assert err is None, body
    return body[0].value


def unwrap(value):
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    return value


def zddctl(served, *argv, user=None):
    cmd = [str(VENV_BIN / "zddctl"), "--bus", served.address, *argv]
    if user:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd="/")


async def _watch(address: str, actions, match: str) -> list[Message]:
    """Signals matching `match` seen while `actions` (callables, run in a thread) ran."""
    bus = await MessageBus(bus_address=address).connect()
    seen: list[Message] = []
    try:
        reply = await bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s",
            body=[f"type='signal',sender='org.zddd.Steering1',{match}"]))
        assert reply.message_type == MessageType.METHOD_RETURN, reply.body
        bus.add_message_handler(
            lambda m: seen.append(m) if m.message_type == MessageType.SIGNAL else None)
        for action in actions:
            await asyncio.get_running_loop().run_in_executor(None, action)
        await asyncio.sleep(0.3)
    finally:
        bus.disconnect()
    return seen


# ---- the objects ------------------------------------------------------------------------------

def test_each_service_is_an_object_listed_by_the_object_manager(two):
    err, body = call(two, "GetManagedObjects", interface=OM)
    assert err is None, body
    objects = unwrap(body[0])
    assert set(objects) == {ROOT, f"{ROOT}/service/api", f"{ROOT}/service/web"} - {ROOT}
    web = objects[f"{ROOT}/service/web"][SERVICE]
    assert web["Name"] == "web" and web["ListenPort"] == 8888
    assert web["ActiveTarget"] == "main" and web["Weights"] == {"main": 100, "backup": 0}
    assert web["Targets"] == {"main": 8080, "backup": 80}
    assert web["LastSwitchTimestamp"] == 0 and web["Connections"] == {"main": 0, "backup": 0}
    assert objects[f"{ROOT}/service/api"][SERVICE]["ListenPort"] == 8890
    # The tree, as busctl shows it, and each object's interface.
    r = subprocess.run(["busctl", f"--address={two.address}", "tree", "org.zddd.Steering1"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert f"{ROOT}/service/web" in r.stdout and f"{ROOT}/service/api" in r.stdout
    r = subprocess.run(["busctl", f"--address={two.address}", "introspect",
                        "org.zddd.Steering1", f"{ROOT}/service/web", SERVICE],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    for name in ("Switch", "SwitchWithOptions", "WaitDrained", "SetWeights", "Name",
                 "ListenPort", "Weights", "LastSwitchTimestamp", "Switched"):
        assert f".{name} " in r.stdout, name
    r = subprocess.run(["busctl", f"--address={two.address}", "introspect",
                        "org.zddd.Steering1", ROOT], capture_output=True, text=True, timeout=10)
    assert OM in r.stdout and "GetManagedObjects" in r.stdout


def test_with_several_services_the_manager_names_their_objects(two):
    props = unwrap(call(two, "GetAll", "s", [MANAGER], interface=PROPS)[1][0])
    assert props == {"Backend": "nftables", "Services": ["api", "web"]}
    for member, sig, body in (("Switch", "s", ["backup"]),
                              ("SwitchWithOptions", "sa{sv}", ["off", {}]),
                              ("WaitDrained", "st", ["main", 0]),
                              ("SetWeights", "a{su}a{sv}", [{"main": 50, "backup": 50}, {}])):
        err, reply = call(two, member, sig, body)
        assert err == E + "InvalidArgument", (member, err, reply)
        assert f"{ROOT}/service/api" in reply[0] and f"{ROOT}/service/web" in reply[0]
    err, reply = call(two, "Get", "ss", [MANAGER, "ActiveTarget"], interface=PROPS)
    assert err == E + "InvalidArgument" and f"{ROOT}/service/web" in reply[0]
    assert all(not svc.calls for svc in two.core.services.values())  # nothing reached a service
    assert call(two, "Reload")[0] is None and two.reloads == 1  # global: still the Manager's


def test_a_service_object_switches_its_service_and_signals_on_its_own_path(two):
    web = f"{ROOT}/service/web"

    def switch():
        assert call(two, "Switch", "s", ["backup"], path=web, interface=SERVICE) == (None, [])

    seen = asyncio.run(_watch(two.address, [switch], "path_namespace='/org/zddd/Steering1'"))
    assert two.core.services["web"].calls[0][:2] == ("switch", "backup")
    assert two.core.services["web"].calls[0][4] == "uid=0"  # who asked
    assert not two.core.services["api"].calls
    switched = [(m.path, m.interface, tuple(m.body)) for m in seen if m.member == "Switched"]
    assert switched == [(web, SERVICE, ("main", "backup", 42))]  # not on the Manager: several
    changed = [(m.path, m.body[0], m.body[1]) for m in seen if m.member == "PropertiesChanged"]
    assert [p for p, _, _ in changed] == [web]
    assert changed[0][1] == SERVICE
    assert unwrap(changed[0][2])["ActiveTarget"] == "backup"
    assert unwrap(changed[0][2])["Weights"] == {"main": 0, "backup": 100}
    assert prop(two, "ActiveTarget", path=web, interface=SERVICE) == "backup"
    # The same errors, and the same signature checks.
    err, reply = call(two, "Switch", "s", ["Main"], path=web, interface=SERVICE)
    assert err == E + "InvalidTarget"
    err, _ = call(two, "Switch", "i", [1], path=web, interface=SERVICE)
    assert err == "org.freedesktop.DBus.Error.InvalidArgs"
    err, _ = call(two, "SwitchWithOptions", "sa{sv}", ["off", {"forse": Variant("b", True)}],
                  path=web, interface=SERVICE)
    assert err == E + "InvalidArgument"
    err, _ = call(two, "Switch", "s", ["main"], path=f"{ROOT}/service/nope", interface=SERVICE)
    assert err is not None and err.startswith("org.freedesktop.DBus.Error.")
    assert (None, [True]) == call(two, "WaitDrained", "st", ["main", 0], path=web,
                                  interface=SERVICE)


def test_set_weights_reaches_the_service_with_its_options(two):
    api = f"{ROOT}/service/api"
    err, body = call(two, "SetWeights", "a{su}a{sv}",
                     [{"main": 10, "backup": 90}, {"ramp_usec": Variant("t", 30_000_000),
                                                   "force": Variant("b", True)}],
                     path=api, interface=SERVICE)
    assert (err, body) == (None, [])
    assert two.core.services["api"].calls == [
        ("set_weights", {"main": 10, "backup": 90}, True, 30.0, "uid=0")]
    assert prop(two, "Weights", path=api, interface=SERVICE) == {"main": 10, "backup": 90}
    assert prop(two, "ActiveTarget", path=api, interface=SERVICE) == "split"
    for options in ({"ramp_usec": Variant("u", 1)}, {"drain_timeout_usec": Variant("t", 1)},
                    {"ramp_usec": Variant("t", 24 * 3600 * 10**6 + 1)}):
        err, body = call(two, "SetWeights", "a{su}a{sv}", [{"main": 10, "backup": 90}, options],
                         path=api, interface=SERVICE)
        assert err == E + "InvalidArgument", (options, err, body)
    err, body = call(two, "SetWeights", "a{su}a{sv}", [{"main": 10, "backup": 10}, {}],
                     path=api, interface=SERVICE)
    assert err == E + "InvalidArgument"  # the core's refusal, under its name
    # A core before weights: the call is answered, as not supported.
    with core_before_weights():
        err, body = call(two, "SetWeights", "a{su}a{sv}", [{"main": 10, "backup": 90}, {}],
                         path=api, interface=SERVICE)
    assert err == "org.freedesktop.DBus.Error.NotSupported" and "Switch" in body[0]


@contextmanager
def core_before_weights():
    """The stand-in's services without set_weights, as in a core before issue #17."""
    saved = FakeService.set_weights
    FakeService.set_weights = property(lambda self: None)
    try:
        yield
    finally:
        FakeService.set_weights = saved


def test_a_reload_adds_and_removes_objects_with_object_manager_signals(two):
    def add():
        two.on_loop(two.core.add, "jobs", 8892)

    def remove():
        two.on_loop(two.core.remove, "api")

    seen = asyncio.run(_watch(two.address, [add, remove], f"path='{ROOT}'"))
    om = [(m.member, m.body[0]) for m in seen if m.interface == OM]
    assert om == [("InterfacesAdded", f"{ROOT}/service/jobs"),
                  ("InterfacesRemoved", f"{ROOT}/service/api")]
    added = next(m for m in seen if m.member == "InterfacesAdded")
    assert added.signature == "oa{sa{sv}}"
    assert unwrap(added.body[1])[SERVICE]["ListenPort"] == 8892
    removed = next(m for m in seen if m.member == "InterfacesRemoved")
    assert removed.body[1] == [SERVICE]
    services = [unwrap(m.body[1])["Services"] for m in seen if m.member == "PropertiesChanged"]
    assert services == [["api", "jobs", "web"], ["jobs", "web"]]
    objects = unwrap(call(two, "GetManagedObjects", interface=OM)[1][0])
    assert set(objects) == {f"{ROOT}/service/jobs", f"{ROOT}/service/web"}
    assert call(two, "Switch", "s", ["main"], path=f"{ROOT}/service/api",
                interface=SERVICE)[0] is not None  # gone


def test_from_several_services_to_one_the_manager_acts_on_it_again(two):
    two.on_loop(two.core.remove, "api")
    assert prop(two, "Services") == ["web"]
    assert prop(two, "ListenPort") == 8888
    assert call(two, "Switch", "s", ["backup"]) == (None, [])
    assert two.core.services["web"].calls[0][:2] == ("switch", "backup")


# ---- one service: the Manager as before, and the service's object too -----------------------

def test_one_service_the_manager_acts_on_it_and_signals_both(one):
    default = f"{ROOT}/service/default"
    props = unwrap(call(one, "GetAll", "s", [MANAGER], interface=PROPS)[1][0])
    assert props["Services"] == ["default"] and props["ActiveTarget"] == "main"
    assert props["Weights"] == {"main": 100, "backup": 0} and props["LastSwitchTimestamp"] == 0

    def switch():
        assert call(one, "Switch", "s", ["backup"]) == (None, [])

    def weights():
        assert call(one, "SetWeights", "a{su}a{sv}", [{"main": 40, "backup": 60}, {}]) == \
            (None, [])

    seen = asyncio.run(_watch(one.address, [switch, weights],
                              "path_namespace='/org/zddd/Steering1'"))
    switched = sorted((m.path, m.interface) for m in seen if m.member == "Switched")
    assert switched == [(ROOT, MANAGER), (default, SERVICE)]
    weights_seen = [(m.path, unwrap(m.body[1])["Weights"]) for m in seen
                    if m.member == "PropertiesChanged" and "Weights" in m.body[1]]
    assert sorted(weights_seen, key=str) == sorted(
        [(ROOT, {"main": 0, "backup": 100}), (default, {"main": 0, "backup": 100}),
         (ROOT, {"main": 40, "backup": 60}), (default, {"main": 40, "backup": 60})], key=str)
    assert prop(one, "Weights") == {"main": 40, "backup": 60}


# ---- the policy -------------------------------------------------------------------------------

def test_anyone_lists_and_reads_the_services_but_only_root_calls_them(two):
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

    def busctl(*argv):
        return subprocess.run([*nobody, "busctl", f"--address={two.address}", *argv],
                              capture_output=True, text=True, timeout=10, cwd="/")

    r = busctl("call", "org.zddd.Steering1", ROOT, OM, "GetManagedObjects")
    assert r.returncode == 0 and f"{ROOT}/service/web" in r.stdout, r.stderr
    r = busctl("get-property", "org.zddd.Steering1", f"{ROOT}/service/web", SERVICE, "Weights")
    assert r.returncode == 0 and "main" in r.stdout, r.stderr
    for argv in (("Switch", "s", "backup"), ("SetWeights", "a{su}a{sv}", "2", "main", "50",
                                              "backup", "50", "0"),
                 ("WaitDrained", "st", "main", "0")):
        r = busctl("call", "org.zddd.Steering1", f"{ROOT}/service/web", SERVICE, *argv)
        assert r.returncode != 0 and "Access denied" in r.stderr, (argv, r)
    assert not two.core.services["web"].calls
    r = zddctl(two, "status", "--json", user="nobody")
    assert r.returncode == 0, r.stderr
    r = zddctl(two, "-s", "web", "switch", "backup", user="nobody")
    assert r.returncode == 1 and "permission denied" in r.stderr.lower(), r


# ---- zddctl -----------------------------------------------------------------------------------

def test_zddctl_needs_a_service_when_there_are_several(two):
    for argv in (["switch", "backup"], ["weights", "main=50"], ["wait-drained", "main"]):
        r = zddctl(two, *argv)
        assert r.returncode == 2, (argv, r)
        assert "api, web" in r.stderr and "-s" in r.stderr and "Traceback" not in r.stderr
        r = zddctl(two, "--json", *argv)
        assert r.returncode == 2 and json.loads(r.stdout)["error"] == "usage", r
    r = zddctl(two, "-s", "shop", "switch", "backup")
    assert r.returncode == 2 and "no service 'shop'" in r.stderr and "api, web" in r.stderr
    assert all(not svc.calls for svc in two.core.services.values())
    r = zddctl(two, "-s", "web", "switch", "backup")
    assert (r.returncode, r.stdout) == (0, "switched to backup\n"), r
    assert two.core.services["web"].calls[0][:2] == ("switch", "backup")
    assert not two.core.services["api"].calls
    r = zddctl(two, "-s", "web", "switch", "main", "--ramp", "30")
    assert (r.returncode, r.stdout) == (0, "ramping to main over 30 s\n"), r
    assert two.core.services["web"].calls[1] == ("switch", "main", False, None, "uid=0", 30.0)
    r = zddctl(two, "-s", "api", "wait-drained", "main", "--timeout", "1")
    assert r.returncode == 0, r.stderr
    ((what, target, timeout),) = two.core.services["api"].calls
    assert (what, target) == ("wait_drained", "main") and 0.9 < timeout <= 1.0
    r = zddctl(two, "services")
    assert (r.returncode, r.stdout) == (0, "api\nweb\n")
    assert json.loads(zddctl(two, "services", "--json").stdout) == {"services": ["api", "web"]}


def test_zddctl_status_of_several_services(two):
    two.on_loop(two.core.services["api"].set_weights, {"main": 30, "backup": 70})
    r = zddctl(two, "status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert set(st) == {"backend", "services"} and st["backend"] == "nftables"
    assert set(st["services"]) == {"api", "web"}
    api = st["services"]["api"]
    assert set(api) == {"active_target", "draining", "listen_port", "last_switch_usec",
                        "last_switch_timestamp_usec", "last_switch_caller", "targets",
                        "weights", "ramp"}
    assert api["weights"] == {"main": 30, "backup": 70} and api["active_target"] == "split"
    assert api["listen_port"] == 8890
    assert api["targets"]["main"] == {"port": 8080, "up": True, "connections": 0}
    text = zddctl(two, "status").stdout
    assert text.startswith("backend:       nftables\n\nservice api:\n  active target: split\n")
    assert "  weights:       main 30 %, backup 70 %\n" in text
    assert "\nservice web:\n  active target: main\n" in text
    # One of them.
    st = json.loads(zddctl(two, "-s", "web", "status", "--json").stdout)
    assert st["active_target"] == "main" and st["backend"] == "nftables"
    assert st["listen_port"] == 8888 and list(st["services"]) == ["web"]
    assert zddctl(two, "-s", "web", "status").stdout.startswith("service:       web\n")


def test_zddctl_weights(two):
    r = zddctl(two, "-s", "api", "weights", "main=10", "--ramp", "60")
    assert (r.returncode, r.stdout) == (0, "weights set: main 10 %, backup 90 %, ramping over "
                                           "60 s\n"), r
    assert two.core.services["api"].calls == [
        ("set_weights", {"main": 10, "backup": 90}, False, 60.0, "uid=0")]
    r = zddctl(two, "-s", "api", "--json", "weights", "backup=25", "--force")
    assert r.returncode == 0, r
    assert json.loads(r.stdout) == {"weights": {"main": 75, "backup": 25},
                                    "ramp_seconds": None, "service": "api"}
    assert two.core.services["api"].calls[-1] == (
        "set_weights", {"main": 75, "backup": 25}, True, None, "uid=0")
    for bad in (["main=60", "backup=60"], ["main=101"], ["main=x"], ["main=5", "main=6"],
                ["other=5"]):
        r = zddctl(two, "-s", "api", "weights", *bad)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (bad, r)
    assert len(two.core.services["api"].calls) == 2
    # A zddd that cannot split yet: its error, exit 1.
    with core_before_weights():
        r = zddctl(two, "-s", "api", "weights", "main=50")
    assert r.returncode == 1 and "NotSupported" in r.stderr, r


def test_zddctl_with_one_service_is_as_before_plus_services(one):
    r = zddctl(one, "status", "--json")
    st = json.loads(r.stdout)
    assert st["active_target"] == "main" and st["backend"] == "nftables"
    assert st["services"] == {"default": {
        "active_target": "main", "draining": "", "listen_port": 8888, "last_switch_usec": 0,
        "last_switch_timestamp_usec": 0, "last_switch_caller": "",
        "targets": {"backup": {"port": 80, "up": True, "connections": 0},
                    "main": {"port": 8080, "up": True, "connections": 0}},
        "weights": {"main": 100, "backup": 0}, "ramp": None}}
    text = zddctl(one, "status").stdout
    assert text.startswith("active target: main\n") and "weights:       main 100 %" in text
    assert zddctl(one, "switch", "backup").returncode == 0
    assert zddctl(one, "-s", "default", "weights", "main=20").returncode == 0
    assert [c[0] for c in one.core.services["default"].calls] == ["switch", "set_weights"]
    r = zddctl(one, "-s", "web", "switch", "main")
    assert r.returncode == 2 and "default" in r.stderr


def test_non_ascii_from_callers_still_answers_on_the_service_objects(two):
    """dbus-fast 1.84 measures strings in characters: the wire fix must cover the new objects'
    replies too, or the bus drops zddd's connection on the first error that echoes one."""
    web = f"{ROOT}/service/web"
    for body in (["mäin"], ["\u2603" * 50]):
        err, reply = call(two, "Switch", "s", body, path=web, interface=SERVICE)
        assert err == E + "InvalidTarget" and body[0] in reply[0], (err, reply)
    err, reply = call(two, "Get", "ss", [SERVICE, "Nämé"], path=web, interface=PROPS)
    assert err is not None
    err, reply = call(two, "SetWeights", "a{su}a{sv}", [{"mäin": 100}, {}], path=web,
                      interface=SERVICE)
    assert err == E + "InvalidArgument"
    # Still connected and answering.
    assert prop(two, "Name", path=web, interface=SERVICE) == "web"
    err, body = call(two, "GetManagedObjects", interface=OM, path="/")
    assert set(unwrap(body[0])) == {ROOT, f"{ROOT}/service/api", web}
    err, _ = call(two, "Set", "ssv", [SERVICE, "ActiveTarget", Variant("s", "backup")],
                  path=web, interface=PROPS)
    assert err == "org.freedesktop.DBus.Error.PropertyReadOnly"


# ---- the real core behind the bus (its in-memory backend: no kernel) --------------------------

def test_zddctl_and_the_objects_over_the_real_core(public_tmp):
    from unit.test_core import Rig

    web = {"listen_port": 8888, "targets": {"main": {"port": 8080}, "backup": {"port": 80}}}
    api = {"listen_port": 9888, "targets": {"main": {"port": 9080}, "backup": {"port": 90}}}
    rig = Rig(public_tmp, {"services": {"web": web, "api": api}})
    rig.start()
    served = Served(rig.core, public_tmp)
    try:
        r = zddctl(served, "-s", "api", "weights", "main=30", "--ramp", "2")
        assert r.returncode == 0, r.stderr
        st = json.loads(zddctl(served, "status", "--json").stdout)
        assert st["backend"] == "fake" and set(st["services"]) == {"api", "web"}
        ramp = st["services"]["api"]["ramp"]
        assert ramp is not None and (ramp["main_from"], ramp["main_to"]) == (100, 30)
        assert ramp["seconds"] == 2.0
        assert "ramp:          main 100 % \u2192 30 % over 2 s" in zddctl(served, "status").stdout
        # (The rig's wall clock stands still: the ramp does not move on its own.) Weights
        # without a ramp replace it.
        assert zddctl(served, "-s", "api", "weights", "main=30").returncode == 0
        st = json.loads(zddctl(served, "-s", "api", "status", "--json").stdout)
        assert st["active_target"] == "split" and st["services"]["api"]["ramp"] is None, st
        assert st["services"]["api"]["weights"] == {"main": 30, "backup": 70}
        assert rig.backend.table["weights"] == {"web": 100, "api": 30}
        r = zddctl(served, "-s", "web", "switch", "backup")
        assert r.returncode == 0, r.stderr
        assert rig.backend.table["weights"] == {"web": 0, "api": 30}
        r = zddctl(served, "-s", "web", "switch", "Main")
        assert r.returncode == 1 and "InvalidTarget" in r.stderr
        r = zddctl(served, "switch", "main")
        assert r.returncode == 2 and "api, web" in r.stderr
        err, body = call(served, "Switch", "s", ["main"])  # the Manager, several services
        assert err == E + "InvalidArgument"
        assert prop(served, "LastSwitchCaller", path=f"{ROOT}/service/web",
                    interface=SERVICE) == "uid=0"
    finally:
        served.close()


def test_switch_wait_drained_from_a_split_waits_for_what_lost_its_share(public_tmp):
    from unit.test_core import Rig

    rig = Rig(public_tmp)
    rig.start()
    served = Served(rig.core, public_tmp)
    try:
        assert zddctl(served, "weights", "main=50").returncode == 0
        r = zddctl(served, "--json", "switch", "main", "--wait-drained=5")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["drained"] == "backup"  # not main, the new target
        assert zddctl(served, "weights", "main=50").returncode == 0
        r = zddctl(served, "switch", "off", "--force", "--wait-drained=5")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-2:] == ["main is drained", "backup is drained"]
    finally:
        served.close()
