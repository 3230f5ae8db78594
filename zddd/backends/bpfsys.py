"""The bpf(2) calls the BPF backends make outside bcc, through ctypes.

Reading, flipping and removing pinned objects needs no compiler and no bcc: `leftover` and
`remove` work on machines where bcc cannot run, and a flip is one BPF_MAP_UPDATE_ELEM on a map
opened from its pin. Every function raises OSError (with errno) when the kernel refuses.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
            "riscv64": 280}.get(platform.machine(), 321)

MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
OBJ_PIN, OBJ_GET = 6, 7
PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD = 13, 14, 15

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2

MAP_TYPE_HASH, MAP_TYPE_ARRAY, MAP_TYPE_PERCPU_HASH, MAP_TYPE_LRU_HASH = 1, 2, 5, 9
PROG_TYPE_SCHED_CLS, PROG_TYPE_XDP = 3, 6

BPF_FS_MAGIC = 0xCAFE4A11

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    rc = _libc.syscall(_SYS_BPF, cmd, attr, len(attr))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def _addr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def obj_get(path: str) -> int:
    """An fd for the object pinned at `path` (FileNotFoundError if there is none)."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    attr = ctypes.create_string_buffer(struct.pack("=QII", _addr(name), 0, 0), 16)
    return _bpf(OBJ_GET, attr)


def obj_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(os.fsencode(path))
    attr = ctypes.create_string_buffer(struct.pack("=QII", _addr(name), fd, 0), 16)
    _bpf(OBJ_PIN, attr)


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
        self._slot = slot

    def _elem(self, cmd: int, key: bytes, second, flags: int = 0) -> int:
        ctypes.memmove(self.key, key, len(self.key))
        struct.pack_into("=IIQQQ", self._attr, 0, self.fd, 0, _addr(self.key), _addr(second),
                         flags)
        return _bpf(cmd, self._attr)

    def lookup(self, key: bytes) -> bytes | None:
        try:
            self._elem(MAP_LOOKUP_ELEM, key, self.value)
        except FileNotFoundError:
            return None
        return self.value.raw

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        raw = self.lookup(key)
        if raw is None:
            return None
        return [raw[i:i + self._slot] for i in range(0, len(raw), self._slot)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        ctypes.memmove(self.value, value, len(value))
        self._elem(MAP_UPDATE_ELEM, key, self.value, flags)

    def delete(self, key: bytes) -> bool:
        try:
            self._elem(MAP_DELETE_ELEM, key, None)
        except FileNotFoundError:
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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


def _info(fd: int, size: int, extra=None) -> bytes:
    info = ctypes.create_string_buffer(size)
    if extra is not None:
        extra(info)
    attr = ctypes.create_string_buffer(struct.pack("=IIQ", fd, size, _addr(info)), 16)
    _bpf(OBJ_GET_INFO_BY_FD, attr)
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


def _fd_by_id(cmd: int, id_: int) -> int:
    attr = ctypes.create_string_buffer(struct.pack("=III", id_, 0, 0), 12)
    return _bpf(cmd, attr)


def prog_fd_by_id(id_: int) -> int:
    return _fd_by_id(PROG_GET_FD_BY_ID, id_)


def map_fd_by_id(id_: int) -> int:
    return _fd_by_id(MAP_GET_FD_BY_ID, id_)


def xdp_set(index: int, fd: int, flags: int) -> None:
    """Attach the XDP program `fd` to interface `index` (fd -1: detach), in the mode `flags`
    says (XDP_FLAGS_SKB_MODE 2, XDP_FLAGS_DRV_MODE 4). One RTM_SETLINK on a netlink socket of
    its own: Debian's pyroute2 0.7 encodes IFLA_XDP_FLAGS as a big-endian u16, which the
    kernel refuses, and without flags the kernel picks the mode itself."""
    import socket

    def nla(kind: int, payload: bytes) -> bytes:
        header = struct.pack("=HH", 4 + len(payload), kind)
        return header + payload + b"\0" * (-len(payload) % 4)

    ifla_xdp, ifla_xdp_fd, ifla_xdp_flags, nla_f_nested = 43, 1, 3, 0x8000
    rtm_setlink, nlm_f_request, nlm_f_ack, nlmsg_error = 19, 1, 4, 2
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, 0, 0) + nla(
        ifla_xdp | nla_f_nested,
        nla(ifla_xdp_fd, struct.pack("=i", fd)) + nla(ifla_xdp_flags, struct.pack("=I", flags)))
    message = struct.pack("=IHHII", 16 + len(body), rtm_setlink, nlm_f_request | nlm_f_ack, 1,
                          0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(message)
        reply = sock.recv(65536)
    length, kind = struct.unpack_from("=IH", reply, 0)
    if kind == nlmsg_error:
        (error,) = struct.unpack_from("=i", reply, 16)
        if error < 0:
            raise OSError(-error, os.strerror(-error))


# ---- rtnetlink dumps: what the reconciler reads every tick, without pyroute2's decoding ----

RTM_GETLINK, RTM_GETQDISC, RTM_GETTFILTER = 18, 38, 46
IFLA_IFNAME, IFLA_XDP = 3, 43
IFLA_XDP_PROG_ID, IFLA_XDP_DRV_PROG_ID, IFLA_XDP_SKB_PROG_ID = 4, 5, 6
TCA_KIND, TCA_OPTIONS, TCA_BPF_NAME, TCA_BPF_ID = 1, 2, 7, 11


def _attrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    found = {}
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, start)
        if length < 4:
            break
        found[kind & 0x3FFF] = data[start + 4:start + length]
        start += (length + 3) & ~3
    return found


