"""The sk_lookup backend's plan from what a read found: pure data, no kernel."""

from __future__ import annotations

from zddd.backends import ApplyError, Desired, KernelState, Plan
from zddd.backends.pinned import Claim, Flip
from zddd.backends.sk_lookup import Build, FillSockets, Found, Relink, SkLookupBackend, source_path

DESIRED = Desired(8888, (("backup", 80), ("main", 8080)), "main", pin_dir="/nonexistent/zt")
ACTIVE = "/nonexistent/zt/sk_lookup_active"


def state(found: Found, active: str | None = "main") -> KernelState:
    problems = (found.layout_problems + found.link_problems + list(found.socket_problems))
    return KernelState(active, not problems, found, tuple(problems))


def test_nothing_there_builds_everything_then_flips():
    plan = SkLookupBackend().plan(None, DESIRED)
    assert plan.layout == (Build(DESIRED, 2),)
    assert plan.flip == Flip(ACTIVE, 2)


def test_intact_and_agreeing_is_empty_and_a_switch_is_one_flip():
    found = Found(DESIRED.pin_dir, active_value=2)
    backend = SkLookupBackend()
    assert not backend.plan(state(found), DESIRED)
    off = backend.plan(state(found), DESIRED.steering(None))
    assert off.steering_only and off.flip == Flip(ACTIVE, 0)
    backup = backend.plan(state(found), DESIRED.steering("backup"))
    assert backup.steering_only and backup.flip == Flip(ACTIVE, 1)


def test_each_kind_of_drift_gets_its_own_repair():
    found = Found(DESIRED.pin_dir, active_value=2, link_problems=["link detached"],
                  socket_problems={"main": "holds 0 socket(s), 2 current listener(s)"})
    plan = SkLookupBackend().plan(state(found), DESIRED)
    assert plan.layout == (Relink(DESIRED.pin_dir), FillSockets(DESIRED.pin_dir, 1, "main", 8080))


def test_a_foreign_layout_is_rebuilt_keeping_what_it_steered_to_until_the_flip():
    found = Found(DESIRED.pin_dir, active_value=1, layout_problems=["layout version 9"])
    plan = SkLookupBackend().plan(state(found, "backup"), DESIRED)
    assert plan.layout == (Build(DESIRED, 1),)
    assert plan.flip == Flip(ACTIVE, 2)


def test_leftover_and_read_need_no_compiler_when_nothing_is_pinned():
    backend = SkLookupBackend()
    assert backend.leftover(DESIRED) is None
    assert backend.read(DESIRED) is None
    assert backend.listener_missing("main")


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
    monkeypatch.setattr(backend, "_flip", lambda step: done.append(step))
    plan = Plan((Relink(DESIRED.pin_dir),), Flip(ACTIVE, 1))
    backend.apply(plan)
    assert done == [Relink(DESIRED.pin_dir), Flip(ACTIVE, 1)]


def test_a_layout_pinned_before_the_owner_stamp_is_claimed_not_rebuilt():
    from zddd.backends.pinned import UNCLAIMED

    found = Found(DESIRED.pin_dir, active_value=2, unclaimed=True)
    plan = SkLookupBackend().plan(KernelState("main", False, found, (UNCLAIMED,)), DESIRED)
    assert plan.layout == (Claim(DESIRED.pin_dir),)
