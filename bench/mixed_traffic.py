#!/usr/bin/env python3
"""Does steered traffic harm the direct traffic that follows it? One client, three phases.

In fresh namespaces (client 198.51.100.10, app 198.51.100.11 with nginx main :8080 and backup
:80), the backend under test is set up in the app namespace by zdddlab.driver (the
backend alone, no daemon) and steers the listen port 8888 to main. Then the same client runs
wrk with `Connection: close` (a new connection per request, so client ports are reused fast;
the client's port range is narrowed to --ports ports to make reuse certain):

    before   direct to :8080      (baseline)
    steered  through :8888
    after    direct to :8080

and reports after/before requests per second and the client's SYN retransmissions during
steered + after (nstat in the client namespace: TcpExtTCPSynRetrans, TcpRetransSegs). A backend
that leaves state behind for steered flows (NAT or flow entries that a reused port then hits)
shows up as a ratio below 1 and SYN retransmits. Goals (for sk_lookup): ratio >= 0.9 and at
most 20 SYN retransmits.

With --flips N it also measures the switch (the backend's apply of a flip-only plan, main <->
backup) p50 (goal for sk_lookup: <= 20 µs), and with --keepalive the keep-alive requests/s
through 8888 divided by direct.

    .venv/bin/python bench/mixed_traffic.py --backend sk_lookup [--rounds 3] [--seconds 3]

Run as root after `make setup`. Everything (namespaces, processes, the bpffs mount of its own
for pins) is removed on exit. Exit status: 0 goals met, 1 a goal missed, 2 could not run.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess

import zdddlab
from zdddlab.driver import DriverClient

APP, CLIENT = "198.51.100.11", "198.51.100.10"
LISTEN = 8888
GOAL_RATIO = 0.9
GOAL_SYN_RETRANS = 20
GOAL_FLIP_P50_USEC = 20
SYN_RETRANS, RETRANS_SEGS = "TcpExtTCPSynRetrans", "TcpRetransSegs"


def wrk(lab: zdddlab.Lab, ns: str, port: int, seconds: int, conns: int,
        close: bool = True) -> float:
    """Requests per second from one wrk run (errors fail the bench: a refused or reset
    connection is a lost request, not a slow one)."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s"]
    if close:
        argv += ["-H", "Connection: close"]
    run = subprocess.run(["ip", "netns", "exec", ns, *argv, f"http://{APP}:{port}/"],
                         capture_output=True, text=True, timeout=seconds + 30)
    out = run.stdout
    if run.returncode != 0 and "unable to connect" in out + run.stderr:
        # wrk gives up when its first connections fail: no request got through at all.
        print(f"    wrk could not connect to :{port}: {(out + run.stderr).strip()}")
        return 0.0
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise zdddlab.LabError(f"wrk printed no rate:\n{out}")
    errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        print(f"    wrk socket errors on :{port}: {errors.group(1)}")
    return float(match.group(1))


def counters(lab: zdddlab.Lab, ns: str) -> dict[str, int]:
    """The namespace's absolute TCP counters (nstat -a reads /proc/net of the namespace; the
    history file is not used)."""
    out = lab.exec(ns, ["nstat", "-asz", SYN_RETRANS, RETRANS_SEGS], capture_output=True,
                   text=True).stdout
    values = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in (SYN_RETRANS, RETRANS_SEGS):
            values[parts[0]] = int(parts[1])
    return values


def setup_backend(lab: zdddlab.Lab, app: str, backend: str) -> DriverClient:
    """The backend in the app namespace, steering 8888 to main, driven directly."""
    bpffs = lab.tmp / "bpf"
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    lab.closers.append(lambda: subprocess.run(["umount", str(bpffs)], check=False))
    desired = {"listen_port": LISTEN, "ports": {"main": 8080, "backup": 80},
               "pin_dir": str(bpffs / "zddd"), "flow_entries": 65536}
    app_ns = lab.ns(app)
    driver = DriverClient(app_ns.popen, backend, desired)
    lab.closers.append(driver.close)
    driver("probe")
    driver("switch", target="main")
    return driver


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(round(pct / 100 * len(ordered))) - 1)]


