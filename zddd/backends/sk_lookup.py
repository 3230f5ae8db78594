"""The sk_lookup backend: new connections to a service's listen port are handed to a listening
socket of one of its targets by a BPF sk_lookup program. No packet is rewritten: the
application accepts the connection on its own listener and sees the listen port as its local
port.

One program steers every service. The services are runtime data, not compiled in: a service
has a *slot* (0 .. MAX_SERVICES - 1), the `services` map says which listen port is which slot,
and everything per service is indexed by it. Adding a service is inserts (its listeners, its
slot), removing one is deletes, and a switch of one service is one store into its element of
`active`: nothing of any other service is touched, and nothing is recompiled or re-linked.

Kernel objects, all pinned in `bpf_pin_dir` under the names in `PINS` (so the data plane
outlives zddd, and the tc/xdp backends' pins can share the directory), beside the directory's
owner stamp `netns` (pinned.py: `read` refuses a pin dir of another live network namespace, or
one that needs a bpffs zddd would mount privately, with BackendUnavailable):

    sk_lookup_link      BPF link of the program to zddd's network namespace (BPF_LINK_CREATE);
                        a rebuild gives it the new program in one step (BPF_LINK_UPDATE)
    sk_lookup_prog      the program (bpf/sk_lookup.c), so a lost link is recreated without bcc
    sk_lookup_services  hash: listen port -> service slot
    sk_lookup_active    array[MAX_SERVICES] u32 per slot: 0 off, 1 + main's weight (0..100);
                        mmapable: a switch is one store into zddd's mapping of it
    sk_lookup_sockets   SOCKMAP: the listening sockets of (slot, target t) at
                        (slot * 2 + t) * SLOTS + i; targets in name order: backup 0, main 1
    sk_lookup_flows     LRU hash: connection addresses and ports -> slot * 2 + target, for
                        per-target counts
    sk_lookup_steered   per-CPU array: connections assigned, per slot * 2 + target
    sk_lookup_meta      the layout stamp (magic, version, MAX_SERVICES, targets, slots, flow
                        map size), checked before adopting; another stamp is replaced, not
                        adopted, and a newer version is left alone (NewerLayout)

The pins stay where layout v1 (zddd <= cd0a822: one service, its listen port compiled in) had
them, so that layout is adopted in place: `read` reports its one service's weight under the
listen port the v1 stamp names, and the rebuild to v2 keeps that service's steering (no
flip), carries its established connections' attribution and its counters over, and replaces
the program through the existing link, so no new connection is refused or sent elsewhere.
Established connections never reach the program, so none of them moves.

Weights 1..99 split new connections by a hash of their addresses and ports compared with the
weight (bpf/sk_lookup.c), so a retransmitted SYN goes where the first one went.

The sockets are the targets' own listeners, found by port with sock_diag (every address they
listen on, both families) and duplicated out of their owner with pidfd_getfd, so zddd needs
CAP_SYS_PTRACE. zddd keeps no socket open: the map holds them, and when the owner closes one
the kernel drops it from the map. `read` compares the map (a sockmap lookup returns the socket
cookie) with the current listeners, so a restarted vhost is noticed and refilled by the next
repair. `apply` reports what it did and reads nothing back: what health sees of the sockets it
put in comes from the next `read` (the core reads back after a layout change). Listeners
zddd cannot take are reported by `target_problem` and do not make the layout "not intact"
(they would otherwise be retried, and logged, four times a second).

Public beyond the Backend interface:
- `listener_problem(service, target)` (= `target_problem`), `listener_missing(service,
  target)`: whether new connections of `service` for `target` have a socket to go to, as of
  the last `read` (for health).
- `flow_attribution()(flows) -> list[(service, target) | None]`: which service and target each
  established connection on a listen port was assigned to, for the connection counts. Limits:
  a connection is known only while its entry is in the LRU flow map (`bpf_flow_entries`; under
  churn the oldest are evicted) and only if this program assigned it; others answer None.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from ..kernel.sock_diag import (TCP_ESTABLISHED, TCP_LISTEN, Flow, SocketInfo, as_flow,
                                dump_sockets)
from ..kernel import bpf as kbpf
from ..kernel import pidfd
from . import (BACKUP, MAIN, ApplyError, Backend, BackendUnavailable, Desired, KernelState,
               NewerLayout, Plan, ServiceLayout, pinned, weight_target)
from .pinned import Claim, Flip, Step

log = logging.getLogger("zddd")

SOURCE_NAME = "sk_lookup.c"
PROGRAM = "zddd_sk_lookup"
LAYOUT_MAGIC = 0x7A646431  # "zdd1"
LAYOUT_VERSION = 2
V1 = 1  # cd0a822's layout: one service, LISTEN_PORT compiled in, one `active` element
MAX_SERVICES = 256  # slots; `active` (4 bytes each) stays within one page
TARGETS = (BACKUP, MAIN)  # index order, as in the C source (sorted by name)
SLOTS = 8  # listening sockets kept per (service, target) (one per address and family is
# enough: the kernel picks among a SO_REUSEPORT group itself after the assignment)

PREFIX = "sk_lookup_"
MAPS = ("services", "active", "meta", "sockets", "flows", "steered")
PINS = ("link", "prog") + MAPS
V1_MAPS = ("active", "meta", "sockets", "flows", "steered")
BPF_MAP_TYPE_HASH = 1
_MAP_TYPES = {
    "services": BPF_MAP_TYPE_HASH,
    "active": kbpf.BPF_MAP_TYPE_ARRAY, "meta": kbpf.BPF_MAP_TYPE_ARRAY,
    "sockets": kbpf.BPF_MAP_TYPE_SOCKMAP, "flows": kbpf.BPF_MAP_TYPE_LRU_HASH,
    "steered": kbpf.BPF_MAP_TYPE_PERCPU_ARRAY,
}
_META = struct.Struct("=6I")  # v1: magic, version, listen port, targets, slots, flow entries
_U32 = struct.Struct("=I")
_COOKIE = struct.Struct("=Q")
# remote, local, remote port (network order), local port, family, padding
_FLOW_KEY = struct.Struct("=16s16s2sHHH")
_V1_FLOW_KEY = struct.Struct("=16s16s2sH")  # v1's: no local port (one listen port)
SO_COOKIE = 57
CAP_SYS_PTRACE = 19


def source_path() -> Path:
    """The C source: bpf/ next to the package in a checkout, else where the package installs
    it."""
    repo = Path(__file__).resolve().parents[2] / "bpf" / SOURCE_NAME
    return repo if repo.exists() else Path("/usr/share/zddd/bpf") / SOURCE_NAME


def _pin(pin_dir: str, name: str) -> str:
    return os.path.join(pin_dir, PREFIX + name)


def _has_capability(cap: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def value_of(weight: int | None) -> int:
    """A service's element of `active` for main's weight (None: off)."""
    return 0 if weight is None else 1 + weight


def weight_of(value: int) -> int | None:
    """Main's weight an element of `active` stands for (None: off). ValueError if it stands
    for nothing (the program treats it as off)."""
    if value == 0:
        return None
    if 1 <= value <= 101:
        return value - 1
    raise ValueError(value)


def _v1_value(value: int) -> int:
    """A v1 `active` value (0 off, target index + 1: backup 1, main 2) as a v2 element."""
    return {1: value_of(0), 2: value_of(100)}.get(value, 0)


def _sockets_base(slot: int, index: int) -> int:
    return (slot * len(TARGETS) + index) * SLOTS


# ---- the plan's steps -------------------------------------------------------------------------

@dataclass(frozen=True)
class Build(Step):
    """Compile and load the program, create its maps, fill them (every service's slot, its
    listeners and its starting `active` value: `slots` is (listen port, slot, value) per
    service), carry over what the old layout knew, and put all of it in place of the old pins,
    the program through the existing link when there is one."""

    desired: Desired
    slots: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Relink(Step):
    """Link the pinned program to the namespace again (the link was removed or detached), or
    give the pinned link, still attached, the pinned program (BPF_LINK_UPDATE)."""

    pin_dir: str


@dataclass(frozen=True)
class AddService(Step):
    """Give a service `slot`: its listeners, its element of `active` at 0 (off: the flip
    that follows sets its weight), then its listen port in `services`."""

    pin_dir: str
    service: str
    listen_port: int
    slot: int
    ports: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class RemoveService(Step):
    """Take the service on `listen_port` out: its `services` entry first (its new connections
    are no longer steered), then its `active` element, listeners and counters."""

    pin_dir: str
    listen_port: int
    slot: int


@dataclass(frozen=True)
class FillSockets(Step):
    """Put the current listeners of `service`'s `target` on `port` into its socket slots."""

    pin_dir: str
    slot: int
    service: str
    target: str
    port: int


