"""Raw bpf(2), pidfd and bpffs calls that bcc 0.26's Python binding does not offer.

What callers may rely on: every function raises OSError with the kernel's errno (and the
command's name in the message) when the kernel refuses; file descriptors returned are the
caller's to close (they are opened O_CLOEXEC by the kernel for bpf objects). Nothing here needs
bcc or a compiler, so it works where programs cannot be compiled (leftover, remove).

The layouts of `union bpf_attr` and of the info structs are the kernel's UAPI (linux/bpf.h),
which only ever grows at the end; only the leading fields used here are packed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

SYS_BPF = 321  # x86_64
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438

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
BPF_LINK_GET_NEXT_ID = 31
BPF_LINK_DETACH = 34

BPF_ANY = 0

BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_SOCKMAP = 15
BPF_PROG_TYPE_SK_LOOKUP = 30
BPF_SK_LOOKUP = 36  # expected attach type of sk_lookup programs
BPF_LINK_TYPE_NETNS = 5

BPF_FS_MAGIC = 0xCAFE4A11

_COMMANDS = {
    BPF_MAP_LOOKUP_ELEM: "BPF_MAP_LOOKUP_ELEM", BPF_MAP_UPDATE_ELEM: "BPF_MAP_UPDATE_ELEM",
    BPF_MAP_DELETE_ELEM: "BPF_MAP_DELETE_ELEM", BPF_MAP_GET_NEXT_KEY: "BPF_MAP_GET_NEXT_KEY",
    BPF_OBJ_PIN: "BPF_OBJ_PIN", BPF_OBJ_GET: "BPF_OBJ_GET",
    BPF_PROG_GET_FD_BY_ID: "BPF_PROG_GET_FD_BY_ID", BPF_MAP_GET_FD_BY_ID: "BPF_MAP_GET_FD_BY_ID",
    BPF_OBJ_GET_INFO_BY_FD: "BPF_OBJ_GET_INFO_BY_FD", BPF_LINK_CREATE: "BPF_LINK_CREATE",
    BPF_LINK_DETACH: "BPF_LINK_DETACH", BPF_LINK_GET_FD_BY_ID: "BPF_LINK_GET_FD_BY_ID",
    BPF_LINK_GET_NEXT_ID: "BPF_LINK_GET_NEXT_ID",
}

# Big enough for every attr used here; the kernel checks that bytes past what it knows are 0.
_ATTR_SIZE = 128


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    ret = _syscall(SYS_BPF, cmd, buf, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({_COMMANDS.get(cmd, cmd)}): {os.strerror(err)}")
    return ret


def _ptr(buf) -> int:
    return ctypes.addressof(buf)


# ---- maps -----------------------------------------------------------------------------------

def map_update(map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, struct.pack("=IIQQQ", map_fd, 0, _ptr(k), _ptr(v), flags))


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value, or None if the key has no element (ENOENT)."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, struct.pack("=IIQQQ", map_fd, 0, _ptr(k), _ptr(v), 0))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(map_fd: int, key: bytes) -> bool:
    """True if an element was deleted, False if there was none."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, struct.pack("=IIQ", map_fd, 0, _ptr(k)))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


class Updater:
    """One map element written again and again with the least work per call: the attr and
    the key/value buffers are built once (a switch is one of these calls, a few µs)."""

    def __init__(self, map_fd: int, key: bytes, value_size: int):
        self._key = ctypes.create_string_buffer(key, len(key))
        self._value = ctypes.create_string_buffer(value_size)
        self._attr = ctypes.create_string_buffer(
            struct.pack("=IIQQQ", map_fd, 0, _ptr(self._key), _ptr(self._value), BPF_ANY)
            .ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)

    def write(self, value: bytes) -> None:
        ctypes.memmove(self._value, value, len(value))
        if _syscall(SYS_BPF, BPF_MAP_UPDATE_ELEM, self._attr, _ATTR_SIZE) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"bpf(BPF_MAP_UPDATE_ELEM): {os.strerror(err)}")


# ---- pins, ids, info ------------------------------------------------------------------------

def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(BPF_OBJ_PIN, struct.pack("=QI", _ptr(p), fd))


def obj_get(path: str) -> int:
    """An fd for the object pinned at `path`; OSError ENOENT if nothing is pinned there."""
    p = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(BPF_OBJ_GET, struct.pack("=QI", _ptr(p), 0))


def map_fd_by_id(map_id: int) -> int:
    return _bpf(BPF_MAP_GET_FD_BY_ID, struct.pack("=I", map_id))


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("=I", prog_id))