def run(args) -> int:
    with zdddlab.Lab(prefix="zbm") as lab:
        client, app = lab.netns("cli"), lab.netns("app")
        lab.link(client, "eth0", app, "eth0", cidr_a=f"{CLIENT}/24", cidr_b=f"{APP}/24")
        low = 32768
        lab.exec(client, ["sysctl", "-q",
                          f"net.ipv4.ip_local_port_range={low} {low + args.ports - 1}"])
        lab.nginx("nginx", app, {8080: "main", 80: "backup"}, workers=1)
        driver = setup_backend(lab, app, args.backend)
        lab.exec(client, ["curl", "-sSf", f"http://{APP}:{LISTEN}/"], capture_output=True)

        ratios, syn_retrans, seg_retrans = [], [], []
        for round_no in range(1, args.rounds + 1):
            before = wrk(lab, client, 8080, args.seconds, args.conns)
            start = counters(lab, client)
            steered = wrk(lab, client, LISTEN, args.seconds, args.conns)
            after = wrk(lab, client, 8080, args.seconds, args.conns)
            end = counters(lab, client)
            syn = end.get(SYN_RETRANS, 0) - start.get(SYN_RETRANS, 0)
            segs = end.get(RETRANS_SEGS, 0) - start.get(RETRANS_SEGS, 0)
            ratios.append(after / before if before else 0.0)
            syn_retrans.append(syn)
            seg_retrans.append(segs)
            print(f"round {round_no}: before {before:.0f} req/s, steered {steered:.0f} req/s, "
                  f"after {after:.0f} req/s, after/before {ratios[-1]:.3f}, "
                  f"SYN retransmits {syn}, retransmitted segments {segs}")
        ratio = statistics.median(ratios)
        worst_syn = max(syn_retrans)
        ok = ratio >= GOAL_RATIO and worst_syn <= GOAL_SYN_RETRANS
        print(f"{args.backend}: direct after/before median {ratio:.3f} (goal >= {GOAL_RATIO}), "
              f"SYN retransmits per round at most {worst_syn} (goal <= {GOAL_SYN_RETRANS})")

        if args.flips:
            usec = driver("flips", n=args.flips)["usec"]
            p50, p99 = percentile(usec, 50), percentile(usec, 99)
            print(f"{args.backend}: switch (apply of a flip) p50 {p50:.1f} µs, p99 {p99:.1f} µs "
                  f"over {len(usec)} (goal for sk_lookup <= {GOAL_FLIP_P50_USEC} µs)")
            driver("switch", target="main")
            if args.backend == "sk_lookup":
                ok = ok and p50 <= GOAL_FLIP_P50_USEC
        if args.keepalive:
            pairs = []
            for _ in range(args.rounds):
                direct = wrk(lab, client, 8080, args.seconds, args.conns, close=False)
                through = wrk(lab, client, LISTEN, args.seconds, args.conns, close=False)
                pairs.append(through / direct)
                print(f"keep-alive: direct {direct:.0f} req/s, through {LISTEN} "
                      f"{through:.0f} req/s, ratio {through / direct:.3f}")
            print(f"{args.backend}: keep-alive through {LISTEN} / direct median "
                  f"{statistics.median(pairs):.3f}")
        return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="sk_lookup",
                        help="backend to set up: nftables, sk_lookup (or any zddd knows)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--conns", type=int, default=16, help="wrk connections")
    parser.add_argument("--ports", type=int, default=1024,
                        help="size of the client's ephemeral port range")
    parser.add_argument("--flips", type=int, default=0, help="also time N switches")
    parser.add_argument("--keepalive", action="store_true",
                        help="also compare keep-alive throughput through 8888 with direct")
    args = parser.parse_args()
    zdddlab.run_main(lambda: run(args), "mixed_traffic")


if __name__ == "__main__":
    main()