@dataclass(frozen=True)
class SetWeight(Step):
    """The switch of one service: one store of `value` into element `slot` of the `active`
    array pinned at `path`. A plan's flip is a tuple of these, one per service that changes."""

    path: str
    slot: int
    value: int


# ---- what read found --------------------------------------------------------------------------

@dataclass
class Found:
    """The backend's record of a read: the problems by kind decide the plan's layout steps."""

    pin_dir: str
    version: int = LAYOUT_VERSION  # of the layout found (V1: adopted and rebuilt in place)
    layout_problems: list[str] = field(default_factory=list)  # need a Build
    link_problems: list[str] = field(default_factory=list)  # a Relink will do
    service_problems: list[str] = field(default_factory=list)  # AddService / RemoveService
    socket_problems: dict[tuple[str, str], str] = field(default_factory=dict)  # FillSockets
    services: dict[int, int] = field(default_factory=dict)  # listen port -> slot
    values: dict[int, int] = field(default_factory=dict)  # slot -> its `active` element
    unclaimed: bool = False  # pinned by a zddd before the pin dir's owner stamp

    @property
    def problems(self) -> list[str]:
        return (self.layout_problems + self.link_problems + self.service_problems
                + [f"socket map for {s} {t}: {p}" for (s, t), p in self.socket_problems.items()]
                + ([pinned.UNCLAIMED] if self.unclaimed else []))


def _meta(flow_entries: int) -> tuple[int, ...]:
    return (LAYOUT_MAGIC, LAYOUT_VERSION, MAX_SERVICES, len(TARGETS), SLOTS, flow_entries)


def _check_targets(desired: Desired) -> None:
    if len(desired.services) > MAX_SERVICES:
        raise ApplyError(f"the sk_lookup backend steers at most {MAX_SERVICES} services")
    for service in desired.services:
        if tuple(name for name, _ in service.ports) != TARGETS:
            raise ApplyError(f"service {service.name}: the sk_lookup backend steers to the "
                             f"targets {', '.join(TARGETS)}")


def _usable(listeners: list[SocketInfo]) -> list[SocketInfo]:
    """The listeners to put in the map, in slot order, at most SLOTS: one of each bound
    address and family first (IPv4 first: an IPv4 connection takes the first of its address
    that fits), then more of each in turn; by cookie within one, so the order is stable. One
    per address is enough for the kernel (it picks within a SO_REUSEPORT group after the
    assignment); the others keep the map working while a repair replaces one that closed."""
    groups: dict[tuple[int, bytes], list[SocketInfo]] = {}
    for sock in sorted(listeners, key=lambda s: (s.family != socket.AF_INET, s.local_addr,
                                                  s.cookie)):
        groups.setdefault((sock.family, sock.local_addr), []).append(sock)
    chosen: list[SocketInfo] = []
    rank = 0
    while len(chosen) < SLOTS and any(rank < len(g) for g in groups.values()):
        chosen += [g[rank] for g in groups.values() if rank < len(g)]
        rank += 1
    return chosen[:SLOTS]



