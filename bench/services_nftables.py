#!/usr/bin/env python3
"""The nftables backend with many services: does a switch cost more with more services?

For each count of services (default 1 and 64) in one table `inet zddd` in a throwaway network
namespace:
- switch: `apply` of one service's switch (main <-> backup: its one steer element, deleted and
  added in one transaction), the step zddd reports as LastSwitchUSec; p50/p99 over N switches,
  each of a service picked in turn, planned from a `read` just before, as zddd does (the read
  lists the whole table: the bigger the table, the colder the CPU caches the commit starts in)
- alone: the same commits back to back, planned ahead: the commit itself (goal: p50 with the
  most services within 1.25x of p50 with the fewest)
- split: a switch between 100 and a split weight whose chain exists (one element too)
- read: one `read` of the whole table (what every switch and each reconcile round start with)
- build: the first build of the table, every service in one transaction

    bench/services_nftables.py [--services 1,64] [--switches 1000] [--json]

Runs as root after `make setup`; the namespace is removed on exit. Exit status: 0 goal met,
1 goal missed, 2 could not run. `measure()` is the same for callers in Python (it must already
run inside a namespace of its own).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time

GOAL_RATIO = 1.25


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


def services(count: int, weight: int | None = 100):
    from zddd.backends import ServiceLayout

    return tuple(ServiceLayout("default" if i == 0 else f"s{i}", 10000 + i,
                               (("backup", 30000 + i), ("main", 20000 + i)), weight)
                 for i in range(count))


def measure(count: int, switches: int = 1000) -> dict:
    """Build `count` services in this namespace's table, measure, remove the table."""
    from zddd.backends import Desired, Plan
    from zddd.backends.nftables import STEER, NftablesBackend, _element_cmd, steer_verdict

    backend = NftablesBackend()
    backend.probe()
    desired = Desired(services(count))
    started = time.perf_counter()
    backend.apply(backend.plan(backend.read(desired), desired))
    build_ms = (time.perf_counter() - started) * 1000
    try:
        state = backend.read(desired)
        assert state is not None and state.intact, state and state.problems

        def switch_times(one: int, other: int) -> list[float]:
            nonlocal desired
            times = []
            for i in range(switches):
                service = desired.services[i % count]
                wanted = desired.with_weight(service.name,
                                             other if service.weight == one else one)
                plan = backend.plan(backend.read(desired), wanted)
                assert plan.steering_only and len(plan.flip) == 2, plan
                t = time.perf_counter_ns()
                backend.apply(plan)
                times.append((time.perf_counter_ns() - t) / 1000)
                desired = wanted
            return times

        def alone_times() -> list[float]:
            # The flips zddd's plan makes (checked above), planned ahead: each service's
            # element to backup and back, in turn.
            plans = [[Plan((), (_element_cmd("delete", STEER, s.listen_port),
                                _element_cmd("add", STEER, s.listen_port,
                                             {"data": steer_verdict(w)})))
                      for w in (0, 100)] for s in desired.services]
            times = []
            for i in range(switches):
                plan = plans[i % count][(i // count) % 2]
                t = time.perf_counter_ns()
                backend.apply(plan)
                times.append((time.perf_counter_ns() - t) / 1000)
            return times

        plain = switch_times(0, 100)
        desired = Desired(services(count))
        backend.apply(backend.plan(backend.read(desired), desired))
        alone = alone_times()
        backend.apply(backend.plan(backend.read(desired), desired))
        # Make the split chain once, then switches between 100 and 30 are one element each.
        wanted = desired.with_weight(desired.services[0].name, 30)
        backend.apply(backend.plan(backend.read(desired), wanted))
        desired = wanted
        split = switch_times(30, 100)
        read_usec = []
        for _ in range(100):
            t = time.perf_counter_ns()
            backend.read(desired)
            read_usec.append((time.perf_counter_ns() - t) / 1000)
    finally:
        backend.remove(desired)
    return {
        "services": count,
        "switches": switches,
        "switch_p50_usec": round(statistics.median(plain), 1),
        "switch_p99_usec": round(percentile(plain, 99), 1),
        "alone_p50_usec": round(statistics.median(alone), 1),
        "alone_p99_usec": round(percentile(alone, 99), 1),
        "split_switch_p50_usec": round(statistics.median(split), 1),
        "split_switch_p99_usec": round(percentile(split, 99), 1),
        "read_p50_usec": round(statistics.median(read_usec), 1),
        "build_ms": round(build_ms, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", default="1,64", help="counts to measure, e.g. 1,16,64")
    parser.add_argument("--switches", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(c) for c in args.services.split(",")]
    if args.inside:
        print(json.dumps([measure(c, args.switches) for c in counts]))
        return 0
    if os.geteuid() != 0:
        print("services_nftables: needs root (a network namespace, nftables)", file=sys.stderr)
        return 2
    netns = f"zb-nftsvc-{secrets.token_hex(3)}"
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True)
        r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, __file__,
                            "--services", args.services, "--switches", str(args.switches),
                            "--inside"], capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            print(f"services_nftables: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 2
        results = json.loads(r.stdout.strip().splitlines()[-1])
    except KeyboardInterrupt:
        return 130
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    base = results[0]["alone_p50_usec"]
    ok = all(r["alone_p50_usec"] <= GOAL_RATIO * base for r in results)
    if args.json:
        print(json.dumps({"results": results, "goal_met": ok}, indent=2))
    else:
        for r in results:
            print(f"{r['services']:>3} services: switch p50 {r['switch_p50_usec']} us, "
                  f"p99 {r['switch_p99_usec']} us; alone p50 {r['alone_p50_usec']} us, "
                  f"p99 {r['alone_p99_usec']} us; split switch p50 "
                  f"{r['split_switch_p50_usec']} us; read p50 {r['read_p50_usec']} us; "
                  f"build {r['build_ms']} ms")
        print(f"goal (alone p50 with the most services <= {GOAL_RATIO}x with the fewest): "
              f"{'met' if ok else 'missed'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
