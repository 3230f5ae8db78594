"""The tc and xdp backends' plan from what a read found: pure data, no kernel."""

from __future__ import annotations

import pytest

from zddd.backends import Desired, KernelState, ServiceLayout, backend_class
from zddd.backends.pinned import UNCLAIMED, Claim
from zddd.backends.rewrite import (MAX_SERVICES, Attach, AttachEverywhere, Build, CarryLegacy,
                                   Clsact, Detach, DropService, Flavour, Found, Missing, Refuse,
                                   Repin, RequireInterfaces, Row, SetService, Stores, decode,
                                   encode)

PIN_DIR = "/nonexistent/zt"
PORTS = (("backup", 80), ("main", 8080))
A = ServiceLayout("a", 8888, PORTS, 100)
B = ServiceLayout("b", 9888, (("backup", 90), ("main", 9080)), 0)
DESIRED = Desired((A,), pin_dir=PIN_DIR, flow_entries=4096)
TWO = Desired((A, B), pin_dir=PIN_DIR, flow_entries=4096)
ALL_MAPS = {"flows", "active", "services", "targets", "counts"}


@pytest.fixture(params=["tc", "xdp"])
def backend(request):
    return backend_class(request.param)()


def active(backend) -> str:
    return f"{PIN_DIR}/{backend.name}/active"


def attached(backend, ids=(11, 12), desired: Desired = DESIRED) -> Found:
    """A complete layout holding `desired`'s services at their weights: pins, programs
    attached on lo (1) and eth0 (2) with clsact."""
    directory = f"{PIN_DIR}/{backend.name}"
    found = Found(directory, pins={"ingress": ids[0], "egress": ids[1], "flows": 1, "active": 2,
                                   "services": 5, "targets": 6, "counts": 3, "stamp": 4},
                  keepable=set(ALL_MAPS), interfaces={"lo": 1, "eth0": 2},
                  clsact={"lo", "eth0"})
    for slot, s in enumerate(desired.services):
        row = Row(s.listen_port, slot, s.port_of("main"), s.port_of("backup"))
        found.services[s.listen_port] = row
        found.targets[row.main_port] = found.targets[row.backup_port] = s.listen_port
        found.values[slot] = encode(s.weight)
    for ifname in ("lo", "eth0"):
        mode = 0
        if backend.ingress_hook == "xdp":
            mode = 2 if ifname == "lo" else 4
        found.attached[ifname] = {"egress": (ids[1], 0), backend.ingress_hook: (ids[0], mode)}
    return found


def state(found: Found, problems=("something",), desired: Desired = DESIRED) -> KernelState:
    weights = {s.name: decode(found.values[found.services[s.listen_port].slot])
               for s in desired.services if s.listen_port in found.services}
    return KernelState(weights, not problems, found, tuple(problems))


def test_weights_are_encoded_one_value_per_service():
    assert [encode(w) for w in (None, 0, 1, 50, 100)] == [0, 1, 2, 51, 101]
    assert [decode(v) for v in (0, 1, 51, 101)] == [None, 0, 50, 100]
    with pytest.raises(ValueError):
        decode(102)


def test_nothing_there_builds_every_service_off_then_flips_them(backend):
    plan = backend.plan(None, TWO)
    directory = f"{PIN_DIR}/{backend.name}"
    rows = (Row(8888, 0, 8080, 80), Row(9888, 1, 9080, 90))
    assert plan.layout == (
        Build(PIN_DIR, Flavour(4096), ((("a", "backup"), 80), (("a", "main"), 8080),
                                       (("b", "backup"), 90), (("b", "main"), 9080)),
              rows=rows, values=((0, 0), (1, 0))),
        AttachEverywhere(directory, None, "native"))
    assert plan.flip == Stores(active(backend), ((0, 101), (1, 1)))


def test_configured_interfaces_are_required_before_anything_is_built(backend):
    desired = Desired((A,), interfaces=("eth0",), pin_dir=PIN_DIR).with_weight("a", 0)
    plan = backend.plan(None, desired)
    assert plan.layout[0] == RequireInterfaces(("eth0",))
    assert isinstance(plan.layout[1], Build)
    assert plan.flip.stores == ((0, 1),)


def test_intact_is_a_flip_alone_or_nothing(backend):
    found = attached(backend)
    assert not backend.plan(state(found, ()), DESIRED)
    off = backend.plan(state(found, ()), DESIRED.with_weight("a", None))
    assert off.steering_only and off.flip == Stores(active(backend), ((0, 0),))


