"""The sk_lookup backend's plan from what a read found: pure data, no kernel. Every service is
runtime data in one program: a switch of one service is one store into its slot, a service
added is its inserts, a service removed its deletes, and nothing else of any other service."""

from __future__ import annotations

import pytest

from zddd.backends import ApplyError, Desired, KernelState, Plan, ServiceLayout
from zddd.backends.pinned import Claim
from zddd.backends.sk_lookup import (MAX_SERVICES, V1, AddService, Build, FillSockets, Found,
                                     Relink, RemoveService, SetWeight, SkLookupBackend,
                                     source_path, value_of, weight_of)

PIN_DIR = "/nonexistent/zt"
ACTIVE = "/nonexistent/zt/sk_lookup_active"


def service(name: str, listen: int, main: int, backup: int, weight: int | None = 100
            ) -> ServiceLayout:
    return ServiceLayout(name, listen, (("backup", backup), ("main", main)), weight)


A = service("a", 8888, 8080, 80)
B = service("b", 9888, 9080, 90, weight=0)
C = service("c", 7888, 7080, 70, weight=None)
DESIRED = Desired((A,), pin_dir=PIN_DIR)
TWO = Desired((A, B), pin_dir=PIN_DIR)


def state(found: Found, desired: Desired) -> KernelState:
    """What read would report for `found` against `desired`."""
    weights = {s.name: weight_of(found.values.get(found.services[s.listen_port], 0))
               for s in desired.services if s.listen_port in found.services}
    problems = found.problems
    return KernelState(weights, not problems, found, tuple(problems))


def holding(*entries: tuple[ServiceLayout, int], **kwargs) -> Found:
    """A v2 layout holding these services at these slots, each at its own weight."""
    return Found(PIN_DIR, services={s.listen_port: slot for s, slot in entries},
                 values={slot: value_of(s.weight) for s, slot in entries}, **kwargs)


def test_weights_are_stored_as_one_plus_main_weight():
    assert [value_of(w) for w in (None, 0, 1, 50, 100)] == [0, 1, 2, 51, 101]
    assert [weight_of(v) for v in (0, 1, 2, 51, 101)] == [None, 0, 1, 50, 100]
    with pytest.raises(ValueError):
        weight_of(102)


def test_nothing_there_builds_every_service_off_then_flips_each():
    plan = SkLookupBackend().plan(None, TWO)
    assert plan.layout == (Build(TWO, ((8888, 0, 0), (9888, 1, 0))),)
    assert plan.flip == (SetWeight(ACTIVE, 0, 101), SetWeight(ACTIVE, 1, 1))


def test_intact_and_agreeing_is_empty():
    assert not SkLookupBackend().plan(state(holding((A, 0), (B, 1)), TWO), TWO)


def test_a_switch_of_one_service_is_one_store_into_its_slot_alone():
    found = holding((A, 3), (B, 7))
    for weight, value in ((None, 0), (0, 1), (100, 101), (30, 31)):
        plan = SkLookupBackend().plan(state(found, TWO), TWO.with_weight("b", weight))
        if weight == 0:
            assert not plan
            continue
        assert plan.steering_only and plan.flip == (SetWeight(ACTIVE, 7, value),)


def test_a_service_added_is_its_inserts_and_its_weight_nothing_else():
    found = holding((A, 0))
    three = Desired((C, A, B), pin_dir=PIN_DIR)
    plan = SkLookupBackend().plan(state(found, three), three)
    assert plan.layout == (AddService(PIN_DIR, "c", 7888, 1, C.ports),
                           AddService(PIN_DIR, "b", 9888, 2, B.ports))
    # c starts off (AddService leaves its element at 0): only b's weight is stored.
    assert plan.flip == (SetWeight(ACTIVE, 2, 1),)


def test_a_service_removed_is_its_deletes_nothing_else():
    found = holding((A, 0), (B, 1))
    plan = SkLookupBackend().plan(state(found, TWO), DESIRED)
    assert plan.layout == (RemoveService(PIN_DIR, 9888, 1),)
    assert plan.flip is None


def test_slots_are_kept_and_a_freed_slot_is_reused_last():
    found = holding((A, 0), (B, 1))
    swapped = Desired((A, C), pin_dir=PIN_DIR)
    plan = SkLookupBackend().plan(state(found, TWO), swapped)
    assert plan.layout == (RemoveService(PIN_DIR, 9888, 1),
                           AddService(PIN_DIR, "c", 7888, 2, C.ports))


