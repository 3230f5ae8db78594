"""The nftables backend's read-back, against listings as nft prints them: what nft shows
differently on some systems is still zddd's own layout, and real changes are still seen."""

from __future__ import annotations

import copy

from zddd.backends import Desired, ServiceLayout
from zddd.backends.nftables import (NftablesBackend, _layout, _static_elements, counter_name,
                                    parse_counter, steer_verdict, target_chain)

DEFAULT = ServiceLayout("default", 8888, (("backup", 80), ("main", 8080)), 100)
API = ServiceLayout("api", 9888, (("backup", 90), ("main", 9080)), 30)
DESIRED = Desired((DEFAULT,))


def listing(desired: Desired, *, l4proto="tcp", steer=None) -> list[dict]:
    """What `nft -j list table inet zddd` gives for zddd's layout of `desired` (with `steer`
    as the steer map's elements instead of what `desired` says, if given)."""
    out: list[dict] = [{"metainfo": {"json_schema_version": 1}},
                       {"table": {"family": "inet", "name": "zddd", "handle": 1}}]
    handle = 2
    elements = {**_static_elements(desired), "steer": {
        s.listen_port: steer_verdict(s) for s in desired.services if s.weight is not None}}
    if steer is not None:
        elements["steer"] = steer
    for (kind, name), obj in _layout(desired).items():
        obj = {k: v for k, v in copy.deepcopy(obj).items() if k != "rules"}
        if kind == "map" and elements.get(name):
            obj["elem"] = [[k, v] for k, v in elements[name].items()]
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


def test_every_service_reads_its_own_weight(monkeypatch):
    desired = Desired((DEFAULT, API))
    state = read(monkeypatch, listing(desired), desired)
    assert state.intact and state.weights == {"default": 100, "api": 30}, state.problems
    off = read(monkeypatch, listing(desired, steer={9888: steer_verdict(API)}), desired)
    assert off.intact and off.weights == {"default": None, "api": 30}


def test_an_element_pointing_at_another_services_chain_is_foreign(monkeypatch):
    desired = Desired((DEFAULT, API))
    crossed = {8888: {"goto": {"target": target_chain("api", "main")}},
               9888: steer_verdict(API)}
    state = read(monkeypatch, listing(desired, steer=crossed), desired)
    assert not state.intact and state.problems == ("map steer element 8888 foreign",)
    assert state.weights == {"api": 30}  # default's steering is unknown, not "off"


def test_a_service_the_table_lacks_is_absent_and_missing(monkeypatch):
    state = read(monkeypatch, listing(DESIRED), Desired((DEFAULT, API)))
    assert state.weights == {"default": 100}
    assert not state.intact and "chain steer_api_main missing" in state.problems


def test_names_of_the_default_service_are_layout_v1s_and_others_carry_the_service():
    assert target_chain("default", "main") == "steer_main"
    assert counter_name("default", "backup") == "flows_backup"
    assert target_chain("api", "main") == "steer_api_main"
    assert counter_name("a_main", "backup") == "flows_a_main_backup"
    for service in ("default", "api", "a_main", "main", "backup"):
        for target in ("main", "backup"):
            assert parse_counter(counter_name(service, target)) == (service, target)
    assert parse_counter("layout_v2") is None and parse_counter("flows_default_main") is None


def test_a_refused_batch_is_reported_by_its_first_error_line():
    from zddd.backends.nftables import _first_error

    err = ("Error: Could not process rule: Operation not permitted\n{...}\n^^^^\n"
           "Error: Could not process rule: Operation not permitted\n{...}\n^^^^\n")
    assert _first_error(err) == ("Error: Could not process rule: Operation not permitted "
                                 "(and 1 more)")
    assert _first_error("  \n") == "nftables refused the batch"
    assert _first_error("something odd\nmore") == "something odd"
