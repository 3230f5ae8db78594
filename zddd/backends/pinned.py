"""What every BPF backend (tc, xdp, sk_lookup) does with its pinned objects, done once.

- `check_pin_dir` before anything touches the kernel: the pin directory must not belong to a
  zddd of another live network namespace (its `netns` stamp, written by `claim`), and must not
  need a bpffs that zddd would mount in a private mount namespace (it would die with zddd).
  Both raise BackendUnavailable: zddd exits 78 with one line naming the key to change.
- `probe`: bcc importable, kernel headers, the C source present, and a compile test.
- `Pinned(path)`: an fd for a pinned object, closed on exit.
- `stage(fd, final)`: pin under a temporary name, for one rename into place when complete.
- `ActiveWriter`: the open, mapped `active` element a flip stores into.
- `percpu_total`: the sum of a per-CPU value; `copy_entries`: carry a map's entries over into
  its replacement.
- `Step`, `Claim`, `Flip` and `carry_out`: every BPF backend's plan is layout steps (small
  frozen dataclasses, one type per kind of step) and a flip, carried out by a handler per type.

The pin layout: `<bpf_pin_dir>/netns` (the owner stamp) and each backend's objects. What a
backend keeps beyond the kernel's word is handles (fds, a mapping), never a judgement.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import astuple, dataclass
from typing import Any
from pathlib import Path

from ..kernel import bpf as kbpf
from ..kernel import bpffs
from . import ApplyError, BackendUnavailable, Plan

OWNER_PIN = "netns"
OWNER_MAGIC = 0x7A64646E  # "zddn"
OWNER_VERSION = 2
# magic, version, the network namespace's inode, and (v2) its cookie: an inode names a
# namespace only while it lives (a new namespace may get the inode of one that is gone); the
# cookie is never reused. A v1 stamp (no cookie) is read as cookie 0, "not known".
_OWNER = struct.Struct("=IIQQ")
_OWNER_V1 = struct.Struct("=IIQ")
SO_NETNS_COOKIE = 71
_ZERO = b"\0\0\0\0"
NFTABLES_HINT = 'use backend = "nftables"'


def netns_ino(pid: str = "self") -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def netns_cookie() -> int:
    """This thread's network namespace's cookie (Linux 5.14+; 0 where the kernel has none)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
    except OSError:
        return 0


def _cookie_of(path: str) -> int | None:
    """The cookie of the network namespace at `path` (an nsfs file), read from a thread that
    enters it (setns moves only the calling thread); None when it cannot be entered (no
    CAP_SYS_ADMIN, a seccomp filter without setns)."""
    result: list[int | None] = [None]

    def enter() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if libc.setns(fd, CLONE_NEWNET) == 0:
                result[0] = netns_cookie()
        finally:
            os.close(fd)

    thread = threading.Thread(target=enter, name="zddd-netns-cookie")
    thread.start()
    thread.join()
    return result[0]


class Pinned:
    """An fd for the object pinned at `path`, closed on exit (FileNotFoundError if none)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def __enter__(self) -> int:
        self.fd = kbpf.obj_get(self.path)
        return self.fd

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def stage(fd: int, final: str) -> tuple[str, str]:
    """Pin `fd` under a temporary name next to `final`; (temporary, final) for the rename
    that puts it in place (a rename over a pin replaces it atomically)."""
    directory, name = os.path.split(final)
    temporary = os.path.join(directory, f"{name}-staged")  # bpffs refuses names with a dot
    unlink(temporary)
    kbpf.obj_pin(fd, temporary)
    return temporary, final


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def percpu_total(raw: bytes | None) -> int:
    """The sum of a per-CPU u64 value (one 8-byte slot per possible CPU)."""
    return sum(v for (v,) in struct.iter_unpack("=Q", raw or b""))


def copy_entries(old_fd: int, new_fd: int, key_size: int, value_size: int) -> int:
    """Copy every entry of one map into another of the same key and value layout (a flow
    map rebuilt with another size); entries that do not fit are dropped. Returns how many were
    copied."""
    old = kbpf.MapHandle(old_fd, key_size, value_size)
    new = kbpf.MapHandle(new_fd, key_size, value_size)
    copied = 0
    for key in old.keys():
        value = old.lookup(key)
        if value is None:  # expired meanwhile
            continue
        try:
            new.update(key, value)
        except OSError:  # E2BIG: the new map is full
            break
        copied += 1
    return copied


# ---- plans --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One layout step of a BPF backend's plan: plain data, carried out by the backend's
    handler for its type."""

    def __str__(self) -> str:
        parts = [str(v) for v in astuple(self) if not isinstance(v, (tuple, dict))]
        return " ".join([type(self).__name__.lower(), *parts])


