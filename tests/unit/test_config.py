"""config.py: defaults, every error naming its key, endpoint and health parsing, load()."""

from __future__ import annotations

import pytest

from zddd import config as cfg
from zddd.config import Config, ConfigError, Endpoint, Health, Target, from_dict, load


def test_defaults_match_the_spec():
    c = from_dict({})
    assert c == Config()
    assert c.listen_port == 8888
    assert c.backend == "nftables"
    assert c.interfaces is None
    assert c.xdp_mode == "native"
    assert c.bpf_pin_dir == "/sys/fs/bpf/zddd"
    assert c.bpf_flow_entries == 1048576
    assert c.initial == "main"
    assert c.state_file == "/var/lib/zddd/state.json"
    assert c.drain_timeout == 30
    assert c.targets == {"main": Target("main", 8080, Health("tcp")),
                         "backup": Target("backup", 80, Health("tcp"))}
    assert (c.health_interval, c.health_timeout) == (1.0, 0.5)
    assert c.agent_listen == Endpoint("::", 8889)
    assert c.metrics_listen == Endpoint("127.0.0.1", 9488)


def test_a_full_config_is_taken_over():
    c = from_dict({
        "listen_port": 9000, "backend": "tc", "interfaces": ["eth0", "lo"],
        "xdp_mode": "generic", "bpf_pin_dir": "/sys/fs/bpf/z2", "bpf_flow_entries": 4096,
        "initial": "off", "state_file": "/tmp/s.json", "drain_timeout": 2.5,
        "targets": {"main": {"port": 8081, "health": "http:/healthz"},
                    "backup": {"port": 81, "health": "none"}},
        "health": {"interval": 0.2, "timeout": 0.1},
        "agent": {"listen": ""}, "metrics": {"listen": "[::1]:9100"},
    })
    assert c.listen_port == 9000 and c.backend == "tc" and c.interfaces == ("eth0", "lo")
    assert c.xdp_mode == "generic" and c.bpf_pin_dir == "/sys/fs/bpf/z2"
    assert c.bpf_flow_entries == 4096 and c.initial == "off" and c.state_file == "/tmp/s.json"
    assert c.drain_timeout == 2.5
    assert c.targets["main"] == Target("main", 8081, Health("http", "/healthz"))
    assert c.targets["backup"] == Target("backup", 81, Health("none"))
    assert (c.health_interval, c.health_timeout) == (0.2, 0.1)
    assert c.agent_listen is None
    assert c.metrics_listen == Endpoint("::1", 9100)


def test_a_partial_target_keeps_the_other_defaults():
    c = from_dict({"targets": {"backup": {"health": "http:/ok"}}})
    assert c.targets["backup"] == Target("backup", 80, Health("http", "/ok"))
    assert c.targets["main"] == Target("main", 8080)
    c = from_dict({"targets": {"main": {"port": 9090}}})
    assert c.targets["main"] == Target("main", 9090)


def test_int_and_zero_drain_timeout():
    assert from_dict({"drain_timeout": 0}).drain_timeout == 0.0
    assert isinstance(from_dict({"drain_timeout": 3}).drain_timeout, float)


