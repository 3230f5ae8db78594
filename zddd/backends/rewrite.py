"""What the rewriting eBPF backends share: `tc` (tc.py: clsact ingress + egress) and `xdp`
(xdp.py: XDP ingress, clsact egress). Both run bpf/steer.c, compiled with bcc; see its header
for the packet semantics. The pinned layout's common parts (owner stamp, staged pins, the
probe, step types) are pinned.py's.

Kernel layout, per backend, under `<bpf_pin_dir>/<backend>/` (tc/ or xdp/):

    flows    LRU hash: (client addr, local addr, client port, listen port) -> (target port,
             listen port, SYN seq), set at the first SYN
    services hash: listen port -> (slot, main port, backup port), one entry per service
    targets  hash: target port -> its service's listen port (egress, and the rule that a SYN
             straight to a target port forgets a steered flow of the same addresses)
    active   array[MAX_SERVICES]: per slot 0 for off, else 1 + main's weight (percent of new
             connections to main). Created mmapable: a switch of one service is one 4-byte
             store into zddd's mapping of it (pinned.ActiveWriter).
    counts   per-CPU hash: target port -> new flows steered; 65536/65537 -> entries added/deleted
    stamp    array[1]: magic, LAYOUT_VERSION, digest of the build
    ingress  the ingress program (tc classifier or XDP), pinned
    egress   the egress tc classifier, pinned

Services are data, not code: adding one is a write of its `active` slot, its `targets` and
`counts` entries, then its `services` entry (what makes the programs see it); removing one
deletes them (its established flows end with it: the core removes only services that are off).
No build and no attachment changes for either. A switch of a service's weight is one store
into its `active` slot.

On every configured interface a clsact qdisc with zddd's filters (priority TC_PRIORITY[name],
handle 1, named "zddd-<backend>-<hook>") and, for `xdp`, the XDP program (generic on lo and
whenever `xdp_mode = "generic"`). Programs stay attached and maps pinned when zddd exits.

What callers may rely on:
- `probe` compiles a private build (no pins, nothing attached) and raises BackendUnavailable
  with one line saying what is missing (bcc, kernel headers, the C source) before touching the
  kernel. `compile_seconds` holds how long that compile took.
- `read` first checks the pin dir (pinned.check_pin_dir: another live namespace's, or on a
  bpffs that would die with zddd, is BackendUnavailable), then adopts what is pinned and
  attached: it needs no compile, and a fresh instance reports the layout intact without a flip
  when the stamp, the maps, the programs and the attachments all match `desired`. `problems`
  names every difference. The interfaces (`interfaces = None`: every one that is up) are
  resolved at every read.
- `plan` works from what `read` found alone: maps whose layout still fits are kept (an upgrade
  or repair keeps every established flow), a flow map of another size is rebuilt with the flows
  copied over, programs are rebuilt when the source, the flow map's size or the layout in the
  stamp differ, and only missing or wrong attachments are redone. A service's elements that
  differ from `desired` are written again (or deleted) alone, keeping its slot and weight
  where its entry is whole; other services' elements are not touched. A pin removed by hand
  is re-pinned from the map the attached programs still use. Where `read` found nothing, the
  plan builds everything and attaches to the interfaces as they are when it is carried out.
- `apply` never leaves two programs of zddd's on one hook: filters are replaced in place, XDP
  programs swapped atomically. ApplyError(changed=True) when a layout step had begun.
- `flows_steered` and `flow_table` read the counters through the handle the last read opened.
  `flow_table` counts entries added minus deleted by the programs (no walk of the map), capped
  at capacity.
- `leftover` and `remove` need no bcc and no compile. `remove` detaches this backend's
  programs from every interface and deletes its pin directory; clsact qdiscs stay (others'
  filters may share them).
- `interfaces = None` means every interface that is up and carries Ethernet framing (lo and
  Ethernet-like links; tunnels without a link layer are skipped). A configured interface that
  does not exist makes the plan's first step fail (ApplyError, changed=False): nothing is
  built or flipped until it exists.
- Capabilities: CAP_BPF + CAP_NET_ADMIN to load and attach, CAP_SYS_ADMIN to mount bpffs and to
  re-pin maps by id (BPF_MAP_GET_FD_BY_ID) after a pin was removed by hand.
- At most MAX_SERVICES services (a plan for more is one failing step).
- Upgrade from layout v1 (one service compiled in, `active` holding its port, flows keyed
  without the listen port): `read` reports that service (the desired one of the stamp's listen
  port) with the weight of the old `active`; `plan` rebuilds: the old flow map is kept pinned
  as `flows-v1` and its entries copied into the new one with the listen port added, the
  build writes the current steering into the new maps, only then are the programs replaced
  in place (tc filter replace, XDP swap), and last the entries the old programs made
  meanwhile are copied too and `flows-v1` dropped (`CarryLegacy`; a later plan does it if
  that was cut short). No flip; no established flow lost.
- `pinned_weights(pin_dir, backend)` reads the steering from the pins alone (for labs).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import secrets
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..kernel import bpf as kbpf
from ..kernel import bpffs, rtnetlink
from . import (ApplyError, Backend, Desired, KernelState, NewerLayout, Plan, pinned,
               target_weight)
from .pinned import Claim, Step

log = logging.getLogger("zddd.bpf")

LAYOUT_VERSION = 2  # of the maps' key/value layout: a change means flows cannot be kept
LEGACY_VERSION = 1  # one service compiled in; adopted (its flows kept) by a rebuild
STAMP_MAGIC = 0x7A646464  # "zddd"
MAX_SERVICES = 256
COUNT_ADDED, COUNT_DELETED = 65536, 65537

TC_PRIORITY = {"tc": 0x2DD, "xdp": 0x2DE}  # distinct, so neither backend replaces the other's
TC_HANDLE = 1
PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 2, 4
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
IFF_UP = 1

FLOW_KEY_SIZE, FLOW_VALUE_SIZE = 40, 8
V1_FLOW_KEY_SIZE = 36  # layout v1's flow key: no listen port
LEGACY_FLOWS = "flows-v1"  # layout v1's flow map, kept under this pin until carried over
BPF_MAP_TYPE_HASH, BPF_NOEXIST = 1, 1  # not in kernel/bpf.py, which the others share
SERVICE = struct.Struct("=IHH")  # slot, main port, backup port
STAMP_FORMAT = "=4I8IQ"
STAMP_SIZE = struct.calcsize(STAMP_FORMAT)
ZERO = b"\0\0\0\0"

# name -> (map type, key size, value size, max entries or None for desired.flow_entries)
MAPS = {
    "flows": (kbpf.BPF_MAP_TYPE_LRU_HASH, FLOW_KEY_SIZE, FLOW_VALUE_SIZE, None),
    "active": (kbpf.BPF_MAP_TYPE_ARRAY, 4, 4, MAX_SERVICES),
    "services": (BPF_MAP_TYPE_HASH, 4, SERVICE.size, MAX_SERVICES),
    "targets": (BPF_MAP_TYPE_HASH, 4, 4, 2 * MAX_SERVICES),
    "counts": (kbpf.BPF_MAP_TYPE_PERCPU_HASH, 4, 8, 2 * MAX_SERVICES + 2),
    "stamp": (kbpf.BPF_MAP_TYPE_ARRAY, 4, STAMP_SIZE, 1),
}
# Maps whose entries a rebuild may copy into a map of another size (same meaning per entry).
CARRIABLE = ("flows",)
# Maps each pinned program must be using (checked against the pins by id).
PROG_MAPS = {"ingress": ("flows", "active", "services", "targets", "counts"),
             "egress": ("flows", "targets")}


def encode(weight: int | None) -> int:
    """A service's `active` value: 0 off, else 1 + main's weight (0..100)."""
    return 0 if weight is None else 1 + max(0, min(100, weight))


def decode(value: int) -> int | None:
    """The weight an `active` value stands for (None: off); ValueError if it is none."""
    if value == 0:
        return None
    if 1 <= value <= 101:
        return value - 1
    raise ValueError(value)


def source_path() -> Path:
    """bpf/steer.c: next to the package in a checkout, else where the Debian package puts it."""
    here = Path(__file__).resolve().parent.parent.parent / "bpf" / "steer.c"
    return here if here.exists() else Path("/usr/share/zddd/bpf/steer.c")


def _valid_pin_dir(path: str) -> str:
    # The path is compiled into the program as a C string.
    if not path.startswith("/") or any(c in path for c in '"\\\n'):
        raise ApplyError(f"bpf_pin_dir {path!r} must be an absolute path without quotes")
    return path.rstrip("/") or "/"


@dataclass(frozen=True)
class Flavour:
    """Everything a build of steer.c depends on besides the source (the services are data)."""

    flow_entries: int

    @classmethod
    def of(cls, desired: Desired) -> "Flavour":
        return cls(desired.flow_entries)

    def cflags(self, pin_dir: str | None) -> list[str]:
        flags = [f"-DFLOW_ENTRIES={self.flow_entries}", f"-DMAX_SERVICES={MAX_SERVICES}"]
        if pin_dir is not None:
            flags.append(f'-DPIN_DIR="{pin_dir}"')
        return flags

    def digest(self, source: bytes) -> int:
        h = hashlib.sha256(source)
        h.update(repr((self.flow_entries, MAX_SERVICES)).encode())
        return int.from_bytes(h.digest()[:8], "little")

    def stamp(self, source: bytes) -> bytes:
        return struct.pack(STAMP_FORMAT, STAMP_MAGIC, LAYOUT_VERSION, 0, 0, *[0] * 8,
                           self.digest(source))


@dataclass(frozen=True)
class Row:
    """One service as the maps hold it."""

    listen_port: int
    slot: int
    main_port: int
    backup_port: int


def rows_of(desired: Desired, slots: dict[int, int]) -> dict[int, Row]:
    return {s.listen_port: Row(s.listen_port, slots[s.listen_port], dict(s.ports).get("main", 0),
                               dict(s.ports).get("backup", 0)) for s in desired.services}


# ---- the plan's steps -------------------------------------------------------------------------

@dataclass(frozen=True)
class Missing(Step):
    """Configured interfaces that do not exist: fails, before anything is built."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class RequireInterfaces(Step):
    """Fail (changed=False) unless every configured interface exists now."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class Repin(Step):
    """Pin again, by id, a map whose pin was removed while programs still use it."""

    directory: str
    name: str
    map_id: int


@dataclass(frozen=True)
class Build(Step):
    """Compile and load with the maps pinned in `pin_dir`/<backend>, keeping the maps in
    `keep`, copying the entries of the maps in `carry` (same layout, another size) into their
    new maps, and writing every service's `rows` with its `active` value from `values` (slot ->
    value: the steering as it is now, so the new programs steer as the old ones did) before the
    programs are pinned. `targets` ((service, target), port) say what the counters mean."""

    pin_dir: str
    flavour: Flavour
    targets: tuple[tuple[tuple[str, str], int], ...]
    keep: tuple[str, ...] = ()
    carry: tuple[str, ...] = ()
    rows: tuple[Row, ...] = ()
    values: tuple[tuple[int, int], ...] = ()
    legacy_flows: bool = False  # layout v1's flow map: kept as LEGACY_FLOWS, entries copied


@dataclass(frozen=True)
class CarryLegacy(Step):
    """After the new programs are attached: copy the entries layout v1's programs added to
    its flow map (LEGACY_FLOWS) while the build was being attached, then drop that map."""

    directory: str


@dataclass(frozen=True)
class SetService(Step):
    """Write one service's elements: (if `reset`) its `active` slot to off, its `targets` and
    `counts` entries, then its `services` entry, which is what makes the programs steer it."""

    directory: str
    row: Row
    reset: bool

    def __str__(self) -> str:
        return f"setservice {self.row.listen_port} slot {self.row.slot}"


@dataclass(frozen=True)
class DropService(Step):
    """Delete a service's `services` entry (`listen_port` None: none), the `targets` and
    `counts` entries of `ports`, and (`slot` not None) set its `active` slot to off."""

    directory: str
    listen_port: int | None
    slot: int | None
    ports: tuple[int, ...]


@dataclass(frozen=True)
class Refuse(Step):
    """A plan this data plane cannot hold: fails before anything changes."""

    message: str


@dataclass(frozen=True)
class Stores(Step):
    """The flip: per service whose weight changes, one store of its `active` value into the
    `active` array pinned at `path` ((slot, value) pairs)."""

    path: str
    stores: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Clsact(Step):
    ifname: str
    index: int


@dataclass(frozen=True)
class Attach(Step):
    """Attach the pinned program for `hook` on an interface (tc filter or XDP in `mode`)."""

    directory: str
    ifname: str
    index: int
    hook: str
    mode: int


@dataclass(frozen=True)
class AttachEverywhere(Step):
    """Where `read` found nothing: clsact and every hook on the interfaces as they are now
    (`interfaces` None: every one up with Ethernet framing)."""

    directory: str
    interfaces: tuple[str, ...] | None
    xdp_mode: str


@dataclass(frozen=True)
class Detach(Step):
    ifname: str
    mode: int
    hook: str


# ---- what read found --------------------------------------------------------------------------

@dataclass
class Found:
    """What `read` saw, for `plan`: pinned objects by name (id, ok?), what the attached
    programs use, the services the maps hold, and zddd's attachments by interface."""

    directory: str
    pins: dict[str, int] = field(default_factory=dict)  # pin name -> object id
    bad_pins: set[str] = field(default_factory=set)  # present but unfit (type, size, stamp)
    keepable: set[str] = field(default_factory=set)  # maps a rebuild may keep
    carriable: set[str] = field(default_factory=set)  # maps of another size, entries copyable
    orphans: dict[str, int] = field(default_factory=dict)  # unpinned map in use -> map id
    rebuild: bool = False
    unclaimed: bool = False  # pins there, but no owner stamp (pinned by an older zddd)
    interfaces: dict[str, int] = field(default_factory=dict)  # desired ifname -> index
    attached: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    clsact: set[str] = field(default_factory=set)
    foreign_xdp: set[str] = field(default_factory=set)  # someone else's XDP program there
    missing_interfaces: tuple[str, ...] = ()
    services: dict[int, Row] = field(default_factory=dict)  # listen port -> its entry
    targets: dict[int, int] = field(default_factory=dict)  # target port -> listen port
    values: dict[int, int] = field(default_factory=dict)  # slot -> `active` value, of `services`
    v1_flows: bool = False  # `flows` is layout v1's (its key has no listen port)
    legacy_flows: bool = False  # LEGACY_FLOWS is still pinned (an upgrade cut short)


