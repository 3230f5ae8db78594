"""Established TCP connections per target, read from the kernel with sock_diag.

A connection counts for a target when its server side is a local socket on the target's port,
however it arrived (redirected from the listen port or straight to the vhost). zddd's own probe
connections are left out: their client ports are given by `probe_ports`.
"""

from __future__ import annotations

import socket
from typing import Callable

from pyroute2 import DiagSocket

TCP_ESTABLISHED = 1


class ConnectionCounter:
    def __init__(self, probe_ports: Callable[[], set[int]] = set):
        self.probe_ports = probe_ports

    def count(self, ports: dict[str, int]) -> dict[str, int]:
        """Established connections by target name. Safe to call from any thread: each call
        opens its own netlink socket."""
        by_port = {port: name for name, port in ports.items()}
        counts = dict.fromkeys(ports, 0)
        excluded = self.probe_ports()
        with DiagSocket() as diag:
            diag.bind()
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in diag.get_sock_stats(family=family, states=1 << TCP_ESTABLISHED):
                    name = by_port.get(msg["idiag_sport"])
                    if name is not None and msg["idiag_dport"] not in excluded:
                        counts[name] += 1
        return counts