BAD = {
    "unknown-top": ({"frob": 1}, "frob"),
    "unknown-target": ({"targets": {"canary": {"port": 1}}}, "targets.canary"),
    "unknown-target-key": ({"targets": {"main": {"prot": 1}}}, "targets.main.prot"),
    "unknown-health-key": ({"health": {"retries": 3}}, "health.retries"),
    "unknown-agent-key": ({"agent": {"port": 1}}, "agent.port"),
    "unknown-metrics-key": ({"metrics": {"path": "/m"}}, "metrics.path"),
    "listen-str": ({"listen_port": "8888"}, "listen_port"),
    "listen-bool": ({"listen_port": True}, "listen_port"),
    "listen-float": ({"listen_port": 8888.0}, "listen_port"),
    "listen-zero": ({"listen_port": 0}, "listen_port"),
    "listen-big": ({"listen_port": 65536}, "listen_port"),
    "listen-negative": ({"listen_port": -1}, "listen_port"),
    "target-port-big": ({"targets": {"backup": {"port": 70000}}}, "targets.backup.port"),
    "target-port-str": ({"targets": {"main": {"port": "80"}}}, "targets.main.port"),
    "target-not-table": ({"targets": {"main": 8080}}, "targets.main"),
    "targets-not-table": ({"targets": [1]}, "targets"),
    "backend": ({"backend": "iptables"}, "backend"),
    "backend-type": ({"backend": 1}, "backend"),
    "xdp-mode": ({"xdp_mode": "offload"}, "xdp_mode"),
    "interfaces-type": ({"interfaces": "eth0"}, "interfaces"),
    "interface-name-type": ({"interfaces": ["eth0", 3]}, "interfaces[1]"),
    "interface-name-empty": ({"interfaces": [""]}, "interfaces[0]"),
    "interface-name-long": ({"interfaces": ["a" * 16]}, "interfaces[0]"),
    "interface-name-slash": ({"interfaces": ["a/b"]}, "interfaces[0]"),
    "pin-dir-relative": ({"bpf_pin_dir": "zddd"}, "bpf_pin_dir"),
    "state-file-relative": ({"state_file": "state.json"}, "state_file"),
    "state-file-type": ({"state_file": 1}, "state_file"),
    "flow-entries-small": ({"bpf_flow_entries": 10}, "bpf_flow_entries"),
    "flow-entries-type": ({"bpf_flow_entries": "1M"}, "bpf_flow_entries"),
    "initial-case": ({"initial": "Main"}, "initial"),
    "initial-space": ({"initial": "main "}, "initial"),
    "drain-negative": ({"drain_timeout": -1}, "drain_timeout"),
    "drain-str": ({"drain_timeout": "30"}, "drain_timeout"),
    "drain-bool": ({"drain_timeout": False}, "drain_timeout"),
    "drain-nan": ({"drain_timeout": float("nan")}, "drain_timeout"),
    "drain-inf": ({"drain_timeout": float("inf")}, "drain_timeout"),
    "interval-inf": ({"health": {"interval": float("inf")}}, "health.interval"),
    "interval-zero": ({"health": {"interval": 0}}, "health.interval"),
    "timeout-negative": ({"health": {"timeout": -0.5}}, "health.timeout"),
    "health-not-table": ({"health": "tcp"}, "health"),
    "health-kind": ({"targets": {"main": {"health": "udp"}}}, "targets.main.health"),
    "health-no-slash": ({"targets": {"main": {"health": "http:health"}}},
                        "targets.main.health"),
    "health-space": ({"targets": {"main": {"health": "http:/a b"}}}, "targets.main.health"),
    "health-type": ({"targets": {"backup": {"health": True}}}, "targets.backup.health"),
    "rise-zero": ({"health": {"rise": 0}}, "health.rise"),
    "fall-float": ({"health": {"fall": 2.0}}, "health.fall"),
    "fall-huge": ({"health": {"fall": 10**6}}, "health.fall"),
    "host-empty": ({"health": {"host": ""}}, "health.host"),
    "host-newline": ({"health": {"host": "a\r\nX-Evil: 1"}}, "health.host"),
    "host-too-long": ({"health": {"host": "a" * 261}}, "health.host"),
    "address-name": ({"health": {"address": "localhost"}}, "health.address"),
    "address-cidr": ({"health": {"address": "10.0.0.0/8"}}, "health.address"),
    "target-rise-bool": ({"targets": {"main": {"health_rise": True}}},
                         "targets.main.health_rise"),
    "target-fall-negative": ({"targets": {"backup": {"health_fall": -1}}},
                             "targets.backup.health_fall"),
    "target-host-space": ({"targets": {"main": {"health_host": "a b"}}},
                          "targets.main.health_host"),
    "target-address-bad": ({"targets": {"backup": {"health_address": "192.0.2.300"}}},
                           "targets.backup.health_address"),
    "target-unknown-probe-key": ({"targets": {"main": {"health_interval": 1}}},
                                 "targets.main.health_interval"),
    "health-unknown-key": ({"health": {"retries": 3}}, "health.retries"),
    "agent-not-table": ({"agent": "[::]:8889"}, "agent"),
    "agent-no-port": ({"agent": {"listen": "127.0.0.1"}}, "agent.listen"),
    "agent-hostname": ({"agent": {"listen": "localhost:8889"}}, "agent.listen"),
    "agent-v6-unbracketed": ({"agent": {"listen": "::1:8889"}}, "agent.listen"),
    "agent-v4-bracketed": ({"agent": {"listen": "[127.0.0.1]:8889"}}, "agent.listen"),
    "agent-port-big": ({"agent": {"listen": "[::]:99999"}}, "agent.listen"),
    "agent-port-zero": ({"agent": {"listen": "[::]:0"}}, "agent.listen"),
    "metrics-type": ({"metrics": {"listen": 9488}}, "metrics.listen"),
    "metrics-port-name": ({"metrics": {"listen": "127.0.0.1:http"}}, "metrics.listen"),
    # Two roles on one port: the later claim is named, the message names the earlier one.
    "targets-share-a-port": ({"targets": {"main": {"port": 80}}}, "targets.backup.port"),
    "target-on-listen-port": ({"targets": {"backup": {"port": 8888}}}, "targets.backup.port"),
    "listen-on-target-port": ({"listen_port": 80}, "targets.backup.port"),
    "agent-on-target-port": ({"agent": {"listen": "[::]:8080"}}, "agent.listen"),
    "agent-on-listen-port": ({"agent": {"listen": "[::]:8888"}}, "agent.listen"),
    "metrics-on-agent-port": ({"metrics": {"listen": "127.0.0.1:8889"}}, "metrics.listen"),
}


