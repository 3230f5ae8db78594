#!/usr/bin/env python3
"""`make bench` (second table): one service against 64 on one host, per backend, through the real
daemon. Prints one side-by-side table.

Per backend and service count N (1, 64), in fresh namespaces (client 198.51.100.10, app
198.51.100.11): nginx answering every service's main (:20000+i) and backup (:30000+i) vhost, a
private bus, and one zddd with N services `s00`.. in the `[services.NAME]` form, listen port
10000+i, health probes every second (the default), no agents.

- switch p50/p99: LastSwitchUSec of the switched service's object (the backend's apply step)
  after each of --switches switches, main <-> backup, going round the services. Goal: the p50
  with 64 services within 2x that with 1 (a switch changes one element, whatever N is).
- keep-alive req/s through the last service's listen port ÷ straight to its main vhost: wrk
  (-t1 -c16) in alternating pairs, the median ratio (the last listen port: a lookup that
  grew with N would show there first). Goal: with 64 services no more than 0.05 below the
  ratio with 1 (the per-packet cost does not grow with N; the ratio itself is the backend's,
  see bench/backends.py).
- zddd's RSS and idle CPU: VmRSS, and user+system time over --idle seconds with nothing but
  the health probes (2N targets a second).
- connection counting: 10,000 established connections through the listen ports, spread evenly
  over the services and held open. "count ms" is the median time of a /metrics scrape (zddd
  counts every target's connections for it), idle / with the 10,000 held; "drain CPU" is zddd's
  CPU while one service drains towards off with its share of them still open (the drain asks
  whether connections are left every 150 ms), over --drain-hold seconds.

Run as root after `make setup`; use a quiet machine (2 cores: load moves every figure).
Everything is removed on exit. Exit status: 0 every goal met, 1 a goal missed, 2 could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import zdddlab
from zdddlab.measure import percentile, wrk

APP, CLIENT = "198.51.100.11", "198.51.100.10"
BACKENDS = ("nftables", "tc", "xdp", "sk_lookup")
COUNTS = (1, 64)
LISTEN, MAIN, BACKUP = 10000, 20000, 30000
SERVICE_INTERFACE = "org.zddd.Steering1.Service"
GOALS = {"switch_growth": 2.0, "ratio_drop": 0.05}
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Run in the client namespace: opens one connection to APP:port per port given on the command
# line, says "ready N", then closes the ones to a port named on stdin ("close PORT"), and all of
# them at "exit" or end of input.
HOLDER = r"""
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (19000, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
host, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
held = {}
for port in ports:
    s = socket.create_connection((host, port), timeout=10)
    held.setdefault(port, []).append(s)
print("ready", sum(map(len, held.values())), flush=True)
for line in sys.stdin:
    word = line.split()
    if word[:1] == ["close"]:
        for s in held.pop(int(word[1]), []):
            s.close()
        print("closed", flush=True)
    elif word[:1] == ["exit"]:
        break
"""


def names(n: int) -> list[str]:
    return [f"s{i:02d}" for i in range(n)]


def services_config(backend: str, n: int) -> dict:
    return {"backend": backend, "health": {"interval": 1.0, "timeout": 0.5}, "services": {
        name: {"listen_port": LISTEN + i, "drain_timeout": 60,
               "targets": {"main": {"port": MAIN + i}, "backup": {"port": BACKUP + i}}}
        for i, name in enumerate(names(n))}}


def start_zddd(lab: zdddlab.Lab, ns, bus, backend: str, n: int) -> zdddlab.Zddd:
    directory = lab.tmp / "zddd"
    directory.mkdir()
    config = services_config(backend, n)
    if backend != "nftables":
        config["bpf_pin_dir"] = lab.bpf_pin_dir()
    zddd = zdddlab.Zddd(lab.ns(ns), bus, directory, config)
    # The lab's default drain_timeout is a single-service key; here each service has its own.
    zddd.config.pop("drain_timeout", None)
    zddd.write_config()
    return lab.own(zddd).start()


def service_path(name: str) -> str:
    return f"{zdddlab.OBJECT_PATH}/service/{name}"


async def switch_times(bus_address: str, services: list[str], count: int) -> list[int]:
    """Switch main <-> backup `count` times going round `services`; LastSwitchUSec of the
    switched service after each."""
    bus = await zdddlab.connect(bus_address)

    async def call(member, signature, body, path, interface=SERVICE_INTERFACE):
        err, reply = await zdddlab.bus_call(bus, member, signature, body, path=path,
                                            interface=interface)
        if err:
            raise zdddlab.LabError(f"{member} on {path}: {err}: {reply}")
        return reply

    commits = []
    try:
        for i in range(count):
            path = service_path(services[i % len(services)])
            target = "backup" if (i // len(services)) % 2 == 0 else "main"
            await call("Switch", "s", [target], path)
            (value,) = await call("Get", "ss", [SERVICE_INTERFACE, "LastSwitchUSec"], path,
                                  interface=zdddlab.PROPERTIES)
            commits.append(int(value.value))
        for name in services:  # every service back on main
            await call("Switch", "s", ["main"], service_path(name))
    finally:
        bus.disconnect()
    return commits


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise zdddlab.LabError(f"no VmRSS for {pid}")


def scrape_ms(ns, tries: int = 5) -> float:
    """Median time of a /metrics scrape, in ms (curl's own clock: no process start)."""
    times = []
    for _ in range(tries):
        r = ns.run("curl", "-sS", "-o", "/dev/null", "--max-time", "30", "-w",
                   "%{time_total}", "http://127.0.0.1:9488/metrics")
        times.append(float(r.stdout) * 1000)
    return statistics.median(times)


def bench(backend: str, n: int, args) -> dict:
    with zdddlab.Lab(prefix="zbs") as lab:
        client, app = lab.netns("cli"), lab.netns("app")
        lab.link(client, "eth0", app, "eth0", cidr_a=f"{CLIENT}/24", cidr_b=f"{APP}/24")
        vhosts = {port: f"{kind} {i}" for i in range(n)
                  for kind, port in (("main", MAIN + i), ("backup", BACKUP + i))}
        # Three workers: 10,000 held connections are more than one worker's 4096.
        lab.nginx("nginx", app, vhosts, workers=3, cpus=args.nginx_cpus)
        bus = lab.dbus_daemon("bus")
        zddd = start_zddd(lab, app, bus, backend, n)
        pid = zddd.proc.pid
        services = names(n)
        row: dict = {}
        commits = asyncio.run(switch_times(bus.address, services, args.switches))
        row["switch_p50"], row["switch_p99"] = percentile(commits, 50), percentile(commits, 99)

        last = n - 1
        steered, direct = f"http://{APP}:{LISTEN + last}/", f"http://{APP}:{MAIN + last}/"
        wrk(client, direct, seconds=1, cpus=args.wrk_cpus)  # warm-up
        ratios = []
        for i in range(args.pairs):
            order = (direct, steered) if i % 2 == 0 else (steered, direct)
            rps = {url: wrk(client, url, seconds=args.seconds, cpus=args.wrk_cpus)
                   for url in order}
            ratios.append(rps[steered] / rps[direct])
        row["ratio"] = statistics.median(ratios)

        time.sleep(2)  # wrk's connections gone, the probes' rhythm back
        row["rss"] = rss_mib(pid)
        started, cpu0 = time.monotonic(), cpu_seconds(pid)
        time.sleep(args.idle)
        row["idle_cpu"] = 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - started)

        row["count_idle"] = scrape_ms(app)
        ports = [LISTEN + i % n for i in range(args.connections)]
        holder = subprocess.Popen(["ip", "netns", "exec", client.name, sys.executable, "-c",
                                   HOLDER, APP, *map(str, ports)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            ready = holder.stdout.readline().split()
            if ready[:1] != ["ready"]:
                raise zdddlab.LabError(f"holding {args.connections} connections failed")
            row["held"] = int(ready[1])
            zdddlab.wait_for(lambda: connections(app) >= args.connections, 30,
                             f"zddd to count {args.connections} connections")
            row["count_held"] = scrape_ms(app)
            # One service drains while its share of the connections stays open.
            drained = services[last]
            started, cpu0 = time.monotonic(), cpu_seconds(pid)
            zddd.ctl("-s", drained, "switch", "off")
            time.sleep(args.drain_hold)
            row["drain_cpu"] = 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - started)
            holder.stdin.write(f"close {LISTEN + last}\n")
            holder.stdin.flush()
            holder.stdout.readline()
            zddd.ctl("-s", drained, "wait-drained", "main", "--timeout", "30")
        finally:
            if holder.poll() is None:
                holder.stdin.write("exit\n")
                holder.stdin.close()
                holder.wait(30)
        zddd.check_alive()
        return row


def connections(app) -> int:
    """The sum of zddd_target_connections over every service and target."""
    samples = zdddlab.scrape_metrics(app)
    return int(sum(v for k, v in samples.items() if k.startswith("zddd_target_connections{")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--switches", type=int, default=256)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=3, help="each wrk run")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measured")
    p.add_argument("--connections", type=int, default=10000)
    p.add_argument("--drain-hold", type=float, default=3.0)
    p.add_argument("--wrk-cpus", default="0")
    p.add_argument("--nginx-cpus", default="1")
    args = p.parse_args(argv)
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(f"note: load average {load1:.2f}: other work makes every figure noisier",
              flush=True)
    rows: dict[str, dict[int, dict]] = {}
    for backend in args.backends.split(","):
        rows[backend] = {}
        for n in COUNTS:
            print(f"benchmarking {backend} with {n} service{'s' * (n > 1)} ...", flush=True)
            try:
                rows[backend][n] = bench(backend, n, args)
            except zdddlab.LabError as e:
                if zdddlab.interrupted.is_set():
                    raise
                print(f"  {backend}, {n}: could not run: {str(e).splitlines()[0]}", flush=True)
                rows[backend][n] = {"error": True}
    return report(rows, args)


def report(rows: dict[str, dict[int, dict]], args) -> int:
    ok = True

    def mark(good: bool) -> str:
        nonlocal ok
        ok = ok and good
        return "" if good else " MISS"

    a, b = COUNTS
    print()
    print(f"services: {a} | {b} per host; {args.connections} connections held for the "
          "connection columns")
    head = (f"{'backend':<10} {'switch p50/p99 µs':>24} {'listen/direct':>16} {'RSS MiB':>12} "
            f"{'idle CPU %':>12} {'count ms idle/held':>26} {'drain CPU %':>12}")
    print(head)
    for backend, by_n in rows.items():
        if any(r.get("error") for r in by_n.values()):
            print(f"{backend:<10} {'could not run':>24}")
            ok = False
            continue
        x, y = by_n[a], by_n[b]
        sw = (f"{x['switch_p50']:.0f}/{x['switch_p99']:.0f} | "
              f"{y['switch_p50']:.0f}/{y['switch_p99']:.0f}")
        sw += mark(y["switch_p50"] <= GOALS["switch_growth"] * max(x["switch_p50"], 5))
        ratio = f"{x['ratio']:.3f} | {y['ratio']:.3f}"
        ratio += mark(y["ratio"] >= x["ratio"] - GOALS["ratio_drop"])
        rss = f"{x['rss']:.0f} | {y['rss']:.0f}"
        idle = f"{x['idle_cpu']:.1f} | {y['idle_cpu']:.1f}"
        count = (f"{x['count_idle']:.1f}/{x['count_held']:.1f} | "
                 f"{y['count_idle']:.1f}/{y['count_held']:.1f}")
        drain = f"{x['drain_cpu']:.0f} | {y['drain_cpu']:.0f}"
        print(f"{backend:<10} {sw:>24} {ratio:>16} {rss:>12} {idle:>12} {count:>26} "
              f"{drain:>12}")
    print(f"goals: with {b} services, switch p50 <= {GOALS['switch_growth']:.0f}x that with {a} "
          f"(or 5 µs) and listen/direct >= that with {a} - {GOALS['ratio_drop']}")
    return 0 if ok else 1


if __name__ == "__main__":
    zdddlab.run_main(main, "bench")