def test_one_services_switch_is_one_store_and_touches_no_other(backend):
    found = attached(backend, desired=TWO)
    for weight, value in ((100, 101), (None, 0), (30, 31)):
        plan = backend.plan(state(found, (), TWO), TWO.with_weight("b", weight))
        assert plan.steering_only
        assert plan.flip == Stores(active(backend), ((1, value),))


def test_an_added_service_is_its_elements_alone(backend):
    """A service added to Desired: its entries written (slot off first), then its weight
    flipped; no build, no attachment, nothing of the other service."""
    found = attached(backend)  # holds A only
    plan = backend.plan(state(found, ("service b missing",), TWO), TWO)
    assert plan.layout == (SetService(found.directory, Row(9888, 1, 9080, 90), True),)
    assert plan.flip == Stores(active(backend), ((1, 1),))


def test_a_removed_service_is_its_elements_removed(backend):
    found = attached(backend, desired=TWO)
    plan = backend.plan(state(found, ("listen port 9888 steered, but no service has it",),
                              DESIRED), DESIRED)
    assert plan.layout == (DropService(found.directory, 9888, 1, (90, 9080)),)
    assert plan.flip is None


def test_a_new_service_takes_the_lowest_free_slot(backend):
    found = attached(backend, desired=TWO)
    del found.services[8888], found.targets[80], found.targets[8080]  # slot 0 free
    c = ServiceLayout("c", 7000, (("backup", 70), ("main", 7080)), 100)
    desired = Desired((c, B), pin_dir=PIN_DIR)
    plan = backend.plan(state(found, ("service c missing",), desired), desired)
    assert plan.layout == (SetService(found.directory, Row(7000, 0, 7080, 70), True),)
    assert plan.flip == Stores(active(backend), ((0, 101),))


def test_a_flipped_element_is_repaired_alone(backend):
    """Someone stored another value in one service's slot: read reports its weight, plan
    stores that one value back."""
    found = attached(backend, desired=TWO)
    found.values[1] = 101  # b: 0 -> 100 by hand
    current = state(found, (), TWO)
    assert current.weights == {"a": 100, "b": 100}
    plan = backend.plan(current, TWO)
    assert plan.flip == Stores(active(backend), ((1, 1),)) and plan.steering_only


def test_a_bad_value_is_stored_over(backend):
    found = attached(backend, desired=TWO)
    found.values[1] = 500
    plan = backend.plan(KernelState({"a": 100, "b": None}, False, found, ("bad weight",)), TWO)
    assert plan.layout == ()
    assert plan.flip == Stores(active(backend), ((1, 1),))


def test_a_deleted_entry_is_written_again_alone(backend):
    found = attached(backend, desired=TWO)
    del found.targets[9080]
    plan = backend.plan(state(found, ("target port 9080 of service b missing",), TWO), TWO)
    # The entry keeps its slot: the slot is not reset, its weight not stored again.
    assert plan.layout == (SetService(found.directory, Row(9888, 1, 9080, 90), False),)
    assert plan.flip is None
    del found.services[9888]
    plan = backend.plan(state(found, ("service b missing",), TWO), TWO)
    assert plan.layout == (SetService(found.directory, Row(9888, 1, 9080, 90), True),)
    assert plan.flip == Stores(active(backend), ((1, 1),))


def test_a_stray_target_entry_is_deleted(backend):
    found = attached(backend)
    found.targets[1234] = 8888
    plan = backend.plan(state(found), DESIRED)
    assert plan.layout == (DropService(found.directory, None, None, (1234,)),)


def test_too_many_services_are_refused_before_any_change(backend):
    many = Desired(tuple(ServiceLayout(f"s{i}", 10000 + i, (("backup", 20000 + i),
                                                            ("main", 30000 + i)), 100)
                         for i in range(MAX_SERVICES + 1)), pin_dir=PIN_DIR)
    plan = backend.plan(None, many)
    assert len(plan.layout) == 1 and isinstance(plan.layout[0], Refuse)


def test_sixty_four_services_plan_as_fast_as_one(backend):
    many = Desired(tuple(ServiceLayout(f"s{i}", 10000 + i, (("backup", 20000 + i),
                                                            ("main", 30000 + i)), 100)
                         for i in range(64)), pin_dir=PIN_DIR)
    found = attached(backend, desired=many)
    plan = backend.plan(state(found, (), many), many.with_weight("s17", 0))
    assert plan.flip == Stores(active(backend), ((17, 1),))


def test_a_missing_interface_is_one_failing_step(backend):
    found = attached(backend)
    found.missing_interfaces = ("eth9",)
    plan = backend.plan(state(found), DESIRED)
    assert plan.layout == (Missing(("eth9",)),)


