"""bpf(2) through ctypes: map elements, pins, object info, ids, and netns links.

What callers may rely on: nothing here needs bcc or a compiler, so reading, flipping and
removing pinned objects works on machines where programs cannot be compiled. Every function
raises OSError with the kernel's errno (so FileNotFoundError for ENOENT; the bpf command's name
is in the message) when the kernel refuses. File descriptors returned are the caller's to close
(the kernel opens bpf objects O_CLOEXEC).

The layouts of `union bpf_attr` and of the info structs are the kernel's UAPI (linux/bpf.h),
which only ever grows at the end; only the leading fields used here are packed, and the kernel
reads the fields a shorter attr leaves out as 0.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# bpf(2) has a number of its own on each architecture.
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
            "riscv64": 280}.get(platform.machine(), 321)

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_UPDATE = 29
BPF_LINK_GET_NEXT_ID = 31
BPF_LINK_DETACH = 34

_COMMANDS = {value: name for name, value in globals().items()
             if name.startswith(("BPF_MAP_", "BPF_OBJ_", "BPF_PROG_", "BPF_LINK_"))}

BPF_ANY = 0  # map update flag: create or replace
BPF_F_MMAPABLE = 1 << 10  # map flag: an array that can be mapped into memory (ActiveSlot)

BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_SOCKMAP = 15

BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
BPF_PROG_TYPE_SK_LOOKUP = 30

BPF_SK_LOOKUP = 36  # the attach type of sk_lookup programs
BPF_LINK_TYPE_NETNS = 5


def _bpf(cmd: int, attr: bytes | ctypes.Array) -> int:
    """One bpf(2) call. `attr` is packed bytes, or a buffer the caller keeps (for calls made
    again and again, and for commands whose answer the kernel writes into the attr)."""
    if isinstance(attr, bytes):
        attr = ctypes.create_string_buffer(attr, len(attr))
    rc = _syscall(_SYS_BPF, cmd, attr, len(attr))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({_COMMANDS.get(cmd, cmd)}): {os.strerror(err)}")
    return rc


def _addr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


# ---- maps -------------------------------------------------------------------------------------

def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0) -> int:
    """A new map's fd (unpinned: it lives while an fd, a pin or a program holds it)."""
    return _bpf(BPF_MAP_CREATE, struct.pack("=5I", map_type, key_size, value_size, max_entries,
                                            flags))


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, struct.pack("=IIQQQ", map_fd, 0, _addr(k), _addr(v), flags))


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value, or None if the key has no element (ENOENT)."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, struct.pack("=IIQQQ", map_fd, 0, _addr(k), _addr(v), 0))
    except FileNotFoundError:
        return None
    return v.raw


