"""A real zddd of two services ([services.web] and [services.api]) in a lab namespace, on a
private bus with the shipped policy: the services' D-Bus objects and the ObjectManager, zddctl
-s, status, weights and services, the metrics of both services, and one agent per service."""

from __future__ import annotations

import asyncio
import json

import pytest
from zdddlab import APP_V4, Vhost, agent_ask, dbus_call, http_get, scrape_metrics, wait_for

from zddd.service.dbus import Message, MessageBus, MessageType

ROOT = "/org/zddd/Steering1"
MANAGER = "org.zddd.Steering1.Manager"
SERVICE = "org.zddd.Steering1.Service"
PROPS = "org.freedesktop.DBus.Properties"
OM = "org.freedesktop.DBus.ObjectManager"
E = "org.zddd.Steering1.Error."

WEB = {"listen_port": 8888, "targets": {"main": {"port": 8080}, "backup": {"port": 80}},
       "agent": {"listen": "0.0.0.0:8889"}}
API = {"listen_port": 9888, "targets": {"main": {"port": 9080}, "backup": {"port": 90}},
       "agent": {"listen": "0.0.0.0:9889", "weights": True}}
JOBS = {"listen_port": 7888, "targets": {"main": {"port": 7080}, "backup": {"port": 70}}}


@pytest.fixture
def two(lab):
    for port, name in ((9080, "api-main"), (90, "api-backup")):
        vhost = Vhost(lab.app, port, name)
        lab.closers.append(vhost.stop)
    return lab, lab.start_zddd({"services": {"web": WEB, "api": API}})


def values(body):
    def un(v):
        v = getattr(v, "value", v)
        return {k: un(x) for k, x in v.items()} if isinstance(v, dict) else v
    return un(body)


def test_each_service_has_its_object_and_the_manager_names_them(two):
    lab, z = two
    err, body = dbus_call(z.bus.address, "GetManagedObjects", "", [], 10, OM, path=ROOT)
    assert err is None, body
    objects = values(body[0])
    assert set(objects) == {f"{ROOT}/service/api", f"{ROOT}/service/web"}
    api = objects[f"{ROOT}/service/api"][SERVICE]
    assert (api["Name"], api["ListenPort"], api["ActiveTarget"]) == ("api", 9888, "main")
    assert api["Targets"] == {"main": 9080, "backup": 90}
    assert api["Weights"] == {"main": 100, "backup": 0}
    assert api["TargetsUp"] == {"main": True, "backup": True}
    err, body = dbus_call(z.bus.address, "GetAll", "s", [MANAGER], 10, PROPS)
    assert values(body[0]) == {"Backend": z.backend, "Services": ["api", "web"]}
    err, body = z.call("Switch", "s", "backup")  # the Manager's: which service?
    assert err == E + "InvalidArgument" and f"{ROOT}/service/web" in body[0]
    assert http_get(lab.client, APP_V4, 8888) == "main"

    err, body = dbus_call(z.bus.address, "Switch", "s", ["backup"], 10, SERVICE,
                          path=f"{ROOT}/service/api")
    assert err is None, body
    assert http_get(lab.client, APP_V4, 9888) == "api-backup"
    assert http_get(lab.client, APP_V4, 8888) == "main"  # the other service is untouched
    err, body = dbus_call(z.bus.address, "Get", "ss", [SERVICE, "LastSwitchCaller"], 10, PROPS,
                          path=f"{ROOT}/service/api")
    assert body[0].value == "uid=0"


def test_zddctl_with_two_services(two):
    lab, z = two
    r = z.zddctl("switch", "backup")
    assert r.returncode == 2 and "api, web" in r.stderr, r
    r = z.zddctl("-s", "web", "switch", "backup")
    assert r.returncode == 0, r.stderr
    assert http_get(lab.client, APP_V4, 8888) == "backup"
    assert http_get(lab.client, APP_V4, 9888) == "api-main"
    st = z.status()
    assert set(st) == {"backend", "services"}
    assert st["services"]["web"]["active_target"] == "backup"
    assert st["services"]["web"]["weights"] == {"main": 0, "backup": 100}
    assert st["services"]["api"]["listen_port"] == 9888
    assert st["services"]["api"]["targets"]["main"]["port"] == 9080
    text = z.zddctl("status").stdout
    assert "service api:\n  active target: main" in text
    assert "service web:\n  active target: backup" in text
    assert z.zddctl("services").stdout == "api\nweb\n"
    r = z.zddctl("-s", "web", "wait-drained", "main", "--timeout", "5")
    assert r.returncode == 0, r.stderr


