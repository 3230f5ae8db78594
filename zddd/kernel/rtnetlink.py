"""rtnetlink on zddd's netlink codec: the dumps the BPF backends' reconciler reads every tick
(interfaces, qdiscs, cls_bpf filters) and XDP attach, without pyroute2's decoding, which costs
more than the reconciler may spend.

Each call opens a netlink socket of its own in the caller's network namespace and raises
OSError with the kernel's errno when the kernel refuses.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from . import netlink

RTM_SETLINK, RTM_GETLINK = 19, 18
RTM_GETQDISC, RTM_GETTFILTER = 38, 46
IFLA_IFNAME, IFLA_XDP = 3, 43
IFLA_XDP_FD, IFLA_XDP_FLAGS = 1, 3
IFLA_XDP_PROG_ID, IFLA_XDP_DRV_PROG_ID, IFLA_XDP_SKB_PROG_ID = 4, 5, 6
TCA_KIND, TCA_OPTIONS, TCA_BPF_NAME, TCA_BPF_ID = 1, 2, 7, 11

_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info


def _dump(msg_type: int, header: bytes, what: str) -> list[tuple[bytes, dict[int, bytes]]]:
    """(fixed header, attributes) of every message of one dump."""
    size = len(header)
    with netlink.Socket(socket.NETLINK_ROUTE) as sock:
        return [(data[start:start + size], netlink.attrs(data, start + size, end))
                for _, _, data, start, end in sock.dump(msg_type, header, what=what)]


@dataclass(frozen=True)
class Link:
    """A network interface (not a BPF link) as RTM_GETLINK reports it."""

    name: str
    index: int
    type: int
    flags: int
    xdp_drv: int  # XDP program ids by mode, 0 for none
    xdp_skb: int
    xdp_any: int


def links() -> list[Link]:
    """Every network interface of the namespace."""
    found = []
    for header, attrs in _dump(RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0),
                               "rtnetlink: list interfaces"):
        _, type_, index, flags, _ = _IFINFOMSG.unpack(header)
        xdp = netlink.attrs(attrs[IFLA_XDP]) if IFLA_XDP in attrs else {}
        found.append(Link(netlink.string(attrs.get(IFLA_IFNAME)), index, type_, flags,
                          netlink.u32(xdp.get(IFLA_XDP_DRV_PROG_ID)),
                          netlink.u32(xdp.get(IFLA_XDP_SKB_PROG_ID)),
                          netlink.u32(xdp.get(IFLA_XDP_PROG_ID))))
    return found


def qdisc_kinds() -> list[tuple[int, str]]:
    """(interface index, kind) of every qdisc in the namespace."""
    return [(_TCMSG.unpack(header)[1], netlink.string(attrs.get(TCA_KIND)))
            for header, attrs in _dump(RTM_GETQDISC, _TCMSG.pack(0, 0, 0, 0, 0),
                                       "rtnetlink: list qdiscs")]


def bpf_filters(index: int, parent: int) -> list[tuple[int, int, str, int]]:
    """(priority, handle, name, program id) of the cls_bpf filters under `parent` (e.g. the
    clsact ingress 0xFFFFFFF2) of interface `index`; [] when there is no such parent."""
    try:
        dumped = _dump(RTM_GETTFILTER, _TCMSG.pack(0, index, 0, parent, 0),
                       f"rtnetlink: list filters of interface {index}")
    except OSError:
        return []
    found = []
    for header, attrs in dumped:
        _, _, handle, _, info = _TCMSG.unpack(header)
        if netlink.string(attrs.get(TCA_KIND)) != "bpf" or TCA_OPTIONS not in attrs:
            continue
        options = netlink.attrs(attrs[TCA_OPTIONS])
        found.append((info >> 16, handle, netlink.string(options.get(TCA_BPF_NAME)),
                      netlink.u32(options.get(TCA_BPF_ID))))
    return found


def xdp_set(index: int, fd: int, flags: int) -> None:
    """Attach the XDP program `fd` to interface `index` (fd -1: detach), in the mode `flags`
    says (XDP_FLAGS_SKB_MODE 2, XDP_FLAGS_DRV_MODE 4). Not pyroute2's: Debian's pyroute2 0.7
    encodes IFLA_XDP_FLAGS as a big-endian u16, which the kernel refuses, and without flags
    the kernel picks the mode itself."""
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0) + netlink.attr(
        IFLA_XDP, netlink.attr(IFLA_XDP_FD, struct.pack("=i", fd))
        + netlink.attr(IFLA_XDP_FLAGS, struct.pack("=I", flags)), nested=True)
    with netlink.Socket(socket.NETLINK_ROUTE) as sock:
        sock.request(RTM_SETLINK, body, what=f"rtnetlink: XDP on interface {index}")
