"""bpffs: is a path on one, where one would have to be mounted, whether a mount made here
would outlive the process, and a pin directory on one."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)

BPF_FS_MAGIC = 0xCAFE4A11


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def is_bpffs(path: str) -> bool:
    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {path}: {os.strerror(err)}")
    return (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


def mount_bpffs(path: str) -> None:
    if _libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t bpf bpf {path}: {os.strerror(err)}")


STANDARD = "/sys/fs/bpf"  # the conventional place, where every BPF tool looks


def mount_needed(path: str) -> str | None:
    """Where a bpffs would have to be mounted for `path` to lie on one: None when the nearest
    existing directory of `path` is on a bpffs already, else /sys/fs/bpf for paths below it,
    else `path` itself."""
    existing = path
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing.rstrip("/")) or "/"
    if is_bpffs(existing):
        return None
    below = (path.rstrip("/") + "/").startswith(STANDARD + "/")
    mount_at = STANDARD if below else path
    if os.path.isdir(mount_at) and is_bpffs(mount_at):
        return None
    return mount_at


def private_mount_namespace() -> bool:
    """Does this process run in a mount namespace other than PID 1's (`ip netns exec`,
    systemd's PrivateMounts=, unshare)? A mount made there lives only as long as that
    namespace. Where PID 1's cannot be read (a PID 1 that is not dumpable), kthreadd's stands
    in for it (PID 2 on a host: the kernel's threads live in the initial mount namespace, as a
    host's PID 1 does); where neither can be read, False: zddd assumes the host's, as it did
    before it checked."""
    own = os.stat("/proc/self/ns/mnt")
    for pid in ("1", "2"):
        try:
            if pid == "2" and Path("/proc/2/comm").read_text().strip() != "kthreadd":
                break
            host = os.stat(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue
        return (own.st_dev, own.st_ino) != (host.st_dev, host.st_ino)
    return False


def ensure_bpffs_dir(path: str, mode: int = 0o777) -> None:
    """Make `path` a directory on bpffs (created with `mode` if it is not there), mounting a
    bpffs where `mount_needed` says."""
    mount_at = mount_needed(path)
    if mount_at is not None:
        os.makedirs(mount_at, exist_ok=True)
        mount_bpffs(mount_at)
    os.makedirs(path, mode=mode, exist_ok=True)
