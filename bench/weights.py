#!/usr/bin/env python3
"""`make bench`, weights: every backend side by side in one run, through the real daemon.
Prints one table.

Per backend, in fresh namespaces (client 198.51.100.10, app 198.51.100.11: nginx "main" on
:8080, "backup" on :80, a private bus, zddd with that backend):

- keep-alive req/s through 8888 / straight to 8080 at 50/50, next to the same at 100/0: wrk
  (-t1 -c16) in alternating pairs, the two weights taking turns, the median ratio of each.
  Goal: 50/50 no lower than 100/0 (within 0.02: a split costs nothing per packet).
- split accuracy: 10,000 new connections (one request each) to :8888 at 10/90: the share main
  served, as the client saw it. Goal: within ±1.5 points of 10. Then whether the choice depends
  on the client's port: each connection comes from a distinct source port drawn at random
  from 1024-65535 (bound by the client: Linux's own choice would be even ports only, reused,
  and sk_lookup's choice is a hash of the 4-tuple, so a reused port would count one draw many
  times); a chi-square test of target against odd/even source port (1 degree of freedom) and
  against 16 ranges of source ports (15 degrees); the p-values. Goal: both > 0.001 (no
  evidence of a bias).
- weight change commit p50/p99: LastSwitchUSec (the backend's apply step) after each of N
  SetWeights alternating 10/90 and 20/80 over D-Bus (the first two, which make nftables' split
  chains, left out). Goals: BPF backends p50 <= 20 µs; nftables p50 within 1.3x of a
  one-element libnftables transaction (a verdict map element deleted and added in one batch,
  in a table of the bench's own) measured in the same namespace in the same run ("ref").

    bench/weights.py [--backends nftables,tc,xdp,sk_lookup] [--connections 10000]
                     [--changes 200] [--pairs 5] [--seconds 3]

Run as root after `make setup`; use a quiet machine (2 cores: load moves every figure).
Everything is removed on exit. Exit status: 0 every goal met, 1 a goal missed, 2 could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics

import zdddlab
from zdddlab import PYTHON
from zdddlab.bus import INTERFACE, PROPERTIES, bus_call, connect
from zdddlab.measure import percentile, wrk

APP, CLIENT = "198.51.100.11", "198.51.100.10"
BACKENDS = ("nftables", "tc", "xdp", "sk_lookup")
GOALS = {"share": 10.0, "share_points": 1.5, "p_value": 0.001, "bpf_p50": 20.0,
         "nft_ratio": 1.3, "keepalive_drop": 0.02}
PORT_BUCKETS = 16

# New connections from the client, one request each, on a few threads, each from a source port
# of its own drawn at random from 1024-65535 (odd and even: Linux's own choice for connect() is
# even ports only, and reuses them): [source port, answer].
CONNECT = r"""
import http.client, json, random, sys, threading
host, port, n, source, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], 4
ports = random.sample(range(1024, 65536), n)
seen, lock = [], threading.Lock()
def worker(mine_ports):
    mine = []
    for p in mine_ports:
        c = http.client.HTTPConnection(host, port, timeout=5, source_address=(source, p))
        try:
            c.request("GET", "/", headers={"Connection": "close"})
        except OSError as e:  # the port is taken here: drawn again by nobody, left out
            if e.errno != 98:
                raise
            continue
        mine.append([p, c.getresponse().read().decode().strip()])
        c.close()
    with lock:
        seen.extend(mine)
ts = [threading.Thread(target=worker, args=(ports[i::threads],)) for i in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(seen))
"""

# The reference: a one-element libnftables transaction, in a table of the bench's own.
NFT_REFERENCE = r"""
import json, sys, time, nftables
n = int(sys.argv[1])
nft = nftables.Nftables()
nft.set_json_output(True)
T = {"family": "inet", "table": "zddd_bench_ref"}
setup = [{"metainfo": {"json_schema_version": 1}},
         {"add": {"table": {"family": "inet", "name": "zddd_bench_ref"}}},
         {"add": {"chain": {**T, "name": "a"}}}, {"add": {"chain": {**T, "name": "b"}}},
         {"add": {"map": {**T, "name": "m", "type": "inet_service", "map": "verdict"}}},
         {"add": {"element": {**T, "name": "m", "elem": [[8888, {"goto": {"target": "a"}}]]}}}]
rc, _, err = nft.json_cmd({"nftables": setup})
if rc:
    sys.exit(err)
