#!/usr/bin/env python3
"""zddd's two performance figures, measured side by side in one run, through the real daemon.

(a) Switch commit time: the backend's apply step as zddd reports it in LastSwitchUSec, read over
    D-Bus after each of N switches main<->backup (goal: p50 <= 300 us). The round trip of the
    Switch call itself (client -> dbus-daemon -> zddd -> back) is printed for context.
(b) Steering overhead: keep-alive HTTP requests/s through the listen port (8888, redirected by
    the kernel) divided by requests/s straight to the main vhost (8080), wrk -t1 -c16 -d3s from
    a client namespace against nginx, in alternating pairs; the median ratio is the figure
    (goal: >= 0.97).

Everything runs in fresh network namespaces (198.51.100.0/24) with a private dbus-daemon and is
removed on exit, Ctrl-C included. Run as root after `make setup`: `make bench`.
Exit status: 0 all goals met, 1 a goal missed, 2 the bench could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import time

import zdddlab
from zdddlab import INTERFACE, PROPERTIES, bus_call

GOAL_COMMIT_P50_USEC = 300
GOAL_RATIO = 0.97
APP_ADDR, CLIENT_ADDR = "198.51.100.11", "198.51.100.10"


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


async def measure_switches(bus_address: str, count: int) -> tuple[list[int], list[float]]:
    """Switch main<->backup `count` times; returns (LastSwitchUSec after each, round trips in
    µs)."""
    bus = await zdddlab.connect(bus_address)

    async def call(member, signature="", body=(), interface=INTERFACE):
        err, reply = await bus_call(bus, member, signature, body, interface=interface)
        if err:
            raise zdddlab.LabError(f"{member}: {err}: {reply}")
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
            (active,) = await call("Get", "ss", [INTERFACE, "ActiveTarget"],
                                   interface=PROPERTIES)
            if active.value != target:
                raise zdddlab.LabError(f"after Switch({target}) ActiveTarget is {active.value}")
        if count % 2:
            await call("Switch", "s", ["main"])
    finally:
        bus.disconnect()
    return commits, round_trips


def wrk_rps(lab: zdddlab.Lab, ns: zdddlab.NetNS, url: str, args: argparse.Namespace) -> float:
    pin = ["taskset", "-c", args.wrk_cpus] if args.wrk_cpus else []
    res = lab.exec(ns, [*pin, "wrk", f"-t{args.wrk_threads}", f"-c{args.wrk_connections}",
                        f"-d{args.wrk_duration}s", url], timeout=args.wrk_duration + 30)
    match = re.search(r"Requests/sec:\s+([\d.]+)", res.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", res.stdout)
    if not match:
        raise zdddlab.LabError(f"no Requests/sec in wrk's output:\n{res.stdout}")
    if errors:
        raise zdddlab.LabError(f"wrk saw errors against {url}:\n{res.stdout}")
    return float(match.group(1))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--switches", type=int, default=200, help="switches to time (default 200)")
    p.add_argument("--pairs", type=int, default=5, help="wrk run pairs (default 5)")
    p.add_argument("--wrk-duration", type=int, default=3, metavar="SECONDS")
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--wrk-connections", type=int, default=16)
    p.add_argument("--nginx-workers", type=int, default=1)
    # With two cores, wrk and nginx on a core each keeps the two from trading places
    # mid-run, which otherwise moves the figures by tens of percent between runs.
    p.add_argument("--wrk-cpus", default="0", help="taskset CPU list for wrk ('' for none)")
    p.add_argument("--nginx-cpus", default="1", help="taskset CPU list for nginx ('' for none)")
    p.add_argument("--backend", default="nftables", help="zddd backend (default nftables)")
    args = p.parse_args(argv)
    if args.switches < 2 or args.pairs < 1:
        p.error("need at least 2 switches and 1 pair")

    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(f"note: load average {load1:.2f} before starting; other work on this machine "
              "makes both figures noisier (the ratio in either direction)", flush=True)
    with zdddlab.Lab(prefix="zdb") as lab:
        app = lab.netns("app")
        client = lab.netns("cli")
        lab.link(client, "eth0", app, "eth0", cidr_a=f"{CLIENT_ADDR}/24",
                 cidr_b=f"{APP_ADDR}/24")
        bus = lab.dbus_daemon("bus")
        lab.nginx("nginx", app, {8080: "main", 80: "backup"}, workers=args.nginx_workers,
                  cpus=args.nginx_cpus)
        zddd = lab.zddd("zddd", app, bus, {"backend": args.backend})

        print(f"zddd bench: backend {args.backend}, {args.switches} switches main<->backup over "
              f"D-Bus, then {args.pairs} wrk pairs (-t{args.wrk_threads} "
              f"-c{args.wrk_connections} -d{args.wrk_duration}s, nginx "
              f"{args.nginx_workers} worker)", flush=True)
        commits, round_trips = asyncio.run(measure_switches(bus.address, args.switches))
        if zddd.status()["active_target"] != "main":
            raise zdddlab.LabError("zddd did not end on main")

        steered_url = f"http://{APP_ADDR}:8888/"
        direct_url = f"http://{APP_ADDR}:8080/"
        wrk_rps(lab, client, direct_url, args)  # warm-up: conntrack, nginx, caches
        pairs = []
        for i in range(args.pairs):
            order = (direct_url, steered_url) if i % 2 == 0 else (steered_url, direct_url)
            rps = {url: wrk_rps(lab, client, url, args) for url in order}
            pairs.append((rps[steered_url], rps[direct_url]))
            print(f"  pair {i + 1}: via 8888 {rps[steered_url]:>9.0f} req/s   direct 8080 "
                  f"{rps[direct_url]:>9.0f} req/s   ratio {rps[steered_url] / rps[direct_url]:.3f}",
                  flush=True)
        zddd.check_alive()

    p50, p99 = percentile(commits, 50), percentile(commits, 99)
    rt50, rt99 = percentile(round_trips, 50), percentile(round_trips, 99)
    ratios = [s / d for s, d in pairs]
    ratio = statistics.median(ratios)
    commit_ok, ratio_ok = p50 <= GOAL_COMMIT_P50_USEC, ratio >= GOAL_RATIO

    rows = [
        ("switch commit p50 (LastSwitchUSec)", f"{p50:.0f} µs", f"<= {GOAL_COMMIT_P50_USEC} µs",
         verdict(commit_ok)),
        ("switch commit p99", f"{p99:.0f} µs", "", ""),
        ("Switch call round trip p50 / p99", f"{rt50:.0f} / {rt99:.0f} µs", "", "(context)"),
        ("req/s via 8888 / direct 8080, median", f"{ratio:.3f}", f">= {GOAL_RATIO}",
         verdict(ratio_ok)),
        ("  via 8888 / direct 8080, median req/s",
         f"{statistics.median(s for s, _ in pairs):.0f} / "
         f"{statistics.median(d for _, d in pairs):.0f}", "", "(context)"),
    ]
    print()
    print(f"{'figure':<40} {'measured':>18}  {'goal':<11} result")
    for name, measured, goal, result in rows:
        print(f"{name:<40} {measured:>18}  {goal:<11} {result}")
    return 0 if commit_ok and ratio_ok else 1


if __name__ == "__main__":
    zdddlab.run_main(main, "bench")