class SkLookupBackend(Backend):
    name = "sk_lookup"

    def __init__(self) -> None:
        self._active = pinned.ActiveWriter()
        self._counters: _Counters | None = None
        # Listener cookie -> why it could not be taken; kept until the listener goes away.
        self._untakeable: dict[int, str] = {}
        # (service, target) -> None (fine) or what keeps its new connections from a socket.
        self._listener_problems: dict[tuple[str, str], str | None] = {}

    # ---- probe ------------------------------------------------------------------------------

    def probe(self) -> None:
        def compile_test() -> None:
            from bcc import BPF

            _compile(BPF, source_path(), 64).cleanup()

        pinned.probe(self.name, source_path(), compile_test)
        if not _has_capability(CAP_SYS_PTRACE):
            raise BackendUnavailable(
                "the sk_lookup backend needs CAP_SYS_PTRACE to take the vhosts' listening "
                f"sockets (pidfd_getfd); grant it or {pinned.NFTABLES_HINT}")

    # ---- read -------------------------------------------------------------------------------

    def read(self, desired: Desired) -> KernelState | None:
        pinned.check_pin_dir(desired.pin_dir)
        pin_dir = desired.pin_dir
        if not os.path.isdir(pin_dir):
            self._note_listeners(desired, None)
            return None
        fds: dict[str, int] = {}
        try:
            for name in PINS:
                try:
                    fds[name] = kbpf.obj_get(_pin(pin_dir, name))
                except FileNotFoundError:
                    continue
            if not fds:
                self._note_listeners(desired, None)
                return None
            found = Found(pin_dir)
            self._check_maps(desired, fds, found)
            self._check_link(fds, found)
            if not found.layout_problems:
                self._check_services(desired, found)
                self._check_sockets(desired, fds["sockets"], found)
                self._active.adopt(fds["active"])
                self._open_counters(desired, found, fds)
            else:
                self._note_listeners(desired, None)
            if pinned.unclaimed_problem(pin_dir):
                found.unclaimed = True
        except OSError as e:
            raise ApplyError(f"cannot read the sk_lookup data plane: {e}") from None
        finally:
            for fd in fds.values():
                os.close(fd)
        weights: dict[str, int | None] = {}
        for service in desired.services:
            slot = found.services.get(service.listen_port)
            if slot is not None:
                try:
                    weights[service.name] = weight_of(found.values.get(slot, 0))
                except ValueError:
                    weights[service.name] = None
        problems = found.problems
        return KernelState(weights=weights, intact=not problems, found=found,
                           problems=tuple(problems))

    def _check_maps(self, desired: Desired, fds: dict[str, int], found: Found) -> None:
        stamp = None
        if "meta" in fds:
            raw = kbpf.map_lookup(fds["meta"], _U32.pack(0), _META.size)
            stamp = _META.unpack(raw) if raw and len(raw) == _META.size else None
        if stamp is not None and stamp[0] == LAYOUT_MAGIC:
            NewerLayout.check(f"the sk_lookup data plane in {desired.pin_dir}", stamp[1],
                              LAYOUT_VERSION)
            if stamp[1] == V1:
                self._check_v1(fds, stamp, found)
                return
        missing = [name for name in PINS if name not in fds]
        if [m for m in missing if m != "link"]:
            found.layout_problems.append(f"not pinned: {', '.join(missing)}")
            return
        for name in MAPS:
            info = kbpf.map_info(fds[name])
            if info.type != _MAP_TYPES[name]:
                found.layout_problems.append(f"{PREFIX}{name} is not zddd's map")
                return
        if stamp != _meta(desired.flow_entries):
            if stamp is None or stamp[0] != LAYOUT_MAGIC:
                found.layout_problems.append("layout stamp missing")
            elif stamp[1] != LAYOUT_VERSION:
                found.layout_problems.append(
                    f"layout version {stamp[1]} (this zddd builds {LAYOUT_VERSION})")
            else:
                found.layout_problems.append(
                    "layout for {2} services, {3} targets, {4} slots, {5} flow entries"
                    .format(*stamp))
            return
        prog = kbpf.prog_info(fds["prog"])
        map_ids = {kbpf.map_info(fds[name]).id for name in ("services", "active", "sockets",
                                                               "flows", "steered")}
        if prog.type != kbpf.BPF_PROG_TYPE_SK_LOOKUP or not map_ids <= set(prog.map_ids):
            found.layout_problems.append("the pinned program does not use the pinned maps")
            return
        services = kbpf.MapHandle(fds["services"], 4, 4)
        for key in services.keys():
            raw = services.lookup(key)
            if raw is not None:
                found.services[_U32.unpack(key)[0]] = _U32.unpack(raw)[0]
        for slot in set(found.services.values()):
            if slot < MAX_SERVICES:
                raw = kbpf.map_lookup(fds["active"], _U32.pack(slot), 4)
                found.values[slot] = _U32.unpack(raw)[0] if raw else 0

    @staticmethod
    def _check_v1(fds: dict[str, int], stamp: tuple[int, ...], found: Found) -> None:
        """cd0a822's layout: its one service (on the listen port its stamp names) is adopted
        at slot 0 with its steering, and rebuilt as v2 in place."""
        found.version = V1
        listen_port = stamp[2]
        found.layout_problems.append(
            f"layout v{V1} (one service, on listen port {listen_port}): rebuilt as "
            f"v{LAYOUT_VERSION} in place")
        if "active" in fds:
            raw = kbpf.map_lookup(fds["active"], _U32.pack(0), 4)
            found.services[listen_port] = 0
            found.values[0] = _v1_value(_U32.unpack(raw)[0] if raw else 0)

    def _check_link(self, fds: dict[str, int], found: Found) -> None:
        if found.layout_problems:
            return
        if "link" not in fds:
            found.link_problems.append("link not pinned")
            return
        problem = _link_problem(fds["link"], fds["prog"])
        if problem:
            found.link_problems.append(problem)

    @staticmethod
    def _check_services(desired: Desired, found: Found) -> None:
        wanted = desired.by_listen_port()
        for service in desired.services:
            slot = found.services.get(service.listen_port)
            if slot is None:
                found.service_problems.append(
                    f"service {service.name}: listen port {service.listen_port} not steered")
            elif slot >= MAX_SERVICES:
                found.service_problems.append(
                    f"service {service.name}: slot {slot} out of range")
            else:
                try:
                    weight_of(found.values.get(slot, 0))
                except ValueError:
                    found.service_problems.append(
                        f"service {service.name}: active value {found.values[slot]} unknown")
        for port in found.services:
            if port not in wanted:
                found.service_problems.append(f"listen port {port} steered by no service")

    def _check_sockets(self, desired: Desired, sockets_fd: int, found: Found) -> None:
        """Compare each (service, target)'s socket slots with its current listeners. zddd
        fills the slots from the first and clears the rest, and the kernel drops a socket that
        closes, so only as many slots as there are listeners to hold, and one more, are read
        (a read of 64 services is then about 3 lookups per target, not SLOTS)."""
        by_port = self._listeners(desired)
        sockets = kbpf.MapHandle(sockets_fd, 4, 8)  # buffers made once; the fd is the caller's
        for service in desired.services:
            slot = found.services.get(service.listen_port)
            if slot is None or slot >= MAX_SERVICES:
                continue
            for index, target in enumerate(TARGETS):
                port = service.port_of(target)
                wanted = {s.cookie for s in _usable(by_port.get(port, []))}
                takeable = wanted - set(self._untakeable)
                in_map = set()
                for i in range(min(SLOTS, len(takeable) + 1)):
                    raw = sockets.lookup(_U32.pack(_sockets_base(slot, index) + i))
                    if raw:
                        in_map.add(_COOKIE.unpack(raw)[0])
                if in_map != takeable:
                    found.socket_problems[(service.name, target)] = (
                        f"holds {len(in_map)} socket(s), {len(takeable)} current listener(s) "
                        f"on port {port}" + (f" ({len(in_map - wanted)} stale)"
                                             if in_map - wanted else ""))
        self._note_listeners(desired, by_port, found)

    def _listeners(self, desired: Desired) -> dict[int, list[SocketInfo]]:
        """Every target port's listeners, in one dump."""
        ports = sorted(desired.by_target_port())
        by_port: dict[int, list[SocketInfo]] = {port: [] for port in ports}
        if ports:
            for sock in dump_sockets(ports, 1 << TCP_LISTEN):
                by_port.setdefault(sock.local_port, []).append(sock)
        current = {s.cookie for socks in by_port.values() for s in socks}
        for cookie in list(self._untakeable):
            if cookie not in current:
                del self._untakeable[cookie]
        return by_port

    def _note_listeners(self, desired: Desired, by_port: dict[int, list[SocketInfo]] | None,
                        found: Found | None = None) -> None:
        """Record, per (service, target), whether its new connections have a socket (health
        reads this between reads)."""
        problems: dict[tuple[str, str], str | None] = {}
        for service in desired.services:
            for target, port in service.ports:
                key = (service.name, target)
                if by_port is None:
                    problems[key] = "the sk_lookup data plane is not in place"
                elif found is not None and service.listen_port not in found.services:
                    problems[key] = f"service {service.name} is not in the data plane yet"
                else:
                    pending = found is not None and key in found.socket_problems
                    problems[key] = self._listener_problem_of(port, by_port.get(port, []),
                                                              pending)
        self._listener_problems = problems

    def _listener_problem_of(self, port: int, listeners: list[SocketInfo],
                             pending: bool = False) -> str | None:
        if not listeners:
            return f"nothing listens on port {port}"
        untaken = [self._untakeable[s.cookie] for s in listeners if s.cookie in self._untakeable]
        if len(untaken) == len(listeners):
            return f"the listening socket(s) on port {port} could not be taken: {untaken[0]}"
        if pending:
            return f"the socket map does not hold port {port}'s listeners yet (repair pending)"
        return None

    def _noted_filled(self, filled: dict[tuple[str, str], tuple[int, list[SocketInfo]]]) -> None:
        """After a step that filled the socket map for these (service, target)s completed:
        what health sees of them is what the step put in (no read of the kernel)."""
        problems = dict(self._listener_problems)
        for key, (port, listeners) in filled.items():
            problems[key] = self._listener_problem_of(port, listeners)
        self._listener_problems = problems

    def _open_counters(self, desired: Desired, found: Found, fds: dict[str, int]) -> None:
        """Keep the `steered` and `flows` maps (of a layout that is this zddd's) open for the
        metrics and the connection counts, with what their slots mean now."""
        ids = (kbpf.map_info(fds["steered"]).id, kbpf.map_info(fds["flows"]).id)
        names = {found.services[s.listen_port]: s.name for s in desired.services
                 if s.listen_port in found.services}
        if self._counters is not None and self._counters.ids == ids:
            self._counters.names = names
            return
        self._close_counters()
        self._counters = _Counters(ids, os.dup(fds["steered"]), os.dup(fds["flows"]), names,
                                   desired.flow_entries)

    def _close_counters(self) -> None:
        if self._counters is not None:
            os.close(self._counters.steered_fd)
            os.close(self._counters.flows_fd)
            self._counters = None

    # ---- the health hook ------------------------------------------------------------------

    def listener_problem(self, service: str, target: str) -> str | None:
        """None when new connections of `service` for `target` have a listening socket to go
        to (as of the last read); else why not: nothing listens on its port, its listeners
        could not be taken (and why, e.g. no CAP_SYS_PTRACE), the map is behind (a repair is
        coming), or the data plane is not in place."""
        return self._listener_problems.get((service, target), "not read yet")

    target_problem = listener_problem

    def listener_missing(self, service: str, target: str) -> bool:
        return self.listener_problem(service, target) is not None

    # ---- plan and apply -------------------------------------------------------------------

    def plan(self, current: KernelState | None, desired: Desired) -> Plan:
        _check_targets(desired)
        found: Found | None = current.found if current is not None else None
        active = _pin(desired.pin_dir, "active")
        if found is None or found.layout_problems:
            known = found.services if found else {}
            slots = _assign_slots(desired.services, known, ())
            entries, starting = [], []
            for service in desired.services:
                slot = slots[service.name]
                start = (found.values.get(slot, 0)
                         if found and known.get(service.listen_port) == slot else 0)
                entries.append((service.listen_port, slot, start))
                if start != value_of(service.weight):
                    starting.append(SetWeight(active, slot, value_of(service.weight)))
            return Plan((Build(desired, tuple(entries)),), tuple(starting) or None)
        layout: list[Step] = []
        if found.unclaimed:
            layout.append(Claim(desired.pin_dir))
        if found.link_problems:
            layout.append(Relink(desired.pin_dir))
        wanted = desired.by_listen_port()
        removed = {port: slot for port, slot in found.services.items()
                   if port not in wanted or slot >= MAX_SERVICES}
        for port, slot in sorted(removed.items()):
            layout.append(RemoveService(desired.pin_dir, port, min(slot, MAX_SERVICES)))
        kept = {port: slot for port, slot in found.services.items() if port not in removed}
        slots = _assign_slots(desired.services, kept, removed.values())
        flips: list[SetWeight] = []
        for service in desired.services:
            slot = slots[service.name]
            value = value_of(service.weight)
            if service.listen_port not in kept:
                layout.append(AddService(desired.pin_dir, service.name, service.listen_port,
                                         slot, service.ports))
                if value != 0:
                    flips.append(SetWeight(active, slot, value))
                continue
            for target in TARGETS:
                if (service.name, target) in found.socket_problems:
                    layout.append(FillSockets(desired.pin_dir, slot, service.name, target,
                                              service.port_of(target)))
            if found.values.get(slot, 0) != value:
                flips.append(SetWeight(active, slot, value))
        return Plan(tuple(layout), tuple(flips) or None)

    def apply(self, plan: Plan) -> None:
        """Carries out the plan and reports what it did; reading back (and so what health
        sees of the sockets just put in) is the next `read`'s, the core's."""
        # The flip is a tuple of SetWeight (one per service that changes), not one Flip.
        flip = cast(Callable[[Flip], None], self._flip)
        pinned.carry_out(plan, {Build: self._build, Claim: self._claim, Relink: self._relink,
                                AddService: self._add_service,
                                RemoveService: self._remove_service,
                                FillSockets: self._fill_step}, flip)

    def _flip(self, flips: tuple[SetWeight, ...]) -> None:
        for flip in flips:
            self._active.write(flip.path, flip.value, flip.slot)

    @staticmethod
    def _claim(step: Claim) -> None:
        pinned.claim(step.pin_dir)

    def _fill_step(self, step: FillSockets) -> None:
        with pinned.Pinned(_pin(step.pin_dir, "sockets")) as fd:
            listeners = self._fill_sockets(fd, step.slot, step.service, step.target, step.port)
        self._noted_filled({(step.service, step.target): (step.port, listeners)})

    def _add_service(self, step: AddService) -> None:
        ports = dict(step.ports)
        with pinned.Pinned(_pin(step.pin_dir, "active")) as active, \
                pinned.Pinned(_pin(step.pin_dir, "sockets")) as sockets, \
                pinned.Pinned(_pin(step.pin_dir, "steered")) as steered, \
                pinned.Pinned(_pin(step.pin_dir, "services")) as services:
            kbpf.map_update(active, _U32.pack(step.slot), _U32.pack(0))
            _zero_counters(steered, step.slot)
            filled = {(step.service, target): (ports[target], self._fill_sockets(
                sockets, step.slot, step.service, target, ports[target])) for target in TARGETS}
            kbpf.map_update(services, _U32.pack(step.listen_port), _U32.pack(step.slot))
        self._noted_filled(filled)
        if self._counters is not None:
            self._counters.names[step.slot] = step.service

    def _remove_service(self, step: RemoveService) -> None:
        with pinned.Pinned(_pin(step.pin_dir, "services")) as services:
            kbpf.map_delete(services, _U32.pack(step.listen_port))
        if step.slot >= MAX_SERVICES:
            return
        with pinned.Pinned(_pin(step.pin_dir, "active")) as active, \
                pinned.Pinned(_pin(step.pin_dir, "sockets")) as sockets, \
                pinned.Pinned(_pin(step.pin_dir, "steered")) as steered:
            kbpf.map_update(active, _U32.pack(step.slot), _U32.pack(0))
            for index in range(len(TARGETS)):
                _clear_sockets(sockets, _sockets_base(step.slot, index))
            _zero_counters(steered, step.slot)
        if self._counters is not None:
            self._counters.names.pop(step.slot, None)

    def _build(self, step: Build) -> None:
        desired = step.desired
        try:
            from bcc import BPF
        except ImportError:
            raise ApplyError("bcc is not installed (python3-bpfcc)") from None
        pinned.claim(desired.pin_dir)
        try:
            bpf = _compile(BPF, source_path(), desired.flow_entries)
        except Exception as e:
            raise ApplyError(f"the sk_lookup program does not load: {pinned.one_line(e)}",
                             changed=True) from None
        staged: list[tuple[str, str]] = []
        try:
            from bcc.libbcc import lib

            fds = {name: lib.bpf_table_fd(bpf.module, f"zddd_{name}".encode())
                   for name in MAPS}
            fds["prog"] = bpf.funcs[PROGRAM.encode()].fd
            kbpf.map_update(fds["meta"], _U32.pack(0), _META.pack(*_meta(desired.flow_entries)))
            by_port = desired.by_listen_port()
            filled = {}
            for port, slot, value in step.slots:
                service = by_port[port]
                kbpf.map_update(fds["active"], _U32.pack(slot), _U32.pack(value))
                for target, target_port in service.ports:
                    filled[(service.name, target)] = (target_port, self._fill_sockets(
                        fds["sockets"], slot, service.name, target, target_port))
                kbpf.map_update(fds["services"], _U32.pack(port), _U32.pack(slot))
            _carry_over(desired.pin_dir, step.slots, fds)
            for name in ("prog",) + MAPS:
                staged.append(pinned.stage(fds[name], _pin(desired.pin_dir, name)))
            # The new program takes over in one step: through the link there is (the old
            # program's, whatever its layout), else through a new one. Until the renames below
            # the old pins stay where they are (the old program may still hold its maps).
            if not _update_link(desired.pin_dir, fds["prog"]):
                link = _link_to_netns(fds["prog"])
                try:
                    staged.append(pinned.stage(link, _pin(desired.pin_dir, "link")))
                finally:
                    os.close(link)
            for tmp, final in staged:
                os.rename(tmp, final)
            staged.clear()
            self._noted_filled(filled)
        except OSError as e:
            raise ApplyError(f"building the sk_lookup data plane: {e}", changed=True) from None
        finally:
            for tmp, _ in staged:
                pinned.unlink(tmp)
            bpf.cleanup()
        self._active.forget()  # a new `active` map: the next flip opens the pinned one
        self._close_counters()  # the next read opens the new ones

    def _relink(self, step: Relink) -> None:
        with pinned.Pinned(_pin(step.pin_dir, "prog")) as prog:
            if _update_link(step.pin_dir, prog):  # attached, to another program: one step
                return
            link = _link_to_netns(prog)
        try:
            os.rename(*pinned.stage(link, _pin(step.pin_dir, "link")))  # a detached link
            # pinned there goes with it
        finally:
            os.close(link)

    def _fill_sockets(self, sockets_fd: int, slot: int, service: str, target: str,
                      port: int) -> list[SocketInfo]:
        """Put `port`'s listeners into (slot, target)'s socket slots (the kernel's dup of the
        owner's fd is closed at once: the map holds the socket, and when the owner closes it
        the kernel drops it from the map), then clear the slots left over. Returns every
        listener found on `port`."""
        base = _sockets_base(slot, TARGETS.index(target))
        found = [s for s in dump_sockets([port], 1 << TCP_LISTEN) if s.local_port == port]
        listeners = [s for s in _usable(found) if s.cookie not in self._untakeable]
        owners = _owners({s.inode for s in listeners})
        taken = 0
        for sock in listeners:
            try:
                fd = _take(sock, owners.get(sock.inode, []))
            except OSError as e:
                reason = e.strerror or str(e)
                if e.errno == errno.EPERM or (e.errno == errno.ESRCH and owners.denied):
                    reason += " (zddd needs CAP_SYS_PTRACE)"
                self._untakeable[sock.cookie] = reason
                log.warning("event=listener_untakeable service=%s target=%s port=%d error=%s",
                            service, target, port, reason.replace(" ", "_"))
                continue
            try:
                kbpf.map_update(sockets_fd, _U32.pack(base + taken), _COOKIE.pack(fd))
            finally:
                os.close(fd)
            taken += 1
        _clear_sockets(sockets_fd, base, taken)
        return found

    # ---- leftovers and removal --------------------------------------------------------------

    def leftover(self, desired: Desired) -> str | None:
        try:
            pinned.check_pin_dir(desired.pin_dir)  # another namespace's pins are not ours
        except BackendUnavailable:
            return None
        pins = [name for name in PINS if os.path.lexists(_pin(desired.pin_dir, name))]
        if not pins:
            return None
        try:
            state = self.read(desired)
        except (ApplyError, BackendUnavailable):
            state = None
        if state is not None and state.intact:
            return f"sk_lookup program linked in {desired.pin_dir} steering {_steering(state)}"
        linked = "link" in pins
        return (f"sk_lookup pins in {desired.pin_dir} ({'linked' if linked else 'not linked'}"
                f"{', ' + state.problems[0] if state and state.problems else ''})")

    def remove(self, desired: Desired) -> None:
        pinned.check_pin_dir(desired.pin_dir)
        self._active.forget()
        self._close_counters()
        link_pin = _pin(desired.pin_dir, "link")
        try:
            fd = kbpf.obj_get(link_pin)
        except FileNotFoundError:
            fd = None
        except OSError as e:
            raise ApplyError(f"cannot open {link_pin}: {e}") from None
        if fd is not None:
            try:
                # Detach first: any other holder of the link (a bpftool, a stuck zddd) must not
                # keep the program steering after its pins are gone.
                kbpf.link_detach(fd)
            except OSError as e:
                if e.errno not in (errno.ENOLINK, errno.EINVAL):
                    raise ApplyError(f"cannot detach {link_pin}: {e}") from None
            finally:
                os.close(fd)
        for name in PINS:
            pinned.unlink(_pin(desired.pin_dir, name))
            pinned.unlink(_pin(desired.pin_dir, name) + "-staged")
        pinned.release(desired.pin_dir)
        try:
            os.rmdir(desired.pin_dir)  # only if nothing else (another backend's pins) is there
        except OSError:
            pass

    # ---- counters ---------------------------------------------------------------------------

    def flows_steered(self) -> dict[tuple[str, str], int]:
        if self._counters is None:
            return {}
        try:
            return self._counters.steered()
        except OSError:
            return {}

    def flow_table(self) -> tuple[int, int] | None:
        """(entries in use, capacity) of the flow map. Counting an LRU map's entries means
        walking it, so "in use" is an upper bound: connections recorded so far (each adds at
        most one entry), capped at the capacity."""
        if self._counters is None:
            return None
        recorded = sum(self.flows_steered().values())
        return min(recorded, self._counters.capacity), self._counters.capacity

    def flow_attribution(self) -> Callable[[list[Flow]], list[tuple[str, str] | None]]:
        return self._attribute_flows

    def _attribute_flows(self, flows: list[Flow]) -> list[tuple[str, str] | None]:
        if self._counters is None or not flows:
            return [None] * len(flows)
        names = self._counters.names
        try:
            out: list[tuple[str, str] | None] = []
            for flow in flows:
                raw = kbpf.map_lookup(self._counters.flows_fd, _flow_key(flow), 4)
                if not raw:
                    out.append(None)
                    continue
                slot, target = divmod(_U32.unpack(raw)[0], len(TARGETS))
                name = names.get(slot)
                out.append((name, TARGETS[target]) if name is not None else None)
            return out
        except OSError:
            return [None] * len(flows)


