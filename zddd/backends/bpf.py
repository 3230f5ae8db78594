"""The rewriting eBPF backends: `tc` (clsact ingress + egress) and `xdp` (XDP ingress, clsact
egress). Both run bpf/steer.c, compiled with bcc; see its header for the packet semantics.

Kernel layout, per backend, under `<bpf_pin_dir>/<backend>/` (tc/ or xdp/):

    flows    LRU hash: (client addr, local addr, client port) -> (target port, SYN seq),
             set at the first SYN
    active   array[1]: the port new connections go to, 0 for off. Created mmapable: a switch is
             one 4-byte store into zddd's mapping of it (kbpf.ActiveSlot).
    counts   per-CPU hash: target port -> new flows steered; 65536/65537 -> entries added/deleted
    stamp    array[1]: magic, LAYOUT_VERSION, listen port, target ports, digest of the build
    ingress  the ingress program (tc classifier or XDP), pinned
    egress   the egress tc classifier, pinned

and on every configured interface a clsact qdisc with zddd's filters (priority TC_PRIORITY[name],
handle 1, named "zddd-<backend>-<hook>") and, for `xdp`, the XDP program (generic on lo and
whenever `xdp_mode = "generic"`). Programs stay attached and maps pinned when zddd exits.

What callers may rely on:
- `probe` compiles a private build (no pins, nothing attached) and raises BackendUnavailable
  with one line saying what is missing (bcc, kernel headers, the C source) before touching the
  kernel. `compile_seconds` holds how long that compile took.
- `read` adopts what is pinned and attached: it needs no compile, and a fresh instance reports
  the layout intact without a flip when the stamp, the maps, the programs and the attachments
  all match `desired`. `problems` names every difference.
- `plan` repairs from what `read` found: maps whose layout still fits are kept (an upgrade or
  repair keeps every established flow), programs are rebuilt when the source, ports or anything
  else in the stamp differ, and only missing or wrong attachments are redone. A pin removed by
  hand is re-pinned from the map the attached programs still use.
- `apply` never leaves two programs of zddd's on one hook: filters are replaced in place, XDP
  programs swapped atomically. ApplyError(changed=True) when a layout step had begun.
- `flows_steered` and `flow_table` only read maps, from any thread. `flow_table` counts
  entries added minus deleted by the programs (no walk of the map), capped at capacity.
- `leftover` and `remove` need no bcc and no compile. `remove` detaches this backend's
  programs from every interface and deletes its pin directory; clsact qdiscs stay (others'
  filters may share them), and so does a bpffs that zddd mounted.
- `interfaces = None` means every interface that is up and carries Ethernet framing (lo and
  Ethernet-like links; tunnels without a link layer are skipped). A configured interface that
  does not exist makes `plan` a single failing step (ApplyError, changed=False): nothing is
  built or flipped until it exists.
- The pin dir is made on a bpffs: a directory inside a mounted one, else bpffs is mounted on
  /sys/fs/bpf (for paths under it) or on the pin dir. A mount belongs to the mount namespace
  zddd runs in: `ip netns exec` and systemd's sandboxing give private ones, where a mount made
  by zddd vanishes when it exits (the programs keep running; a restart re-pins their maps).
- Capabilities: CAP_BPF + CAP_NET_ADMIN to load and attach, CAP_SYS_ADMIN to mount bpffs and to
  re-pin maps by id (BPF_MAP_GET_FD_BY_ID) after a pin was removed by hand.
- `pinned_active_port(pin_dir, backend)` reads the steering from the pins alone (for labs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import ApplyError, Backend, BackendUnavailable, Desired, KernelState, Plan
from ..kernel import bpf as kbpf
from ..kernel import bpffs, rtnetlink

log = logging.getLogger("zddd.bpf")

LAYOUT_VERSION = 1  # of the maps' key/value layout: a change means flows cannot be kept
STAMP_MAGIC = 0x7A646464  # "zddd"
MAX_TARGETS = 8
COUNT_ADDED, COUNT_DELETED = 65536, 65537

TC_PRIORITY = {"tc": 0x2DD, "xdp": 0x2DE}  # distinct, so neither backend replaces the other's
TC_HANDLE = 1
PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 2, 4
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
IFF_UP = 1
MODULES_DIR = Path("/lib/modules")  # bcc compiles against <this>/<release>/build

FLOW_KEY_SIZE, FLOW_VALUE_SIZE = 36, 8
STAMP_FORMAT = "=4I8IQ"
STAMP_SIZE = struct.calcsize(STAMP_FORMAT)

# name -> (map type, key size, value size, max entries or None for desired.flow_entries)
MAPS = {
    "flows": (kbpf.BPF_MAP_TYPE_LRU_HASH, FLOW_KEY_SIZE, FLOW_VALUE_SIZE, None),
    "active": (kbpf.BPF_MAP_TYPE_ARRAY, 4, 4, 1),
    "counts": (kbpf.BPF_MAP_TYPE_PERCPU_HASH, 4, 8, 64),
    "stamp": (kbpf.BPF_MAP_TYPE_ARRAY, 4, STAMP_SIZE, 1),
}
# Maps each pinned program must be using (checked against the pins by id).
PROG_MAPS = {"ingress": ("flows", "active", "counts"), "egress": ("flows",)}


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
class Build:
    """Everything a build of steer.c depends on besides the source."""

    listen_port: int
    ports: tuple[int, ...]
    flow_entries: int

    @classmethod
    def of(cls, desired: Desired) -> "Build":
        return cls(desired.listen_port, tuple(sorted({p for _, p in desired.ports})),
                   desired.flow_entries)

    def cflags(self, pin_dir: str | None) -> list[str]:
        check = "||".join(f"(p)=={port}" for port in self.ports) or "0"
        flags = [f"-DLISTEN_PORT={self.listen_port}", f"-DFLOW_ENTRIES={self.flow_entries}",
                 f"-DIS_TARGET_PORT(p)=({check})"]
        if pin_dir is not None:
            flags.append(f'-DPIN_DIR="{pin_dir}"')
        return flags

    def digest(self, source: bytes) -> int:
        h = hashlib.sha256(source)
        h.update(repr((self.listen_port, self.ports, self.flow_entries)).encode())
        return int.from_bytes(h.digest()[:8], "little")

    def stamp(self, source: bytes) -> bytes:
        ports = list(self.ports[:MAX_TARGETS]) + [0] * (MAX_TARGETS - len(self.ports))
        return struct.pack(STAMP_FORMAT, STAMP_MAGIC, LAYOUT_VERSION, self.listen_port,
                           len(self.ports), *ports, self.digest(source))


@dataclass
class Found:
    """What `read` saw, for `plan`: pinned objects by name (id, ok?), what the attached
    programs use, and zddd's attachments by interface."""

    directory: str
    pins: dict[str, int] = field(default_factory=dict)  # pin name -> object id
    bad_pins: set[str] = field(default_factory=set)  # present but unfit (type, size, stamp)
    keepable: set[str] = field(default_factory=set)  # maps a rebuild may keep
    orphans: dict[str, int] = field(default_factory=dict)  # unpinned map in use -> map id
    rebuild: bool = False
    interfaces: dict[str, int] = field(default_factory=dict)  # desired ifname -> index
    attached: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    clsact: set[str] = field(default_factory=set)
    foreign_xdp: set[str] = field(default_factory=set)  # someone else's XDP program there
    missing_interfaces: tuple[str, ...] = ()


