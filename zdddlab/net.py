"""Network namespaces, veth links and bridges.

A `NetNS` has a random name (zt-<role>-<hex>), loopback up, and on close kills every process
still inside it and deletes it; close is safe to call twice. Anything that takes a namespace
takes a NetNS or its name (`ns_name`). Links carry only the addresses they are given (the
callers use documentation ranges) and route nothing out.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from contextlib import suppress

from .base import Proc, run


class NetNS:
    """A network namespace with loopback up; deleted (and its processes killed) on close."""

    def __init__(self, role: str):
        self.name = f"zt-{role}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.procs: list[Proc] = []
        self.run("ip", "link", "set", "lo", "up")

    def __str__(self) -> str:
        return self.name

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30, **kw):
        """Run a command inside; a failure raises CalledProcessError (with check)."""
        return subprocess.run(self.cmd(*argv), check=check, timeout=timeout,
                              capture_output=True, text=True, **kw)

    def popen(self, *argv: str, **kw) -> Proc:
        """Start a command inside; it is killed on close."""
        proc = Proc(self.cmd(*argv), name=argv[0], **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            with suppress(Exception):
                proc.close()
        # Anything else started in the namespace (e.g. by a test directly) goes too.
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def ns_name(ns: NetNS | str) -> str:
    """The name of a namespace given as a NetNS or a name."""
    return ns.name if isinstance(ns, NetNS) else str(ns)


def _with_prefix(address: str) -> str:
    if "/" in address:
        return address
    return f"{address}/64" if ":" in address else f"{address}/24"


def link(a: NetNS | str, b: NetNS | str, a_addrs=(), b_addrs=(), *, a_ifname: str | None = None,
         b_ifname: str | None = None, master_a: str | None = None) -> tuple[str, str]:
    """Join two namespaces with a veth pair and bring both ends up; returns the two interface
    names (random unless given). Addresses without a prefix get /24 (IPv4) or /64 (IPv6);
    `master_a` enslaves a's end to a bridge of a's."""
    a, b = ns_name(a), ns_name(b)
    va = a_ifname or f"v{secrets.token_hex(4)}"
    vb = b_ifname or f"v{secrets.token_hex(4)}"
    run(["ip", "link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b])
    sides = ((a, va, [_with_prefix(x) for x in a_addrs]),
             (b, vb, [_with_prefix(x) for x in b_addrs]))
    for ns, dev, addrs in sides:
        for cidr in addrs:
            # nodad: a tentative IPv6 address would drop the first packets after link-up.
            extra = ["nodad"] if ":" in cidr else []
            run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev, *extra])
    if master_a:
        run(["ip", "-n", a, "link", "set", va, "master", master_a])
    for ns, dev, _ in sides:
        run(["ip", "-n", ns, "link", "set", dev, "up"])
    # Static IPv6 neighbours: otherwise the first IPv6 SYN after link-up is lost while the
    # link-local address is tentative, and the connection takes a 1 s retransmit.
    v6 = [[c.split("/")[0] for c in addrs if ":" in c] for _, _, addrs in sides]
    if v6[0] and v6[1]:
        macs = [json.loads(run(["ip", "-n", ns, "-j", "link", "show", dev]).stdout)[0]["address"]
                for ns, dev, _ in sides]
        for (ns, dev, _), peer_mac, peer_v6 in zip(sides, reversed(macs), reversed(v6),
                                                   strict=True):
            for address in peer_v6:
                run(["ip", "-n", ns, "-6", "neigh", "replace", address, "lladdr", peer_mac,
                     "dev", dev, "nud", "permanent"])
    return va, vb


def bridge(ns: NetNS | str, cidr: str, name: str = "br0") -> str:
    """A bridge with address `cidr` in `ns`, up; returns its name."""
    ns = ns_name(ns)
    run(["ip", "-n", ns, "link", "add", name, "type", "bridge"])
    run(["ip", "-n", ns, "addr", "add", cidr, "dev", name])
    run(["ip", "-n", ns, "link", "set", name, "up"])
    return name
