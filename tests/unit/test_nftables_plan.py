"""The nftables backend's plan from what a read found: pure data, no kernel. A switch of one
service is its one `steer` element; adding or removing a service touches only its own
elements; a repair rewrites only what differs; layout v1 is upgraded without a flip."""

from __future__ import annotations

import json

import pytest

from zddd.backends import Desired, NewerLayout, ServiceLayout
from zddd.backends.nftables import NftablesBackend
from zddd.backends.nftables import steer_verdict as verdict_of

from .test_nftables_listing import listing


def service(i: int, weight: int | None = 100) -> ServiceLayout:
    """Service i: "default" listens on 8888 (8080/80), "s<i>" on 10000+i (20000+i/30000+i)."""
    if i == 0:
        return ServiceLayout("default", 8888, (("backup", 80), ("main", 8080)), weight)
    return ServiceLayout(f"s{i}", 10000 + i, (("backup", 30000 + i), ("main", 20000 + i)),
                         weight)


def desired(*services: ServiceLayout) -> Desired:
    return Desired(tuple(sorted(services, key=lambda s: s.listen_port)))


MANY = desired(*(service(i, 100 if i % 2 else 0) for i in range(64)))


def state(items: list[dict], wanted: Desired):
    backend = NftablesBackend()
    backend._list = lambda: items  # what the kernel would list
    return backend.read(wanted)


def plan(current_items: list[dict] | None, read_as: Desired, wanted: Desired):
    current = state(current_items, read_as) if current_items is not None else None
    return current, NftablesBackend().plan(current, wanted)


def steer_verdict(s: ServiceLayout):
    return verdict_of(s.weight)


def elem(verb: str, key: int, verdict=None) -> dict:
    return {verb: {"element": {"family": "inet", "table": "zddd", "name": "steer",
                               "elem": [[key, verdict] if verdict else key]}}}


def keys_of(commands) -> set[tuple[str, int]]:
    """(map, key) of every element the commands touch."""
    found = set()
    for command in commands:
        element = next(iter(command.values())).get("element")
        for e in element["elem"] if element else ():
            key = e[0] if isinstance(e, list) else e
            found.add((element["name"], key["elem"]["val"] if isinstance(key, dict) else key))
    return found


def test_nothing_there_builds_everything_and_steers_every_service_in_one_plan():
    _, p = plan(None, MANY, MANY)
    assert p.layout[0] == {"add": {"table": {"family": "inet", "name": "zddd"}}}
    assert p.flip == tuple(elem("add", s.listen_port, steer_verdict(s)) for s in MANY.services)
    off = desired(service(0, None), service(1))
    _, p = plan(None, off, off)
    assert p.flip == (elem("add", 10001, steer_verdict(service(1))),)  # off: no element


def test_intact_and_agreeing_is_an_empty_plan():
    current, p = plan(listing(MANY), MANY, MANY)
    assert current.intact and not p, current.problems


@pytest.mark.parametrize("weight", [0, None, 37])
def test_a_switch_of_one_of_64_services_is_its_one_element(weight):
    flipped = MANY.with_weight("s5", weight)
    items = listing(MANY)
    if weight == 37:  # a split chain another service made before
        items = listing(MANY.with_weight("s8", 37))
        items = [i for i in items if "map" not in i or i["map"]["name"] != "steer"] + [
            i for i in listing(MANY) if "map" in i and i["map"]["name"] == "steer"]
    current, p = plan(items, MANY, flipped)
    assert current.intact, current.problems
    assert p.steering_only
    new = steer_verdict(flipped.service("s5"))
    assert p.flip == ((elem("delete", 10005),) + ((elem("add", 10005, new),) if new else ()))


def test_the_first_switch_to_a_new_split_adds_the_shared_split_chain_and_the_element():
    split = MANY.with_weight("s5", 37)
    _, p = plan(listing(MANY), MANY, split)
    assert [next(iter(c["add"])) for c in p.layout] == ["chain", "rule", "rule"]
    assert p.layout[0]["add"]["chain"]["name"] == "split_37"
    assert p.flip == (elem("delete", 10005), elem("add", 10005, {"goto": {"target": "split_37"}}))
    # Back to 100 %: split_37 stays for the next split, the switch is the element alone.
    after = listing(split)
    current, p = plan(after, split, MANY)
    assert current.intact and p.steering_only, current.problems
    assert p.flip == (elem("delete", 10005), elem("add", 10005, steer_verdict(service(5))))


