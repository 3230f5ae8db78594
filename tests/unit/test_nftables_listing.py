"""The nftables backend's read-back, against listings as nft prints them: what nft shows
differently on some systems is still zddd's own layout, and real changes are still seen."""

from __future__ import annotations

import copy

from zddd.backends import Desired, ServiceLayout
from zddd.backends.nftables import NftablesBackend, _element_cmd, _elements, _layout

DEFAULT = ServiceLayout("default", 8888, (("backup", 80), ("main", 8080)), 100)
API = ServiceLayout("api", 9888, (("backup", 90), ("main", 9080)), 30)
DESIRED = Desired((DEFAULT,))


def listing(desired: Desired, *, l4proto="tcp", steer=None) -> list[dict]:
    """What `nft -j list table inet zddd` gives for zddd's layout of `desired` (with `steer`,
    {listen port: verdict}, as the steer map's elements instead of what `desired` says)."""
    out: list[dict] = [{"metainfo": {"json_schema_version": 1}},
                       {"table": {"family": "inet", "name": "zddd", "handle": 1}}]
    handle = 2
    elements = _elements(desired)
    if steer is not None:
        elements["steer"] = {k: {"data": v} for k, v in steer.items()}
    for (kind, name), obj in _layout(desired).items():
        obj = {k: v for k, v in copy.deepcopy(obj).items() if k != "rules"}
        if kind == "map" and elements.get(name):
            obj["elem"] = [listed(k, e) for k, e in elements[name].items()]
        if kind == "counter":
            obj.update(packets=0, bytes=0)
        out.append({kind: {**obj, "handle": handle}})
        handle += 1
    for (_, name), obj in _layout(desired).items():
        for expr in obj.get("rules", []):
            expr = copy.deepcopy(expr)
            for stmt in expr:
                match = stmt.get("match", {})
                if match.get("left") == {"meta": {"key": "l4proto"}}:
                    match["right"] = l4proto
            out.append({"rule": {"family": "inet", "table": "zddd", "chain": name,
                                 "handle": handle, "expr": expr}})
            handle += 1
    return out


def listed(key: int, element: dict) -> list:
    """An element as nft lists it: the key with its comment and counter when it has one."""
    key_json, data = _element_cmd("add", "any", key, element)["add"]["element"]["elem"][0]
    if isinstance(key_json, dict):
        key_json["elem"]["counter"] = {"packets": 7, "bytes": 420}
    return [key_json, data]


def read(monkeypatch, items: list[dict], desired: Desired = DESIRED):
    backend = NftablesBackend()
    monkeypatch.setattr(backend, "_list", lambda: items)
    return backend.read(desired)


def test_own_layout_reads_intact(monkeypatch):
    state = read(monkeypatch, listing(DESIRED))
    assert state.intact and state.weights == {"default": 100}, state.problems


def test_a_protocol_listed_by_number_is_still_zddds_layout(monkeypatch):
    # Without /etc/protocols (no netbase), nft lists `meta l4proto 6`: not drift.
    state = read(monkeypatch, listing(DESIRED, l4proto=6))
    assert state.intact and state.weights == {"default": 100}, state.problems


def test_another_protocol_is_drift(monkeypatch):
    state = read(monkeypatch, listing(DESIRED, l4proto=17))
    assert not state.intact
    assert set(state.problems) == {"chain steer_main changed", "chain steer_backup changed"}


def steer_verdict(service: ServiceLayout) -> dict:
    from zddd.backends.nftables import steer_verdict

    return steer_verdict(service.weight)


def test_every_service_reads_its_own_weight(monkeypatch):
    desired = Desired((DEFAULT, API))
    state = read(monkeypatch, listing(desired), desired)
    assert state.intact and state.weights == {"default": 100, "api": 30}, state.problems
    off = read(monkeypatch, listing(desired, steer={9888: steer_verdict(API)}), desired)
    assert off.intact and off.weights == {"default": None, "api": 30}


def test_an_element_zddd_would_not_write_is_foreign(monkeypatch):
    desired = Desired((DEFAULT, API))
    odd = {8888: {"jump": {"target": "steer_main"}}, 9888: steer_verdict(API)}
    state = read(monkeypatch, listing(desired, steer=odd), desired)
    assert not state.intact and state.problems == ("map steer element 8888 foreign",)
    assert state.weights == {"api": 30}  # default's steering is unknown, not "off"


def test_a_service_the_table_lacks_is_absent_and_missing(monkeypatch):
    state = read(monkeypatch, listing(DESIRED), Desired((DEFAULT, API)))
    assert state.weights == {"default": 100}
    assert not state.intact and set(state.problems) == {
        "map main_port element 9888 missing", "map backup_port element 9888 missing",
        "chain split_30 missing"}  # api's weight, 30, needs it


def test_a_port_map_element_naming_another_service_or_port_is_changed(monkeypatch):
    items = listing(Desired((DEFAULT, API)))
    renamed = Desired((DEFAULT, ServiceLayout("web", 9888, API.ports, 30)))
    state = read(monkeypatch, items, renamed)
    assert set(state.problems) == {"map main_port element 9888 changed",
                                   "map backup_port element 9888 changed"}
    moved = Desired((DEFAULT, ServiceLayout("api", 9888, (("backup", 90), ("main", 9081)), 30)))
    assert read(monkeypatch, items, moved).problems == ("map main_port element 9888 changed",)


def test_flows_are_counted_per_service_and_target_from_the_port_maps(monkeypatch):
    backend = NftablesBackend()
    items = listing(Desired((DEFAULT, API)))
    maps = {i["map"]["name"]: i for i in items if "map" in i}
    monkeypatch.setattr(backend, "_list_cmd", lambda what: [maps[what["map"]["name"]]])
    assert backend.flows_steered() == {("default", "main"): 7, ("api", "main"): 7,
                                       ("default", "backup"): 7, ("api", "backup"): 7}


def test_a_refused_batch_is_reported_by_its_first_error_line():
    from zddd.backends.nftables import _first_error

    err = ("Error: Could not process rule: Operation not permitted\n{...}\n^^^^\n"
           "Error: Could not process rule: Operation not permitted\n{...}\n^^^^\n")
    assert _first_error(err) == ("Error: Could not process rule: Operation not permitted "
                                 "(and 1 more)")
    assert _first_error("  \n") == "nftables refused the batch"
    assert _first_error("something odd\nmore") == "something odd"
