"""zddctl status from zddd's properties: the JSON keys and the lines people read, for a zddd
that has the last switch's time and caller, for an older one that has not, and for connection
counts zddd could not read."""

from __future__ import annotations

import time

import pytest

from zddd.cli import format_status, status_dict

OLD_ZDDD = {"ActiveTarget": "main", "Draining": "", "Backend": "nftables", "ListenPort": 8888,
            "LastSwitchUSec": 412, "Targets": {"main": 8080, "backup": 80},
            "TargetsUp": {"main": True, "backup": False},
            "Connections": {"main": 3, "backup": 0}, "DrainTimeoutUSec": 30_000_000}
NOW = 1_780_000_000.0


def test_an_older_zddd_shows_no_time_nor_caller():
    st = status_dict(OLD_ZDDD)
    assert st["last_switch_timestamp_usec"] is None and st["last_switch_caller"] is None
    assert st["targets"] == {"backup": {"port": 80, "up": False, "connections": 0},
                             "main": {"port": 8080, "up": True, "connections": 3}}
    text = format_status(st, NOW)
    assert "last switch:   412 µs (data-plane commit)\n" in text
    assert "by " not in text


def test_when_and_who_asked():
    stamp = NOW - 125
    st = status_dict({**OLD_ZDDD, "LastSwitchTimestamp": int(stamp * 1e6),
                      "LastSwitchCaller": "uid=1000"})
    assert st["last_switch_timestamp_usec"] == int(stamp * 1e6)
    assert st["last_switch_caller"] == "uid=1000"
    line = next(x for x in format_status(st, NOW).splitlines() if x.startswith("last switch"))
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
    assert line.startswith(f"last switch:   {when} "), line
    assert line.endswith("(2 min ago) by uid=1000, data-plane commit 412 µs"), line


@pytest.mark.parametrize("ago, says", [(0, "0 s ago"), (59, "59 s ago"), (3600 * 5, "5 h ago"),
                                       (86400, "1 day ago"), (86400 * 3 + 5, "3 days ago")])
def test_how_long_ago(ago, says):
    st = status_dict({**OLD_ZDDD, "LastSwitchTimestamp": int((NOW - ago) * 1e6),
                      "LastSwitchCaller": ""})
    text = format_status(st, NOW)
    assert f"({says}), data-plane commit" in text, text


def test_never_switched():
    st = status_dict({**OLD_ZDDD, "LastSwitchTimestamp": 0, "LastSwitchCaller": ""})
    assert st["last_switch_timestamp_usec"] == 0
    assert "last switch:   never\n" in format_status(st, NOW)


@pytest.mark.parametrize("connections", [{"main": 3}, {"main": 3, "backup": -1}])
def test_a_count_zddd_could_not_read_is_unknown(connections):
    st = status_dict({**OLD_ZDDD, "Connections": connections})
    assert st["targets"]["backup"]["connections"] is None
    assert st["targets"]["main"]["connections"] == 3
    lines = format_status(st, NOW).splitlines()
    assert lines[-2].startswith("  backup ") and lines[-2].endswith(" connections unknown")
    assert lines[-1].endswith(" 3 connections")


# ---- services and weights -----------------------------------------------------------------------

from zddd.cli import service_dict, weights_of  # noqa: E402

NEW_ZDDD = {**OLD_ZDDD, "LastSwitchTimestamp": 0, "LastSwitchCaller": "",
            "Weights": {"main": 100, "backup": 0}, "Services": ["default"]}


def test_one_service_shows_its_weights_before_the_last_switch():
    st = {**status_dict(NEW_ZDDD), "services": {"default": service_dict(NEW_ZDDD)}}
    lines = format_status(st, NOW).splitlines()
    assert lines[0] == "active target: main"  # no service line for the single form
    assert lines.index("weights:       main 100 %, backup 0 %") == \
        lines.index("listen port:   8888") + 1
    assert st["services"]["default"]["weights"] == {"main": 100, "backup": 0}
    assert "backend" not in st["services"]["default"]


def test_several_services_each_under_its_name():
    web = {**NEW_ZDDD, "ListenPort": 8888, "Name": "web"}
    api = {**NEW_ZDDD, "ListenPort": 8890, "ActiveTarget": "split",
           "Weights": {"main": 10, "backup": 90}, "Name": "api"}
    st = {"backend": "nftables", "services": {"api": service_dict(api), "web": service_dict(web)}}
    text = format_status(st, NOW)
    assert text.startswith("backend:       nftables\n\nservice api:\n  active target: split\n")
    assert "  weights:       main 10 %, backup 90 %\n" in text
    assert "\n\nservice web:\n  active target: main\n" in text
    assert text.endswith("  main    port 8080  up   3 connections")


def test_a_ramp_in_progress():
    props = {**NEW_ZDDD, "ActiveTarget": "split", "Weights": {"main": 40, "backup": 60},
             "Ramp": [10, 100, int((NOW - 100) * 1e6), 300_000_000]}
    one = service_dict(props)
    assert one["ramp"] == {"main_from": 10, "main_to": 100,
                           "started_usec": int((NOW - 100) * 1e6), "seconds": 300.0}
    text = format_status({**status_dict(props), "services": {"default": one}}, NOW)
    assert "ramp:          main 10 % \u2192 100 % over 300 s, 200 s left\n" in text
    assert service_dict({**props, "Ramp": [0, 0, 0, 0]})["ramp"] is None
    assert service_dict(OLD_ZDDD)["ramp"] is None and service_dict(OLD_ZDDD)["weights"] is None


@pytest.mark.parametrize("pairs, weights", [
    ([("main", 10)], {"main": 10, "backup": 90}),
    ([("backup", 100)], {"main": 0, "backup": 100}),
    ([("backup", 30), ("main", 70)], {"main": 70, "backup": 30}),
])
def test_weights_a_target_left_out_gets_the_rest(pairs, weights):
    assert weights_of(pairs) == weights


@pytest.mark.parametrize("pairs", [[("main", 10), ("backup", 10)], [("main", 1), ("main", 99)]])
def test_weights_that_cannot_be(pairs):
    with pytest.raises(ValueError):
        weights_of(pairs)
