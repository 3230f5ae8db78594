"""The adapters (D-Bus, metrics, agent) over the real core of many services (core.Steering, with
test_core's in-memory backend): the calls they make and the events they get are the core's own,
so a change of either side's contract shows here, without a bus or a kernel."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

import zddd
from zddd import errors
from zddd.config import from_dict
from zddd.service import dbus
from zddd.service.agent import agent_word
from zddd.service.dbus import Variant

from .metricsrig import serving
from .test_core import Rig

WEB = {"listen_port": 8888, "targets": {"main": {"port": 8080}, "backup": {"port": 80}}}
API = {"listen_port": 9888, "targets": {"main": {"port": 9080}, "backup": {"port": 90}},
       "agent": {"listen": "127.0.0.1:9889", "weights": True}}
JOBS = {"listen_port": 7888, "targets": {"main": {"port": 7080}, "backup": {"port": 70}}}


class Signals:
    """What a ServiceInterface would send, recorded instead of sent."""

    def __init__(self, iface):
        self.changed: list[dict] = []
        self.switched: list[tuple] = []
        iface.emit_properties_changed = lambda changed, invalidated=(): self.changed.append(
            dict(changed))
        iface.Switched = lambda *a: self.switched.append(a)


def two_services(tmp_path) -> Rig:
    rig = Rig(tmp_path, {"services": {"web": WEB, "api": API}})
    rig.start()
    return rig


def test_the_d_bus_methods_drive_the_real_core(tmp_path):
    rig = two_services(tmp_path)
    core = rig.core
    manager = dbus.ManagerInterface(core, None)
    web, api = Signals(manager.objects["web"]), Signals(manager.objects["api"])
    top = Signals(manager)

    async def go():
        await dbus._switch(core.service("api"), "uid=0", ["backup"])
        await dbus._set_weights(core.service("web"), "uid=1000",
                                [{"main": 30, "backup": 70}, {"force": Variant("b", False)}])
        return await dbus._wait_drained(core.service("web"), "uid=0", ["main", 0])

    assert asyncio.run(go()) == [True]  # the reply body
    assert api.switched == [("main", "backup", api.switched[0][2])]
    assert api.changed[-1]["ActiveTarget"] == "backup"
    assert web.changed[-1]["Weights"] == {"main": 30, "backup": 70}
    assert web.changed[-1]["ActiveTarget"] == "split"
    assert not top.switched and not top.changed  # several services: not the Manager's
    assert manager.objects["web"].LastSwitchCaller == "uid=1000"
    assert manager.objects["api"].ListenPort == 9888
    assert rig.backend.table["weights"] == {"web": 30, "api": 0}
    try:
        asyncio.run(dbus._set_weights(core.service("web"), "", [{"main": 30, "backup": 60}, {}]))
        raise AssertionError("accepted")
    except errors.InvalidArgument:
        pass
    assert {k: v.value for k, v in manager.values().items()} == {
        "Backend": "fake", "Services": ["api", "web"]}


def test_a_reload_that_adds_and_removes_services_reaches_the_objects(tmp_path):
    rig = two_services(tmp_path)
    core = rig.core
    manager = dbus.ManagerInterface(core, None)
    new = from_dict({"state_file": str(tmp_path / "state.json"),
                     "services": {"web": WEB, "api": API, "jobs": JOBS}})
    core.check_reload(new)
    core.reload(new)
    assert list(manager.objects) == ["api", "jobs", "web"]
    assert manager.objects["jobs"].ListenPort == 7888
    core.service("api").switch("off", force=True)
    core.service("jobs").switch("off", force=True)
    new = from_dict({"state_file": str(tmp_path / "state.json"), "services": {"web": WEB}})
    core.check_reload(new)
    core.reload(new)
    assert list(manager.objects) == ["web"]
    assert manager.ActiveTarget == "main"  # one service again: the Manager acts on it


def test_metrics_of_the_real_core(tmp_path):
    rig = two_services(tmp_path)
    rig.conns.counts = {"main": 2}
    rig.core.service("api").set_weights({"main": 25, "backup": 75})
    rig.backend.flows_steered = lambda: {("api", "main"): 4, ("web", "main"): 9}
    with serving(rig.core) as (server, port):
        try:
            rig.core.service("web").switch("Main")
        except errors.InvalidTarget:
            pass
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    v = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for f in text_string_to_metric_families(text) for s in f.samples}
    assert v[("zddd_target_weight", (("service", "api"), ("target", "main")))] == 25
    assert v[("zddd_target_weight", (("service", "web"), ("target", "main")))] == 100
    assert v[("zddd_target_connections", (("service", "api"), ("target", "main")))] == 2
    assert v[("zddd_flows_steered_total", (("service", "web"), ("target", "main")))] == 9
    assert v[("zddd_switches_total", (("result", "refused"), ("service", "web"),
                                      ("target", "invalid")))] == 1
    assert v[("zddd_build_info", (("backend", "fake"), ("version", zddd.__version__)))] == 1


def test_each_services_agent_answers_from_its_own_snapshot(tmp_path):
    rig = two_services(tmp_path)
    core = rig.core
    core.service("api").set_weights({"main": 40, "backup": 60})
    assert agent_word(core.service("api").agent_polled()) == "ready up 40%"  # weights = true
    core.service("web").set_weights({"main": 40, "backup": 60})
    assert agent_word(core.service("web").agent_polled()) == "ready up"  # weights = false
    core.service("web").switch("off", force=True)
    assert agent_word(core.service("web").agent_polled()) == "maint"
