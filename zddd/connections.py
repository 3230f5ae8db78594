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
`attribute` also dumps the established sockets on the listen ports and asks `attribute` which
(service, target) each belongs to (a `Flow` per socket, one call per count); sockets it
answers None for are not counted. `zddd.kernel.sock_diag.dump_sockets` gives the raw socket
list (addresses, cookie, inode) for other states, e.g. the listeners on a port.
"""

from __future__ import annotations

import socket
from typing import AbstractSet, Callable, Generator, Hashable, Iterator, Sequence, TypeVar

from .kernel import sock_diag
from .kernel.sock_diag import TCP_ESTABLISHED, Flow, as_flow, port_filter

K = TypeVar("K", bound=Hashable)
# Sockets on a listen port attributed at a time when only "any?" is asked.
ANY_BATCH = 64


class ConnectionCounter:
    def __init__(self, probe_ports: Callable[[], AbstractSet[int]] = frozenset, *,
                 attribute: Callable[[list[Flow]], Sequence[Hashable | None]] | None = None):
        self.probe_ports = probe_ports
        # Established sockets on a listen port, attributed by the backend.
        self.attribute = attribute

    def count(self, ports: dict[K, int], listen_ports: AbstractSet[int] = frozenset()
              ) -> dict[K, int]:
        """Established connections by key (a target, or a (service, target) pair: `ports`
        maps each to its port), in one dump on a netlink socket opened for this count. With an
        `attribute` function, the sockets on `listen_ports` are counted for the key it names
        (one call for them all). Raises OSError if the kernel refuses the dump."""
        counts = dict.fromkeys(ports, 0)
        for key in self._established(ports, listen_ports, batch=None):
            counts[key] += 1
        return counts

    def any(self, ports: dict[K, int], listen_ports: AbstractSet[int] = frozenset()) -> bool:
        """Whether a key of `ports` has an established connection: the dump stops at the first
        one (a drain asks every 50 ms; with thousands of connections left, reading them all
        each time would cost a good part of a core). Raises OSError."""
        found = self._established(ports, listen_ports, batch=ANY_BATCH)
        try:
            return next(found, None) is not None
        finally:
            found.close()  # the rest of the dump is dropped with its socket

    def _established(self, ports: dict[K, int], listen_ports: AbstractSet[int],
                     batch: int | None) -> Generator[K, None, None]:
        """The key of each established connection, as the dump finds them (sockets on a listen
        port attributed `batch` at a time, or all at the end with None)."""
        by_port = {port: key for key, port in ports.items()}
        if not by_port:
            return
        excluded = self.probe_ports()
        listening = (frozenset(listen_ports) - set(by_port) if self.attribute is not None
                     else frozenset())
        bytecode = port_filter(sorted(set(by_port) | listening))
        steered: list[Flow] = []
        unpack_ports = sock_diag.PORTS.unpack_from
        unpack_addresses = sock_diag.ADDRESSES.unpack_from
        with sock_diag.open_socket() as sock:
            for family in (socket.AF_INET, socket.AF_INET6):
                for _, _, data, start, _ in self._dump(sock, family, bytecode,
                                                       1 << TCP_ESTABLISHED):
                    sport, dport = unpack_ports(data, start + 4)
                    mine = by_port.get(sport)
                    if mine is not None and dport not in excluded:
                        yield mine
                    elif sport in listening:
                        src, dst = unpack_addresses(data, start + 8)
                        steered.append(as_flow(family, src, sport, dst, dport))
                        if batch is not None and len(steered) >= batch:
                            yield from self._attributed(steered, ports)
                            steered = []
        yield from self._attributed(steered, ports)

    def _attributed(self, flows: list[Flow], ports: dict[K, int]) -> Iterator[K]:
        if flows and self.attribute is not None:
            for key in self.attribute(flows):
                if key in ports:
                    yield key  # type: ignore[misc]  # a key of `ports`, as checked

    # The one place a count reads the kernel (a test counts the rows that reach Python here).
    _dump = staticmethod(sock_diag.dump)