@dataclass
class _Counters:
    """The open `steered` and `flows` maps (by their ids) and the service each slot holds,
    from the last read."""

    ids: tuple[int, int]
    steered_fd: int
    flows_fd: int
    names: dict[int, str]  # slot -> service
    capacity: int

    def steered(self) -> dict[tuple[str, str], int]:
        size = 8 * kbpf.possible_cpus()
        counts = {}
        for slot, name in sorted(self.names.items()):
            for index, target in enumerate(TARGETS):
                key = _U32.pack(slot * len(TARGETS) + index)
                counts[(name, target)] = pinned.percpu_total(
                    kbpf.map_lookup(self.steered_fd, key, size))
        return counts


def _assign_slots(services: tuple[ServiceLayout, ...], kept: dict[int, int],
                  avoid) -> dict[str, int]:
    """service name -> slot: the one the kernel has for its listen port (`kept`), else the
    lowest free one (one that no kept service has, nor one in `avoid`, when there is another:
    slots just freed are reused last)."""
    taken: set[int] = set()
    slots: dict[str, int] = {}
    for service in services:
        slot = kept.get(service.listen_port)
        if slot is not None and slot < MAX_SERVICES and slot not in taken:
            slots[service.name] = slot
            taken.add(slot)
    avoid = set(avoid)
    free = [s for s in range(MAX_SERVICES) if s not in taken and s not in avoid]
    free += sorted(s for s in avoid if s not in taken and s < MAX_SERVICES)
    for service in services:
        if service.name not in slots:
            slots[service.name] = free.pop(0)
    return slots