def test_drift_of_one_service_repairs_that_service_alone():
    found = holding((A, 0), (B, 1))
    found.values[1] = value_of(100)  # someone flipped b
    found.socket_problems[("a", "backup")] = "holds 0 socket(s), 1 current listener(s)"
    plan = SkLookupBackend().plan(state(found, TWO), TWO)
    assert plan.layout == (FillSockets(PIN_DIR, 0, "a", "backup", 80),)
    assert plan.flip == (SetWeight(ACTIVE, 1, 1),)


def test_a_deleted_service_element_is_added_back():
    found = holding((A, 0))  # b's `services` entry deleted by someone
    found.service_problems.append("service b: listen port 9888 not steered")
    current = state(found, TWO)
    assert not current.intact and "b" not in current.weights
    plan = SkLookupBackend().plan(current, TWO)
    assert plan.layout == (AddService(PIN_DIR, "b", 9888, 1, B.ports),)
    assert plan.flip == (SetWeight(ACTIVE, 1, 1),)


def test_an_unknown_element_value_is_stored_again():
    found = holding((A, 0))
    found.values[0] = 500
    found.service_problems.append("service a: active value 500 unknown")
    plan = SkLookupBackend().plan(KernelState({"a": None}, False, found, ()), DESIRED)
    assert plan.steering_only and plan.flip == (SetWeight(ACTIVE, 0, 101),)


def test_a_lost_link_is_relinked_without_touching_the_services():
    found = holding((A, 0), (B, 1), link_problems=["link detached"])
    plan = SkLookupBackend().plan(state(found, TWO), TWO)
    assert plan.layout == (Relink(PIN_DIR),) and plan.flip is None


def test_the_v1_layout_is_rebuilt_in_place_without_a_flip():
    """cd0a822's layout, steering main for its one service on 8888: read reports it at slot
    0 with its weight; the rebuild starts from it, so nothing is stored after it."""
    found = Found(PIN_DIR, version=V1, services={8888: 0}, values={0: value_of(100)},
                  layout_problems=["layout v1"])
    default = Desired((service("default", 8888, 8080, 80),), pin_dir=PIN_DIR)
    current = state(found, default)
    assert current.weights == {"default": 100} and not current.intact
    plan = SkLookupBackend().plan(current, default)
    assert plan.layout == (Build(default, ((8888, 0, 101),)),) and plan.flip is None
    # Asked for backup instead: the rebuild keeps main until the one store after it.
    plan = SkLookupBackend().plan(current, default.with_weight("default", 0))
    assert plan.layout[0].slots == ((8888, 0, 101),)
    assert plan.flip == (SetWeight(ACTIVE, 0, 1),)


def test_a_foreign_layout_is_rebuilt_keeping_what_it_steered_to_until_the_flip():
    found = holding((A, 5), layout_problems=["layout version 9"])
    found.values[5] = value_of(0)
    plan = SkLookupBackend().plan(state(found, DESIRED), DESIRED)
    assert plan.layout == (Build(DESIRED, ((8888, 5, 1),)),)
    assert plan.flip == (SetWeight(ACTIVE, 5, 101),)


def test_targets_other_than_main_and_backup_and_too_many_services_are_refused():
    odd = Desired((ServiceLayout("x", 8888, (("blue", 1), ("main", 2)), 100),),
                  pin_dir=PIN_DIR)
    with pytest.raises(ApplyError):
        SkLookupBackend().plan(None, odd)
    many = Desired(tuple(service(f"s{i}", 10000 + i, 20000 + i, 30000 + i)
                         for i in range(MAX_SERVICES + 1)), pin_dir=PIN_DIR)
    with pytest.raises(ApplyError):
        SkLookupBackend().plan(None, many)


def test_64_services_build_and_one_of_them_switches_alone():
    services = tuple(service(f"s{i}", 10000 + i, 20000 + i, 30000 + i) for i in range(64))
    desired = Desired(services, pin_dir=PIN_DIR)
    build = SkLookupBackend().plan(None, desired)
    assert [slot for _, slot, _ in build.layout[0].slots] == list(range(64))
    found = holding(*((s, i) for i, s in enumerate(services)))
    plan = SkLookupBackend().plan(state(found, desired), desired.with_weight("s40", None))
    assert plan.steering_only and plan.flip == (SetWeight(ACTIVE, 40, 0),)