@pytest.mark.parametrize("data,key", BAD.values(), ids=BAD.keys())
def test_every_error_names_its_key(data, key):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert e.value.key == key
    assert str(e.value).startswith(f"{key}: ")
    assert e.value.problem


def test_port_clash_message_names_both_keys():
    with pytest.raises(ConfigError) as e:
        from_dict({"targets": {"main": {"port": 80}}})
    assert "targets.main.port" in str(e.value) and "80" in str(e.value)


def test_disabled_listeners_claim_no_port():
    c = from_dict({"agent": {"listen": ""}, "metrics": {"listen": ""},
                   "targets": {"main": {"port": 8889}, "backup": {"port": 9488}}})
    assert c.agent_listen is None and c.metrics_listen is None


@pytest.mark.parametrize("text,host,port", [
    ("127.0.0.1:9488", "127.0.0.1", 9488),
    ("0.0.0.0:1", "0.0.0.0", 1),
    ("[::]:8889", "::", 8889),
    ("[::1]:65535", "::1", 65535),
    ("[2001:DB8::0001]:80", "2001:db8::1", 80),
])
def test_endpoint_parsing(text, host, port):
    ep = cfg.parse_endpoint(text, "k")
    assert ep == Endpoint(host, port)
    assert cfg.parse_endpoint(str(ep), "k") == ep  # str() writes what parses back


def test_empty_endpoint_disables():
    assert cfg.parse_endpoint("", "agent.listen") is None


def test_health_parsing():
    assert cfg.parse_health("tcp", "k") == Health("tcp")
    assert cfg.parse_health("none", "k") == Health("none")
    assert cfg.parse_health("http:/", "k") == Health("http", "/")
    assert cfg.parse_health("http:/a/b?c=d", "k") == Health("http", "/a/b?c=d")
    assert str(Health("http", "/x")) == "http:/x" and str(Health("tcp")) == "tcp"


def test_probe_settings_default_to_one_probe_deciding_on_the_loopback():
    assert Health() == Health("tcp", "", host="localhost", address=None, rise=1, fall=1)
    for target in from_dict({}).targets.values():
        assert target.health == Health("tcp")
    # The shipped file writes the default address as "" (TOML has no null).
    assert from_dict({"health": {"address": ""}}) == Config()


def test_probe_settings_of_health_apply_to_every_target_and_a_target_overrides_them():
    c = from_dict({"health": {"rise": 2, "fall": 3, "host": "app.example",
                              "address": "2001:DB8::10"},
                   "targets": {"main": {"health": "http:/healthz",
                                        "health_host": "main.example:8080",
                                        "health_fall": 5},
                               "backup": {"health_address": "192.0.2.10", "health_rise": 1}}})
    assert c.targets["main"].health == Health("http", "/healthz", host="main.example:8080",
                                              address="2001:db8::10", rise=2, fall=5)
    assert c.targets["backup"].health == Health("tcp", host="app.example",
                                                address="192.0.2.10", rise=1, fall=3)


def test_restart_changes():
    base = from_dict({})
    assert base.restart_changes(from_dict({"drain_timeout": 1,
                                           "targets": {"backup": {"port": 81}}})) == []
    assert base.restart_changes(from_dict({"listen_port": 9999})) == ["listen_port"]
    assert base.restart_changes(from_dict({"backend": "xdp",
                                           "bpf_pin_dir": "/sys/fs/bpf/x"})) == [
        "backend", "bpf_pin_dir"]


