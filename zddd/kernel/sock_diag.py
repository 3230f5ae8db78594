"""sock_diag (inet_diag) on zddd's netlink codec: TCP sockets of this network namespace by
local port and state, filtered in the kernel.

The dump request carries an inet_diag bytecode filter (`port_filter`) for the local ports
asked for, so on a busy host only the matching sockets reach Python at all; their replies are
read in place with struct (`dump` yields the netlink messages; `MSG` unpacks the
inet_diag_msg at a message's start).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import NamedTuple

from . import netlink

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_S_EQ = 11
TCP_ESTABLISHED = 1
TCP_LISTEN = 10

# struct inet_diag_req_v2: family, protocol, ext, pad, states, then an inet_diag_sockid
# (ports, addresses, interface, cookie) left zero: the bytecode does the matching.
_REQUEST = struct.Struct("=BBBxI48x")
# struct inet_diag_msg: family, state, timer, retrans, sport, dport, src, dst, if, cookie,
# expires, rqueue, wqueue, uid, inode. Ports and addresses in network byte order; the cookie
# is two host-order u32, low half first.
MSG = struct.Struct("=BBBB2s2s16s16sIQIIIII")
PORTS = struct.Struct(">HH")  # sport, dport, at offset 4 of an inet_diag_msg
ADDRESSES = struct.Struct("16s16s")  # src, dst, at offset 8
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def open_socket() -> netlink.Socket:
    return netlink.Socket(NETLINK_SOCK_DIAG)


def port_filter(ports: list[int]) -> bytes:
    """inet_diag bytecode: accept a socket whose local port is any of `ports`. Laid out like
    ss(8) compiles an OR, which is what the kernel's audit accepts: per port, a comparison (its
    port in the following op) that goes on to a JMP to the end (accept) when it matches and to
    the next comparison when not; the last one goes on to the end, or past it (reject)."""
    ops, total = b"", 12 * len(ports) - 4
    for i, port in enumerate(ports):
        ops += struct.pack("=BBH", INET_DIAG_BC_S_EQ, 8, 12) + struct.pack("=BBH", 0, 0, port)
        if i < len(ports) - 1:
            jmp_at = 12 * i + 8
            ops += struct.pack("=BBH", INET_DIAG_BC_JMP, 4, total - jmp_at)
    return ops


def dump(sock: netlink.Socket, family: int, bytecode: bytes,
         states: int) -> Iterator[netlink.Message]:
    """One message (an inet_diag_msg at its start) per TCP socket of `family` that the
    filter `bytecode` accepts and whose state is in the bit mask `states` (1 << TCP_LISTEN,
    ...). Raises OSError."""
    body = (_REQUEST.pack(family, socket.IPPROTO_TCP, 0, states)
            + netlink.attr(INET_DIAG_REQ_BYTECODE, bytecode))
    return sock.dump(SOCK_DIAG_BY_FAMILY, body, what="sock_diag")


class Flow(NamedTuple):
    """An established socket as the kernel reports it, seen from the local side. Addresses
    are packed (4 bytes for IPv4, 16 for IPv6); an IPv4 connection on a dual-stack IPv6
    socket is given as IPv4 (family AF_INET, the address unmapped)."""

    family: int
    local_addr: bytes
    local_port: int
    remote_addr: bytes
    remote_port: int


class SocketInfo(NamedTuple):
    """A socket from `dump_sockets`: family and packed addresses as the kernel has them (a
    listener's local address is its bound address, all zeros for the wildcard)."""

    family: int
    state: int
    local_addr: bytes
    local_port: int
    remote_addr: bytes
    remote_port: int
    cookie: int
    inode: int


def as_flow(family: int, local: bytes, lport: int, remote: bytes, rport: int) -> Flow:
    """A Flow from sock_diag's 16-byte address fields (IPv4-mapped IPv6 given as IPv4)."""
    if family == socket.AF_INET:
        return Flow(family, local[:4], lport, remote[:4], rport)
    if local.startswith(_V4_MAPPED) and remote.startswith(_V4_MAPPED):
        return Flow(socket.AF_INET, local[12:], lport, remote[12:], rport)
    return Flow(family, local, lport, remote, rport)


def dump_sockets(ports: list[int], states: int) -> list[SocketInfo]:
    """TCP sockets of both families whose local port is in `ports` and whose state is in the
    bit mask `states` (1 << TCP_LISTEN, ...), in this network namespace. Raises OSError."""
    found = []
    bytecode = port_filter(sorted(set(ports)))
    with open_socket() as sock:
        for family in (socket.AF_INET, socket.AF_INET6):
            for _, _, data, start, _ in dump(sock, family, bytecode, states):
                (fam, state, _, _, sport, dport, src, dst, _, cookie, _, _, _, _,
                 inode) = MSG.unpack_from(data, start)
                size = 4 if fam == socket.AF_INET else 16
                found.append(SocketInfo(fam, state, src[:size], int.from_bytes(sport, "big"),
                                        dst[:size], int.from_bytes(dport, "big"), cookie,
                                        inode))
    return found