def _info(fd: int, info: ctypes.Array) -> bytes:
    _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, len(info), _ptr(info)))
    return info.raw


class MapInfo:
    """struct bpf_map_info: type, id, key_size, value_size, max_entries, flags, name."""

    def __init__(self, fd: int):
        raw = _info(fd, ctypes.create_string_buffer(88))
        (self.type, self.id, self.key_size, self.value_size, self.max_entries,
         self.flags) = struct.unpack_from("=6I", raw)
        self.name = raw[24:40].split(b"\0")[0].decode()


class ProgInfo:
    """struct bpf_prog_info: type, id, name and the ids of the maps it uses."""

    def __init__(self, fd: int):
        map_ids = (ctypes.c_uint32 * 16)()
        info = ctypes.create_string_buffer(
            struct.pack("=II8sIIQQQII", 0, 0, b"", 0, 0, 0, 0, 0, 0, 16).ljust(80, b"\0"), 80)
        struct.pack_into("=Q", info, 56, ctypes.addressof(map_ids))
        raw = _info(fd, info)
        self.type, self.id = struct.unpack_from("=II", raw)
        nr_map_ids = struct.unpack_from("=I", raw, 52)[0]
        self.map_ids = tuple(map_ids[:min(nr_map_ids, 16)])
        self.name = raw[64:80].split(b"\0")[0].decode()


class LinkInfo:
    """struct bpf_link_info for a netns link: type, id, prog_id, netns_ino, attach_type.
    A link that was detached (BPF_LINK_DETACH, or its netns went away) has netns_ino 0."""

    def __init__(self, fd: int):
        raw = _info(fd, ctypes.create_string_buffer(64))
        self.type, self.id, self.prog_id = struct.unpack_from("=III", raw)
        self.netns_ino, self.attach_type = struct.unpack_from("=II", raw, 16)


def link_create_netns(prog_fd: int, netns_fd: int, attach_type: int = BPF_SK_LOOKUP) -> int:
    return _bpf(BPF_LINK_CREATE, struct.pack("=IIII", prog_fd, netns_fd, attach_type, 0))


def link_detach(link_fd: int) -> None:
    _bpf(BPF_LINK_DETACH, struct.pack("=I", link_fd))


def link_ids() -> list[int]:
    """The ids of every BPF link on the machine (all namespaces)."""
    ids, current = [], 0
    while True:
        buf = ctypes.create_string_buffer(struct.pack("=II", current, 0).ljust(_ATTR_SIZE,
                                                                               b"\0"))
        if _syscall(SYS_BPF, BPF_LINK_GET_NEXT_ID, buf, _ATTR_SIZE) < 0:
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                return ids
            raise OSError(err, f"bpf(BPF_LINK_GET_NEXT_ID): {os.strerror(err)}")
        current = struct.unpack_from("=I", buf, 4)[0]
        ids.append(current)


def link_fd_by_id(link_id: int) -> int:
    return _bpf(BPF_LINK_GET_FD_BY_ID, struct.pack("=I", link_id))


# ---- bpffs ----------------------------------------------------------------------------------

class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def is_bpffs(path: str) -> bool:
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {path}: {os.strerror(err)}")
    return (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def mount_bpffs(path: str) -> None:
    if _libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t bpf bpf {path}: {os.strerror(err)}")


def ensure_pin_dir(pin_dir: str) -> None:
    """Make `pin_dir` a directory on bpffs. If the filesystem under it is not bpffs, bpffs is
    mounted at /sys/fs/bpf when `pin_dir` is below it (the conventional place, which other
    BPF tools also find), else on `pin_dir` itself."""
    existing = pin_dir
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing) or "/"
    if not is_bpffs(existing):
        mount_at = "/sys/fs/bpf" if (pin_dir + "/").startswith("/sys/fs/bpf/") else pin_dir
        os.makedirs(mount_at, exist_ok=True)
        if not is_bpffs(mount_at):
            mount_bpffs(mount_at)
    os.makedirs(pin_dir, mode=0o700, exist_ok=True)


# ---- sockets of other processes ---------------------------------------------------------------

def pidfd_open(pid: int) -> int:
    fd = _syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_open({pid}): {os.strerror(err)}")
    return fd


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A duplicate of another process' fd (needs CAP_SYS_PTRACE over it). O_CLOEXEC is set."""
    fd = _syscall(SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(target_fd),
                  ctypes.c_uint(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
    return fd


def take_fd(pid: int, target_fd: int) -> int:
    pidfd = pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, target_fd)
    finally:
        os.close(pidfd)