times = []
try:
    for i in range(n):
        target = "b" if i % 2 == 0 else "a"
        batch = [{"metainfo": {"json_schema_version": 1}},
                 {"delete": {"element": {**T, "name": "m", "elem": [8888]}}},
                 {"add": {"element": {**T, "name": "m",
                                      "elem": [[8888, {"goto": {"target": target}}]]}}}]
        started = time.perf_counter()
        rc, _, err = nft.json_cmd({"nftables": batch})
        times.append((time.perf_counter() - started) * 1e6)
        if rc:
            sys.exit(err)
finally:
    nft.json_cmd({"nftables": [{"delete": {"table": {"family": "inet",
                                                     "name": "zddd_bench_ref"}}}]})
print(json.dumps(times))
"""


# ---- statistics (no scipy on Debian's base: the two functions needed) ------------------------

def chi_square_p(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X chi-square with `dof` degrees of freedom: the regularized upper
    incomplete gamma function Q(dof/2, statistic/2), by its series (or its continued fraction
    far out in the tail)."""
    a, x = dof / 2, statistic / 2
    if x <= 0:
        return 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1 / a
        for k in range(1, 1000):
            term *= x / (a + k)
            total += term
            if term < total * 1e-15:
                break
        return max(0.0, 1 - math.exp(log_front) * total)
    # Lentz's continued fraction for Q.
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(log_front) * h


def independence(groups: list[int], mains: list[bool]) -> tuple[float, int]:
    """Chi-square test of independence between a connection's group (e.g. its source port's
    parity) and whether main served it: (p-value, degrees of freedom)."""
    keys = sorted(set(groups))
    n = len(groups)
    total_main = sum(mains)
    statistic = 0.0
    for key in keys:
        in_group = [m for g, m in zip(groups, mains, strict=True) if g == key]
        size, main = len(in_group), sum(in_group)
        for observed, share in ((main, total_main / n), (size - main, 1 - total_main / n)):
            expected = size * share
            if expected > 0:
                statistic += (observed - expected) ** 2 / expected
    dof = len(keys) - 1
    return chi_square_p(statistic, dof), dof


# ---- measurements ----------------------------------------------------------------------------

async def weight_change_times(bus_address: str, changes: int) -> list[int]:
    """LastSwitchUSec after each of `changes` SetWeights alternating 10/90 and 20/80 (the first
    two, which may build what the split needs, not counted)."""
    bus = await connect(bus_address)

    async def call(member, signature="", body=(), interface=INTERFACE):
        err, reply = await bus_call(bus, member, signature, body, interface=interface)
        if err:
            raise zdddlab.LabError(f"{member}: {err}: {reply}")
        return reply

    times = []
    try:
        for i in range(changes + 2):
            main = 10 if i % 2 == 0 else 20
            await call("SetWeights", "a{su}a{sv}", [{"main": main, "backup": 100 - main}, {}])
            (value,) = await call("Get", "ss", [INTERFACE, "LastSwitchUSec"],
                                  interface=PROPERTIES)
            if i >= 2:
                times.append(int(value.value))
    finally:
        bus.disconnect()
    return times


def keepalive_ratios(client, zddd, args) -> dict[int, float]:
    """Main's weight (100, 50) -> the median over wrk pairs of req/s through 8888 / straight
    to 8080. The two weights take turns, pair by pair, in alternating order, so a change of
    the machine's load during the run weighs on both alike."""
    steered, direct = f"http://{APP}:8888/", f"http://{APP}:8080/"
    ratios: dict[int, list[float]] = {100: [], 50: []}
    for i in range(args.pairs):
        for main in ((100, 50) if i % 2 == 0 else (50, 100)):
            zddd.ctl("weights", f"main={main}")
            order = (direct, steered) if i % 2 == 0 else (steered, direct)
            rps = {url: wrk(client, url, seconds=args.seconds, cpus=args.wrk_cpus)
                   for url in order}
            ratios[main].append(rps[steered] / rps[direct])
    return {main: statistics.median(values) for main, values in ratios.items()}