@dataclass
class _Counters:
    """The open `counts` map and what its keys mean, from the last read."""

    handle: kbpf.MapHandle
    map_id: int
    ports: tuple[tuple[tuple[str, str], int], ...]  # ((service, target), port)
    capacity: int

    def totals(self) -> dict[int, int]:
        keys = {p for _, p in self.ports} | {COUNT_ADDED, COUNT_DELETED}
        return {key: pinned.percpu_total(self.handle.lookup(struct.pack("=I", key)))
                for key in keys}


def counter_ports(desired: Desired) -> tuple[tuple[tuple[str, str], int], ...]:
    return tuple(((s.name, name), port) for s in desired.services for name, port in s.ports)


class RewriteBackend(Backend):
    """A rewriting backend; tc.py and xdp.py say which program goes on ingress."""

    name = "bpf"
    ingress_function = ""
    ingress_program_type = ""  # the bcc BPF class' name for it: SCHED_CLS or XDP
    ingress_hook = ""  # "ingress" (tc) or "xdp"

    def __init__(self) -> None:
        self._ipr = None
        self._active = pinned.ActiveWriter()
        self._counters: _Counters | None = None
        self._known_prog_ids: set[int] = set()  # programs this instance saw pinned as its own
        self.compile_seconds: float | None = None
        self._source: bytes | None = None

    # ---- probe ------------------------------------------------------------------------------

    def probe(self) -> None:
        def compile_test() -> None:
            self._compile(Flavour(1024), None).cleanup()

        self.compile_seconds = pinned.probe(self.name, source_path(), compile_test)
        log.info("event=bpf_compiled seconds=%.2f", self.compile_seconds)

    def _source_text(self) -> bytes:
        if self._source is None:
            self._source = source_path().read_bytes()
        return self._source

    def _compile(self, flavour: Flavour, pin_dir: str | None):
        from bcc import BPF

        bpf = BPF(text=self._source_text().decode(), cflags=flavour.cflags(pin_dir))
        programs = {"ingress": bpf.load_func(self.ingress_function,
                                             getattr(BPF, self.ingress_program_type)),
                    "egress": bpf.load_func("zddd_egress", BPF.SCHED_CLS)}
        bpf.zddd_programs = programs
        return bpf

    # ---- netlink ----------------------------------------------------------------------------

    def _netlink(self):
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    @staticmethod
    def _links() -> list[tuple[str, int, int, int, tuple[int, int]]]:
        """(name, index, flags, type, (XDP program id, mode)) of every link in this network
        namespace, from one netlink dump."""
        return [(link.name, link.index, link.flags, link.type, _xdp_of(link))
                for link in rtnetlink.links()]

    @staticmethod
    def _clsact_indexes() -> set[int]:
        """Interfaces with a clsact qdisc, from one dump (only they can hold our filters)."""
        return {index for index, kind in rtnetlink.qdisc_kinds() if kind == "clsact"}

    @staticmethod
    def _resolve(interfaces: tuple[str, ...] | None,
                 links) -> tuple[dict[str, int], tuple[str, ...]]:
        by_name = {name: (index, flags, kind) for name, index, flags, kind, _ in links}
        if interfaces is None:
            # Every interface up that carries Ethernet framing (what steer.c parses): lo and
            # Ethernet-like links; tunnels without a link layer are left alone.
            chosen = {n: i for n, (i, flags, kind) in by_name.items()
                      if flags & IFF_UP and kind in (ARPHRD_ETHER, ARPHRD_LOOPBACK)}
            return chosen, ()
        chosen, missing = {}, []
        for name in interfaces:
            if name in by_name:
                chosen[name] = by_name[name][0]
            else:
                missing.append(name)
        return chosen, tuple(missing)

    def _filter_ids(self, index: int) -> dict[str, int]:
        """Program ids of this backend's filters on the interface, by hook: ours are at our
        priority and handle, with our name (someone else's filter there is not ours)."""
        found = {}
        for hook, parent in PARENT.items():
            for prio, handle, name, prog_id in rtnetlink.bpf_filters(index, parent):
                if (prio, handle, name) == (TC_PRIORITY[self.name], TC_HANDLE,
                                            self._filter_name(hook)):
                    found[hook] = prog_id
        return found

    def _filter_name(self, hook: str) -> str:
        return f"zddd-{self.name}-{hook}"

    @staticmethod
    def _xdp(index: int) -> tuple[int, int]:
        """(program id, mode flag) of the XDP program on the interface, (0, 0) if none."""
        for link in rtnetlink.links():
            if link.index == index:
                return _xdp_of(link)
        return 0, 0

    @staticmethod
    def _xdp_mode(xdp_mode: str, ifname: str) -> int:
        if ifname == "lo" or xdp_mode == "generic":
            return XDP_FLAGS_SKB_MODE
        return XDP_FLAGS_DRV_MODE

    # ---- read -------------------------------------------------------------------------------

    def _directory(self, desired: Desired) -> str:
        return os.path.join(_valid_pin_dir(desired.pin_dir), self.name)

    def read(self, desired: Desired) -> KernelState | None:
        pinned.check_pin_dir(desired.pin_dir)
        try:
            return self._read(desired)
        except ApplyError:
            raise
        except Exception as e:
            raise ApplyError(f"cannot read the {self.name} data plane: {e}") from None

    def _read(self, desired: Desired) -> KernelState | None:
        found = Found(self._directory(desired))
        problems: list[str] = []
        flavour = Flavour.of(desired)
        fds: dict[str, int] = {}
        try:
            stamp = self._read_pins(found, flavour, fds, problems)
            if stamp is not None and stamp[1] == LEGACY_VERSION:
                weights = self._read_legacy(stamp, fds, desired, problems)
            else:
                weights = self._read_services(found, fds, desired, problems)
            self._open_counters(found, fds, desired)
            self._read_attachments(found, desired, problems)
        finally:
            for fd in fds.values():
                os.close(fd)
        if not found.pins and not any(found.attached.values()):
            return None
        if found.pins:
            unclaimed = pinned.unclaimed_problem(desired.pin_dir)
            if unclaimed:
                found.unclaimed = True
                problems.append(unclaimed)
        return KernelState(weights=weights, intact=not problems, found=found,
                           problems=tuple(problems))

    def _read_pins(self, found: Found, flavour: Flavour, fds: dict[str, int],
                   problems: list[str]):
        """The pinned objects, judged; returns the stamp (None if there is none)."""
        directory = found.directory
        infos: dict[str, kbpf.MapInfo | kbpf.ProgInfo | None] = {}
        for name in (*MAPS, "ingress", "egress"):
            try:
                fd = kbpf.obj_get(os.path.join(directory, name))
            except OSError:
                continue
            fds[name] = fd
            try:
                info = kbpf.map_info(fd) if name in MAPS else kbpf.prog_info(fd)
            except OSError:
                info = None
            infos[name] = info
            found.pins[name] = getattr(info, "id", 0)
        # Maps: the right kind and size, or unfit.
        for name, (kind, key, value, entries) in MAPS.items():
            info = infos.get(name)
            if name not in found.pins:
                problems.append(f"pin {name} missing")
                continue
            want_entries = flavour.flow_entries if entries is None else entries
            if not isinstance(info, kbpf.MapInfo) or (
                    info.type, info.key_size, info.value_size, info.max_entries) != (
                    kind, key, value, want_entries):
                found.bad_pins.add(name)
                problems.append(f"map {name} has another layout")
                if name in CARRIABLE and isinstance(info, kbpf.MapInfo) and (
                        info.type, info.key_size, info.value_size) == (kind, key, value):
                    found.carriable.add(name)
        stamp = self._read_stamp(fds, found)
        stamp_version = stamp[1] if stamp else None
        if stamp is None or stamp[0] != STAMP_MAGIC:
            problems.append("stamp missing")
            stamp = None
        elif stamp_version != LAYOUT_VERSION:
            NewerLayout.check(f"the {self.name} data plane in {found.directory}",
                              stamp[1], LAYOUT_VERSION)
            problems.append(f"layout version {stamp_version}, this zddd builds {LAYOUT_VERSION}")
        elif stamp[-1] != flavour.digest(self._source_text()):
            problems.append("programs built from another source or configuration")
        # Keep a map through a rebuild (or copy its entries) when its layout fits and no other
        # layout version wrote it (a stamp of another version means the flows' key layout may
        # differ). Layout v1's flows are copied with their listen port added to the key.
        kept_versions = (None, LAYOUT_VERSION)
        if stamp_version not in kept_versions:
            found.carriable.clear()
        flows = infos.get("flows")
        found.v1_flows = stamp_version == LEGACY_VERSION and isinstance(flows, kbpf.MapInfo) \
            and (flows.type, flows.key_size, flows.value_size) == (
                kbpf.BPF_MAP_TYPE_LRU_HASH, V1_FLOW_KEY_SIZE, FLOW_VALUE_SIZE)
        for name in MAPS:
            if name in found.pins and name not in found.bad_pins and name != "stamp" and (
                    stamp_version in kept_versions):
                found.keepable.add(name)
        # Programs: pinned, of the right type, using exactly the pinned maps.
        for hook in ("ingress", "egress"):
            info = infos.get(hook)
            if hook not in found.pins:
                problems.append(f"pin {hook} missing")
                continue
            if not isinstance(info, kbpf.ProgInfo) or info.type != self._prog_type(hook):
                found.bad_pins.add(hook)
                problems.append(f"pin {hook} is not a {self.name} {hook} program")
                continue
            for map_name in PROG_MAPS[hook]:
                if found.pins.get(map_name) not in info.map_ids:
                    problems.append(f"program {hook} does not use the pinned map {map_name}")
        # Every problem so far is one of the pinned objects: only a build repairs those.
        found.rebuild = bool(problems)
        if os.path.exists(os.path.join(directory, LEGACY_FLOWS)):
            found.legacy_flows = True
            problems.append("flows of layout v1 not carried over yet")
        return stamp

    def _read_legacy(self, stamp, fds: dict[str, int], desired: Desired,
                     problems: list[str]) -> dict[str, int | None]:
        """Layout v1: one service (its listen port and ports in the stamp), `active` holding
        the port new connections go to (0: off). Its weight, as the desired service of that
        listen port (the adopted one) has it."""
        listen_port = stamp[2]
        service = desired.by_listen_port().get(listen_port)
        if service is None:
            problems.append(f"layout v1 steers listen port {listen_port}, which no service has")
            return {}
        port = 0
        if "active" in fds:
            raw = kbpf.map_lookup(fds["active"], ZERO, 4)
            port = struct.unpack("=I", raw)[0] if raw else 0
        by_port = {p: name for name, p in service.ports}
        if port and port not in by_port:
            problems.append(f"layout v1 steers to port {port}, which is no target")
            return {}
        return {service.name: None if not port else target_weight(by_port[port])}

    def _read_services(self, found: Found, fds: dict[str, int], desired: Desired,
                       problems: list[str]) -> dict[str, int | None]:
        """The services the maps hold (and for `plan`, every entry), judged against `desired`:
        each service's weight from its `active` slot. The writer keeps `active` open and mapped
        for the flip."""
        usable = {name for name in ("services", "targets", "active")
                  if name in fds and name not in found.bad_pins}
        if "services" in usable:
            for key, raw in _entries(fds["services"], 4, SERVICE.size, MAX_SERVICES):
                (listen_port,) = struct.unpack("=I", key)
                found.services[listen_port] = Row(listen_port, *SERVICE.unpack(raw))
        if "targets" in usable:
            for key, raw in _entries(fds["targets"], 4, 4, 2 * MAX_SERVICES):
                found.targets[struct.unpack("=I", key)[0]] = struct.unpack("=I", raw)[0]
        if "active" in usable:
            self._active.adopt(fds["active"])
            for row in found.services.values():
                if row.slot < MAX_SERVICES:
                    found.values[row.slot] = self._active.read(row.slot)
        weights: dict[str, int | None] = {}
        wanted = rows_of(desired, {s.listen_port: 0 for s in desired.services})
        slots_seen: dict[int, int] = {}
        for service in desired.services:
            held = found.services.get(service.listen_port)
            if held is None:
                problems.append(f"service {service.name} missing")
                continue
            row = held
            want = wanted[service.listen_port]
            if (row.main_port, row.backup_port) != (want.main_port, want.backup_port):
                problems.append(f"service {service.name} steers to other ports")
            if row.slot >= MAX_SERVICES or row.slot in slots_seen:
                problems.append(f"service {service.name} has a bad slot {row.slot}")
                continue
            slots_seen[row.slot] = row.listen_port
            for port in (want.main_port, want.backup_port):
                if found.targets.get(port) != service.listen_port:
                    problems.append(f"target port {port} of service {service.name} missing")
            if row.slot not in found.values:
                continue  # `active` could not be read: its weight is not known
            try:
                weights[service.name] = decode(found.values[row.slot])
            except ValueError:
                problems.append(f"service {service.name} has a bad weight "
                                f"{found.values.get(row.slot)}")
                weights[service.name] = None
        listen_ports = {s.listen_port for s in desired.services}
        for listen_port in sorted(set(found.services) - listen_ports):
            problems.append(f"listen port {listen_port} steered, but no service has it")
        target_ports = desired.by_target_port()
        for port, listen_port in sorted(found.targets.items()):
            if port not in target_ports:
                problems.append(f"target port {port} (of listen port {listen_port}) is no "
                                "service's")
        return weights

    def _prog_type(self, hook: str) -> int:
        if hook == "ingress" and self.ingress_hook == "xdp":
            return kbpf.BPF_PROG_TYPE_XDP
        return kbpf.BPF_PROG_TYPE_SCHED_CLS

    @staticmethod
    def _read_stamp(fds: dict[str, int], found: Found):
        if "stamp" not in fds or "stamp" in found.bad_pins:
            return None
        raw = kbpf.map_lookup(fds["stamp"], ZERO, STAMP_SIZE)
        return struct.unpack(STAMP_FORMAT, raw) if raw else None

    def _open_counters(self, found: Found, fds: dict[str, int], desired: Desired) -> None:
        """Keep the counts map open for the metrics, with what its keys mean now."""
        if "counts" not in fds or "counts" in found.bad_pins:
            return
        capacity = desired.flow_entries
        if "flows" in fds:
            capacity = kbpf.map_info(fds["flows"]).max_entries
        self._keep_counters(fds["counts"], found.pins["counts"], counter_ports(desired),
                            capacity)

    def _keep_counters(self, fd: int, map_id: int,
                       ports: tuple[tuple[tuple[str, str], int], ...],
                       capacity: int) -> None:
        if self._counters is not None and self._counters.map_id == map_id:
            self._counters.ports, self._counters.capacity = ports, capacity
            return
        self._close_counters()
        handle = kbpf.MapHandle(os.dup(fd), 4, 8, percpu=True)
        self._counters = _Counters(handle, map_id, ports, capacity)

    def _close_counters(self) -> None:
        if self._counters is not None:
            self._counters.handle.close()
            self._counters = None

    def _read_attachments(self, found: Found, desired: Desired, problems: list[str]) -> None:
        links = self._links()
        found.interfaces, found.missing_interfaces = self._resolve(desired.interfaces, links)
        for name in found.missing_interfaces:
            problems.append(f"interface {name} missing")
        want = {hook: found.pins.get(hook) for hook in ("ingress", "egress")}
        self._known_prog_ids.update(i for i in want.values() if i)
        orphan_prog_ids = set()
        clsact = self._clsact_indexes()
        for ifname, index, _, _, (prog_id, mode) in links:
            filters = self._filter_ids(index) if index in clsact else {}
            hooks = {h: (pid, 0) for h, pid in filters.items()}
            if self.ingress_hook == "xdp":
                if prog_id and self._is_ours(prog_id):
                    hooks["xdp"] = (prog_id, mode)
                elif prog_id:
                    found.foreign_xdp.add(ifname)
            if hooks:
                found.attached[ifname] = hooks
            if index in clsact:
                found.clsact.add(ifname)
            for attached_id, _ in hooks.values():
                if attached_id not in want.values():
                    orphan_prog_ids.add(attached_id)
            if ifname not in found.interfaces:
                for hook in hooks:
                    problems.append(f"{hook} program attached on {ifname}, not configured")
                continue
            for hook in sorted(set(hooks) - {"egress", self.ingress_hook}):
                problems.append(f"{hook} program of zddd's on {ifname}, not used by {self.name}")
            for hook in ("egress", self.ingress_hook):
                pin = "egress" if hook == "egress" else "ingress"
                got = hooks.get(hook)
                if got is None:
                    problems.append(f"{hook} program missing on {ifname}")
                elif got[0] != want[pin]:
                    problems.append(f"{hook} program on {ifname} is not the pinned one")
                elif hook == "xdp" and got[1] != self._xdp_mode(desired.xdp_mode, ifname):
                    problems.append(f"xdp program on {ifname} in the wrong mode")
                if hook == "xdp" and ifname in found.foreign_xdp:
                    problems.append(f"another XDP program is attached on {ifname}")
        # A map pin removed by hand while programs still run on the map: re-pin it, so a
        # rebuild keeps established flows.
        for prog_id in orphan_prog_ids | {i for i in want.values() if i}:
            self._find_orphans(found, prog_id)

    def _is_ours(self, prog_id: int) -> bool:
        """Is this XDP program zddd's? Programs seen pinned by this instance are; others are
        judged by name, which needs CAP_SYS_ADMIN (BPF_PROG_GET_FD_BY_ID): without it an
        unknown program counts as someone else's, and zddd leaves it alone."""
        if prog_id in self._known_prog_ids:
            return True
        try:
            fd = kbpf.prog_fd_by_id(prog_id)
        except OSError:
            return False
        try:
            return kbpf.prog_info(fd).name == self.ingress_function[:15]
        finally:
            os.close(fd)

    @staticmethod
    def _find_orphans(found: Found, prog_id: int) -> None:
        missing = [m for m in MAPS if m not in found.pins and m != "stamp"]
        if not missing:
            return
        try:
            fd = kbpf.prog_fd_by_id(prog_id)
            try:
                map_ids = kbpf.prog_info(fd).map_ids
            finally:
                os.close(fd)
        except OSError:
            return
        for map_id in map_ids:
            try:
                fd = kbpf.map_fd_by_id(map_id)
            except OSError:
                continue
            try:
                info = kbpf.map_info(fd)
            finally:
                os.close(fd)
            if info.name in missing and info.name not in found.orphans:
                found.orphans[info.name] = map_id

    # ---- plan -------------------------------------------------------------------------------

    def plan(self, current: KernelState | None, desired: Desired) -> Plan:
        pin_dir = _valid_pin_dir(desired.pin_dir)
        directory = os.path.join(pin_dir, self.name)
        active_path = os.path.join(directory, "active")
        if len(desired.services) > MAX_SERVICES:
            return Plan((Refuse(f"{len(desired.services)} services, the {self.name} data plane "
                                f"holds at most {MAX_SERVICES}"),))
        if current is not None and current.intact:
            # Every service's elements are right: a flip alone, of the services whose value
            # differs.
            found: Found = current.found
            stores = tuple((found.services[s.listen_port].slot, encode(s.weight))
                           for s in desired.services
                           if found.values.get(found.services[s.listen_port].slot)
                           != encode(s.weight))
            return Plan((), Stores(active_path, stores) if stores else None)
        targets = counter_ports(desired)
        if current is None:
            # Nothing of zddd's: build it all (every service off), attach where the interfaces
            # are then, and flip the services that are not off.
            fresh = tuple(rows_of(desired, self._slots(desired, {})).values())
            first = () if desired.interfaces is None else (RequireInterfaces(desired.interfaces),)
            build = Build(pin_dir, Flavour.of(desired), targets, rows=fresh,
                          values=tuple((row.slot, 0) for row in fresh))
            return Plan((*first, build, AttachEverywhere(directory, desired.interfaces,
                                                         desired.xdp_mode)),
                        self._stores(active_path, desired, fresh, {}))
        found = current.found
        if found.missing_interfaces:
            # Nothing to attach to: fail before building anything.
            return Plan((Missing(found.missing_interfaces),))
        steps: list[Step] = []
        for name, map_id in sorted(found.orphans.items()):
            steps.append(Repin(found.directory, name, map_id))
        if found.unclaimed and not found.rebuild:
            steps.append(Claim(pin_dir))
        keep = tuple(sorted(found.keepable | set(found.orphans)))
        # Entries of the maps that stay (all of them, unless a rebuild replaces a map).
        services = found.services if not found.rebuild or "services" in keep else {}
        target_entries = found.targets if not found.rebuild or "targets" in keep else {}
        values = found.values if not found.rebuild or "active" in keep else {}
        slots = self._slots(desired, services)
        rows = rows_of(desired, slots)
        starts: dict[int, int] = {}  # listen port -> its `active` value once the layout is done
        for service in desired.services:
            row = rows[service.listen_port]
            held = services.get(service.listen_port)
            if held is not None and held.slot == row.slot and row.slot in values:
                starts[row.listen_port] = values[row.slot]
            elif found.rebuild and service.name in current.weights:
                # The steering the old maps hold (layout v1's `active`, or a map replaced).
                starts[row.listen_port] = encode(current.weights[service.name])
            elif found.rebuild:
                # Not known (its `active` unreadable): the build writes the desired steering
                # before the programs see it, never a moment of "off".
                starts[row.listen_port] = encode(service.weight)
            else:
                starts[row.listen_port] = 0
        if found.rebuild:
            carry = tuple(sorted(found.carriable - set(keep)))
            steps.append(Build(pin_dir, Flavour.of(desired), targets, keep, carry,
                               tuple(rows.values()),
                               tuple((rows[p].slot, v if _valid(v) else 0)
                                     for p, v in starts.items()), found.v1_flows))
            starts = {p: v if _valid(v) else 0 for p, v in starts.items()}
        steps.extend(self._drops(found.directory, desired, services, target_entries, slots))
        if not found.rebuild:
            for service in desired.services:
                row = rows[service.listen_port]
                held = services.get(service.listen_port)
                targets_ok = all(target_entries.get(port) == row.listen_port
                                 for port in (row.main_port, row.backup_port))
                if held != row or not targets_ok:
                    reset = held is None or held.slot != row.slot
                    steps.append(SetService(found.directory, row, reset))
                    if reset:
                        starts[row.listen_port] = 0
        want = {"ingress": found.pins.get("ingress"), "egress": found.pins.get("egress")}
        for ifname, index in sorted(found.interfaces.items()):
            attached = found.attached.get(ifname, {})
            if ifname not in found.clsact:
                steps.append(Clsact(ifname, index))
            for hook in ("egress", self.ingress_hook):
                pin = "egress" if hook == "egress" else "ingress"
                got = attached.get(hook)
                mode = self._xdp_mode(desired.xdp_mode, ifname) if hook == "xdp" else 0
                if found.rebuild or got is None or got[0] != want[pin] or got[1] != mode:
                    steps.append(Attach(found.directory, ifname, index, hook, mode))
        for ifname, hooks in sorted(found.attached.items()):
            for hook in sorted(hooks):
                if ifname not in found.interfaces or hook not in ("egress", self.ingress_hook):
                    steps.append(Detach(ifname, hooks[hook][1], hook))
        if (found.rebuild and found.v1_flows) or found.legacy_flows:
            steps.append(CarryLegacy(found.directory))
        return Plan(tuple(steps), self._stores(active_path, desired, rows.values(), starts))

    @staticmethod
    def _slots(desired: Desired, services: dict[int, Row]) -> dict[int, int]:
        """listen port -> slot: a service keeps the slot its entry has (the first of two that
        share one), a new one takes the lowest free slot."""
        slots: dict[int, int] = {}
        taken: set[int] = set()
        for service in desired.services:
            held = services.get(service.listen_port)
            if held is not None and held.slot < MAX_SERVICES and held.slot not in taken:
                slots[service.listen_port] = held.slot
                taken.add(held.slot)
        free = (slot for slot in range(MAX_SERVICES) if slot not in taken)
        for service in desired.services:
            if service.listen_port not in slots:
                slot = next(free)
                slots[service.listen_port] = slot
                taken.add(slot)
        return slots

    @staticmethod
    def _drops(directory: str, desired: Desired, services: dict[int, Row],
               target_entries: dict[int, int], slots: dict[int, int]) -> list[Step]:
        """Delete what the maps hold of services not desired, and target entries of no
        desired service's ports; never a slot a desired service uses."""
        listen_ports = set(slots)
        target_ports = desired.by_target_port()
        stale: dict[int | None, list[int]] = {}
        for port, listen_port in sorted(target_entries.items()):
            if port not in target_ports:
                owner = listen_port if listen_port in services and \
                    listen_port not in listen_ports else None
                stale.setdefault(owner, []).append(port)
        steps: list[Step] = []
        used = set(slots.values())
        for listen_port, row in sorted(services.items()):
            if listen_port not in listen_ports:
                slot = row.slot if row.slot < MAX_SERVICES and row.slot not in used else None
                steps.append(DropService(directory, listen_port, slot,
                                         tuple(stale.pop(listen_port, ()))))
        if stale.get(None):
            steps.append(DropService(directory, None, None, tuple(stale[None])))
        return steps

    @staticmethod
    def _stores(path: str, desired: Desired, rows, starts: dict[int, int]) -> Stores | None:
        by_listen = {row.listen_port: row for row in rows}
        stores = tuple((by_listen[s.listen_port].slot, encode(s.weight))
                       for s in desired.services
                       if starts.get(s.listen_port, 0) != encode(s.weight))
        return Stores(path, stores) if stores else None

    # ---- apply ------------------------------------------------------------------------------

    def apply(self, plan: Plan) -> None:
        pinned.carry_out(plan, {
            Missing: self._missing, RequireInterfaces: self._require_interfaces,
            Refuse: self._refuse, Repin: self._repin, Claim: self._claim, Build: self._build,
            SetService: self._set_service, DropService: self._drop_service,
            CarryLegacy: self._carry_legacy,
            Clsact: self._clsact, Attach: self._attach, AttachEverywhere: self._attach_everywhere,
            Detach: self._detach_step}, self._flip)

    def _flip(self, flip) -> None:  # a Stores (pinned.carry_out is typed for Flip)
        for slot, value in flip.stores:
            self._active.write(flip.path, value, slot)

    @staticmethod
    def _refuse(step: Refuse) -> None:
        raise ApplyError(step.message, changed=False)

    @staticmethod
    def _carry_legacy(step: CarryLegacy) -> None:
        path = os.path.join(step.directory, LEGACY_FLOWS)
        with pinned.Pinned(path) as old_fd, \
                pinned.Pinned(os.path.join(step.directory, "flows")) as new_fd, \
                pinned.Pinned(os.path.join(step.directory, "targets")) as targets_fd:
            targets = kbpf.MapHandle(targets_fd, 4, 4)
            listen = {struct.unpack("=I", key)[0]: struct.unpack("=I", raw)[0]
                      for key in targets.keys() if (raw := targets.lookup(key)) is not None}
            count = _copy_v1_flows(old_fd, new_fd, listen)
        os.unlink(path)
        log.info("event=flows_carried_over map=%s entries=%d late=1", LEGACY_FLOWS, count)

    def _set_service(self, step: SetService) -> None:
        row = step.row
        directory = step.directory
        if step.reset:
            self._active.write(os.path.join(directory, "active"), 0, row.slot)
        _write_targets(directory, (row,))
        with pinned.Pinned(os.path.join(directory, "services")) as fd:
            kbpf.map_update(fd, struct.pack("=I", row.listen_port),
                            SERVICE.pack(row.slot, row.main_port, row.backup_port))

    def _drop_service(self, step: DropService) -> None:
        directory = step.directory
        if step.listen_port is not None:
            with pinned.Pinned(os.path.join(directory, "services")) as fd:
                kbpf.map_delete(fd, struct.pack("=I", step.listen_port))
        with pinned.Pinned(os.path.join(directory, "targets")) as targets, \
                pinned.Pinned(os.path.join(directory, "counts")) as counts:
            for port in step.ports:
                kbpf.map_delete(targets, struct.pack("=I", port))
                kbpf.map_delete(counts, struct.pack("=I", port))
        if step.slot is not None:
            self._active.write(os.path.join(directory, "active"), 0, step.slot)

    @staticmethod
    def _missing(step: Missing) -> None:
        raise ApplyError(f"configured interfaces not found: {', '.join(step.names)}",
                         changed=False)

    def _require_interfaces(self, step: RequireInterfaces) -> None:
        _, missing = self._resolve(step.names, self._links())
        if missing:
            self._missing(Missing(missing))

    @staticmethod
    def _claim(step: Claim) -> None:
        pinned.claim(step.pin_dir)

    @staticmethod
    def _repin(step: Repin) -> None:
        bpffs.ensure_bpffs_dir(step.directory)  # the whole directory may have gone
        fd = kbpf.map_fd_by_id(step.map_id)
        try:
            kbpf.obj_pin(fd, os.path.join(step.directory, step.name))
        finally:
            os.close(fd)

    def _build(self, step: Build) -> None:
        """Compile and load with the maps pinned; reuse the maps in `keep`. A first build
        happens in a temporary directory renamed into place when complete; a rebuild pins its
        programs under temporary names and renames them over the old pins."""
        pin_dir = step.pin_dir
        pinned.claim(pin_dir)
        final = os.path.join(pin_dir, self.name)
        for stale in Path(pin_dir).glob(f"{self.name}-build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        fresh = not os.path.isdir(final)
        work = os.path.join(pin_dir, f"{self.name}-build-{secrets.token_hex(4)}") if fresh \
            else final
        os.makedirs(work, exist_ok=True)
        carried: dict[str, int] = {}
        try:
            for name in MAPS:
                path = os.path.join(work, name)
                if name in step.keep or not os.path.exists(path):
                    continue
                if name in step.carry:
                    carried[name] = kbpf.obj_get(path)
                if name == "flows" and step.legacy_flows:
                    # Layout v1's programs keep adding flows to it until they are replaced:
                    # CarryLegacy copies those after the attachments.
                    os.rename(path, os.path.join(work, LEGACY_FLOWS))
                    continue
                os.unlink(path)
            bpf = self._compile(step.flavour, work)
            try:
                for name, old_fd in carried.items():
                    key, value = MAPS[name][1:3]
                    count = pinned.copy_entries(old_fd, bpf[name].get_fd(), key, value)
                    log.info("event=flows_carried_over map=%s entries=%d", name, count)
                if step.legacy_flows:
                    listen = {port: row.listen_port for row in step.rows
                              for port in (row.main_port, row.backup_port)}
                    with pinned.Pinned(os.path.join(work, LEGACY_FLOWS)) as old_fd:
                        count = _copy_v1_flows(old_fd, bpf["flows"].get_fd(), listen)
                    log.info("event=flows_carried_over map=%s entries=%d", LEGACY_FLOWS, count)
                # The steering as it is now, before any program of this build is pinned or
                # attached: the new programs steer every flow as the old ones did.
                active_fd = bpf["active"].get_fd()
                for slot, value in step.values:
                    kbpf.map_update(active_fd, struct.pack("=I", slot), struct.pack("=I", value))
                _fill_counts(bpf["counts"].get_fd(), (COUNT_ADDED, COUNT_DELETED))
                _write_rows(bpf["services"].get_fd(), bpf["targets"].get_fd(),
                            bpf["counts"].get_fd(), step.rows)
                for hook, function in bpf.zddd_programs.items():
                    os.rename(*pinned.stage(function.fd, os.path.join(work, hook)))
                kbpf.map_update(bpf["stamp"].get_fd(), ZERO,
                                step.flavour.stamp(self._source_text()))
            finally:
                bpf.cleanup()
        finally:
            for fd in carried.values():
                os.close(fd)
        if fresh:
            os.rename(work, final)
        self._active.forget()  # a new `active` map, maybe: the next flip opens the pinned one
        with pinned.Pinned(os.path.join(final, "counts")) as fd:  # for the metrics from now
            self._keep_counters(fd, kbpf.map_info(fd).id, step.targets,
                                step.flavour.flow_entries)



    def _clsact(self, step: Clsact) -> None:
        try:
            self._netlink().tc("add", "clsact", step.index)
        except Exception as e:
            if getattr(e, "code", None) != 17:  # EEXIST: someone added it meanwhile
                raise
        if step.index not in self._clsact_indexes():
            raise ApplyError(f"clsact on {step.ifname} did not stick", changed=True)

    def _attach(self, step: Attach) -> None:
        hook, index, ifname = step.hook, step.index, step.ifname
        pin = "egress" if hook == "egress" else "ingress"
        with pinned.Pinned(os.path.join(step.directory, pin)) as fd:
            prog_id = kbpf.prog_info(fd).id
            if hook == "xdp":
                self._attach_xdp(ifname, index, fd, step.mode)
                ok = self._xdp(index) == (prog_id, step.mode)
            else:
                self._netlink().tc("replace-filter", "bpf", index, handle=TC_HANDLE, fd=fd,
                                   name=self._filter_name(hook), parent=PARENT[hook],
                                   prio=TC_PRIORITY[self.name], classid=1, direct_action=True)
                ok = self._filter_ids(index).get(hook) == prog_id
        if not ok:
            raise ApplyError(f"{hook} program on {ifname} did not stick", changed=True)

    def _attach_everywhere(self, step: AttachEverywhere) -> None:
        interfaces, missing = self._resolve(step.interfaces, self._links())
        if missing:
            self._missing(Missing(missing))
        clsact = self._clsact_indexes()
        for ifname, index in sorted(interfaces.items()):
            if index not in clsact:
                self._clsact(Clsact(ifname, index))
            for hook in ("egress", self.ingress_hook):
                mode = self._xdp_mode(step.xdp_mode, ifname) if hook == "xdp" else 0
                self._attach(Attach(step.directory, ifname, index, hook, mode))

    def _attach_xdp(self, ifname: str, index: int, fd: int, mode: int) -> None:
        current, current_mode = self._xdp(index)
        if current and not self._is_ours(current):
            raise ApplyError(f"{ifname} has another XDP program (id {current}); zddd does not "
                             "replace it", changed=False)
        if current and current_mode != mode:
            rtnetlink.xdp_set(index, -1, current_mode)
        # Replacing our own program in the same mode is one atomic swap in the kernel.
        rtnetlink.xdp_set(index, fd, mode)

    def _detach_step(self, step: Detach) -> None:
        index = self._netlink().link_lookup(ifname=step.ifname)
        if index:
            self._detach(index[0], step.hook, step.mode)

    def _detach(self, index: int, hook: str, mode: int) -> None:
        if hook == "xdp":
            rtnetlink.xdp_set(index, -1, mode)
        else:
            self._netlink().tc("del-filter", "bpf", index, handle=TC_HANDLE,
                               parent=PARENT[hook], prio=TC_PRIORITY[self.name])

    # ---- leftover, remove -------------------------------------------------------------------

    def _inventory(self, desired: Desired):
        """(pin names in the directory, [(ifname, index, hook, mode)] attached), no compile."""
        directory = self._directory(desired)
        try:
            pins = sorted(os.listdir(directory))
        except OSError:
            pins = []
        attached = []
        clsact = self._clsact_indexes()
        for ifname, index, _, _, (prog_id, mode) in self._links():
            for hook in self._filter_ids(index) if index in clsact else ():
                attached.append((ifname, index, hook, 0))
            if self.ingress_hook == "xdp":
                if prog_id and self._is_ours(prog_id):
                    attached.append((ifname, index, "xdp", mode))
        return directory, pins, attached

    def leftover(self, desired: Desired) -> str | None:
        try:
            pinned.check_pin_dir(desired.pin_dir)  # another namespace's pins are not ours
            directory, pins, attached = self._inventory(desired)
        except Exception:
            return None
        if not pins and not attached:
            return None
        where = sorted({ifname for ifname, *_ in attached})
        weights = pinned_weights(os.path.dirname(directory), self.name)
        steering = "" if weights is None else " steering " + (", ".join(
            f"{port} {_describe(weight)}" for port, weight in sorted(weights.items()))
            or "nothing")
        return (f"{self.name} programs on {', '.join(where) or 'no interface'}, "
                f"{len(pins)} pins in {directory}{steering}")

    def remove(self, desired: Desired) -> None:
        pinned.check_pin_dir(desired.pin_dir)
        directory, _, attached = self._inventory(desired)
        for _, index, hook, mode in attached:
            self._detach(index, hook, mode)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        pin_dir = os.path.dirname(directory)
        for stale in Path(pin_dir).glob(f"{self.name}-build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        pinned.release(pin_dir)
        self._active.forget()
        self._close_counters()

    # ---- counters ---------------------------------------------------------------------------

    def flows_steered(self) -> dict[tuple[str, str], int]:
        if self._counters is None:
            return {}
        try:
            totals = self._counters.totals()
        except OSError:
            return {}
        return {name: totals.get(port, 0) for name, port in self._counters.ports}

    def flow_table(self) -> tuple[int, int] | None:
        """(entries in use, capacity). Entries are counted, not walked (a 1M-entry map would
        take seconds): added minus deleted by the programs, capped at capacity. LRU evictions
        are not counted, so once the map has filled this stays at capacity, which is what it
        is then: full, evicting the least recently used."""
        if self._counters is None:
            return None
        try:
            totals = self._counters.totals()
        except OSError:
            return None
        capacity = self._counters.capacity
        used = totals.get(COUNT_ADDED, 0) - totals.get(COUNT_DELETED, 0)
        return max(0, min(used, capacity)), capacity


BPF_MAP_LOOKUP_BATCH = 24
ENOTSUPP = 524  # the kernel's own errno for an operation a map type lacks


def _entries(fd: int, key_size: int, value_size: int, capacity: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map of at most `capacity` entries: one
    BPF_MAP_LOOKUP_BATCH (Linux 5.6+; a read's cost stays flat with the number of services),
    key by key where the kernel has no batch lookup."""
    keys = ctypes.create_string_buffer(key_size * capacity)
    values = ctypes.create_string_buffer(value_size * capacity)
    token = ctypes.create_string_buffer(8)
    attr = ctypes.create_string_buffer(struct.pack(
        "=QQQQIIQQ", 0, ctypes.addressof(token), ctypes.addressof(keys),
        ctypes.addressof(values), capacity, fd, 0, 0), 56)
    try:
        kbpf._bpf(BPF_MAP_LOOKUP_BATCH, attr)
    except FileNotFoundError:  # ENOENT: the end of the map was reached (the usual answer)
        pass
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP):
            raise
        handle = kbpf.MapHandle(fd, key_size, value_size)
        return [(key, raw) for key in handle.keys() if (raw := handle.lookup(key)) is not None]
    count = struct.unpack_from("=I", attr, 32)[0]
    return [(keys.raw[i * key_size:(i + 1) * key_size],
             values.raw[i * value_size:(i + 1) * value_size]) for i in range(count)]


def _copy_v1_flows(old_fd: int, new_fd: int, listen: dict[int, int]) -> int:
    """Copy layout v1's flow entries into a v2 flow map: the key gains the listen port of the
    entry's target's service (`listen`: target port -> listen port), and so does the value.
    An entry already in the new map (made by the new programs) is left as it is. Returns how
    many were copied."""
    old = kbpf.MapHandle(old_fd, V1_FLOW_KEY_SIZE, FLOW_VALUE_SIZE)
    copied = 0
    for key in old.keys():
        value = old.lookup(key)
        if value is None:  # evicted meanwhile
            continue
        port, _, seq = struct.unpack("=HHI", value)
        listen_port = listen.get(port)
        if listen_port is None:  # no service has that target any more
            continue
        try:
            kbpf.map_update(new_fd, key + struct.pack("=HH", listen_port, 0),
                            struct.pack("=HHI", port, listen_port, seq), BPF_NOEXIST)
        except FileExistsError:
            continue
        except OSError:  # E2BIG: the new map is full
            break
        copied += 1
    return copied


def _fill_counts(counts_fd: int, keys) -> None:
    """Zeroed per-CPU counters for `keys` that have none (the programs only add to one)."""
    zero = bytes(8 * kbpf.possible_cpus())
    for key in keys:
        try:
            kbpf.map_update(counts_fd, struct.pack("=I", key), zero, BPF_NOEXIST)
        except FileExistsError:
            pass


def _write_rows(services_fd: int, targets_fd: int, counts_fd: int, rows) -> None:
    """Services' elements, each one's `services` entry last (what makes the programs see it)."""
    for row in rows:
        _fill_counts(counts_fd, (row.main_port, row.backup_port))
        for port in (row.main_port, row.backup_port):
            kbpf.map_update(targets_fd, struct.pack("=I", port),
                            struct.pack("=I", row.listen_port))
        kbpf.map_update(services_fd, struct.pack("=I", row.listen_port),
                        SERVICE.pack(row.slot, row.main_port, row.backup_port))


def _write_targets(directory: str, rows) -> None:
    with pinned.Pinned(os.path.join(directory, "targets")) as targets, \
            pinned.Pinned(os.path.join(directory, "counts")) as counts:
        for row in rows:
            _fill_counts(counts, (row.main_port, row.backup_port))
            for port in (row.main_port, row.backup_port):
                kbpf.map_update(targets, struct.pack("=I", port),
                                struct.pack("=I", row.listen_port))


def _valid(value: int) -> bool:
    return 0 <= value <= 101


def _describe(weight: int | None | str) -> str:
    if weight is None:
        return "off"
    if isinstance(weight, str):
        return weight
    return {100: "main", 0: "backup"}.get(weight, f"main {weight}%")


def pinned_services(pin_dir: str, backend: str) -> dict[int, tuple[Row, int]] | None:
    """listen port -> (its `services` entry, its `active` value), from the pins of `backend`
    ("tc" or "xdp") under `pin_dir`; None if nothing is pinned. Pins do not belong to a network
    namespace, so a test can read this from outside the namespace (given the same bpffs mount).
    Needs no bcc."""
    directory = os.path.join(pin_dir, backend)
    try:
        with pinned.Pinned(os.path.join(directory, "services")) as services, \
                pinned.Pinned(os.path.join(directory, "active")) as active:
            handle = kbpf.MapHandle(services, 4, SERVICE.size)
            found = {}
            for key in handle.keys():
                raw = handle.lookup(key)
                if raw is None:
                    continue
                row = Row(struct.unpack("=I", key)[0], *SERVICE.unpack(raw))
                value = kbpf.map_lookup(active, struct.pack("=I", row.slot), 4)
                found[row.listen_port] = (row, struct.unpack("=I", value)[0] if value else 0)
            return found
    except OSError:
        return None


def pinned_weights(pin_dir: str, backend: str) -> dict[int, int | None | str] | None:
    """listen port -> main weight (None: off; "bad" for a value that is none) of every service
    pinned for `backend` under `pin_dir`; a layout v1 gives its one service. None if nothing
    is pinned."""
    found = pinned_services(pin_dir, backend)
    if found is not None:
        weights: dict[int, int | None | str] = {}
        for listen_port, (_, held) in found.items():
            try:
                weights[listen_port] = decode(held)
            except ValueError:
                weights[listen_port] = "bad"
        return weights
    directory = os.path.join(pin_dir, backend)
    try:  # layout v1: the stamp names the one service, `active` the port it steers to
        with pinned.Pinned(os.path.join(directory, "stamp")) as stamp, \
                pinned.Pinned(os.path.join(directory, "active")) as active:
            raw = kbpf.map_lookup(stamp, ZERO, STAMP_SIZE)
            value = kbpf.map_lookup(active, ZERO, 4)
    except OSError:
        return None
    if not raw or not value:
        return None
    fields = struct.unpack(STAMP_FORMAT, raw)
    (port,) = struct.unpack("=I", value)
    return {fields[2]: None if port == 0 else f"port {port}"}


def pinned_active_port(pin_dir: str, backend: str, listen_port: int = 8888) -> int | None:
    """The target port new connections to `listen_port` are steered to, per the pins: 0 for
    off, None if nothing is pinned for it (a split has no one port: -1)."""
    found = pinned_services(pin_dir, backend)
    if found is None or listen_port not in found:
        return None
    row, value = found[listen_port]
    try:
        weight = decode(value)
    except ValueError:
        return -1
    if weight is None:
        return 0
    return row.main_port if weight >= 100 else row.backup_port if weight <= 0 else -1


def _xdp_of(link: rtnetlink.Link) -> tuple[int, int]:
    if link.xdp_drv:
        return link.xdp_drv, XDP_FLAGS_DRV_MODE
    if link.xdp_skb:
        return link.xdp_skb, XDP_FLAGS_SKB_MODE
    return link.xdp_any, 0