def test_an_unstamped_pin_dir_is_claimed_without_a_rebuild(backend):
    plan = backend.plan(state(_unclaimed(backend), (UNCLAIMED,)), DESIRED)
    assert plan.layout == (Claim(PIN_DIR),)


def _unclaimed(backend) -> Found:
    found = attached(backend)
    found.unclaimed = True
    return found


def test_a_flow_map_of_another_size_is_rebuilt_with_its_entries_carried(backend):
    found = attached(backend)
    found.bad_pins, found.keepable = {"flows"}, ALL_MAPS - {"flows"}
    found.carriable, found.rebuild = {"flows"}, True
    plan = backend.plan(state(found, ("map flows has another layout",)), DESIRED)
    build = plan.layout[0]
    assert build == Build(PIN_DIR, Flavour(4096), ((("a", "backup"), 80), (("a", "main"), 8080)),
                          ("active", "counts", "services", "targets"), ("flows",),
                          (Row(8888, 0, 8080, 80),), ((0, 101),))
    # A rebuild attaches the new programs on every hook of every interface.
    assert [type(s) for s in plan.layout[1:]] == [Attach] * 4
    assert plan.flip is None  # the build wrote the steering as it was


def test_a_rebuild_that_cannot_know_a_weight_writes_the_desired_one(backend):
    """`active` was unreadable (its pin removed by hand): the build writes the desired weight
    into the map the programs will use, never an "off" until the flip."""
    found = attached(backend, desired=TWO)
    found.values = {}
    found.pins.pop("active")
    found.orphans, found.rebuild = {"active": 9}, True
    current = KernelState({}, False, found, ("pin active missing",))
    plan = backend.plan(current, TWO)
    build = next(step for step in plan.layout if isinstance(step, Build))
    assert build.values == ((0, 101), (1, 1)) and plan.flip is None


def test_the_one_service_layout_is_adopted_with_its_steering_and_flows(backend):
    """Layout v1: `read` gave the weight from its `active` port; the rebuild copies its flows
    into a flow map keyed by listen port too, writes that steering into the new maps before the
    programs are replaced, copies the flows the old programs made meanwhile after the
    attachments, and needs no flip."""
    found = attached(backend)
    found.services, found.targets, found.values = {}, {}, {}
    found.bad_pins = {"flows", "active", "counts"}
    found.keepable, found.rebuild, found.v1_flows = set(), True, True
    default = Desired((ServiceLayout("default", 8888, PORTS, 0),), pin_dir=PIN_DIR,
                      flow_entries=4096)
    current = KernelState({"default": 0}, False, found, ("layout version 1, this zddd builds 2",))
    plan = backend.plan(current, default)
    build = plan.layout[0]
    assert isinstance(build, Build) and build.keep == () and build.legacy_flows
    assert build.rows == (Row(8888, 0, 8080, 80),) and build.values == ((0, 1),)
    assert [type(s) for s in plan.layout[1:]] == [Attach] * 4 + [CarryLegacy]
    assert plan.flip is None
    # A switch on the way is the one store after the build.
    plan = backend.plan(current, default.with_weight("default", 100))
    assert plan.flip == Stores(active(backend), ((0, 101),))


def test_an_upgrade_cut_short_carries_the_old_flows_over_alone(backend):
    found = attached(backend)
    found.legacy_flows = True
    plan = backend.plan(state(found, ("flows of layout v1 not carried over yet",)), DESIRED)
    assert plan.layout == (CarryLegacy(found.directory),) and plan.flip is None


def test_a_hand_detached_hook_is_attached_again_alone(backend):
    found = attached(backend)
    del found.attached["eth0"][backend.ingress_hook]
    plan = backend.plan(state(found), DESIRED)
    mode = 4 if backend.ingress_hook == "xdp" else 0
    assert plan.layout == (Attach(found.directory, "eth0", 2, backend.ingress_hook, mode),)


def test_a_removed_map_pin_is_repinned_and_a_lost_clsact_added(backend):
    found = attached(backend)
    found.orphans = {"flows": 77}
    found.clsact.discard("lo")
    plan = backend.plan(state(found), DESIRED)
    assert plan.layout[0] == Repin(found.directory, "flows", 77)
    assert plan.layout[1] == Clsact("lo", 1)


def test_an_interface_no_longer_configured_is_detached(backend):
    found = attached(backend)
    found.interfaces = {"lo": 1}
    plan = backend.plan(state(found), DESIRED)
    mode = 4 if backend.ingress_hook == "xdp" else 0
    assert sorted(plan.layout, key=str) == sorted(
        [Detach("eth0", 0, "egress"), Detach("eth0", mode, backend.ingress_hook)], key=str)