def test_load_file(tmp_path):
    p = tmp_path / "zddd.toml"
    p.write_text('listen_port = 9999\n[targets.backup]\nport = 81\n[agent]\nlisten = ""\n')
    c = load(p)
    assert c.listen_port == 9999 and c.targets["backup"].port == 81 and c.agent_listen is None
    p.write_text("")
    assert load(str(p)) == Config()


def test_load_errors_name_the_file(tmp_path):
    p = tmp_path / "zddd.toml"
    p.write_text("listen_port = \n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert e.value.key == "" and str(p) in str(e.value) and "TOML" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "missing.toml")
    assert e.value.key == "" and "missing.toml" in str(e.value)
    p.write_text("[targets.main]\nport = 0\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert e.value.key == "targets.main.port"


def test_no_config_at_the_default_path_gives_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(cfg, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    assert load(None) == Config()
    (tmp_path / "absent.toml").write_text("listen_port = 7777\n")
    assert load(None).listen_port == 7777


def test_invalid_utf8_is_a_config_error(tmp_path):
    p = tmp_path / "zddd.toml"
    p.write_bytes(b'initial = "main"\n# caf\xe9\n')
    with pytest.raises(ConfigError, match="not valid UTF-8 at byte 22"):
        load(p)


# ---- the many-service form ----------------------------------------------------------------

def _svc(listen, main, backup, **extra):
    return {"listen_port": listen, "targets": {"main": {"port": main}, "backup": {"port": backup}},
            **extra}


def test_the_single_form_is_service_default():
    config = from_dict({"listen_port": 7777, "initial": "backup", "agent": {"weights": True}})
    assert config.single and list(config.services) == ["default"]
    one = config.services["default"]
    assert (one.listen_port, one.initial, one.agent_weights) == (7777, "backup", True)
    assert one.agent_listen == config.agent_listen and one.targets["main"].port == 8080


def test_services_tables_give_one_service_each():
    config = from_dict({"services": {
        "web": _svc(8888, 8080, 80, drain_timeout=5, agent={"listen": "[::]:8889"}),
        "api": _svc(9888, 9080, 90, initial="off", agent={"weights": True}),
    }})
    assert not config.single and list(config.services) == ["api", "web"]
    web, api = config.services["web"], config.services["api"]
    assert (web.listen_port, web.drain_timeout, str(web.agent_listen)) == (8888, 5.0, "[::]:8889")
    assert (api.initial, api.agent_listen, api.agent_weights) == ("off", None, True)
    assert api.targets["backup"].port == 90


@pytest.mark.parametrize("data, key", [
    ({"listen_port": 1, "services": {"a": _svc(8888, 8080, 80)}}, "listen_port"),
    ({"targets": {}, "services": {"a": _svc(8888, 8080, 80)}}, "targets"),
    ({"services": {"Web": _svc(8888, 8080, 80)}}, "services.Web"),
    ({"services": {"a" * 33: _svc(8888, 8080, 80)}}, "services." + "a" * 33),
    ({"services": {"a": {"targets": {}}}}, "services.a.listen_port"),
    ({"services": {"a": {"listen_port": 8888, "targets": {"main": {"port": 1}}}}},
     "services.a.targets.backup.port"),
    ({"services": {"a": _svc(8888, 8080, 80, health={})}}, "services.a.health"),
    ({"services": {"a": _svc(8888, 8080, 80, agent={"weights": 1})}}, "services.a.agent.weights"),
    ({"services": {}}, "services"),
])
def test_a_bad_services_table_names_its_key(data, key):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert e.value.key == key


def test_ports_are_distinct_across_services_and_both_keys_are_named():
    with pytest.raises(ConfigError) as e:
        from_dict({"services": {"a": _svc(8888, 8080, 80), "b": _svc(9888, 8080, 90)}})
    assert e.value.key == "services.b.targets.main.port"
    assert "services.a.targets.main.port" in str(e.value)


def test_a_live_service_keeps_its_ports_but_services_come_and_go():
    two = from_dict({"services": {"a": _svc(8888, 8080, 80), "b": _svc(9888, 9080, 90)}})
    moved = from_dict({"services": {"a": _svc(8888, 8081, 80), "c": _svc(7888, 7080, 70)}})
    assert two.restart_changes(moved) == ["services.a.targets.main.port"]
    assert two.restart_changes(from_dict({"services": {"a": _svc(8888, 8080, 80)}})) == []
