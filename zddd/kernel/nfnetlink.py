"""nf_tables over netlink, on zddd's netlink codec: the one thing zddd asks the kernel without
libnftables, a table's flags (see zddd.backends.nftables for why).

`table_flags` takes a socket from `open_socket`, which may serve any number of calls.
"""

from __future__ import annotations

import errno
import struct

from . import netlink

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE = 0, 1
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS = 1, 2
NFPROTO_INET = 1

_NFGENMSG = struct.Struct("=BBH")  # family, version, resource id (big-endian; 0 here)


def open_socket() -> netlink.Socket:
    return netlink.Socket(NETLINK_NETFILTER)


def table_flags(sock: netlink.Socket, name: str, family: int = NFPROTO_INET) -> int | None:
    """The flags of nftables table `name` (NFT_TABLE_F_*), or None when there is no such table:
    one NFT_MSG_GETTABLE, answered by the kernel without libnftables."""
    what = f"netlink GETTABLE {name}"
    body = _NFGENMSG.pack(family, 0, 0) + netlink.attr(NFTA_TABLE_NAME,
                                                      name.encode() + b"\0")
    try:
        replies = sock.request(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE, body, what=what)
    except FileNotFoundError:
        return None
    for kind, _, data, start, end in replies:
        if kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWTABLE:
            found = netlink.attrs(data, start + _NFGENMSG.size, end)
            return netlink.be32(found.get(NFTA_TABLE_FLAGS))
    raise OSError(errno.EPROTO, f"{what}: no table in the reply (message types "
                  f"{[kind for kind, *_ in replies]})")

