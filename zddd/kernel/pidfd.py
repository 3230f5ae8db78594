"""pidfd: a duplicate of another process' file descriptor (pidfd_open + pidfd_getfd)."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# pidfd_open and pidfd_getfd came after the syscall numbering was unified (424 and up), so
# theirs are the same on every architecture.
_SYS_PIDFD_OPEN = 434
_SYS_PIDFD_GETFD = 438

def pidfd_open(pid: int) -> int:
    fd = _syscall(_SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_open({pid}): {os.strerror(err)}")
    return fd


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A duplicate of another process' fd (needs CAP_SYS_PTRACE over it). O_CLOEXEC is set."""
    fd = _syscall(_SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(target_fd),
                  ctypes.c_uint(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
    return fd


def take_fd(pid: int, target_fd: int) -> int:
    """pidfd_getfd of process `pid`'s fd `target_fd`, through a pidfd closed again here."""
    pidfd = pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, target_fd)
    finally:
        os.close(pidfd)
