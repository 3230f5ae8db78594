"""A stand-in for the core of many services (zddd/core.py after issue #16), with what the
adapters (D-Bus, metrics, agent) call and read, and a record of what they asked for. Pure
Python: the adapters' tests run it without a kernel."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from zddd import errors


@dataclass(frozen=True)
class Snap:
    """The fields of core.Snapshot the adapters read."""

    service: str
    active: str = "main"
    draining: str = ""
    backend: str = "nftables"
    listen_port: int = 8888
    targets: dict = field(default_factory=lambda: {"main": 8080, "backup": 80})
    up: dict = field(default_factory=lambda: {"main": True, "backup": True})
    last_switch_usec: int = 0
    drain_timeout: float = 30.0
    last_switch_timestamp: int = 0
    last_switch_caller: str = ""
    weights: dict = field(default_factory=lambda: {"main": 100, "backup": 0})


def weights_for(active: str) -> dict:
    return {"main": {"main": 100, "backup": 0}, "backup": {"main": 0, "backup": 100}}.get(
        active, {"main": 0, "backup": 0})


class FakeService:
    def __init__(self, host: "FakeCore", name: str, listen_port: int, **snap):
        self.host = host
        self.name = name
        self.listen_port = listen_port
        self.snap = Snap(name, listen_port=listen_port, **snap)
        self.calls: list[tuple] = []
        self.polls = 0
        self.counts = {"main": 0, "backup": 0}

    def snapshot(self) -> Snap:
        return self.snap

    def agent_polled(self) -> Snap:
        self.polls += 1
        return self.snap

    def connection_counts(self) -> dict:
        return dict(self.counts)

    def change(self, **fields) -> None:
        """Move to a new state and tell the observers, as the core does."""
        old = self.snap
        self.snap = replace(old, **fields)
        for o in list(self.host.observers):
            o.state_changed(old, self.snap)

    def switch(self, target, *, force=False, drain_timeout=None, ramp=None, caller=""):
        self.calls.append(("switch", target, force, drain_timeout, caller) +
                          ((ramp,) if ramp is not None else ()))
        if target not in ("main", "backup", "off"):
            raise errors.InvalidTarget(f"no target {target!r}")
        old = self.snap.active
        self.change(active=target, weights=weights_for(target), last_switch_usec=42,
                    last_switch_caller=caller)
        for o in list(self.host.observers):
            o.switched(self.name, old, target, 42)
        return 42

    def set_weights(self, weights, *, force=False, ramp=None, caller=""):
        self.calls.append(("set_weights", dict(weights), force, ramp, caller))
        if sorted(weights) != ["backup", "main"] or sum(weights.values()) != 100:
            raise errors.InvalidArgument("weights of main and backup must sum to 100")
        self.change(weights=dict(weights), active="split" if 0 < weights["main"] < 100
                    else ("main" if weights["main"] else "backup"))
        return 1

    async def wait_drained(self, target, timeout):
        self.calls.append(("wait_drained", target, timeout))
        await asyncio.sleep(0)
        return self.counts.get(target, 0) == 0


class FakeCore:
    """core.Steering: the host of every service."""

    class backend:
        name = "nftables"

    def __init__(self, *services: tuple[str, int]):
        self.observers: list = []
        self.services: dict[str, FakeService] = {}
        for name, port in services or (("default", 8888),):
            self.services[name] = FakeService(self, name, port)
        self.single = list(self.services) == ["default"]
        self.fail_counts = False
        self.fail_flows = False
        self.table = None
        self.flows: dict = {}

    def service(self, name: str | None) -> FakeService:
        if name is None:
            if len(self.services) != 1:
                raise errors.InvalidArgument("several services: name one")
            return next(iter(self.services.values()))
        try:
            return self.services[name]
        except KeyError:
            raise errors.InvalidArgument(f"no service {name}") from None

    def connection_counts(self) -> dict:
        if self.fail_counts:
            raise OSError("sock_diag said no")
        return {name: svc.connection_counts() for name, svc in self.services.items()}

    def flows_steered(self) -> dict:
        if self.fail_flows:
            raise OSError("netlink said no")
        return dict(self.flows)

    def flow_table(self):
        return self.table

    def add(self, name: str, port: int) -> None:
        """A reload that adds a service."""
        self.services[name] = FakeService(self, name, port)
        self.services = dict(sorted(self.services.items()))
        for o in list(self.observers):
            o.services_changed([name], [])

    def remove(self, name: str) -> None:
        del self.services[name]
        for o in list(self.observers):
            o.services_changed([], [name])
