#!/usr/bin/env python3
"""The tc/xdp backends' own figures, measured on the real kernel in a throwaway namespace.

- flip: `apply` of a flip-only plan (one store through zddd's mapping of the `active` array), the
  step zddd reports as LastSwitchUSec; p50/p99 over N flips main<->backup (goal: p50 <= 20 us)
- read: one `read` (what the reconciler does every 0.25 s), p50 over 200
- compile: `probe` (a cold bcc compile in a fresh process) and the first build (compile, load,
  pin, attach to lo)
- memory: the kernel memory (fdinfo memlock) of each map, the flow map at its configured size

    bench/bpf_flip.py [--backend tc|xdp] [--flips 1000] [--flow-entries 1048576] [--json]

Runs as root after `make setup`. The namespace and the bpffs it mounts are removed on exit.
Exit status: 0 goal met, 1 goal missed, 2 could not run. `measure()` is the same thing for
callers in Python (it must already run inside a namespace of its own).
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

GOAL_FLIP_P50_USEC = 20.0


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


def memlock(path: str) -> int:
    """Bytes the kernel charges for the map pinned at `path` (fdinfo memlock)."""
    from zddd.kernel import bpf as kbpf

    fd = kbpf.obj_get(path)
    try:
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("memlock:"):
                return int(line.split()[1])
    finally:
        os.close(fd)
    return 0


def measure(backend_name: str, pin_dir: str, flips: int = 1000,
            flow_entries: int = 1048576) -> dict:
    """Build the data plane on lo of the current namespace under `pin_dir`, measure, remove."""
    from zddd.backends import Desired, Plan, ServiceLayout, backend_class
    from zddd.backends.rewrite import Stores

    backend = backend_class(backend_name)()
    started = time.perf_counter()
    backend.probe()
    probe_s = time.perf_counter() - started
    desired = Desired((ServiceLayout("default", 8888, (("backup", 80), ("main", 8080)), 100),),
                      ("lo",), pin_dir, flow_entries, "generic")
    started = time.perf_counter()
    backend.apply(backend.plan(backend.read(desired), desired))
    build_s = time.perf_counter() - started
    try:
        state = backend.read(desired)
        assert state is not None and state.intact and state.weights == {"default": 100}, state
        active = os.path.join(pin_dir, backend_name, "active")
        plans = [Plan((), Stores(active, ((0, 1),))), Plan((), Stores(active, ((0, 101),)))]
        flip_usec = []
        for i in range(flips):
            plan = plans[i % 2]
            t = time.perf_counter_ns()
            backend.apply(plan)
            flip_usec.append((time.perf_counter_ns() - t) / 1000)
        read_usec = []
        for _ in range(200):
            t = time.perf_counter_ns()
            backend.read(desired)
            read_usec.append((time.perf_counter_ns() - t) / 1000)
        directory = f"{pin_dir}/{backend_name}"
        memory = {name: memlock(f"{directory}/{name}")
                  for name in ("flows", "active", "services", "targets", "counts", "stamp")}
    finally:
        backend.remove(desired)
    return {
        "backend": backend_name,
        "flips": flips,
        "flip_p50_usec": round(statistics.median(flip_usec), 2),
        "flip_p99_usec": round(percentile(flip_usec, 99), 2),
        "read_p50_usec": round(statistics.median(read_usec), 1),
        "probe_compile_s": round(probe_s, 2),
        "first_build_s": round(build_s, 2),
        "flow_entries": flow_entries,
        "memlock_bytes": memory,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("tc", "xdp"), default="tc")
    parser.add_argument("--flips", type=int, default=1000)
    parser.add_argument("--flow-entries", type=int, default=1048576)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inside", help=argparse.SUPPRESS)  # pin dir; run in the namespace
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(measure(args.backend, args.inside, args.flips, args.flow_entries)))
        return 0
    if os.geteuid() != 0:
        print("bpf_flip: needs root (a network namespace, bpffs, BPF programs)", file=sys.stderr)
        return 2
    netns = f"zb-flip-{secrets.token_hex(3)}"
    mount = f"/tmp/zb-bpf-{secrets.token_hex(4)}"
    os.makedirs(mount)
    try:
        # Mounted here, outside the namespace's private mount namespace (ip netns exec).
        subprocess.run(["mount", "-t", "bpf", "bpf", mount], check=True)
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"],
                       check=True)
        r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, __file__,
                            "--backend", args.backend, "--flips", str(args.flips),
                            "--flow-entries", str(args.flow_entries), "--inside",
                            f"{mount}/zddd"], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            print(f"bpf_flip: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 2
        result = json.loads(r.stdout.strip().splitlines()[-1])
    except KeyboardInterrupt:
        return 130
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["umount", mount], capture_output=True)
        os.rmdir(mount)
    if args.json:
        print(json.dumps(result))
    else:
        mem = result["memlock_bytes"]
        print(f"backend {result['backend']}: flip p50 {result['flip_p50_usec']} us, "
              f"p99 {result['flip_p99_usec']} us over {result['flips']} "
              f"(goal p50 <= {GOAL_FLIP_P50_USEC:g} us)")
        print(f"  read p50 {result['read_p50_usec']} us; probe compile "
              f"{result['probe_compile_s']} s; first build {result['first_build_s']} s")
        print(f"  kernel memory: flows ({result['flow_entries']} entries) "
              f"{mem['flows'] / 2**20:.1f} MiB, counts {mem['counts'] / 1024:.1f} KiB, "
              f"active {mem['active']} B, services {mem['services']} B, "
              f"targets {mem['targets']} B, stamp {mem['stamp']} B")
    return 0 if result["flip_p50_usec"] <= GOAL_FLIP_P50_USEC else 1


if __name__ == "__main__":
    sys.exit(main())
