"""The sk_lookup backend: new connections to the listen port are handed to a listening socket of
the active target by a BPF sk_lookup program. No packet is rewritten: the application accepts
the connection on its own listener and sees the listen port as its local port.

Kernel objects, all pinned in `bpf_pin_dir` under the names in `PINS` (so the data plane
outlives zddd, and the tc/xdp backends' pins can share the directory), beside the directory's
owner stamp `netns` (pinned.py: `read` refuses a pin dir of another live network namespace, or
one that needs a bpffs zddd would mount privately, with BackendUnavailable):

    sk_lookup_link     BPF link of the program to zddd's network namespace (BPF_LINK_CREATE)
    sk_lookup_prog     the program (bpf/sk_lookup.c), so a lost link is recreated without bcc
    sk_lookup_active   array[1] u32: 0 off, i + 1 target i (targets sorted by name); mmapable:
                       a switch is one store into zddd's mapping of it
    sk_lookup_sockets  SOCKMAP: target i's listening sockets at i * SLOTS + slot
    sk_lookup_flows    LRU hash: connection addresses -> target, for per-target counts
    sk_lookup_steered  per-CPU array: connections assigned, per target
    sk_lookup_meta     the layout stamp (magic, version, listen port, targets, slots, flow map
                       size), checked before adopting; another stamp is replaced, not adopted

The sockets are the targets' own listeners, found by port with sock_diag (every address they
listen on, both families) and duplicated out of their owner with pidfd_getfd, so zddd needs
CAP_SYS_PTRACE. zddd keeps no socket open: the map holds them, and when the owner closes one
the kernel drops it from the map. `read` compares the map (a sockmap lookup returns the socket
cookie) with the current listeners, so a restarted vhost is noticed and refilled by the next
repair. `apply` reports what it did and reads nothing back: what health sees of the sockets it
put in comes from the next `read` (the core reads back after a layout change). Listeners
zddd cannot take are reported by `listener_problem` and do not make the layout "not intact"
(they would otherwise be retried, and logged, four times a second).

Public beyond the Backend interface:
- `listener_problem(target) -> str | None`, `listener_missing(target) -> bool`: whether new
  connections for `target` have a socket to go to, as of the last `read` (for health).
- `flow_attribution()(flows) -> list[str | None]`: the target each established connection on the
  listen port was assigned to, for `ConnectionCounter(attribute=...)`. Limits: a connection is
  known only while its entry is in the LRU flow map (`bpf_flow_entries`; under churn the
  oldest are evicted) and only if this program assigned it; others answer None.
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

from ..kernel.sock_diag import (TCP_ESTABLISHED, TCP_LISTEN, Flow, SocketInfo, as_flow,
                                dump_sockets)
from ..kernel import bpf as kbpf
from ..kernel import pidfd
from . import (ApplyError, Backend, BackendUnavailable, Desired, KernelState, NewerLayout,
               Plan, pinned)
from .pinned import Claim, Flip, Step

log = logging.getLogger("zddd")

SOURCE_NAME = "sk_lookup.c"
PROGRAM = "zddd_sk_lookup"
LAYOUT_MAGIC = 0x7A646431  # "zdd1"
LAYOUT_VERSION = 1
SLOTS = 8  # listening sockets kept per target (one per address and family is enough: the
# kernel picks among a SO_REUSEPORT group itself after the assignment)

PREFIX = "sk_lookup_"
MAPS = ("active", "meta", "sockets", "flows", "steered")
PINS = ("link", "prog") + MAPS
_MAP_TYPES = {
    "active": kbpf.BPF_MAP_TYPE_ARRAY, "meta": kbpf.BPF_MAP_TYPE_ARRAY,
    "sockets": kbpf.BPF_MAP_TYPE_SOCKMAP, "flows": kbpf.BPF_MAP_TYPE_LRU_HASH,
    "steered": kbpf.BPF_MAP_TYPE_PERCPU_ARRAY,
}
_META = struct.Struct("=6I")
_U32 = struct.Struct("=I")
_COOKIE = struct.Struct("=Q")
_FLOW_KEY = struct.Struct("=16s16s2sH")  # remote, local, remote port (network order), family
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


# ---- the plan's steps -------------------------------------------------------------------------

@dataclass(frozen=True)
class Build(Step):
    """Compile and load the program, create its maps, fill them (sockets of every target,
    `active`), link it to the namespace, and put all of it in place of the old pins."""

    desired: Desired
    active: int


@dataclass(frozen=True)
class Relink(Step):
    """Link the pinned program to the namespace again (the link was removed or detached)."""

    pin_dir: str


@dataclass(frozen=True)
class FillSockets(Step):
    """Put target `index`'s current listeners on `port` into the socket map."""

    pin_dir: str
    index: int
    target: str
    port: int