def map_delete(map_fd: int, key: bytes) -> bool:
    """True if an element was deleted, False if there was none."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, struct.pack("=IIQ", map_fd, 0, _addr(k)))
    except FileNotFoundError:
        return False
    return True


class ActiveSlot:
    """A u32 of a small array map (zddd's `active`), written again and again with
    the least work per call. A map created with BPF_F_MMAPABLE is written through a shared
    mapping: a switch is one aligned 4-byte store, which the programs' next lookup sees (no
    syscall, and no reader can see half of it). A map without the flag (pinned by an older
    zddd, kept across an upgrade) is written with BPF_MAP_UPDATE_ELEM from buffers built once."""

    def __init__(self, map_fd: int):
        self.mapped = False
        self._fd = map_fd  # the caller's: it keeps it open while this is used
        # An array map's elements are 8-byte aligned in its memory: element i of u32s is the
        # (2 * i)th u32 of the mapping.
        info = map_info(map_fd)
        self._stride = (info.value_size + 7) // 8 * 2
        size = -(-info.max_entries * self._stride * 4 // mmap.PAGESIZE) * mmap.PAGESIZE
        try:
            # mmap keeps its own duplicate of the descriptor: the map lives while this does.
            self._mmap = mmap.mmap(map_fd, max(size, mmap.PAGESIZE), mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:  # EINVAL: the map was created without BPF_F_MMAPABLE
            self._key = ctypes.create_string_buffer(4)
            self._value = ctypes.create_string_buffer(4)
            packed = struct.pack("=IIQQQ", map_fd, 0, _addr(self._key), _addr(self._value),
                                 BPF_ANY)
            self._attr = ctypes.create_string_buffer(packed, len(packed))
        else:
            # An item of an "I" memoryview is stored with one memcpy of sizeof(unsigned int),
            # which compiles to a single store; struct.pack_into("=I") would go byte by byte.
            self._slot = memoryview(self._mmap).cast("I")
            self.mapped = True

    def write(self, value: int, index: int = 0) -> None:
        """Store `value` in element `index` (0 for a one-element map)."""
        if self.mapped:
            self._slot[index * self._stride] = value
        else:
            struct.pack_into("=I", self._key, 0, index)
            struct.pack_into("=I", self._value, 0, value)
            _bpf(BPF_MAP_UPDATE_ELEM, self._attr)

    def read(self, index: int = 0) -> int:
        """The value in element `index` (0 if the map has none there)."""
        if self.mapped:
            return self._slot[index * self._stride]
        raw = map_lookup(self._fd, struct.pack("=I", index), 4)
        return struct.unpack("=I", raw)[0] if raw else 0

    def close(self) -> None:
        if self.mapped:
            self._slot.release()
            self._mmap.close()
            self.mapped = False


class MapHandle:
    """An open map: fixed key and value buffers, so a lookup or update is one syscall with no
    allocation (a flip is one `update`). Per-CPU maps return the values of every possible CPU."""

    def __init__(self, fd: int, key_size: int, value_size: int, percpu: bool = False):
        self.fd = fd
        self.key = ctypes.create_string_buffer(key_size)
        slot = (value_size + 7) & ~7
        self.value_size = slot * possible_cpus() if percpu else value_size
        self.value = ctypes.create_string_buffer(self.value_size)
        self.next_key = ctypes.create_string_buffer(key_size)
        self._attr = ctypes.create_string_buffer(32)

    def _elem(self, cmd: int, key: bytes, second, flags: int = 0) -> int:
        ctypes.memmove(self.key, key, len(self.key))
        struct.pack_into("=IIQQQ", self._attr, 0, self.fd, 0, _addr(self.key), _addr(second),
                         flags)
        return _bpf(cmd, self._attr)

    def lookup(self, key: bytes) -> bytes | None:
        try:
            self._elem(BPF_MAP_LOOKUP_ELEM, key, self.value)
        except FileNotFoundError:
            return None
        return self.value.raw

    def keys(self) -> list[bytes]:
        """Every key in the map now (a hash map changing meanwhile may skip or repeat some)."""
        found: list[bytes] = []
        struct.pack_into("=IIQQ", self._attr, 0, self.fd, 0, 0, _addr(self.next_key))
        while True:  # the first call has no key: the kernel answers the first one
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, self._attr)
            except FileNotFoundError:
                return found
            found.append(self.next_key.raw)
            ctypes.memmove(self.key, self.next_key, len(self.key))
            struct.pack_into("=IIQQ", self._attr, 0, self.fd, 0, _addr(self.key),
                             _addr(self.next_key))

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        ctypes.memmove(self.value, value, len(value))
        self._elem(BPF_MAP_UPDATE_ELEM, key, self.value, flags)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_cpus: int | None = None


def possible_cpus() -> int:
    """How many values a per-CPU map holds per key (the kernel's possible CPUs)."""
    global _cpus
    if _cpus is None:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
        count = 0
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
        _cpus = count
    return _cpus


# ---- pins, ids, info --------------------------------------------------------------------------

def obj_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(BPF_OBJ_PIN, struct.pack("=QII", _addr(name), fd, 0))


def obj_get(path: str) -> int:
    """An fd for the object pinned at `path` (FileNotFoundError if nothing is pinned there)."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(BPF_OBJ_GET, struct.pack("=QII", _addr(name), 0, 0))


def _fd_by_id(cmd: int, id_: int) -> int:
    return _bpf(cmd, struct.pack("=III", id_, 0, 0))


def prog_fd_by_id(id_: int) -> int:
    return _fd_by_id(BPF_PROG_GET_FD_BY_ID, id_)


def map_fd_by_id(id_: int) -> int:
    return _fd_by_id(BPF_MAP_GET_FD_BY_ID, id_)


def link_fd_by_id(id_: int) -> int:
    return _fd_by_id(BPF_LINK_GET_FD_BY_ID, id_)


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    name: str
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class LinkInfo:
    """A netns link's: a link that was detached (BPF_LINK_DETACH, or its netns went away) has
    netns_ino 0."""

    type: int
    id: int
    prog_id: int
    netns_ino: int
    attach_type: int


def _info(fd: int, size: int, extra=None) -> bytes:
    info = ctypes.create_string_buffer(size)
    if extra is not None:
        extra(info)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, size, _addr(info)))
    return info.raw


def _name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, 88)
    type_, id_, key, value, entries, flags = struct.unpack_from("=6I", raw, 0)
    return MapInfo(type_, id_, key, value, entries, flags, _name(raw[24:40]))


def prog_info(fd: int) -> ProgInfo:
    """The program's type, id, name and the ids of the maps it uses (up to 16)."""
    ids = (ctypes.c_uint32 * 16)()

    def ask_for_map_ids(info):
        struct.pack_into("=IQ", info, 52, 16, ctypes.addressof(ids))

    raw = _info(fd, 128, ask_for_map_ids)
    type_, id_ = struct.unpack_from("=II", raw, 0)
    count = min(struct.unpack_from("=I", raw, 52)[0], 16)
    return ProgInfo(type_, id_, _name(raw[64:80]), tuple(ids[:count]))


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd, 64)
    type_, id_, prog_id = struct.unpack_from("=III", raw, 0)
    netns_ino, attach_type = struct.unpack_from("=II", raw, 16)
    return LinkInfo(type_, id_, prog_id, netns_ino, attach_type)


# ---- BPF links (sk_lookup attaches to a network namespace through one) ----------------------

def link_create_netns(prog_fd: int, netns_fd: int, attach_type: int = BPF_SK_LOOKUP) -> int:
    return _bpf(BPF_LINK_CREATE, struct.pack("=IIII", prog_fd, netns_fd, attach_type, 0))


def link_update(link_fd: int, prog_fd: int) -> None:
    """Replace the program of a link in one step (BPF_LINK_UPDATE): no moment in which
    neither or both run."""
    _bpf(BPF_LINK_UPDATE, struct.pack("=IIII", link_fd, prog_fd, 0, 0))


def link_detach(link_fd: int) -> None:
    _bpf(BPF_LINK_DETACH, struct.pack("=I", link_fd))


def link_ids() -> list[int]:
    """The ids of every BPF link on the machine (all namespaces)."""
    ids: list[int] = []
    current = 0
    attr = ctypes.create_string_buffer(8)  # start_id in, next_id out
    while True:
        struct.pack_into("=II", attr, 0, current, 0)
        try:
            _bpf(BPF_LINK_GET_NEXT_ID, attr)
        except FileNotFoundError:
            return ids
        current = struct.unpack_from("=I", attr, 4)[0]
        ids.append(current)