def test_weights_split_one_service(two):
    lab, z = two
    r = z.zddctl("-s", "api", "weights", "main=50")
    assert r.returncode == 0, r.stderr
    err, body = dbus_call(z.bus.address, "Get", "ss", [SERVICE, "Weights"], 10, PROPS,
                          path=f"{ROOT}/service/api")
    assert body[0].value == {"main": 50, "backup": 50}
    seen = {http_get(lab.client, APP_V4, 9888) for _ in range(40)}
    assert seen == {"api-main", "api-backup"}, seen
    assert {http_get(lab.client, APP_V4, 8888) for _ in range(5)} == {"main"}
    st = z.status()["services"]["api"]
    assert st["active_target"] == "split" and st["weights"] == {"main": 50, "backup": 50}
    m = scrape_metrics(lab.app)
    assert m['zddd_target_weight{service="api",target="main"}'] == 50
    assert m['zddd_target_weight{service="web",target="main"}'] == 100
    # api's agent gives HAProxy main's share ([services.api.agent] weights = true); web's
    # agent answers for web alone.
    assert agent_ask(lab.client, APP_V4, 9889) == "ready up 50%"
    assert agent_ask(lab.client, APP_V4, 8889) == "ready up"


def test_metrics_of_both_services(two):
    lab, z = two
    assert z.zddctl("-s", "api", "switch", "off", "--force").returncode == 0
    assert http_get(lab.client, APP_V4, 8888) == "main"
    m = scrape_metrics(lab.app)
    assert m['zddd_active_target{service="api",target="off"}'] == 1
    assert m['zddd_active_target{service="web",target="main"}'] == 1
    assert m['zddd_switches_total{result="ok",service="api",target="off"}'] == 1
    assert m['zddd_switches_total{result="ok",service="web",target="off"}'] == 0
    assert m['zddd_target_weight{service="api",target="backup"}'] == 0
    assert m['zddd_target_up{service="api",target="main"}'] == 1
    assert 'zddd_target_connections{service="web",target="main"}' in m
    assert agent_ask(lab.client, APP_V4, 9889) == "maint"
    assert agent_ask(lab.client, APP_V4, 8889) == "ready up"


def test_a_reload_announces_added_and_removed_services(two):
    lab, z = two
    for port, name in ((7080, "jobs-main"), (70, "jobs-backup")):
        vhost = Vhost(lab.app, port, name)
        lab.closers.append(vhost.stop)

    async def watch(actions):
        bus = await MessageBus(bus_address=z.bus.address).connect()
        seen = []
        try:
            await bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                body=[f"type='signal',sender='org.zddd.Steering1',path='{ROOT}'"]))
            bus.add_message_handler(
                lambda m: seen.append(m) if m.message_type == MessageType.SIGNAL else None)
            for action in actions:
                await asyncio.get_running_loop().run_in_executor(None, action)
            await asyncio.sleep(0.3)
        finally:
            bus.disconnect()
        return seen

    def reload(services):
        def go():
            z.config["services"] = services
            z.write_config()
            r = z.zddctl("reload")
            assert r.returncode == 0, r.stderr
        return go

    def api_off():
        assert z.zddctl("-s", "api", "switch", "off", "--force").returncode == 0

    seen = asyncio.run(watch([reload({"web": WEB, "api": API, "jobs": JOBS}), api_off,
                              reload({"web": WEB, "jobs": JOBS})]))
    om = [(m.member, m.body[0]) for m in seen if m.interface == OM]
    assert om == [("InterfacesAdded", f"{ROOT}/service/jobs"),
                  ("InterfacesRemoved", f"{ROOT}/service/api")]
    services = [values(m.body[1])["Services"] for m in seen
                if m.member == "PropertiesChanged" and "Services" in m.body[1]]
    assert services == [["api", "jobs", "web"], ["jobs", "web"]]
    assert http_get(lab.client, APP_V4, 7888) == "jobs-main"
    assert json.loads(z.zddctl("services", "--json").stdout) == {"services": ["jobs", "web"]}
    wait_for(lambda: "zddd_active_target{service=\"jobs\",target=\"main\"}"
             in scrape_metrics(lab.app), 3, "jobs in the metrics")
    assert not any('service="api"' in k for k in scrape_metrics(lab.app))
