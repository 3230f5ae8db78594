#!/usr/bin/env python3
"""Switch commit time of the tc/xdp backends with 1 and with many services in one data plane,
measured on the real kernel in a throwaway namespace.

For each count N (default 1 and 64), the data plane is built on lo with N services (listen
ports 10000.., targets 20000.. and 30000..), then one service (the middle one) is switched
main <-> backup `--flips` times, as the core does: `read`, `plan` and `apply`. Reported, p50
and p99 in µs:

- commit: `apply` of the plan (one store into the mapped `active` array: LastSwitchUSec)
- switch: read + plan + apply (what a Switch() costs the daemon besides the bus)
- stores: how many `active` elements each plan stored (must be 1 whatever N is)
- packet: the ingress program's own run time per packet (BPF_PROG_TEST_RUN, the median of
  20,000 runs of one packet each, as the kernel times them) for a segment of an established
  steered flow of the middle service (parsed, looked up, rewritten) and for one to a port no
  service has, in ns. One packet a run: the kernel runs a repeat on the packet as the last run
  left it, which would be a rewritten one.

    bench/services_rewrite.py [--backend tc|xdp] [--flips 1000] [--services 1,64] [--json]

Runs as root after `make setup`. The namespace and the bpffs it mounts are removed on exit.
Exit status: 0 when the commit p50 with the most services is within 2x of the one with the
fewest (and every plan stored one element), 1 otherwise, 2 could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import ctypes
import socket
import struct
import time

from bpf_flip import percentile

BPF_PROG_TEST_RUN = 10
CLIENT, LOCAL = "192.0.2.7", "198.51.100.2"


def _packet(dport: int, sport: int = 40000) -> bytes:
    """Ethernet + IPv4 + TCP ACK from CLIENT:sport to LOCAL:dport (checksums left 0: the
    programs update them incrementally and never check them)."""
    eth = b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", 0x0800)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, 6, 0,
                     socket.inet_aton(CLIENT), socket.inet_aton(LOCAL))
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    return eth + ip + tcp


def test_run(prog_fd: int, data: bytes, repeat: int) -> tuple[float, bytes]:
    """The program's mean run time on `data`, as the kernel measures it (ns), and the packet
    as the program left it."""
    from zddd.kernel import bpf as kbpf

    buf = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(len(data) + 256)
    attr = ctypes.create_string_buffer(struct.pack(
        "=IIIIQQIIIIQQIII", prog_fd, 0, len(data), len(out), ctypes.addressof(buf),
        ctypes.addressof(out), repeat, 0, 0, 0, 0, 0, 0, 0, 0), 80)
    kbpf._bpf(BPF_PROG_TEST_RUN, attr)
    size = struct.unpack_from("=I", attr, 12)[0]
    return struct.unpack_from("=I", attr, 36)[0], out.raw[:size]


def dport(packet: bytes) -> int:
    return struct.unpack_from("!H", packet, 14 + 20 + 2)[0]


def packet_cost(pin_dir: str, backend_name: str, listen_port: int, main_port: int) -> dict:
    """Per-packet figures of the pinned ingress program: a steered flow's segment (its flow
    entry written here) and a segment for a port of no service."""
    from zddd.kernel import bpf as kbpf

    directory = os.path.join(pin_dir, backend_name)
    key = (socket.inet_aton(CLIENT) + bytes(12) + socket.inet_aton(LOCAL) + bytes(12)
           + struct.pack("!H", 40000) + struct.pack("=HHH", socket.AF_INET, listen_port, 0))
    flows = kbpf.obj_get(os.path.join(directory, "flows"))
    prog = kbpf.obj_get(os.path.join(directory, "ingress"))
    try:
        kbpf.map_update(flows, key, struct.pack("=HHI", main_port, listen_port, 1))
        figures = {}
        for name, port, want in (("steered", listen_port, main_port), ("other", 5555, 5555)):
            runs = []
            for _ in range(20_000):
                ns, out = test_run(prog, _packet(port), 1)
                runs.append(ns)
            assert dport(out) == want, f"{name}: port {dport(out)}, not {want}"
            figures[f"{name}_packet_ns"] = statistics.median(runs)
        return figures
    finally:
        os.close(flows)
        os.close(prog)


def measure(backend_name: str, pin_dir: str, count: int, flips: int) -> dict:
    from zddd.backends import Desired, ServiceLayout, backend_class

    backend = backend_class(backend_name)()
    backend.probe()
    desired = Desired(tuple(ServiceLayout(f"s{i}", 10000 + i, (("backup", 20000 + i),
                                                               ("main", 30000 + i)), 100)
                            for i in range(count)), ("lo",), pin_dir, 65536, "generic")
    backend.apply(backend.plan(backend.read(desired), desired))
    name = desired.services[count // 2].name
    commit, switch, stores = [], [], set()
    try:
        for i in range(flips):
            wanted = desired.with_weight(name, 0 if i % 2 == 0 else 100)
            t0 = time.perf_counter_ns()
            plan = backend.plan(backend.read(wanted), wanted)
            t1 = time.perf_counter_ns()
            backend.apply(plan)
            t2 = time.perf_counter_ns()
            assert plan.steering_only, plan
            stores.add(len(plan.flip.stores))
            commit.append((t2 - t1) / 1000)
            switch.append((t2 - t0) / 1000)
        state = backend.read(desired.with_weight(name, 100 if flips % 2 == 0 else 0))
        assert state is not None and state.intact, state.problems
        middle = desired.services[count // 2]
        packets = packet_cost(pin_dir, backend_name, middle.listen_port, middle.port_of("main"))
    finally:
        backend.remove(desired)
    return {"backend": backend_name, "services": count, "flips": flips,
            "commit_p50_usec": round(statistics.median(commit), 2),
            "commit_p99_usec": round(percentile(commit, 99), 2),
            "switch_p50_usec": round(statistics.median(switch), 1),
            "switch_p99_usec": round(percentile(switch, 99), 1),
            "stores_per_switch": sorted(stores), **packets}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("tc", "xdp"), default="tc")
    parser.add_argument("--flips", type=int, default=1000)
    parser.add_argument("--services", default="1,64")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inside", help=argparse.SUPPRESS)  # pin dir; run in the namespace
    args = parser.parse_args()
    counts = [int(n) for n in args.services.split(",")]
    if args.inside:
        print(json.dumps([measure(args.backend, args.inside, n, args.flips) for n in counts]))
        return 0
    if os.geteuid() != 0:
        print("services_rewrite: needs root (a network namespace, bpffs, BPF programs)",
              file=sys.stderr)
        return 2
    netns = f"zb-svc-{secrets.token_hex(3)}"
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
                            "--services", args.services, "--inside", f"{mount}/zddd"],
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            print(f"services_rewrite: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 2
        results = json.loads(r.stdout.strip().splitlines()[-1])
    except KeyboardInterrupt:
        return 130
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["umount", mount], capture_output=True)
        os.rmdir(mount)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(f"{r['backend']} with {r['services']:>3} services: commit p50 "
                  f"{r['commit_p50_usec']} us, p99 {r['commit_p99_usec']} us; read+plan+apply "
                  f"p50 {r['switch_p50_usec']} us, p99 {r['switch_p99_usec']} us; stores per "
                  f"switch {r['stores_per_switch']} ({r['flips']} switches)")
            print(f"    ingress per packet: steered flow {r['steered_packet_ns']} ns, "
                  f"other port {r['other_packet_ns']} ns")
    few, many = results[0], results[-1]
    flat = many["commit_p50_usec"] <= 2 * max(few["commit_p50_usec"], 1.0)
    return 0 if flat and all(r["stores_per_switch"] == [1] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
