"""service/dbus.py without a bus: error names by class hierarchy, the interface declared once
(introspection from the declarations), and who called, from /proc and logind records."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from zddd import errors
from zddd.core import Snapshot
from zddd.service import dbus
from zddd.service.dbus import Variant

from .fakecore import FakeCore


class NewRefusal(errors.InvalidArgument):
    """A condition added later under an existing one."""


class Unmapped(errors.ZdddError):
    """A ZdddError outside every condition the API names."""


@pytest.mark.parametrize("cls", [errors.InvalidTarget, errors.InvalidArgument,
                                 errors.TargetUnhealthy, errors.BackendFailure,
                                 errors.InvalidConfig])
def test_each_condition_has_its_own_name(cls):
    assert dbus.error_name(cls("x")) == dbus.ERROR_PREFIX + cls.__name__


def test_a_new_subclass_is_named_by_its_condition():
    assert dbus.error_name(NewRefusal("x")) == dbus.ERROR_PREFIX + "InvalidArgument"


def test_an_unmapped_zddd_error_still_gets_an_error_name():
    assert dbus.error_name(Unmapped("x")) == "org.freedesktop.DBus.Error.Failed"


class StubCore:
    def __init__(self):
        self.observers = []
        self.fail_counts = False

    def snapshot(self):
        return Snapshot("main", "", "nftables", 8888, {"main": 8080, "backup": 80},
                        {"main": True, "backup": False}, 42, 30.0, 1_765_000_000_000_000,
                        "uid=1000")

    def connection_counts(self):
        if self.fail_counts:
            raise OSError("sock_diag said no")
        return {"main": 2, "backup": 0}


def test_the_introspection_data_shows_every_declared_method_and_property():
    iface = dbus.ManagerInterface(StubCore(), None)
    xml = ET.fromstring(ET.tostring(iface.introspect().to_xml()))
    methods = {m.get("name"): [(a.get("name"), a.get("type"), a.get("direction"))
                               for a in m.findall("arg")] for m in xml.findall("method")}
    assert methods == {
        "Switch": [("target", "s", "in")],
        "SwitchWithOptions": [("target", "s", "in"), ("options", "a{sv}", "in")],
        "WaitDrained": [("target", "s", "in"), ("timeout_usec", "t", "in"), (None, "b", "out")],
        "SetWeights": [("weights", "a{su}", "in"), ("options", "a{sv}", "in")],
        "Reload": [],
    }
    props = {p.get("name"): (p.get("type"), p.get("access")) for p in xml.findall("property")}
    assert props == {p.name: (p.signature, "read") for p in dbus.PROPERTIES}
    assert {"ActiveTarget", "Draining", "Backend", "Targets", "LastSwitchUSec",
            "LastSwitchTimestamp", "LastSwitchCaller", "Services", "Weights"} <= set(props)
    assert [s.get("name") for s in xml.findall("signal")] == ["Switched"]


def test_properties_read_the_snapshot_and_a_failed_count_is_unknown():
    core = StubCore()
    iface = dbus.ManagerInterface(core, None)
    assert iface.ActiveTarget == "main" and iface.LastSwitchUSec == 42
    assert iface.LastSwitchTimestamp == 1_765_000_000_000_000
    assert iface.LastSwitchCaller == "uid=1000"
    assert iface.DrainTimeoutUSec == 30_000_000
    assert iface.Connections == {"main": 2, "backup": 0}
    core.fail_counts = True
    assert iface.Connections == {}  # unknown: absent, never a failed GetAll


# ---- who called -------------------------------------------------------------------------------

def fake_process(root, pid: int, *, cgroup: str = "0::/system.slice/x.service\n",
                 environ: dict | None = None):
    d = root / "proc" / str(pid)
    d.mkdir(parents=True)
    (d / "cgroup").write_text(cgroup)
    if environ is not None:
        (d / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0"
                                             for k, v in environ.items()))
    return root / "proc"


def test_a_local_caller_is_its_uid(tmp_path):
    proc = fake_process(tmp_path, 7, environ={"USER": "root", "HOME": "/root"})
    assert dbus.describe_caller(0, 7, proc=proc, sessions=tmp_path) == "uid=0"
    assert dbus.describe_caller(0, None, proc=proc, sessions=tmp_path) == "uid=0"
    assert dbus.describe_caller(0, 99, proc=proc, sessions=tmp_path) == "uid=0"  # gone


def test_an_ssh_login_session_names_the_user_and_host(tmp_path):
    proc = fake_process(tmp_path, 7, cgroup="0::/user.slice/user-1000.slice/session-12.scope\n",
                        environ={"SSH_CONNECTION": "203.0.113.9 5 192.0.2.1 22"})
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    (sessions / "12").write_text("UID=1000\nUSER=alice\nSERVICE=sshd\nREMOTE=1\n"
                                 "REMOTE_HOST=198.51.100.7\n")
    # The session record wins over the process' own environment.
    assert (dbus.describe_caller(1000, 7, proc=proc, sessions=sessions)
            == "uid=1000 ssh=alice@198.51.100.7")


def test_without_logind_the_environment_names_the_ssh_client(tmp_path):
    proc = fake_process(tmp_path, 7, environ={"USER": "deploy",
                                              "SSH_CONNECTION": "198.51.100.7 51234 192.0.2.1 22"})
    assert (dbus.describe_caller(0, 7, proc=proc, sessions=tmp_path / "none")
            == "uid=0 ssh=deploy@198.51.100.7")


def test_an_unreadable_environment_leaves_the_uid(tmp_path):
    proc = fake_process(tmp_path, 7)  # no environ file: as if not ours to read
    assert dbus.describe_caller(1000, 7, proc=proc, sessions=tmp_path) == "uid=1000"


def test_the_real_proc_of_this_process(monkeypatch):
    monkeypatch.setenv("SSH_CONNECTION", "198.51.100.7 51234 192.0.2.1 22")
    monkeypatch.setenv("USER", "tester")
    # /proc/PID/environ is the environment at exec: a child shows the change.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        got = dbus.describe_caller(os.getuid(), child.pid, sessions=Path("/nonexistent"))
    finally:
        child.kill()
        child.wait()
    assert got == f"uid={os.getuid()} ssh=tester@198.51.100.7"



# ---- many services ----------------------------------------------------------------------------

class Recorder:
    """Stands in for the bus side of a ServiceInterface: what it would signal."""

    def __init__(self, iface):
        self.changed = []
        self.switched = []
        iface.emit_properties_changed = lambda changed, invalidated=(): self.changed.append(
            (dict(changed), list(invalidated)))
        iface.Switched = lambda *a: self.switched.append(a)


def manager_of(*services):
    core = FakeCore(*services)
    manager = dbus.ManagerInterface(core, None)
    return core, manager


def test_the_service_interface_is_declared_once_too():
    _, manager = manager_of(("web", 8888), ("api", 8890))
    obj = manager.objects["web"]
    assert obj.name == dbus.SERVICE_INTERFACE and obj.path == "/org/zddd/Steering1/service/web"
    xml = ET.fromstring(ET.tostring(obj.introspect().to_xml()))
    assert {m.get("name") for m in xml.findall("method")} == {
        "Switch", "SwitchWithOptions", "WaitDrained", "SetWeights"}
    props = {p.get("name"): p.get("type") for p in xml.findall("property")}
    assert props == {p.name: p.signature for p in dbus.SERVICE_PROPERTIES}
    assert props["Name"] == "s" and props["Weights"] == "a{su}" and props["ListenPort"] == "q"
    assert obj.Name == "web" and obj.ListenPort == 8888
    assert manager.objects["api"].ListenPort == 8890
    assert list(manager.objects) == ["api", "web"]


def test_with_several_services_the_manager_is_global_only():
    _, manager = manager_of(("web", 8888), ("api", 8890))
    assert {k: v.value for k, v in manager.values().items()} == {
        "Backend": "nftables", "Services": ["api", "web"]}
    with pytest.raises(errors.InvalidArgument) as e:
        manager.only()
    assert "/org/zddd/Steering1/service/api" in str(e.value)
    assert "/org/zddd/Steering1/service/web" in str(e.value)
    with pytest.raises(dbus.DBusError) as e:
        manager.ActiveTarget  # noqa: B018
    assert e.value.type == dbus.ERROR_PREFIX + "InvalidArgument"


def test_events_go_to_their_service_and_to_the_manager_only_while_it_is_the_one():
    core, manager = manager_of(("web", 8888), ("api", 8890))
    web, api, mgr = (Recorder(manager.objects["web"]), Recorder(manager.objects["api"]),
                     Recorder(manager))
    core.services["web"].switch("backup")
    assert web.switched == [("main", "backup", 42)] and not api.switched and not mgr.switched
    assert web.changed[0][0]["ActiveTarget"] == "backup" and not api.changed and not mgr.changed
    core.remove("api")  # without a bus: the objects follow, nothing is sent
    assert list(manager.objects) == ["web"]
    core.services["web"].switch("main")
    assert mgr.switched == [("backup", "main", 42)]
    assert mgr.changed[-1][0]["ActiveTarget"] == "main"
    assert manager.ActiveTarget == "main" and manager.Weights == {"main": 100, "backup": 0}


def test_set_weights_options():
    assert dbus.parse_options({"ramp_usec": Variant("t", 5_000_000),
                               "force": Variant("b", True)}, dbus._WEIGHT_OPTIONS) == {
        "ramp": 5.0, "force": True}
    with pytest.raises(errors.InvalidArgument):
        dbus.parse_options({"drain_timeout_usec": Variant("t", 1)}, dbus._WEIGHT_OPTIONS)
    assert dbus.parse_options({"ramp_usec": Variant("t", 1)}) == {"ramp": 1e-6}  # a switch's
    with pytest.raises(errors.InvalidArgument):
        dbus.parse_options({"ramp_usec": Variant("u", 1)})


def test_a_core_before_services_is_its_one_service_named_default():
    manager = dbus.ManagerInterface(StubCore(), None)
    assert list(manager.objects) == ["default"]
    assert manager.Services == ["default"] and manager.Backend == "nftables"
    assert manager.objects["default"].ActiveTarget == "main"
    assert manager.Weights == {"main": 100, "backup": 0}  # from the active target