@dataclass(frozen=True)
class Claim(Step):
    """Stamp the pin directory with this network namespace (`claim`)."""

    pin_dir: str


@dataclass(frozen=True)
class Flip(Step):
    """The switch: one store of `value` into the `active` element pinned at `path`."""

    path: str
    value: int


def carry_out(plan: Plan, handlers: Mapping[type, Callable[[Any], None]],
              flip: Callable[[Flip], None]) -> None:
    """The layout steps in order, each by the handler for its type, then the flip. ApplyError
    with `changed` False only when nothing took effect: the first step refused before it began
    (it raised ApplyError(changed=False)), or the flip failed after no layout step."""
    done = 0
    for step in plan.layout:
        try:
            handlers[type(step)](step)
        except ApplyError as e:
            raise ApplyError(str(e), changed=done > 0 or e.changed) from None
        except Exception as e:
            raise ApplyError(f"{step}: {e}", changed=True) from None
        done += 1
    if plan.flip is not None:
        try:
            flip(plan.flip)
        except OSError as e:
            raise ApplyError(f"flip: {e}", changed=done > 0) from None


# ---- the pin directory's owner and its bpffs --------------------------------------------------

CLONE_NEWNET = 0x40000000


def _namespace_name(ino: int) -> str | None:
    try:
        names = sorted(os.listdir("/run/netns"))
    except OSError:
        return None
    for name in names:
        try:
            if os.stat(f"/run/netns/{name}").st_ino == ino:
                return name
        except OSError:
            continue
    return None


def _namespace_path(ino: int) -> str | None:
    """A path to the live network namespace with inode `ino`, None if there is none."""
    name = _namespace_name(ino)
    if name is not None:
        return f"/run/netns/{name}"
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if netns_ino(pid) == ino:
                    return f"/proc/{pid}/ns/net"
            except OSError:
                continue
    return None


def _namespace_alive(stamp: tuple[int, int]) -> bool:
    """Whether the namespace a stamp names still exists: one with its inode lives, and (where
    the stamp has a cookie and that namespace can be entered) it has the stamp's cookie, not
    a new namespace that was given the inode of one that is gone."""
    ino, cookie = stamp
    path = _namespace_path(ino)
    if path is None:
        return False
    if not cookie:
        return True
    current = _cookie_of(path)
    return current is None or current == cookie


def owner(pin_dir: str) -> tuple[int, int] | None:
    """The (inode, cookie) of the network namespace `pin_dir` is stamped with (cookie 0 in a
    stamp written before it had one), None if unstamped."""
    try:
        with Pinned(os.path.join(pin_dir, OWNER_PIN)) as fd:
            size = kbpf.map_info(fd).value_size
            raw = kbpf.map_lookup(fd, _ZERO, size)
    except OSError:
        return None
    if raw is None or len(raw) not in (_OWNER.size, _OWNER_V1.size):
        return None
    if len(raw) == _OWNER_V1.size:
        magic, version, ino = _OWNER_V1.unpack(raw)
        return (ino, 0) if (magic, version) == (OWNER_MAGIC, 1) else None
    magic, version, ino, cookie = _OWNER.unpack(raw)
    return (ino, cookie) if (magic, version) == (OWNER_MAGIC, OWNER_VERSION) else None


def _ours(stamp: tuple[int, int] | None) -> bool:
    """Whether a stamp names this network namespace (a stamp without a cookie: by inode)."""
    if stamp is None or stamp[0] != netns_ino():
        return False
    return stamp[1] in (0, netns_cookie())


def check_pin_dir(pin_dir: str) -> None:
    """Raise BackendUnavailable, before the kernel is touched, when `pin_dir` is another live
    network namespace's, or when a bpffs for it would have to be mounted in a mount namespace
    other than PID 1's. A stamp of a namespace that no longer exists is not a conflict: that
    zddd is gone and its data plane steered nothing anyone can reach; this one replaces it."""
    mount_at = bpffs.mount_needed(pin_dir)
    if mount_at is not None and bpffs.private_mount_namespace():
        raise BackendUnavailable(
            f"bpf_pin_dir {pin_dir} is on no bpffs, and a bpffs zddd mounted on {mount_at} "
            "would live only in zddd's own mount namespace (not PID 1's: `ip netns exec`, "
            "PrivateMounts=), so the data plane would die with zddd: mount bpffs on the host "
            f"(mount -t bpf bpf {mount_at}) or set bpf_pin_dir to a path on a bpffs the host has")
    stamped = owner(pin_dir)
    if stamped is None or _ours(stamped) or not _namespace_alive(stamped):
        return
    name = _namespace_name(stamped[0])
    raise BackendUnavailable(
        f"bpf_pin_dir {pin_dir} belongs to the zddd of network namespace {stamped[0]}"
        + (f" (ip netns {name})" if name else "")
        + f", not this one ({netns_ino()}): each zddd needs a bpf_pin_dir of its own")