def _steering(state: KernelState) -> str:
    """What a KernelState steers, in words: "main" with one service, else per service."""
    def word(weight: int | None) -> str:
        target = weight_target(weight)
        return "nothing" if target is None else (
            f"main {weight}%" if target == "split" else target)

    if len(state.weights) == 1:
        return word(next(iter(state.weights.values())))
    return ", ".join(f"{name} {word(w)}" for name, w in sorted(state.weights.items()))


def _clear_sockets(sockets_fd: int, base: int, start: int = 0) -> None:
    for i in range(start, SLOTS):
        try:
            kbpf.map_delete(sockets_fd, _U32.pack(base + i))
        except OSError as e:
            if e.errno != errno.EINVAL:  # a sockmap's answer for an empty slot
                raise


def _zero_counters(steered_fd: int, slot: int) -> None:
    size = 8 * kbpf.possible_cpus()
    for index in range(len(TARGETS)):
        kbpf.map_update(steered_fd, _U32.pack(slot * len(TARGETS) + index), bytes(size))


def _link_problem(link_fd: int, prog_fd: int | None) -> str | None:
    """Why the pinned link does not steer this namespace's lookups through `prog_fd`'s
    program (None: it does; `prog_fd` None: any program)."""
    link = kbpf.link_info(link_fd)
    if link.type != kbpf.BPF_LINK_TYPE_NETNS or (
            prog_fd is not None and link.prog_id != kbpf.prog_info(prog_fd).id):
        return "the pinned link is not of the pinned program"
    if link.netns_ino == 0:
        return "link detached"
    if link.netns_ino != pinned.netns_ino() or link.attach_type != kbpf.BPF_SK_LOOKUP:
        return "link attached to another network namespace"
    return None