def test_leftover_and_read_need_no_compiler_when_nothing_is_pinned():
    backend = SkLookupBackend()
    assert backend.leftover(DESIRED) is None
    assert backend.read(DESIRED) is None
    assert backend.listener_missing("a", "main")
    assert backend.target_problem("a", "main")


def test_the_c_source_is_found_in_the_checkout():
    assert source_path().name == "sk_lookup.c" and source_path().exists()


def test_many_reuseport_listeners_leave_room_for_every_address():
    """nginx with reuseport and 8 workers: 8 IPv4 and 8 IPv6 sockets on one port. Both
    families must get slots (the kernel picks within a reuseport group itself)."""
    import socket

    from zddd.backends.sk_lookup import SLOTS, _usable
    from zddd.kernel.sock_diag import SocketInfo

    def listener(family, cookie):
        size = 4 if family == socket.AF_INET else 16
        return SocketInfo(family, 10, b"\0" * size, 8080, b"\0" * size, 0, cookie, cookie)

    many = [listener(socket.AF_INET6, c) for c in range(100, 108)]
    many += [listener(socket.AF_INET, c) for c in range(200, 208)]
    chosen = _usable(many)
    assert len(chosen) == SLOTS
    assert chosen[0].family == socket.AF_INET and chosen[1].family == socket.AF_INET6
    assert {s.family for s in chosen[:2]} == {socket.AF_INET, socket.AF_INET6}
    assert _usable(many) == chosen  # stable


def test_apply_reports_what_it_did_even_if_a_read_would_fail(monkeypatch):
    """Reading back is the core's job: a layout step and the flip that succeeded are a
    success, whatever a read after them would say (fault: the core restored the old target)."""
    backend = SkLookupBackend()
    done = []

    def read(desired):
        raise ApplyError("cannot read the sk_lookup data plane: EIO")

    monkeypatch.setattr(backend, "read", read)
    monkeypatch.setattr(backend, "_relink", lambda step: done.append(step))
    monkeypatch.setattr(backend, "_flip", lambda flips: done.extend(flips))
    plan = Plan((Relink(PIN_DIR),), (SetWeight(ACTIVE, 0, 1),))
    backend.apply(plan)
    assert done == [Relink(PIN_DIR), SetWeight(ACTIVE, 0, 1)]


def test_a_layout_pinned_before_the_owner_stamp_is_claimed_not_rebuilt():
    from zddd.backends.pinned import UNCLAIMED

    found = holding((A, 0), unclaimed=True)
    plan = SkLookupBackend().plan(KernelState({"a": 100}, False, found, (UNCLAIMED,)), DESIRED)
    assert plan.layout == (Claim(PIN_DIR),) and plan.flip is None


def test_v1_values_and_flow_keys_carry_over_into_v2():
    """cd0a822's `active` (0 off, 1 backup, 2 main) and flow keys (no local port) as v2's."""
    import socket

    from zddd.backends.sk_lookup import _FLOW_KEY, _flow_key, _v1_flow_key, _v1_value
    from zddd.kernel.sock_diag import Flow

    assert [_v1_value(v) for v in (0, 1, 2, 7)] == [0, value_of(0), value_of(100), 0]
    flow = Flow(socket.AF_INET, bytes([198, 51, 100, 2]), 8888, bytes([198, 51, 100, 1]), 40000)
    key = _flow_key(flow)
    assert len(key) == _FLOW_KEY.size == 40  # struct zddd_flow in bpf/sk_lookup.c
    assert key[:4] == bytes([198, 51, 100, 1]) and key[16:20] == bytes([198, 51, 100, 2])
    assert key[32:34] == (40000).to_bytes(2, "big")  # as the kernel gives the remote port
    assert int.from_bytes(key[34:36], "little") == 8888
    old = _v1_flow_key(flow)
    assert len(old) == 36 and old[:34] == key[:34]


def test_leftover_names_what_each_service_steers():
    from zddd.backends.sk_lookup import _steering

    assert _steering(KernelState({"default": 100}, True)) == "main"
    assert _steering(KernelState({"default": None}, True)) == "nothing"
    assert _steering(KernelState({"b": 0, "a": 30}, True)) == "a main 30%, b backup"