def claim(pin_dir: str) -> None:
    """Stamp `pin_dir` (made on a bpffs if needed) with this network namespace."""
    bpffs.ensure_bpffs_dir(pin_dir)
    if owner(pin_dir) == (netns_ino(), netns_cookie()):
        return
    fd = kbpf.map_create(kbpf.BPF_MAP_TYPE_ARRAY, 4, _OWNER.size, 1)
    try:
        kbpf.map_update(fd, _ZERO, _OWNER.pack(OWNER_MAGIC, OWNER_VERSION, netns_ino(),
                                               netns_cookie()))
        temporary, final = stage(fd, os.path.join(pin_dir, OWNER_PIN))
        os.rename(temporary, final)
    finally:
        os.close(fd)


UNCLAIMED = "pin directory not stamped with this network namespace"


def unclaimed_problem(pin_dir: str) -> str | None:
    """A problem for `read` when zddd's pins are there but the directory is not stamped with
    this namespace (pinned by a zddd before the stamp existed, or by one of a namespace that
    is gone): a `Claim` step stamps it."""
    return None if _ours(owner(pin_dir)) else UNCLAIMED


def release(pin_dir: str) -> None:
    """Remove the stamp when nothing else is left in `pin_dir` (after `remove`)."""
    try:
        left = set(os.listdir(pin_dir))
    except OSError:
        return
    if left <= {OWNER_PIN}:
        unlink(os.path.join(pin_dir, OWNER_PIN))


# ---- the active element -----------------------------------------------------------------------

class ActiveWriter:
    """The `active` map a flip writes, open and mapped once (`kernel.bpf.ActiveSlot`): a
    flip is then one store. A rebuilt map is a new map: `forget` drops the old one (its
    mapping keeps it alive and must never be written again), `adopt` takes the one a read
    opened."""

    def __init__(self) -> None:
        self._fd = -1
        self._id = 0
        self._slot: kbpf.ActiveSlot | None = None

    def adopt(self, fd: int) -> None:
        """Keep a duplicate of `fd` unless the same map is open already."""
        map_id = kbpf.map_info(fd).id
        if self._slot is not None and map_id == self._id:
            return
        self.forget()
        self._fd = os.dup(fd)
        self._id = map_id
        self._slot = kbpf.ActiveSlot(self._fd)

    def write(self, path: str, value: int, index: int = 0) -> None:
        if self._slot is None:
            with Pinned(path) as fd:
                self.adopt(fd)
        assert self._slot is not None
        self._slot.write(value, index)

    def read(self, index: int = 0) -> int:
        """Element `index` of the map `adopt` took."""
        assert self._slot is not None
        return self._slot.read(index)

    def forget(self) -> None:
        if self._slot is not None:
            self._slot.close()
            self._slot = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ---- probe ------------------------------------------------------------------------------------

MODULES_DIR = Path("/lib/modules")  # bcc compiles against <this>/<release>/build


def probe(backend: str, source: Path, compile_test: Callable[[], None]) -> float:
    """BackendUnavailable with one line saying what is missing (bcc, kernel headers, the C
    source) or what the compile said; else the seconds the compile test took. The test builds
    privately (nothing pinned or attached) and frees what it built."""
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise BackendUnavailable(f"the {backend} backend needs bcc: apt-get install "
                                 f"python3-bpfcc; or {NFTABLES_HINT}") from None
    release = os.uname().release
    if not (MODULES_DIR / release / "build" / "include").is_dir():
        raise BackendUnavailable(
            f"no kernel headers for {release} (bcc compiles zddd's BPF programs against "
            f"them): apt-get install linux-headers-{release}; or {NFTABLES_HINT}")
    if not source.exists():
        raise BackendUnavailable(f"zddd's BPF source is missing ({source}): reinstall zddd; "
                                 f"or {NFTABLES_HINT}")
    started = time.monotonic()
    try:
        compile_test()
    except Exception as e:
        raise BackendUnavailable(f"bcc cannot build zddd's {backend} programs ({one_line(e)}); "
                                 f"or {NFTABLES_HINT}") from None
    return time.monotonic() - started


def one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
