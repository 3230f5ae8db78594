"""The nftables backend's read-back, against listings as nft prints them: what nft shows
differently on some systems is still zddd's own layout, and real changes are still seen."""

from __future__ import annotations

import copy

from zddd.backends import Desired
from zddd.backends.nftables import NftablesBackend, _layout

DESIRED = Desired(8888, (("backup", 80), ("main", 8080)), "main")


def listing(desired: Desired, *, l4proto="tcp") -> list[dict]:
    """What `nft -j list table inet zddd` gives for zddd's layout, steering to main."""
    out: list[dict] = [{"metainfo": {"json_schema_version": 1}},
                       {"table": {"family": "inet", "name": "zddd", "handle": 1}}]
    handle = 2
    for (kind, _), obj in _layout(desired).items():
        obj = {k: v for k, v in copy.deepcopy(obj).items() if k != "rules"}
        if kind == "map":
            obj["elem"] = [[8888, {"goto": {"target": "steer_main"}}]]
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


def read(monkeypatch, items: list[dict]):
    backend = NftablesBackend()
    monkeypatch.setattr(backend, "_list", lambda: items)
    return backend.read(DESIRED)


def test_own_layout_reads_intact(monkeypatch):
    state = read(monkeypatch, listing(DESIRED))
    assert state.intact and state.active == "main", state.problems


def test_a_protocol_listed_by_number_is_still_zddds_layout(monkeypatch):
    # Without /etc/protocols (no netbase), nft lists `meta l4proto 6`: not drift.
    state = read(monkeypatch, listing(DESIRED, l4proto=6))
    assert state.intact and state.active == "main", state.problems


def test_another_protocol_is_drift(monkeypatch):
    state = read(monkeypatch, listing(DESIRED, l4proto=17))
    assert not state.intact
    assert set(state.problems) == {"chain steer_main changed", "chain steer_backup changed"}


def test_a_refused_batch_is_reported_by_its_first_error_line():
    from zddd.backends.nftables import _first_error

    err = ("Error: Could not process rule: Operation not permitted\n{...}\n^^^^\n"
           "Error: Could not process rule: Operation not permitted\n{...}\n^^^^\n")
    assert _first_error(err) == ("Error: Could not process rule: Operation not permitted "
                                 "(and 1 more)")
    assert _first_error("  \n") == "nftables refused the batch"
    assert _first_error("something odd\nmore") == "something odd"