# ---- what read found --------------------------------------------------------------------------

@dataclass
class Found:
    """The backend's record of a read: the problems by kind decide the plan's layout steps."""

    pin_dir: str
    present: set[str] = field(default_factory=set)
    layout_problems: list[str] = field(default_factory=list)  # need a Build
    link_problems: list[str] = field(default_factory=list)  # a Relink will do
    socket_problems: dict[str, str] = field(default_factory=dict)  # target -> what differs
    active_value: int | None = None
    unclaimed: bool = False  # pinned by a zddd before the pin dir's owner stamp


def _value_of(desired: Desired, target: str | None) -> int:
    if target is None:
        return 0
    return [name for name, _ in desired.ports].index(target) + 1


def _target_of(desired: Desired, value: int) -> str | None:
    return desired.ports[value - 1][0] if 0 < value <= len(desired.ports) else None


def _meta(desired: Desired) -> tuple[int, ...]:
    return (LAYOUT_MAGIC, LAYOUT_VERSION, desired.listen_port, len(desired.ports), SLOTS,
            desired.flow_entries)


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
        # target -> None (fine) or what keeps new connections for it from a socket.
        self._listener_problems: dict[str, str | None] = {}

    # ---- probe ------------------------------------------------------------------------------

    def probe(self) -> None:
        def compile_test() -> None:
            from bcc import BPF

            _compile(BPF, source_path(), Desired(8888, (("backup", 80), ("main", 8080)), None,
                                                 flow_entries=64)).cleanup()

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
            found = Found(pin_dir, present=set(fds))
            self._check_maps(desired, fds, found)
            self._check_link(fds, found)
            if not found.layout_problems and "active" in fds:
                raw = kbpf.map_lookup(fds["active"], _U32.pack(0), 4)
                found.active_value = _U32.unpack(raw)[0] if raw else 0
                if _target_of(desired, found.active_value) is None and found.active_value:
                    found.layout_problems.append(f"active value {found.active_value} unknown")
            if not found.layout_problems:
                self._check_sockets(desired, fds["sockets"], found)
            else:
                self._note_listeners(desired, None)
            if "active" in fds:
                self._active.adopt(fds["active"])
            if not found.layout_problems:
                self._open_counters(desired, fds)
            if pinned.unclaimed_problem(pin_dir):
                found.unclaimed = True
        except OSError as e:
            raise ApplyError(f"cannot read the sk_lookup data plane: {e}") from None
        finally:
            for fd in fds.values():
                os.close(fd)
        problems = (found.layout_problems + found.link_problems
                    + [f"socket map for {t}: {p}" for t, p in found.socket_problems.items()]
                    + ([pinned.UNCLAIMED] if found.unclaimed else []))
        active = (_target_of(desired, found.active_value)
                  if found.active_value is not None else None)
        return KernelState(active=active, intact=not problems, found=found,
                           problems=tuple(problems))

    def _check_maps(self, desired: Desired, fds: dict[str, int], found: Found) -> None:
        missing = [name for name in PINS if name not in fds]
        if [m for m in missing if m != "link"]:
            found.layout_problems.append(f"not pinned: {', '.join(missing)}")
            return
        for name in MAPS:
            info = kbpf.map_info(fds[name])
            if info.type != _MAP_TYPES[name]:
                found.layout_problems.append(f"{PREFIX}{name} is not zddd's map")
                return
        raw = kbpf.map_lookup(fds["meta"], _U32.pack(0), _META.size)
        stamp = _META.unpack(raw) if raw else None
        if stamp != _meta(desired):
            if stamp is None or stamp[0] != LAYOUT_MAGIC:
                found.layout_problems.append("layout stamp missing")
            elif stamp[1] != LAYOUT_VERSION:
                NewerLayout.check(f"the sk_lookup data plane in {desired.pin_dir}", stamp[1],
                                  LAYOUT_VERSION)
                found.layout_problems.append(
                    f"layout version {stamp[1]} (this zddd builds {LAYOUT_VERSION})")
            else:
                found.layout_problems.append(
                    "layout for listen port {2}, {3} targets, {4} slots, {5} flow entries"
                    .format(*stamp))
            return
        prog = kbpf.prog_info(fds["prog"])
        map_ids = {kbpf.map_info(fds[name]).id for name in ("active", "sockets", "flows",
                                                               "steered")}
        if prog.type != kbpf.BPF_PROG_TYPE_SK_LOOKUP or not map_ids <= set(prog.map_ids):
            found.layout_problems.append("the pinned program does not use the pinned maps")

    def _check_link(self, fds: dict[str, int], found: Found) -> None:
        if found.layout_problems:
            return
        if "link" not in fds:
            found.link_problems.append("link not pinned")
            return
        link = kbpf.link_info(fds["link"])
        prog = kbpf.prog_info(fds["prog"])
        if link.type != kbpf.BPF_LINK_TYPE_NETNS or link.prog_id != prog.id:
            found.link_problems.append("the pinned link is not of the pinned program")
        elif link.netns_ino == 0:
            found.link_problems.append("link detached")
        elif link.netns_ino != pinned.netns_ino() or link.attach_type != kbpf.BPF_SK_LOOKUP:
            found.link_problems.append("link attached to another network namespace")

    def _check_sockets(self, desired: Desired, sockets_fd: int, found: Found) -> None:
        by_port = self._listeners(desired)
        for index, (target, port) in enumerate(desired.ports):
            in_map = set()
            for slot in range(SLOTS):
                raw = kbpf.map_lookup(sockets_fd, _U32.pack(index * SLOTS + slot), 8)
                if raw:
                    in_map.add(_COOKIE.unpack(raw)[0])
            wanted = {s.cookie for s in _usable(by_port.get(port, []))}
            takeable = wanted - set(self._untakeable)
            if in_map != takeable:
                found.socket_problems[target] = (
                    f"holds {len(in_map)} socket(s), {len(takeable)} current listener(s) on "
                    f"port {port}" + (f" ({len(in_map - wanted)} stale)" if in_map - wanted
                                      else ""))
        self._note_listeners(desired, by_port, found)

    def _listeners(self, desired: Desired) -> dict[int, list[SocketInfo]]:
        ports = [port for _, port in desired.ports]
        by_port: dict[int, list[SocketInfo]] = {port: [] for port in ports}
        for sock in dump_sockets(ports, 1 << TCP_LISTEN):
            by_port.setdefault(sock.local_port, []).append(sock)
        current = {s.cookie for socks in by_port.values() for s in socks}
        for cookie in list(self._untakeable):
            if cookie not in current:
                del self._untakeable[cookie]
        return by_port

    def _note_listeners(self, desired: Desired, by_port: dict[int, list[SocketInfo]] | None,
                        found: Found | None = None) -> None:
        """Record, per target, whether new connections for it have a socket (health reads
        this between reads)."""
        problems: dict[str, str | None] = {}
        for target, port in desired.ports:
            if by_port is None:
                problems[target] = "the sk_lookup data plane is not in place"
            else:
                pending = found is not None and target in found.socket_problems
                problems[target] = self._listener_problem_of(port, by_port.get(port, []),
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

    def _noted_filled(self, filled: dict[str, tuple[int, list[SocketInfo]]]) -> None:
        """After a step that filled the socket map for these targets completed: what health
        sees of them is what the step put in (no read of the kernel)."""
        problems = dict(self._listener_problems)
        for target, (port, listeners) in filled.items():
            problems[target] = self._listener_problem_of(port, listeners)
        self._listener_problems = problems

    def _open_counters(self, desired: Desired, fds: dict[str, int]) -> None:
        """Keep the `steered` and `flows` maps (of a layout that is this zddd's) open for the
        metrics and the connection counts, with what their keys mean now."""
        ids = (kbpf.map_info(fds["steered"]).id, kbpf.map_info(fds["flows"]).id)
        names = tuple(name for name, _ in desired.ports)
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

    def listener_problem(self, target: str) -> str | None:
        """None when new connections for `target` have a listening socket to go to (as of the
        last read); else why not: nothing listens on its port, its listeners could not be taken
        (and why, e.g. no CAP_SYS_PTRACE), the map is behind (a repair is coming), or the data
        plane is not in place."""
        return self._listener_problems.get(target, "not read yet")

    target_problem = listener_problem

    def listener_missing(self, target: str) -> bool:
        return self.listener_problem(target) is not None

    # ---- plan and apply -------------------------------------------------------------------

    def plan(self, current: KernelState | None, desired: Desired) -> Plan:
        found: Found | None = current.found if current is not None else None
        value = _value_of(desired, desired.active)
        flip = None
        if current is None or not current.intact or current.active != desired.active:
            flip = Flip(_pin(desired.pin_dir, "active"), value)
        if found is None or found.layout_problems:
            start = found.active_value if found and found.active_value is not None else value
            return Plan((Build(desired, start),), flip)
        layout: list[Step] = []
        if found.unclaimed:
            layout.append(Claim(desired.pin_dir))
        if found.link_problems:
            layout.append(Relink(desired.pin_dir))
        for index, (target, port) in enumerate(desired.ports):
            if target in found.socket_problems:
                layout.append(FillSockets(desired.pin_dir, index, target, port))
        return Plan(tuple(layout), flip)

    def apply(self, plan: Plan) -> None:
        """Carries out the plan and reports what it did; reading back (and so what health
        sees of the sockets just put in) is the next `read`'s, the core's."""
        pinned.carry_out(plan, {Build: self._build, Claim: self._claim, Relink: self._relink,
                                FillSockets: self._fill_step}, self._flip)

    def _flip(self, flip: Flip) -> None:
        self._active.write(flip.path, flip.value)

    @staticmethod
    def _claim(step: Claim) -> None:
        pinned.claim(step.pin_dir)

    def _fill_step(self, step: FillSockets) -> None:
        with pinned.Pinned(_pin(step.pin_dir, "sockets")) as fd:
            listeners = self._fill_sockets(fd, step.index, step.target, step.port)
        self._noted_filled({step.target: (step.port, listeners)})

    def _build(self, step: Build) -> None:
        desired = step.desired
        try:
            from bcc import BPF
        except ImportError:
            raise ApplyError("bcc is not installed (python3-bpfcc)") from None
        pinned.claim(desired.pin_dir)
        try:
            bpf = _compile(BPF, source_path(), desired)
        except Exception as e:
            raise ApplyError(f"the sk_lookup program does not load: {pinned.one_line(e)}",
                             changed=True) from None
        staged: list[tuple[str, str]] = []
        try:
            from bcc.libbcc import lib

            fds = {name: lib.bpf_table_fd(bpf.module, f"zddd_{name}".encode())
                   for name in MAPS}
            fds["prog"] = bpf.funcs[PROGRAM.encode()].fd
            kbpf.map_update(fds["meta"], _U32.pack(0), _META.pack(*_meta(desired)))
            kbpf.map_update(fds["active"], _U32.pack(0), _U32.pack(step.active))
            filled = {target: (port, self._fill_sockets(fds["sockets"], index, target, port))
                      for index, (target, port) in enumerate(desired.ports)}
            _carry_over(desired, fds)
            # Everything is pinned under temporary names and linked before it replaces the old
            # pins: until the rename the old program (if any) keeps steering; for a moment
            # both run and the first one's choice stands.
            for name in ("prog",) + MAPS:
                staged.append(pinned.stage(fds[name], _pin(desired.pin_dir, name)))
            link = _link_to_netns(fds["prog"])
            try:
                staged.append(pinned.stage(link, _pin(desired.pin_dir, "link")))
            finally:
                os.close(link)
            for tmp, final in staged:
                os.rename(tmp, final)
            staged.clear()
            self._noted_filled(filled)
            self._open_counters(desired, fds)  # the connections it steers count from now
        except OSError as e:
            raise ApplyError(f"building the sk_lookup data plane: {e}", changed=True) from None
        finally:
            for tmp, _ in staged:
                pinned.unlink(tmp)
            bpf.cleanup()
        self._active.forget()  # a new `active` map: the next flip opens the pinned one

    def _relink(self, step: Relink) -> None:
        with pinned.Pinned(_pin(step.pin_dir, "prog")) as prog:
            link = _link_to_netns(prog)
        try:
            os.rename(*pinned.stage(link, _pin(step.pin_dir, "link")))  # a detached link
            # pinned there goes with it
        finally:
            os.close(link)

    def _fill_sockets(self, sockets_fd: int, index: int, target: str,
                      port: int) -> list[SocketInfo]:
        """Put `port`'s listeners into target `index`'s slots (the kernel's dup of the owner's
        fd is closed at once: the map holds the socket, and when the owner closes it the kernel
        drops it from the map), then clear the slots left over. Returns every listener found
        on `port`."""
        found = [s for s in dump_sockets([port], 1 << TCP_LISTEN) if s.local_port == port]
        listeners = [s for s in _usable(found) if s.cookie not in self._untakeable]
        owners = _owners({s.inode for s in listeners})
        slot = 0
        for sock in listeners:
            try:
                fd = _take(sock, owners.get(sock.inode, []))
            except OSError as e:
                reason = e.strerror or str(e)
                if e.errno == errno.EPERM or (e.errno == errno.ESRCH and owners.denied):
                    reason += " (zddd needs CAP_SYS_PTRACE)"
                self._untakeable[sock.cookie] = reason
                log.warning("event=listener_untakeable target=%s port=%d error=%s", target,
                            port, reason.replace(" ", "_"))
                continue
            try:
                kbpf.map_update(sockets_fd, _U32.pack(index * SLOTS + slot), _COOKIE.pack(fd))
            finally:
                os.close(fd)
            slot += 1
        for stale in range(slot, SLOTS):
            try:
                kbpf.map_delete(sockets_fd, _U32.pack(index * SLOTS + stale))
            except OSError as e:
                if e.errno != errno.EINVAL:  # a sockmap's answer for an empty slot
                    raise
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
            return (f"sk_lookup program linked in {desired.pin_dir} steering "
                    f"{state.active or 'nothing'}")
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

    def flows_steered(self) -> dict[str, int]:
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

    def flow_attribution(self) -> Callable[[list[Flow]], list[str | None]]:
        return self._attribute_flows

    def _attribute_flows(self, flows: list[Flow]) -> list[str | None]:
        if self._counters is None or not flows:
            return [None] * len(flows)
        names = self._counters.names
        try:
            out: list[str | None] = []
            for flow in flows:
                raw = kbpf.map_lookup(self._counters.flows_fd, _flow_key(flow), 4)
                index = _U32.unpack(raw)[0] if raw else None
                out.append(names[index] if index is not None and index < len(names) else None)
            return out
        except OSError:
            return [None] * len(flows)


@dataclass
class _Counters:
    """The open `steered` and `flows` maps (by their ids) and the target names their indexes
    mean, from the last read."""

    ids: tuple[int, int]
    steered_fd: int
    flows_fd: int
    names: tuple[str, ...]
    capacity: int

    def steered(self) -> dict[str, int]:
        size = 8 * kbpf.possible_cpus()
        return {name: pinned.percpu_total(kbpf.map_lookup(self.steered_fd, _U32.pack(i), size))
                for i, name in enumerate(self.names)}


def _carry_over(desired: Desired, fds: dict[str, int]) -> None:
    """From a layout about to be replaced: the targets of the connections established on the
    listen port now (so a drain still counts them) and the steered counters (so the metric
    does not reset). Best effort: an old layout of another shape has nothing usable."""
    try:
        with pinned.Pinned(_pin(desired.pin_dir, "flows")) as old:
            live = dump_sockets([desired.listen_port], 1 << TCP_ESTABLISHED)
            for sock in live:
                if sock.local_port != desired.listen_port:
                    continue
                key = _flow_key(as_flow(sock.family, sock.local_addr.ljust(16, b"\0"),
                                      sock.local_port, sock.remote_addr.ljust(16, b"\0"),
                                      sock.remote_port))
                value = kbpf.map_lookup(old, key, 4)
                if value is not None:
                    kbpf.map_update(fds["flows"], key, value)
        size = 8 * kbpf.possible_cpus()
        with pinned.Pinned(_pin(desired.pin_dir, "steered")) as old:
            for index in range(len(desired.ports)):
                raw = kbpf.map_lookup(old, _U32.pack(index), size)
                if raw:
                    total = pinned.percpu_total(raw)
                    kbpf.map_update(fds["steered"], _U32.pack(index),
                                      _COOKIE.pack(total).ljust(size, b"\0"))
    except OSError:
        pass


def _link_to_netns(prog_fd: int) -> int:
    """A new BPF link of the program to this network namespace (its fd)."""
    netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return kbpf.link_create_netns(prog_fd, netns)
    finally:
        os.close(netns)


def _flow_key(flow: Flow) -> bytes:
    return _FLOW_KEY.pack(flow.remote_addr, flow.local_addr,
                          flow.remote_port.to_bytes(2, "big"), flow.family)


def _compile(bpf_class, source: Path, desired: Desired):
    """bcc BPF object with the program loaded (its maps created, nothing pinned)."""
    cflags = [f"-DLISTEN_PORT={desired.listen_port}", f"-DNTARGETS={len(desired.ports)}",
              f"-DSLOTS={SLOTS}", f"-DFLOW_ENTRIES={desired.flow_entries}", "-w"]
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