def test_an_added_service_adds_its_own_elements_and_nothing_else():
    before = desired(service(0), service(1))
    after = desired(service(0), service(1), service(2, 0))
    current, p = plan(listing(before), after, after)
    assert not current.intact
    assert current.weights == {"default": 100, "s1": 100}
    assert all("add" in c and "element" in c["add"] for c in p.layout), p.layout
    assert keys_of(p.layout) == {("main_port", 10002), ("backup_port", 10002)}
    assert p.flip == (elem("add", 10002, steer_verdict(service(2, 0))),)


def test_a_removed_service_has_its_elements_removed_and_nothing_else():
    before = desired(service(0), service(1), service(2))
    after = desired(service(0), service(1))
    _, p = plan(listing(before), after, after)
    assert p.flip is None
    assert all("delete" in c and "element" in c["delete"] for c in p.layout), p.layout
    assert keys_of(p.layout) == {("steer", 10002), ("main_port", 10002),
                                 ("backup_port", 10002)}


def test_a_deleted_element_of_one_service_is_repaired_alone():
    items = listing(MANY, steer={s.listen_port: steer_verdict(s) for s in MANY.services
                                 if s.name != "s3"})
    current, p = plan(items, MANY, MANY)
    assert current.intact and current.weights["s3"] is None  # reads as off
    assert p.steering_only and p.flip == (elem("add", 10003, steer_verdict(service(3))),)


def test_a_flipped_element_of_one_service_is_repaired_alone():
    steer = {s.listen_port: steer_verdict(s) for s in MANY.services}
    steer[10003] = {"goto": {"target": "steer_backup"}}
    current, p = plan(listing(MANY, steer=steer), MANY, MANY)
    assert current.intact and current.weights["s3"] == 0
    assert p.flip == (elem("delete", 10003), elem("add", 10003, steer_verdict(service(3))))


def test_a_foreign_element_is_taken_out_and_the_service_steered_again():
    steer = {s.listen_port: steer_verdict(s) for s in MANY.services}
    steer[10003] = {"accept": None}
    steer[9999] = {"goto": {"target": "steer_main"}}
    current, p = plan(listing(MANY, steer=steer), MANY, MANY)
    assert set(current.problems) == {"map steer element 10003 foreign",
                                     "map steer element 9999 foreign"}
    assert "s3" not in current.weights
    assert p.layout == (elem("delete", 10003), elem("delete", 9999))
    assert p.flip == (elem("add", 10003, steer_verdict(service(3))),)


def test_a_changed_chain_is_rewritten_and_nothing_else():
    items = listing(MANY)
    for item in items:
        if item.get("rule", {}).get("chain") == "steer_main":
            item["rule"]["expr"][-1] = {"redirect": {"port": 1}}
    current, p = plan(items, MANY, MANY)
    assert current.problems == ("chain steer_main changed",)
    ref = {"family": "inet", "table": "zddd", "name": "steer_main"}
    assert p.layout[0] == {"flush": {"chain": ref}} and len(p.layout) == 2
    assert p.layout[1]["add"]["rule"]["chain"] == "steer_main" and p.flip is None


