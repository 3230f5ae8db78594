"""The tc and xdp backends' plan from what a read found: pure data, no kernel."""

from __future__ import annotations

import pytest

from zddd.backends import Desired, KernelState, backend_class
from zddd.backends.pinned import UNCLAIMED, Claim, Flip
from zddd.backends.rewrite import (Attach, AttachEverywhere, Build, Clsact, Detach, Flavour,
                                   Found, Missing, Repin, RequireInterfaces)

PIN_DIR = "/nonexistent/zt"
DESIRED = Desired(8888, (("backup", 80), ("main", 8080)), "main", pin_dir=PIN_DIR,
                  flow_entries=4096)
ALL_MAPS = {"flows", "active", "counts"}


@pytest.fixture(params=["tc", "xdp"])
def backend(request):
    return backend_class(request.param)()


def hooks(backend) -> tuple[str, str]:
    return ("egress", backend.ingress_hook)


def attached(backend, ids=(11, 12)) -> Found:
    """A complete layout: pins, programs attached on lo (1) and eth0 (2) with clsact."""
    directory = f"{PIN_DIR}/{backend.name}"
    found = Found(directory, pins={"ingress": ids[0], "egress": ids[1], "flows": 1, "active": 2,
                                   "counts": 3, "stamp": 4},
                  keepable=set(ALL_MAPS), interfaces={"lo": 1, "eth0": 2},
                  clsact={"lo", "eth0"})
    for ifname in ("lo", "eth0"):
        mode = 0
        if backend.ingress_hook == "xdp":
            mode = 2 if ifname == "lo" else 4
        found.attached[ifname] = {"egress": (ids[1], 0), backend.ingress_hook: (ids[0], mode)}
    return found


def state(found: Found, problems=("something",), active="main") -> KernelState:
    return KernelState(active, not problems, found, tuple(problems))


def test_nothing_there_builds_and_attaches_where_the_interfaces_are(backend):
    plan = backend.plan(None, DESIRED)
    directory = f"{PIN_DIR}/{backend.name}"
    assert plan.layout == (Build(PIN_DIR, Flavour(8888, (80, 8080), 4096), DESIRED.ports),
                           AttachEverywhere(directory, None, "native"))
    assert plan.flip == Flip(f"{directory}/active", 8080)


def test_configured_interfaces_are_required_before_anything_is_built(backend):
    desired = Desired(8888, DESIRED.ports, "backup", interfaces=("eth0",), pin_dir=PIN_DIR)
    plan = backend.plan(None, desired)
    assert plan.layout[0] == RequireInterfaces(("eth0",))
    assert isinstance(plan.layout[1], Build)
    assert plan.flip.value == 80


def test_intact_is_a_flip_alone_or_nothing(backend):
    found = attached(backend)
    assert not backend.plan(state(found, ()), DESIRED)
    off = backend.plan(state(found, ()), DESIRED.steering(None))
    assert off.steering_only and off.flip == Flip(f"{PIN_DIR}/{backend.name}/active", 0)


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
    found.bad_pins, found.keepable = {"flows"}, {"active", "counts"}
    found.carriable, found.rebuild = {"flows"}, True
    plan = backend.plan(state(found, ("map flows has another layout",)), DESIRED)
    build = plan.layout[0]
    assert build == Build(PIN_DIR, Flavour(8888, (80, 8080), 4096), DESIRED.ports,
                          ("active", "counts"), ("flows",))
    # A rebuild attaches the new programs on every hook of every interface.
    assert [type(s) for s in plan.layout[1:]] == [Attach] * 4


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
