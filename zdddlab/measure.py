"""Measurements the bench and the soak take: percentiles, wrk runs, a namespace's TCP counters,
and switch commit times read from a running zddd over D-Bus."""

from __future__ import annotations

import re
import subprocess
import time

from .base import LabError
from .bus import INTERFACE, PROPERTIES, bus_call, connect
from .net import NetNS, ns_name

SYN_RETRANS, RETRANS_SEGS = "TcpExtTCPSynRetrans", "TcpRetransSegs"


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def wrk(ns: NetNS | str, url: str, *, seconds: int = 3, connections: int = 16,
        close: bool = False, cpus: str = "") -> float:
    """Requests/s of one wrk run from inside `ns`; 0 when wrk could not connect at all. With
    `close`, every request is a new connection (Connection: close)."""
    argv = ["taskset", "-c", cpus] if cpus else []
    argv += ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    if close:
        argv += ["-H", "Connection: close"]
    res = subprocess.run(["ip", "netns", "exec", ns_name(ns), *argv, url], capture_output=True,
                         text=True, timeout=seconds + 30)
    if res.returncode != 0 and "unable to connect" in res.stdout + res.stderr:
        return 0.0
    match = re.search(r"Requests/sec:\s+([\d.]+)", res.stdout)
    if not match:
        raise LabError(f"wrk printed no rate for {url}:\n{res.stdout}{res.stderr}")
    if re.search(r"Non-2xx or 3xx responses: (\d+)", res.stdout):
        raise LabError(f"wrk got errors from {url}:\n{res.stdout}")
    return float(match.group(1))


def tcp_counters(ns: NetNS | str) -> dict[str, int]:
    """The namespace's absolute SYN retransmit and retransmitted segment counters."""
    out = subprocess.run(["ip", "netns", "exec", ns_name(ns), "nstat", "-asz", SYN_RETRANS,
                          RETRANS_SEGS], capture_output=True, text=True, check=True).stdout
    values = dict.fromkeys((SYN_RETRANS, RETRANS_SEGS), 0)
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in values:
            values[parts[0]] = int(parts[1])
    return values


async def switch_times(bus_address: str, count: int) -> tuple[list[int], list[float]]:
    """Switch main<->backup `count` times (ending on main); returns (LastSwitchUSec after
    each, the Switch call's round trip in µs)."""
    bus = await connect(bus_address)

    async def call(member, signature="", body=(), interface=INTERFACE):
        err, reply = await bus_call(bus, member, signature, body, interface=interface)
        if err:
            raise LabError(f"{member}: {err}: {reply}")
        return reply

    commits, round_trips = [], []
    try:
        for i in range(count):
            target = "backup" if i % 2 == 0 else "main"
            started = time.perf_counter()
            await call("Switch", "s", [target])
            round_trips.append((time.perf_counter() - started) * 1e6)
            (value,) = await call("Get", "ss", [INTERFACE, "LastSwitchUSec"],
                                  interface=PROPERTIES)
            commits.append(int(value.value))
        if count % 2:
            await call("Switch", "s", ["main"])
    finally:
        bus.disconnect()
    return commits, round_trips