class BpfBackend(Backend):
    """Shared by `tc` and `xdp`; the subclasses say which program goes on ingress."""

    name = "bpf"
    ingress_function = ""
    ingress_program_type = ""  # the bcc BPF class' name for it: SCHED_CLS or XDP
    ingress_hook = ""  # "ingress" (tc) or "xdp"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ipr = None
        self._active: kbpf.MapHandle | None = None
        self._active_id = 0
        # (the open `active` map it writes, it): a rebuilt map is a new handle, and a mapping of
        # the old map (which the mapping keeps alive) must never be written again.
        self._flipper: tuple[kbpf.MapHandle, kbpf.ActiveSlot] | None = None
        self._known_prog_ids: set[int] = set()  # programs this instance saw pinned as its own
        self._desired: Desired | None = None
        self.compile_seconds: float | None = None
        self._source: bytes | None = None

    # ---- probe ------------------------------------------------------------------------------

    def probe(self) -> None:
        unavailable = '; or use backend = "nftables"'
        try:
            import bcc  # noqa: F401
        except ImportError:
            raise BackendUnavailable(
                f"the {self.name} backend needs bcc: apt-get install python3-bpfcc"
                f"{unavailable}") from None
        release = os.uname().release
        if not (MODULES_DIR / release / "build" / "include").is_dir():
            raise BackendUnavailable(
                f"no kernel headers for {release} (bcc compiles zddd's BPF programs against "
                f"them): apt-get install linux-headers-{release}{unavailable}")
        source = source_path()
        if not source.exists():
            raise BackendUnavailable(f"zddd's BPF source is missing ({source}): reinstall zddd"
                                     f"{unavailable}")
        # A private build: maps unpinned, programs loaded but attached nowhere, all freed on
        # return. It proves compiler, headers and verifier before zddd changes anything.
        started = time.monotonic()
        try:
            bpf = self._compile(Build(8888, (80, 8080), 1024), None)
            bpf.cleanup()
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendUnavailable(f"bcc cannot build zddd's BPF programs ({first})"
                                     f"{unavailable}") from None
        self.compile_seconds = time.monotonic() - started
        log.info("event=bpf_compiled seconds=%.2f", self.compile_seconds)

    def _source_text(self) -> bytes:
        if self._source is None:
            self._source = source_path().read_bytes()
        return self._source

    def _compile(self, build: Build, pin_dir: str | None):
        from bcc import BPF

        bpf = BPF(text=self._source_text().decode(), cflags=build.cflags(pin_dir))
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

    def _links(self) -> list[tuple[str, int, int, int, tuple[int, int]]]:
        """(name, index, flags, type, (XDP program id, mode)) of every link in this network
        namespace, from one netlink dump."""
        return [(link.name, link.index, link.flags, link.type, _xdp_of(link))
                for link in rtnetlink.links()]

    def _clsact_indexes(self) -> set[int]:
        """Interfaces with a clsact qdisc, from one dump (only they can hold our filters)."""
        return {index for index, kind in rtnetlink.qdisc_kinds() if kind == "clsact"}

    def _resolve(self, desired: Desired, links) -> tuple[dict[str, int], tuple[str, ...]]:
        by_name = {name: (index, flags, kind) for name, index, flags, kind, _ in links}
        if desired.interfaces is None:
            # Every interface up that carries Ethernet framing (what steer.c parses): lo and
            # Ethernet-like links; tunnels without a link layer are left alone.
            chosen = {n: i for n, (i, flags, kind) in by_name.items()
                      if flags & IFF_UP and kind in (ARPHRD_ETHER, ARPHRD_LOOPBACK)}
            return chosen, ()
        chosen, missing = {}, []
        for name in desired.interfaces:
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

    def _xdp(self, index: int) -> tuple[int, int]:
        """(program id, mode flag) of the XDP program on the interface, (0, 0) if none."""
        for link in rtnetlink.links():
            if link.index == index:
                return _xdp_of(link)
        return 0, 0

    def _xdp_mode(self, desired: Desired, ifname: str) -> int:
        if ifname == "lo" or desired.xdp_mode == "generic":
            return XDP_FLAGS_SKB_MODE
        return XDP_FLAGS_DRV_MODE

    # ---- read -------------------------------------------------------------------------------

    def _directory(self, desired: Desired) -> str:
        return os.path.join(_valid_pin_dir(desired.pin_dir), self.name)

    def read(self, desired: Desired) -> KernelState | None:
        self._desired = desired
        try:
            return self._read(desired)
        except ApplyError:
            raise
        except Exception as e:
            raise ApplyError(f"cannot read the {self.name} data plane: {e}") from None

    def _read(self, desired: Desired) -> KernelState | None:
        found = Found(self._directory(desired))
        problems: list[str] = []
        build = Build.of(desired)
        fds: dict[str, int] = {}
        try:
            self._read_pins(found, build, fds, problems)
            active_port = self._read_active(found, fds)
            self._read_attachments(found, desired, problems)
        finally:
            for fd in fds.values():
                os.close(fd)
        if not found.pins and not any(found.attached.values()):
            return None
        by_port = {port: name for name, port in desired.ports}
        active = by_port.get(active_port)
        if active_port and active is None:
            problems.append(f"active map steers to port {active_port}, which is no target")
        return KernelState(active=active, intact=not problems, found=found,
                           problems=tuple(problems))

    def _read_pins(self, found: Found, build: Build, fds: dict[str, int], problems: list[str]):
        directory = found.directory
        infos: dict[str, object] = {}
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
            want_entries = build.flow_entries if entries is None else entries
            if not isinstance(info, kbpf.MapInfo) or (
                    info.type, info.key_size, info.value_size, info.max_entries) != (
                    kind, key, value, want_entries):
                found.bad_pins.add(name)
                problems.append(f"map {name} has another layout")
        stamp = self._read_stamp(fds, found)
        stamp_version = stamp[1] if stamp else None
        if stamp is None or stamp[0] != STAMP_MAGIC:
            problems.append("stamp missing")
        elif stamp_version != LAYOUT_VERSION:
            problems.append(f"layout version {stamp_version}, this zddd builds {LAYOUT_VERSION}")
        elif stamp[-1] != build.digest(self._source_text()):
            problems.append("programs built from another source or configuration")
        # Keep a map through a rebuild when its layout fits and no other layout version
        # wrote it (a stamp of another version means the flows' key layout may differ).
        for name in MAPS:
            if name in found.pins and name not in found.bad_pins and name != "stamp" and (
                    stamp_version in (None, LAYOUT_VERSION)):
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

    def _prog_type(self, hook: str) -> int:
        if hook == "ingress" and self.ingress_hook == "xdp":
            return kbpf.BPF_PROG_TYPE_XDP
        return kbpf.BPF_PROG_TYPE_SCHED_CLS

    def _read_stamp(self, fds, found: Found):
        if "stamp" not in fds or "stamp" in found.bad_pins:
            return None
        handle = kbpf.MapHandle(fds["stamp"], 4, STAMP_SIZE)
        raw = handle.lookup(b"\0\0\0\0")
        return struct.unpack(STAMP_FORMAT, raw) if raw else None

    def _read_active(self, found: Found, fds) -> int:
        """The active port, and keep the active map open for the flip."""
        if "active" not in fds or "active" in found.bad_pins:
            return 0
        with self._lock:
            if self._active is None or self._active_id != found.pins["active"]:
                self._close_active()
                self._active = kbpf.MapHandle(os.dup(fds["active"]), 4, 4)
                self._active_id = found.pins["active"]
            raw = self._active.lookup(b"\0\0\0\0")
        return struct.unpack("=I", raw)[0] if raw else 0

    def _read_attachments(self, found: Found, desired: Desired, problems: list[str]) -> None:
        links = self._links()
        found.interfaces, found.missing_interfaces = self._resolve(desired, links)
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
                elif hook == "xdp" and got[1] != self._xdp_mode(desired, ifname):
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

    def _find_orphans(self, found: Found, prog_id: int) -> None:
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
        self._desired = desired
        port = desired.port_of(desired.active) if desired.active is not None else 0
        flip = ("flip", port)
        if current is not None and current.intact:
            return Plan((), None if current.active == desired.active else flip)
        found = current.found if current is not None else Found(self._directory(desired))
        interfaces = found.interfaces or self._resolve(desired, self._links())[0]
        if desired.interfaces is not None:
            missing = [n for n in desired.interfaces if n not in interfaces]
            if missing:
                # Nothing to attach to: fail before building anything.
                return Plan((("missing", tuple(missing)),), flip)
        steps: list[tuple] = []
        for name, map_id in sorted(found.orphans.items()):
            steps.append(("repin", found.directory, name, map_id))
        rebuild = current is None or found.rebuild
        if rebuild:
            keep = tuple(sorted(found.keepable | set(found.orphans)))
            build = Build.of(desired)
            steps.append(("build", _valid_pin_dir(desired.pin_dir), build.listen_port,
                          build.ports, build.flow_entries, keep))
        want = {"ingress": found.pins.get("ingress"), "egress": found.pins.get("egress")}
        for ifname, index in sorted(interfaces.items()):
            attached = found.attached.get(ifname, {})
            if ifname not in found.clsact:
                steps.append(("clsact", ifname, index))
            for hook in ("egress", self.ingress_hook):
                pin = "egress" if hook == "egress" else "ingress"
                got = attached.get(hook)
                mode = self._xdp_mode(desired, ifname) if hook == "xdp" else 0
                if rebuild or got is None or got[0] != want[pin] or got[1] != mode:
                    steps.append(("attach", found.directory, ifname, index, hook, mode))
        for ifname, hooks in sorted(found.attached.items()):
            for hook in sorted(hooks):
                if ifname not in interfaces or hook not in ("egress", self.ingress_hook):
                    steps.append(("detach", ifname, hooks[hook][1], hook))
        return Plan(tuple(steps), flip)

    # ---- apply ------------------------------------------------------------------------------

    def apply(self, plan: Plan) -> None:
        done = 0
        for step in plan.layout:
            try:
                getattr(self, f"_step_{step[0]}")(*step[1:])
            except ApplyError as e:
                raise ApplyError(str(e), changed=done > 0 or e.changed) from None
            except Exception as e:
                raise ApplyError(f"{step[0]} {_describe(step)}: {e}", changed=True) from None
            done += 1
        if plan.flip is not None:
            try:
                self._flip(plan.flip[1])
            except OSError as e:
                raise ApplyError(f"flip: {e}", changed=done > 0) from None

    def _flip(self, port: int) -> None:
        with self._lock:
            handle = self._active
            if handle is None:
                handle = self._open_active()
            if self._flipper is None or self._flipper[0] is not handle:
                # Mapped (or the syscall's arguments built) once per open map: a flip is then
                # one store.
                if self._flipper is not None:
                    self._flipper[1].close()
                self._flipper = (handle, kbpf.ActiveSlot(handle.fd))
            self._flipper[1].write(port)

    def _close_active(self) -> None:
        """Forget the open `active` map and its mapping (under the lock)."""
        if self._flipper is not None:
            self._flipper[1].close()
            self._flipper = None
        if self._active is not None:
            self._active.close()
            self._active = None

    def _open_active(self) -> kbpf.MapHandle:
        desired = self._desired
        assert desired is not None, "read or plan before apply"
        fd = kbpf.obj_get(os.path.join(self._directory(desired), "active"))
        self._active = kbpf.MapHandle(fd, 4, 4)
        self._active_id = kbpf.map_info(fd).id
        return self._active

    def _step_missing(self, names: tuple[str, ...]) -> None:
        raise ApplyError(f"configured interfaces not found: {', '.join(names)}", changed=False)

    def _step_repin(self, directory: str, name: str, map_id: int) -> None:
        bpffs.ensure_bpffs_dir(directory)  # the whole directory may have gone
        fd = kbpf.map_fd_by_id(map_id)
        try:
            kbpf.obj_pin(fd, os.path.join(directory, name))
        finally:
            os.close(fd)

    def _step_build(self, pin_dir: str, listen_port: int, ports: tuple[int, ...],
                    flow_entries: int, keep: tuple[str, ...]) -> None:
        """Compile and load with the maps pinned; reuse the maps in `keep`. A first build
        happens in a temporary directory renamed into place when complete; a rebuild pins its
        programs under temporary names and renames them over the old pins."""
        bpffs.ensure_bpffs_dir(pin_dir)
        final = os.path.join(pin_dir, self.name)
        for stale in Path(pin_dir).glob(f"{self.name}-build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        fresh = not os.path.isdir(final)
        work = os.path.join(pin_dir, f"{self.name}-build-{secrets.token_hex(4)}") if fresh \
            else final
        os.makedirs(work, exist_ok=True)
        for name in MAPS:
            if name not in keep and os.path.exists(os.path.join(work, name)):
                os.unlink(os.path.join(work, name))
        build = Build(listen_port, ports, flow_entries)
        bpf = self._compile(build, work)
        try:
            for hook, function in bpf.zddd_programs.items():
                temporary = os.path.join(work, f"{hook}-new")
                if os.path.exists(temporary):
                    os.unlink(temporary)
                kbpf.obj_pin(function.fd, temporary)
                os.rename(temporary, os.path.join(work, hook))
            counts = bpf["counts"]
            for key in (*ports, COUNT_ADDED, COUNT_DELETED):
                if counts.get(counts.Key(key)) is None:
                    zero = counts.Leaf(*([0] * kbpf.possible_cpus()))
                    counts[counts.Key(key)] = zero
            stamp_fd = bpf["stamp"].get_fd()
            kbpf.MapHandle(stamp_fd, 4, STAMP_SIZE).update(
                b"\0\0\0\0", build.stamp(self._source_text()))
        finally:
            bpf.cleanup()
        if fresh:
            os.rename(work, final)
        with self._lock:
            self._close_active()

    def _step_clsact(self, ifname: str, index: int) -> None:
        try:
            self._netlink().tc("add", "clsact", index)
        except Exception as e:
            if getattr(e, "code", None) != 17:  # EEXIST: someone added it meanwhile
                raise
        if index not in self._clsact_indexes():
            raise ApplyError(f"clsact on {ifname} did not stick", changed=True)

    def _step_attach(self, directory: str, ifname: str, index: int, hook: str, mode: int):
        pin = "egress" if hook == "egress" else "ingress"
        fd = kbpf.obj_get(os.path.join(directory, pin))
        try:
            prog_id = kbpf.prog_info(fd).id
            if hook == "xdp":
                self._attach_xdp(ifname, index, fd, mode)
                ok = self._xdp(index) == (prog_id, mode)
            else:
                self._netlink().tc("replace-filter", "bpf", index, handle=TC_HANDLE, fd=fd,
                                   name=self._filter_name(hook), parent=PARENT[hook],
                                   prio=TC_PRIORITY[self.name], classid=1, direct_action=True)
                ok = self._filter_ids(index).get(hook) == prog_id
        finally:
            os.close(fd)
        if not ok:
            raise ApplyError(f"{hook} program on {ifname} did not stick", changed=True)

    def _attach_xdp(self, ifname: str, index: int, fd: int, mode: int) -> None:
        current, current_mode = self._xdp(index)
        if current and not self._is_ours(current):
            raise ApplyError(f"{ifname} has another XDP program (id {current}); zddd does not "
                             "replace it", changed=False)
        if current and current_mode != mode:
            rtnetlink.xdp_set(index, -1, current_mode)
        # Replacing our own program in the same mode is one atomic swap in the kernel.
        rtnetlink.xdp_set(index, fd, mode)

    def _step_detach(self, ifname: str, mode: int, hook: str) -> None:
        index = self._netlink().link_lookup(ifname=ifname)
        if not index:
            return
        self._detach(index[0], hook, mode)

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
            directory, pins, attached = self._inventory(desired)
        except Exception:
            return None
        if not pins and not attached:
            return None
        where = sorted({ifname for ifname, *_ in attached})
        port = pinned_active_port(os.path.dirname(directory), self.name)
        steering = "" if port is None else (
            f" steering to port {port}" if port else " steering nothing")
        return (f"{self.name} programs on {', '.join(where) or 'no interface'}, "
                f"{len(pins)} pins in {directory}{steering}")

    def remove(self, desired: Desired) -> None:
        directory, _, attached = self._inventory(desired)
        for _, index, hook, mode in attached:
            self._detach(index, hook, mode)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        pin_dir = os.path.dirname(directory)
        for stale in Path(pin_dir).glob(f"{self.name}-build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        with self._lock:
            self._close_active()

    # ---- counters ---------------------------------------------------------------------------

    def _counts(self) -> tuple[dict[int, int], int] | None:
        desired = self._desired
        if desired is None:
            return None
        directory = self._directory(desired)
        try:
            fd = kbpf.obj_get(os.path.join(directory, "counts"))
        except OSError:
            return None
        try:
            handle = kbpf.MapHandle(fd, 4, 8, percpu=True)
            keys = {p for _, p in desired.ports} | {COUNT_ADDED, COUNT_DELETED}
            totals = {}
            for key in keys:
                values = handle.lookup_percpu(struct.pack("=I", key))
                totals[key] = sum(struct.unpack_from("=Q", v)[0] for v in values or ())
        finally:
            os.close(fd)
        capacity = desired.flow_entries
        try:
            fd = kbpf.obj_get(os.path.join(directory, "flows"))
            try:
                capacity = kbpf.map_info(fd).max_entries
            finally:
                os.close(fd)
        except OSError:
            pass
        return totals, capacity

    def flows_steered(self) -> dict[str, int]:
        counted = self._counts()
        if counted is None or self._desired is None:
            return {}
        totals, _ = counted
        return {name: totals.get(port, 0) for name, port in self._desired.ports}

    def flow_table(self) -> tuple[int, int] | None:
        """(entries in use, capacity). Entries are counted, not walked (a 1M-entry map would
        take seconds): added minus deleted by the programs, capped at capacity. LRU evictions
        are not counted, so once the map has filled this stays at capacity, which is what it
        is then: full, evicting the least recently used."""
        counted = self._counts()
        if counted is None:
            return None
        totals, capacity = counted
        used = totals.get(COUNT_ADDED, 0) - totals.get(COUNT_DELETED, 0)
        return max(0, min(used, capacity)), capacity

    def close(self) -> None:
        with self._lock:
            self._close_active()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


class TcBackend(BpfBackend):
    name = "tc"
    ingress_function = "zddd_ingress"
    ingress_hook = "ingress"
    ingress_program_type = "SCHED_CLS"


class XdpBackend(BpfBackend):
    name = "xdp"
    ingress_function = "zddd_xdp"
    ingress_hook = "xdp"
    ingress_program_type = "XDP"


def pinned_active_port(pin_dir: str, backend: str) -> int | None:
    """The port new connections are steered to according to the pinned `active` map of
    `backend` ("tc" or "xdp") under `pin_dir`: 0 for off, None if nothing is pinned. Pins do
    not belong to a network namespace, so a test can read this from outside the namespace
    (given the same bpffs mount). Needs no bcc."""
    try:
        fd = kbpf.obj_get(os.path.join(pin_dir, backend, "active"))
    except OSError:
        return None
    try:
        raw = kbpf.MapHandle(fd, 4, 4).lookup(b"\0\0\0\0")
    finally:
        os.close(fd)
    return struct.unpack("=I", raw)[0] if raw else None


def _xdp_of(link: rtnetlink.Link) -> tuple[int, int]:
    if link.xdp_drv:
        return link.xdp_drv, XDP_FLAGS_DRV_MODE
    if link.xdp_skb:
        return link.xdp_skb, XDP_FLAGS_SKB_MODE
    return link.xdp_any, 0


def _describe(step: tuple) -> str:
    return " ".join(str(part) for part in step[1:] if not isinstance(part, tuple))