def bench_backend(backend: str, args) -> dict:
    with zdddlab.Lab(prefix="zbw") as lab:
        client, app = lab.netns("cli"), lab.netns("app")
        lab.link(client, "eth0", app, "eth0", cidr_a=f"{CLIENT}/24", cidr_b=f"{APP}/24")
        lab.nginx("nginx", app, {8080: "main", 80: "backup"}, cpus=args.nginx_cpus)
        bus = lab.dbus_daemon("bus")
        zddd = lab.zddd("zddd", app, bus, {"backend": backend})
        row: dict = {"backend": backend}

        # Keep-alive throughput first: the split's 10,000 connections leave TIME_WAIT behind.
        wrk(client, f"http://{APP}:8080/", seconds=1, cpus=args.wrk_cpus)  # warm-up
        ratios = keepalive_ratios(client, zddd, args)
        row["ratio_100"], row["ratio_50"] = ratios[100], ratios[50]

        commits = asyncio.run(weight_change_times(bus.address, args.changes))
        row["p50"], row["p99"] = percentile(commits, 50), percentile(commits, 99)
        if backend == "nftables":
            out = lab.exec(app, [PYTHON, "-c", NFT_REFERENCE, str(args.changes)],
                           timeout=300).stdout
            ref = json.loads(out)
            row["ref_p50"], row["ref_p99"] = percentile(ref, 50), percentile(ref, 99)

        zddd.ctl("weights", "main=10")
        out = lab.exec(client, [PYTHON, "-c", CONNECT, APP, "8888", str(args.connections),
                                CLIENT], timeout=600).stdout
        seen = json.loads(out)
        others = {body for _, body in seen} - {"main", "backup"}
        if others:
            raise zdddlab.LabError(f"unexpected answers through 8888: {sorted(others)[:3]}")
        ports = [port for port, _ in seen]
        mains = [body == "main" for _, body in seen]
        row["n"], row["share"] = len(seen), 100 * sum(mains) / len(seen)
        row["p_parity"], _ = independence([p % 2 for p in ports], mains)
        width = -(-(65536 - 1024) // PORT_BUCKETS)
        row["p_buckets"], row["dof_buckets"] = independence([(p - 1024) // width for p in ports],
                                                            mains)
        zddd.check_alive()
        return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--changes", type=int, default=200)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--seconds", type=int, default=3, help="each wrk run")
    p.add_argument("--wrk-cpus", default="0")
    p.add_argument("--nginx-cpus", default="1")
    args = p.parse_args(argv)
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(f"note: load average {load1:.2f}: other work makes every figure noisier",
              flush=True)
    rows = []
    for backend in args.backends.split(","):
        print(f"benchmarking weights on {backend} ...", flush=True)
        try:
            rows.append(bench_backend(backend, args))
        except zdddlab.LabError as e:
            if zdddlab.interrupted.is_set():
                raise
            print(f"  {backend}: could not run: {str(e).splitlines()[0]}", flush=True)
            rows.append({"backend": backend, "error": True})
    return report(rows)


def report(rows: list[dict]) -> int:
    ok = True

    def mark(good: bool) -> str:
        nonlocal ok
        ok = ok and good
        return "" if good else " MISS"

    print()
    print(f"{'backend':<10} {'main % at 10/90':>16} {'p odd/even':>11} {'p 16 ranges':>12} "
          f"{'weight change p50/p99 µs':>25} {'8888/8080 at 50/50':>19} {'at 100/0':>9}")
    for r in rows:
        b = r["backend"]
        if r.get("error"):
            print(f"{b:<10} {'could not run':>16}")
            ok = False
            continue
        share = f"{r['share']:.2f}" + mark(abs(r["share"] - GOALS["share"])
                                           <= GOALS["share_points"])
        parity = f"{r['p_parity']:.3f}" + mark(r["p_parity"] > GOALS["p_value"])
        buckets = f"{r['p_buckets']:.3f}" + mark(r["p_buckets"] > GOALS["p_value"])
        commit = f"{r['p50']:.0f}/{r['p99']:.0f}"
        if b == "nftables":
            commit += (f" (ref {r['ref_p50']:.0f}/{r['ref_p99']:.0f})"
                       + mark(r["p50"] <= GOALS["nft_ratio"] * r["ref_p50"]))
        else:
            commit += mark(r["p50"] <= GOALS["bpf_p50"])
        half = f"{r['ratio_50']:.3f}" + mark(r["ratio_50"] >= r["ratio_100"]
                                             - GOALS["keepalive_drop"])
        print(f"{b:<10} {share:>16} {parity:>11} {buckets:>12} {commit:>25} {half:>19} "
              f"{r['ratio_100']:>9.3f}")
    n = next((r["n"] for r in rows if "n" in r), 0)
    print(f"goals: main within ±{GOALS['share_points']} points of {GOALS['share']:.0f} % over "
          f"{n} new connections; p > {GOALS['p_value']} (the choice does not depend on the "
          f"client port); weight change p50 <= {GOALS['bpf_p50']:.0f} µs (BPF), <= "
          f"{GOALS['nft_ratio']}x a one-element libnftables transaction (nftables, ref); "
          f"8888/8080 at 50/50 >= at 100/0 - {GOALS['keepalive_drop']}")
    return 0 if ok else 1


if __name__ == "__main__":
    zdddlab.run_main(main, "bench")