def _update_link(pin_dir: str, prog_fd: int) -> bool:
    """Give the pinned link, if it is attached to this namespace, the program `prog_fd` in one
    step (BPF_LINK_UPDATE: no lookup runs neither or both). False when there is no such link
    (a new one is needed)."""
    try:
        fd = kbpf.obj_get(_pin(pin_dir, "link"))
    except FileNotFoundError:
        return False
    try:
        if kbpf.link_info(fd).type != kbpf.BPF_LINK_TYPE_NETNS or _link_problem(fd, None):
            return False
        try:
            kbpf.link_update(fd, prog_fd)
        except OSError as e:
            log.warning("event=link_update_failed error=%s", (e.strerror or str(e))
                        .replace(" ", "_"))
            return False
        return True
    finally:
        os.close(fd)


def _carry_over(pin_dir: str, slots: tuple[tuple[int, int, int], ...],
                fds: dict[str, int]) -> None:
    """From the layout about to be replaced (v1 or v2, told by its flow key's size): which
    service and target each connection established on a listen port now was assigned to (so a
    drain still counts them), and the steered counters (so the metric does not reset). A
    service keeps its slot across a rebuild; v1's one service was "slot 0", its values were
    the target index alone, and its flow keys had no local port. Best effort: an old layout
    of another shape has nothing usable."""
    slot_of = {port: slot for port, slot, _ in slots}
    try:
        with pinned.Pinned(_pin(pin_dir, "meta")) as meta:
            raw = kbpf.map_lookup(meta, _U32.pack(0), _META.size)
        stamp = _META.unpack(raw) if raw and len(raw) == _META.size else None
        v1_port = stamp[2] if stamp is not None and stamp[:2] == (LAYOUT_MAGIC, V1) else None
        with pinned.Pinned(_pin(pin_dir, "flows")) as old:
            carried_flows = _carry_flows(old, slot_of, v1_port, fds["flows"])
        if carried_flows is None:
            return
        v1, carried, count = carried_flows
        size = 8 * kbpf.possible_cpus()
        with pinned.Pinned(_pin(pin_dir, "steered")) as old:
            for slot in carried.values():
                for index in range(len(TARGETS)):
                    old_key = index if v1 else slot * len(TARGETS) + index
                    total = pinned.percpu_total(kbpf.map_lookup(old, _U32.pack(old_key), size))
                    kbpf.map_update(fds["steered"], _U32.pack(slot * len(TARGETS) + index),
                                    _COOKIE.pack(total).ljust(size, b"\0"))
        log.info("event=flows_carried_over backend=sk_lookup from_layout=%d flows=%d",
                 V1 if v1 else LAYOUT_VERSION, count)
    except OSError:
        pass


