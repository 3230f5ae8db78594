"""Established TCP connections per target, read from the kernel with sock_diag.

A connection counts for a target when its server side is a local socket on the target's port,
however it arrived (redirected from the listen port or straight to the vhost). zddd's own probe
connections are left out: their client ports are given by `probe_ports`.

The kernel does the filtering (zddd.kernel.sock_diag): the dump asks only for established
sockets whose local port is a target port, so the agent's clients and everything else on a busy
host never reach Python, and each reply is read in place, two ports per socket. Decoding every
message into objects (pyroute2's way) took about 0.2 ms per socket (200 ms for 1000
connections, measured), far too slow for a count the event loop takes every 50 ms during a
drain.

Connections that a backend steered without changing their local port (sk_lookup: the app
accepts them on the listen port) cannot be told apart by port. For those, a counter made with
`listen_port` and `attribute` also dumps the established sockets on the listen port and asks
`attribute` which target each belongs to (a `Flow` per socket, one call per count); sockets it
answers None for are not counted. `zddd.kernel.sock_diag.dump_sockets` gives the raw socket
list (addresses, cookie, inode) for other states, e.g. the listeners on a port.
"""

from __future__ import annotations

import socket
from typing import AbstractSet, Callable

from .kernel import sock_diag
from .kernel.sock_diag import TCP_ESTABLISHED, Flow, as_flow, port_filter


class ConnectionCounter:
    def __init__(self, probe_ports: Callable[[], AbstractSet[int]] = frozenset, *,
                 listen_port: int | None = None,
                 attribute: Callable[[list[Flow]], list[str | None]] | None = None):
        self.probe_ports = probe_ports
        # Both or neither: established sockets on the listen port, attributed by the backend.
        self.listen_port = listen_port if attribute is not None else None
        self.attribute = attribute

    def count(self, ports: dict[str, int]) -> dict[str, int]:
        """Established connections by target name, on a netlink socket opened for this count.
        Raises OSError if the kernel refuses the dump."""
        by_port = {port: name for name, port in ports.items()}
        counts = dict.fromkeys(ports, 0)
        if not by_port:
            return counts
        excluded = self.probe_ports()
        listen_port = self.listen_port if self.listen_port not in by_port else None
        wanted = set(by_port) if listen_port is None else set(by_port) | {listen_port}
        bytecode = port_filter(sorted(wanted))
        steered: list[Flow] = []
        unpack_ports = sock_diag.PORTS.unpack_from
        unpack_addresses = sock_diag.ADDRESSES.unpack_from
        with sock_diag.open_socket() as sock:
            for family in (socket.AF_INET, socket.AF_INET6):
                for _, _, data, start, _ in self._dump(sock, family, bytecode,
                                                       1 << TCP_ESTABLISHED):
                    sport, dport = unpack_ports(data, start + 4)
                    name = by_port.get(sport)
                    if name is not None and dport not in excluded:
                        counts[name] += 1
                    elif sport == listen_port:
                        src, dst = unpack_addresses(data, start + 8)
                        steered.append(as_flow(family, src, sport, dst, dport))
        if steered and self.attribute is not None:
            for name in self.attribute(steered):
                if name in counts:
                    counts[name] += 1
        return counts

    # The one place a count reads the kernel (a test counts the rows that reach Python here).
    _dump = staticmethod(sock_diag.dump)
