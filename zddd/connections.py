"""Established TCP connections per target, read from the kernel with sock_diag.

A connection counts for a target when its server side is a local socket on the target's port,
however it arrived (redirected from the listen port or straight to the vhost). zddd's own probe
connections are left out: their client ports are given by `probe_ports`.

The kernel does the filtering: the dump request (encoded by pyroute2, sent on its DiagSocket)
carries an inet_diag bytecode filter for established sockets whose local port is a target port,
so the agent's clients and everything else on a busy host never reach Python. The replies are
read with struct, two ports per socket: pyroute2's decoding of every message into objects took
about 0.2 ms per socket (200 ms for 1000 connections, measured), far too slow for a count the
event loop takes every 50 ms during a drain.

Connections that a backend steered without changing their local port (sk_lookup: the app
accepts them on the listen port) cannot be told apart by port. For those, a counter made with
`listen_port` and `attribute` also dumps the established sockets on the listen port and asks
`attribute` which target each belongs to (a `Flow` per socket, one call per count); sockets it
answers None for are not counted. `dump_sockets` gives the raw socket list (addresses, cookie,
inode) for other states, e.g. the listeners on a port.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
from typing import Callable, NamedTuple

from pyroute2 import DiagSocket
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, inet_diag_req

TCP_ESTABLISHED = 1
TCP_LISTEN = 10
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_S_EQ = 11
NLMSG_ERROR, NLMSG_DONE = 2, 3
_NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_PORTS = struct.Struct(">HH")  # inet_diag_msg: sport, dport after family/state/timer/retrans
# The whole inet_diag_msg: family, state, timer, retrans, sport, dport, src, dst, if, cookie,
# expires, rqueue, wqueue, uid, inode. The cookie is two host-order u32, low half first.
_MSG = struct.Struct("=BBBB2s2s16s16sIQIIIII")
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
RECV_BUFFER = 1 << 16


class _filtered_req(inet_diag_req):
    nla_map = (("INET_DIAG_REQ_NONE", "none"), ("INET_DIAG_REQ_BYTECODE", "cdata"))


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


@functools.lru_cache(maxsize=64)
def _request(family: int, bytecode: bytes, seq: int, states: int) -> bytes:
    """The encoded dump request (pyroute2's encoding costs about 0.5 ms; the same few requests
    are sent several times a second)."""
    req = _filtered_req()
    req["header"]["type"] = SOCK_DIAG_BY_FAMILY
    req["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    req["header"]["sequence_number"] = seq
    req["sdiag_family"] = family
    req["sdiag_protocol"] = socket.IPPROTO_TCP
    req["idiag_states"] = states
    req["attrs"] = [["INET_DIAG_REQ_BYTECODE", bytecode]]
    req.encode()
    return bytes(req.data)


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
    with DiagSocket() as diag:
        diag.bind()
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            for data, offset in ConnectionCounter._dump(diag, family, bytecode, seq, states):
                (fam, state, _, _, sport, dport, src, dst, _, cookie, _, _, _, _,
                 inode) = _MSG.unpack_from(data, offset)
                size = 4 if fam == socket.AF_INET else 16
                found.append(SocketInfo(fam, state, src[:size], int.from_bytes(sport, "big"),
                                        dst[:size], int.from_bytes(dport, "big"), cookie,
                                        inode))
    return found


class ConnectionCounter:
    def __init__(self, probe_ports: Callable[[], set[int]] = set, *,
                 listen_port: int | None = None,
                 attribute: Callable[[list[Flow]], list[str | None]] | None = None):
        self.probe_ports = probe_ports
        # Both or neither: established sockets on the listen port, attributed by the backend.
        self.listen_port = listen_port if attribute is not None else None
        self.attribute = attribute

    def count(self, ports: dict[str, int]) -> dict[str, int]:
        """Established connections by target name. Safe to call from any thread: each call
        opens its own netlink socket. Raises OSError if the kernel refuses the dump."""
        by_port = {port: name for name, port in ports.items()}
        counts = dict.fromkeys(ports, 0)
        if not by_port:
            return counts
        excluded = self.probe_ports()
        listen_port = self.listen_port if self.listen_port not in by_port else None
        bytecode = port_filter(sorted(set(by_port) | ({listen_port} - {None})))
        steered: list[Flow] = []
        with DiagSocket() as diag:
            diag.bind()
            for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
                for data, offset in self._dump(diag, family, bytecode, seq):
                    sport, dport = _PORTS.unpack_from(data, offset + 4)
                    name = by_port.get(sport)
                    if name is not None and dport not in excluded:
                        counts[name] += 1
                    elif sport == listen_port:
                        src, dst = struct.unpack_from("16s16s", data, offset + 8)
                        steered.append(as_flow(family, src, sport, dst, dport))
        if steered:
            for name in self.attribute(steered):
                if name in counts:
                    counts[name] += 1
        return counts

    @staticmethod
    def _dump(diag: DiagSocket, family: int, bytecode: bytes, seq: int,
              states: int = 1 << TCP_ESTABLISHED):
        """(data, offset) of each inet_diag_msg in the reply."""
        diag.sendto(_request(family, bytecode, seq, states), (0, 0))
        while True:
            data = diag.recv(RECV_BUFFER)
            offset = 0
            while offset + _NLMSG_HEADER.size <= len(data):
                length, kind, _, msg_seq, _ = _NLMSG_HEADER.unpack_from(data, offset)
                if length < _NLMSG_HEADER.size:
                    raise OSError("sock_diag: malformed reply")
                if msg_seq == seq:
                    if kind == NLMSG_DONE:
                        return
                    if kind == NLMSG_ERROR:
                        (error,) = struct.unpack_from("=i", data, offset + _NLMSG_HEADER.size)
                        if error:
                            raise OSError(-error, f"sock_diag: {os.strerror(-error)}")
                        return
                    yield data, offset + _NLMSG_HEADER.size
                offset += (length + 3) & ~3
