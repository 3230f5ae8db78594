#!/usr/bin/env python3
"""Endurance run (`make soak`, not in CI): zddd under steady load for SOAK_MINUTES (default 30).

The demo's cluster in the traffic-port usage (zdddlab.cluster(): a client, HAProxy,
two app servers with nginx vhosts and a zddd each). wrk sends keep-alive requests through
HAProxy the whole time. On app1, zddd switches main <-> backup every second, and once a minute
runs a drain cycle instead (Switch(off), wait until the drain ended, Switch(main), wait until
HAProxy has the server UP again).

It prints failed requests (goal 0), app1's zddd RSS at start and end (goal: growth under 5 %),
its open descriptors at start and end (goal: equal), and switch p50/p99 (LastSwitchUSec, the
data-plane commit). Exit status 0 when every goal is met, 1 when one is missed, 2 when the lab
could not run. Run as root after `make setup`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time
from pathlib import Path

import zdddlab
from zddd.service.dbus import (BUS_NAME, INTERFACE, OBJECT_PATH, Message, MessageBus,
                               MessageType)
from zdddlab.measure import percentile

GOAL_RSS_GROWTH = 0.05
DRAIN_EVERY = 60.0
SWITCH_EVERY = 1.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise zdddlab.LabError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Control:
    """One D-Bus connection to a zddd, kept for the whole run."""

    def __init__(self, bus: MessageBus):
        self.bus = bus

    async def call(self, member: str, signature: str = "", body=(), interface=INTERFACE):
        reply = await self.bus.call(Message(destination=BUS_NAME, path=OBJECT_PATH,
                                            interface=interface, member=member,
                                            signature=signature, body=list(body)))
        if reply.message_type == MessageType.ERROR:
            raise zdddlab.LabError(f"{member}{tuple(body)}: {reply.error_name}: {reply.body}")
        return reply.body

    async def prop(self, name: str):
        (value,) = await self.call("Get", "ss", [INTERFACE, name],
                                   interface="org.freedesktop.DBus.Properties")
        return value.value


async def churn(ctl: Control, cluster, app, until: float, log) -> tuple[list[int], int, int]:
    """Switch every second and drain every minute until `until`; returns (LastSwitchUSec of
    every switch main<->backup, switches, drain cycles)."""
    commits: list[int] = []
    switches = drains = 0
    next_drain = time.monotonic() + DRAIN_EVERY
    target = "backup"
    while time.monotonic() < until:
        tick = time.monotonic()
        if tick >= next_drain:
            next_drain = tick + DRAIN_EVERY
            await ctl.call("Switch", "s", ["main"])
            started = time.monotonic()
            await ctl.call("Switch", "s", ["off"])
            while await ctl.prop("ActiveTarget") != "off":
                await asyncio.sleep(0.1)
                if time.monotonic() - started > 60:
                    raise zdddlab.LabError("a drain did not end within 60 s")
            drained = time.monotonic() - started
            await ctl.call("Switch", "s", ["main"])
            while cluster.haproxy.servers().get(app.name) != "UP":
                await asyncio.sleep(0.1)
                if time.monotonic() - started > 90:
                    raise zdddlab.LabError("HAProxy did not take the server back within 90 s")
            drains += 1
            log(f"drain cycle {drains}: drained in {drained:.1f} s, UP again after "
                f"{time.monotonic() - started:.1f} s")
            target = "backup"
            continue
        await ctl.call("Switch", "s", [target])
        commits.append(int(await ctl.prop("LastSwitchUSec")))
        switches += 1
        target = "main" if target == "backup" else "backup"
        await asyncio.sleep(max(0.0, SWITCH_EVERY - (time.monotonic() - tick)))
    await ctl.call("Switch", "s", ["main"])
    return commits, switches, drains


def wrk_failures(output: str) -> tuple[int, int, str]:
    """(requests, failed requests, the error lines) from wrk's report."""
    total = re.search(r"(\d+) requests in", output)
    if not total:
        raise zdddlab.LabError(f"no request count in wrk's output:\n{output}")
    failed = 0
    lines = []
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        failed += int(non2xx.group(1))
        lines.append(non2xx.group(0))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     output)
    if sock:
        failed += sum(int(n) for n in sock.groups())
        lines.append(sock.group(0))
    return int(total.group(1)), failed, "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "30")),
                   help="how long (default: $SOAK_MINUTES or 30)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--backend", default="nftables", help="zddd backend (default nftables)")
    args = p.parse_args(argv)
    seconds = int(args.minutes * 60)
    if seconds < 10:
        p.error("run at least 10 seconds")

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    with zdddlab.Lab(prefix="zds") as lab:
        cluster = zdddlab.cluster(lab, "traffic-port", {"backend": args.backend,
                                                       "drain_timeout": 30})
        app = cluster.apps["app1"]
        pid = app.zddd.proc.pid
        wrk = lab.spawn("wrk", cluster.client,
                        ["wrk", "-t2", f"-c{args.connections}", f"-d{seconds + 5}s",
                         "--timeout", "5s", cluster.url])
        time.sleep(2)  # wrk's connections are up; zddd has seen the first agent checks
        rss_start, fds_start = rss_kib(pid), open_fds(pid)
        log(f"soak: {args.minutes:g} min, backend {args.backend}, wrk -t2 -c{args.connections} "
            f"through HAProxy; app1's zddd (pid {pid}) switches every {SWITCH_EVERY:g} s and "
            f"drains every {DRAIN_EVERY:g} s")
        log(f"start: RSS {rss_start} KiB, {fds_start} open descriptors")

        async def run():
            bus = await MessageBus(bus_address=app.zddd.bus.address).connect()
            try:
                return await churn(Control(bus), cluster, app, time.monotonic() + seconds, log)
            finally:
                bus.disconnect()

        commits, switches, drains = asyncio.run(run())
        app.zddd.check_alive()
        time.sleep(1)  # let the last switch's connections settle before counting
        rss_end, fds_end = rss_kib(pid), open_fds(pid)
        zdddlab.wait_for(lambda: not wrk.alive(), 30, "wrk to finish")
        output = wrk.log_text()
        requests, failed, errors = wrk_failures(output)
        zddd_log = app.zddd.log()

    growth = (rss_end - rss_start) / rss_start
    p50, p99 = percentile(commits, 50), percentile(commits, 99)
    goals = {
        "failed requests": failed == 0,
        "RSS growth": growth < GOAL_RSS_GROWTH,
        "open descriptors": fds_end == fds_start,
        "no traceback": "Traceback" not in zddd_log,
    }
    print()
    print(f"requests            {requests} ({requests / seconds:.0f}/s)")
    print(f"failed requests     {failed}{f' ({errors})' if errors else ''}   goal 0")
    print(f"zddd RSS            {rss_start} KiB -> {rss_end} KiB ({growth * 100:+.1f} %)   "
          f"goal < +{GOAL_RSS_GROWTH * 100:.0f} %")
    print(f"zddd open fds       {fds_start} -> {fds_end}   goal equal")
    print(f"switches            {switches} main<->backup, {drains} drain cycles")
    print(f"switch p50 / p99    {p50} / {p99} µs (LastSwitchUSec)")
    print(f"zddd log            {'no traceback' if goals['no traceback'] else 'TRACEBACK'}, "
          f"{zddd_log.count('event=drift_repaired')} drift repairs")
    missed = [name for name, ok in goals.items() if not ok]
    print("result              " + ("PASS" if not missed else "MISS: " + ", ".join(missed)))
    return 0 if not missed else 1


if __name__ == "__main__":
    zdddlab.run_main(main, "soak")
