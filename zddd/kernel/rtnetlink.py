"""rtnetlink: XDP attach, and the dumps the reconciler reads every tick (links, qdiscs, cls_bpf
filters), without pyroute2's decoding, which costs more than the reconciler may spend.
Errors are OSError with the kernel's errno."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

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