def _carry_flows(old: int, slot_of: dict[int, int], v1_port: int | None, new: int
                 ) -> tuple[bool, dict[int, int], int] | None:
    """Copy the old flow map's entries for the connections established on the listen ports
    now; (whether it was v1's, listen port -> slot of the services carried, how many), None
    when it is of no known layout. `v1_port`: the listen port in a v1 stamp."""
    key_size = kbpf.map_info(old).key_size
    v1 = key_size == _V1_FLOW_KEY.size
    if v1:
        if v1_port not in slot_of:
            return None
        carried = {v1_port: slot_of[v1_port]}
    elif key_size == _FLOW_KEY.size:
        carried = slot_of
    else:
        return None
    count = 0
    for sock in dump_sockets(sorted(carried), 1 << TCP_ESTABLISHED):
        if sock.local_port not in carried:
            continue
        flow = as_flow(sock.family, sock.local_addr.ljust(16, b"\0"), sock.local_port,
                       sock.remote_addr.ljust(16, b"\0"), sock.remote_port)
        value = kbpf.map_lookup(old, _v1_flow_key(flow) if v1 else _flow_key(flow), 4)
        if value is None:
            continue
        index = _U32.unpack(value)[0]
        slot = carried[sock.local_port]
        if v1:
            index = slot * len(TARGETS) + index
        elif index // len(TARGETS) != slot:
            continue
        kbpf.map_update(new, _flow_key(flow), _U32.pack(index))
        count += 1
    return v1, carried, count