def _dump(kind: int, header: bytes) -> list[tuple[bytes, dict[int, bytes]]]:
    """One rtnetlink dump: (fixed header, attributes) of every message. OSError on error."""
    import socket

    request = struct.pack("=IHHII", 16 + len(header), kind, 0x301, 1, 0) + header
    messages = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(request)
        while True:
            data = sock.recv(1 << 20)
            offset = 0
            while offset + 16 <= len(data):
                length, msg_type = struct.unpack_from("=IH", data, offset)
                if msg_type == 3:  # NLMSG_DONE
                    return messages
                if msg_type == 2:  # NLMSG_ERROR
                    (error,) = struct.unpack_from("=i", data, offset + 16)
                    if error < 0:
                        raise OSError(-error, os.strerror(-error))
                    return messages
                body = offset + 16
                messages.append((data[body:body + len(header)],
                                 _attrs(data, body + len(header), offset + length)))
                offset += (length + 3) & ~3


def _u32(raw: bytes | None) -> int:
    return struct.unpack("=I", raw[:4])[0] if raw else 0


def _text(raw: bytes | None) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw else ""


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    type: int
    flags: int
    xdp_drv: int  # XDP program ids by mode, 0 for none
    xdp_skb: int
    xdp_any: int


def links() -> list[Link]:
    found = []
    for header, attrs in _dump(RTM_GETLINK, struct.pack("=BxHiII", 0, 0, 0, 0, 0)):
        _, type_, index, flags, _ = struct.unpack("=BxHiII", header)
        xdp = _attrs(attrs[IFLA_XDP], 0, len(attrs[IFLA_XDP])) if IFLA_XDP in attrs else {}
        found.append(Link(_text(attrs.get(IFLA_IFNAME)), index, type_, flags,
                          _u32(xdp.get(IFLA_XDP_DRV_PROG_ID)),
                          _u32(xdp.get(IFLA_XDP_SKB_PROG_ID)),
                          _u32(xdp.get(IFLA_XDP_PROG_ID))))
    return found


def qdisc_kinds() -> list[tuple[int, str]]:
    """(interface index, kind) of every qdisc in the namespace."""
    return [(struct.unpack_from("=i", header, 4)[0], _text(attrs.get(TCA_KIND)))
            for header, attrs in _dump(RTM_GETQDISC, struct.pack("=BxxxiIII", 0, 0, 0, 0, 0))]


def bpf_filters(index: int, parent: int) -> list[tuple[int, int, str, int]]:
    """(priority, handle, name, program id) of the cls_bpf filters under `parent` (e.g. the
    clsact ingress 0xFFFFFFF2) of interface `index`; [] when there is no such parent."""
    try:
        dumped = _dump(RTM_GETTFILTER, struct.pack("=BxxxiIII", 0, index, 0, parent, 0))
    except OSError:
        return []
    found = []
    for header, attrs in dumped:
        _, handle, _, info = struct.unpack_from("=iIII", header, 4)
        if _text(attrs.get(TCA_KIND)) != "bpf" or TCA_OPTIONS not in attrs:
            continue
        options = _attrs(attrs[TCA_OPTIONS], 0, len(attrs[TCA_OPTIONS]))
        found.append((info >> 16, handle, _text(options.get(TCA_BPF_NAME)),
                      _u32(options.get(TCA_BPF_ID))))
    return found


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


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def is_bpffs(path: str) -> bool:
    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def mount_bpffs(path: str) -> None:
    rc = _libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t bpf bpf {path}: {os.strerror(err)}")


def ensure_bpffs_dir(path: str) -> None:
    """Make `path` a directory on a bpffs: mkdir inside a mounted one, else mount bpffs at
    /sys/fs/bpf when `path` lies under it (where every BPF tool looks), else at `path`."""
    existing = path
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing.rstrip("/")) or "/"
    if not is_bpffs(existing):
        standard = "/sys/fs/bpf"
        if (path.rstrip("/") + "/").startswith(standard + "/") and os.path.isdir(standard):
            mount_bpffs(standard)
        else:
            os.makedirs(path, exist_ok=True)
            mount_bpffs(path)
    os.makedirs(path, exist_ok=True)


__all__ = ["obj_get", "obj_pin", "MapHandle", "map_info", "prog_info", "prog_fd_by_id",
           "map_fd_by_id", "possible_cpus", "is_bpffs", "ensure_bpffs_dir", "xdp_set", "errno"]