V1 = json.loads("""{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch \
#5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "zddd", "handle": 3}}, \
{"counter": {"family": "inet", "name": "layout_v1", "table": "zddd", "handle": 1, "packets": 0, \
"bytes": 0}}, {"counter": {"family": "inet", "name": "flows_backup", "table": "zddd", \
"handle": 2, "packets": 0, "bytes": 0}}, {"counter": {"family": "inet", "name": "flows_main", \
"table": "zddd", "handle": 4, "packets": 0, "bytes": 0}}, {"map": {"family": "inet", "name": \
"steer", "table": "zddd", "type": "inet_service", "handle": 6, "map": "verdict", "elem": \
[[8888, {"goto": {"target": "steer_main"}}]]}}, {"chain": {"family": "inet", "table": "zddd", \
"name": "steer_backup", "handle": 3}}, {"chain": {"family": "inet", "table": "zddd", "name": \
"steer_main", "handle": 5}}, {"chain": {"family": "inet", "table": "zddd", "name": \
"prerouting", "handle": 7, "type": "nat", "hook": "prerouting", "prio": -100, "policy": \
"accept"}}, {"chain": {"family": "inet", "table": "zddd", "name": "output", "handle": 8, \
"type": "nat", "hook": "output", "prio": -100, "policy": "accept"}}, {"rule": {"family": \
"inet", "table": "zddd", "chain": "steer_backup", "handle": 9, "expr": [{"match": {"op": "==", \
"left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}, {"counter": "flows_backup"}, \
{"redirect": {"port": 80}}]}}, {"rule": {"family": "inet", "table": "zddd", "chain": \
"steer_main", "handle": 10, "expr": [{"match": {"op": "==", "left": {"meta": {"key": \
"l4proto"}}, "right": "tcp"}}, {"counter": "flows_main"}, {"redirect": {"port": 8080}}]}}, \
{"rule": {"family": "inet", "table": "zddd", "chain": "prerouting", "handle": 11, "expr": \
[{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": \
8888}}, {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}}, \
"right": "local"}}, {"vmap": {"key": {"payload": {"protocol": "tcp", "field": "dport"}}, \
"data": "@steer"}}]}}, {"rule": {"family": "inet", "table": "zddd", "chain": "output", \
"handle": 12, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", \
"field": "dport"}}, "right": 8888}}, {"match": {"op": "==", "left": {"fib": {"result": "type", \
"flags": ["daddr"]}}, "right": "local"}}, {"vmap": {"key": {"payload": {"protocol": "tcp", \
"field": "dport"}}, "data": "@steer"}}]}}]}""")["nftables"]
"""What zddd of layout v1 (d3fac13) listed, steering 8888 to main: `nft -j list table`."""


def test_layout_v1_is_adopted_as_service_default_and_upgraded_without_a_flip():
    single = desired(service(0))
    current, p = plan(V1, single, single)
    assert current.weights == {"default": 100} and not current.intact
    assert current.problems[0] == "older layout v1"
    assert p.flip is None  # the element 8888 : goto steer_main stays as it is
    deleted = [c["delete"]["counter"]["name"] for c in p.layout if "delete" in c]
    assert deleted == ["layout_v1", "flows_backup", "flows_main"]
    # The NAT chains and the steer map stay (established redirected flows need the hooks);
    # only their rules are rewritten, in the same transaction.
    flushed = {c["flush"]["chain"]["name"] for c in p.layout if "flush" in c}
    assert flushed == {"steer_main", "steer_backup", "prerouting", "output"}
    assert not any("add" in c and ("table" in c["add"] or c["add"].get("map", {}).get("name")
                                   == "steer") for c in p.layout)


def test_layout_v1_steering_backup_reads_as_weight_0():
    items = json.loads(json.dumps(V1).replace('"target": "steer_main"',
                                              '"target": "steer_backup"'))
    current = state(items, desired(service(0)))
    assert current.weights == {"default": 0}


def test_a_newer_layout_is_refused_not_repaired():
    items = json.loads(json.dumps(V1).replace("layout_v1", "layout_v3"))
    with pytest.raises(NewerLayout, match="layout v3"):
        state(items, desired(service(0)))


def test_up_to_four_unused_split_chains_stay_and_a_ramps_trail_goes():
    def splits(*weights):
        return desired(*(service(i, w) for i, w in enumerate(weights)))

    four = splits(11, 12, 13, 14, 100)
    current, p = plan(listing(four), four, splits(100, 100, 100, 100, 100))
    assert p.steering_only and current.intact  # a canary back to 100 is its element alone
    five = splits(11, 12, 13, 14, 15)
    current, p = plan(listing(five), five, splits(11, 12, 13, 14, 100))
    assert p.steering_only  # split_15 is the only unused one, and stays
    current, p = plan(listing(five), five, splits(100, 100, 100, 100, 100))
    chains = {"family": "inet", "table": "zddd"}
    gone = [{"delete": {"chain": {**chains, "name": f"split_{w}"}}} for w in range(11, 16)]
    assert all(c in p.layout for c in gone)
    # Each service's element is unlinked before its chain goes, and steered again after.
    for i in range(5):
        key = 8888 if i == 0 else 10000 + i
        assert p.layout.index(elem("delete", key)) < p.layout.index(gone[i])
        assert elem("add", key, {"goto": {"target": "steer_main"}}) in p.flip
    after = listing(splits(100, 100, 100, 100, 100))
    assert plan(after, five, five)[1].layout  # the splits are made again when wanted