def _link_to_netns(prog_fd: int) -> int:
    """A new BPF link of the program to this network namespace (its fd)."""
    netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return kbpf.link_create_netns(prog_fd, netns)
    finally:
        os.close(netns)


def _flow_key(flow: Flow) -> bytes:
    return _FLOW_KEY.pack(flow.remote_addr.ljust(16, b"\0"), flow.local_addr.ljust(16, b"\0"),
                          flow.remote_port.to_bytes(2, "big"), flow.local_port, flow.family, 0)


def _v1_flow_key(flow: Flow) -> bytes:
    return _V1_FLOW_KEY.pack(flow.remote_addr.ljust(16, b"\0"),
                             flow.local_addr.ljust(16, b"\0"),
                             flow.remote_port.to_bytes(2, "big"), flow.family)


def _compile(bpf_class, source: Path, flow_entries: int):
    """bcc BPF object with the program loaded (its maps created, nothing pinned)."""
    cflags = [f"-DMAX_SERVICES={MAX_SERVICES}", f"-DSLOTS={SLOTS}",
              f"-DFLOW_ENTRIES={flow_entries}", "-w"]
    bpf = bpf_class(text=source.read_text(), cflags=cflags)
    try:
        bpf.load_func(PROGRAM.encode(), kbpf.BPF_PROG_TYPE_SK_LOOKUP,
                      attach_type=kbpf.BPF_SK_LOOKUP)
    except Exception:
        bpf.cleanup()
        raise
    return bpf


class _Owners(dict):
    """socket inode -> [(pid, fd)]; `denied` counts the processes /proc would not show."""

    denied = 0


def _owners(inodes: set[int]) -> _Owners:
    """socket inode -> [(pid, fd)] of the processes holding it, from /proc/*/fd."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    owners = _Owners()
    if not wanted:
        return owners
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            entries = os.listdir(fd_dir)
        except PermissionError:  # another user's process, without CAP_SYS_PTRACE
            owners.denied += 1
            continue
        except OSError:  # gone
            continue
        for fd in entries:
            try:
                inode = wanted.get(os.readlink(f"{fd_dir}/{fd}"))
            except PermissionError:
                owners.denied += 1
                break
            except OSError:
                continue
            if inode is not None:
                owners.setdefault(inode, []).append((int(pid), int(fd)))
    return owners


def _take(sock: SocketInfo, owners: list[tuple[int, int]]) -> int:
    """A duplicate of the listener's fd from one of its owners, checked to be the same socket
    (the owner may have closed and reused the fd number since /proc was read)."""
    if not owners:
        raise OSError(errno.ESRCH, "no process holding it was found in /proc")
    error: OSError | None = None
    for pid, number in owners:
        try:
            fd = pidfd.take_fd(pid, number)
        except OSError as e:
            error = e
            continue
        if _socket_cookie(fd) == sock.cookie:
            return fd
        os.close(fd)
    raise error or OSError(errno.ESRCH, "its owners no longer hold it")


def _socket_cookie(fd: int) -> int:
    s = socket.socket(fileno=os.dup(fd))
    try:
        return _COOKIE.unpack(s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    finally:
        s.close()
