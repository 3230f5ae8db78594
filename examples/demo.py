#!/usr/bin/env python3
"""`make demo`: zero-downtime switches under steady traffic, with real HAProxy, nginx and zddd.

Topology (network namespaces of this machine, removed at the end):

    client 203.0.113.10 --> lb 203.0.113.1:80  HAProxy 2.6, examples/haproxy/traffic-port.cfg
                            lb 198.51.100.1 --+--> app1 198.51.100.11  nginx :8080 "app1 main"
                                              |                        nginx :80   "app1 backup"
                                              |                        zddd :8888, agent :8889
                                              +--> app2 198.51.100.12  (the same)

HAProxy sends traffic to each host's :8888 (the "traffic port" usage). While the client sends
requests without pause, the demo flips app1 main -> backup -> main and drains app2 to off and
back, then prints who answered in each phase and how long each data-plane commit took.

Every zddd runs the data plane `--backend` names (nftables unless given; tc, xdp and sk_lookup
need bcc and kernel headers, and each zddd gets a pin dir of its own on the lab's bpffs):
`make demo BACKEND=tc`.

Exit status: 0 when every request succeeded and every phase looked as expected, 1 otherwise,
2 when the lab could not be built, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter

import zdddlab
from zddd.config import BACKENDS

HOSTS = ("app1", "app2")
VHOSTS = tuple(f"{h} {v}" for h in HOSTS for v in ("main", "backup"))
STEADY = ("both hosts on main", "app1 on backup", "app1 back on main", "app2 off",
          "app2 back on main")
# What each steady phase must (True) or must not (False) have served. The phases while a
# zddctl call runs are left out: the commit happens at some moment inside them.
EXPECT = {
    STEADY[0]: {"app1 main": True, "app2 main": True, "app1 backup": False,
                "app2 backup": False},
    STEADY[1]: {"app1 backup": True, "app1 main": False, "app2 main": True},
    STEADY[2]: {"app1 main": True, "app1 backup": False, "app2 main": True},
    STEADY[3]: {"app1 main": True, "app2 main": False, "app2 backup": False},
    STEADY[4]: {"app1 main": True, "app2 main": True},
}


class Timeline:
    def __init__(self):
        self.t0 = time.monotonic()
        self.lock = threading.Lock()

    def say(self, who: str, text: str, at: float | None = None) -> None:
        """Print an event; `at` is when it happened (monotonic), if not now."""
        at = time.monotonic() if at is None else at
        with self.lock:
            print(f"  {at - self.t0:6.2f}s  {who:<8} {text}", flush=True)


def watch_haproxy(haproxy: zdddlab.HAProxy, timeline: Timeline, stopping: threading.Event):
    """Print every change of HAProxy's view of the servers."""
    last: dict[str, str] = {}
    while not stopping.is_set():
        try:
            now = haproxy.servers()
        except OSError:
            now = last
        for name, status in now.items():
            if last.get(name) != status:
                if name in last:
                    timeline.say("haproxy", f"{name}: {last[name]} -> {status}")
                last[name] = status
        stopping.wait(0.05)


def main(backend: str) -> int:
    print("\n\n".join(__doc__.split("\n\n")[1:3]), flush=True)
    print(f"\nbackend: {backend}", flush=True)
    with zdddlab.Lab(prefix="zdemo") as lab:
        print("building the lab ...", flush=True)
        c = zdddlab.cluster(lab, "traffic-port", zddd_config={"backend": backend})
        app1, app2 = c.apps["app1"].zddd, c.apps["app2"].zddd
        timeline = Timeline()
        phases: list[tuple[str, float]] = []
        commits: list[tuple[str, str, int, float]] = []  # host, change, µs, zddctl seconds

        def phase(name: str) -> None:
            phases.append((name, time.monotonic()))
            timeline.say("phase", f"-- {name}")

        def switch(host: str, zddd: zdddlab.Zddd, target: str, *extra: str,
                   then: str) -> None:
            """Run zddctl; requests started while it runs are counted in a phase of their
            own, since the commit happens at some moment inside that window."""
            before = zddd.status()["active_target"]
            command = " ".join(("zddctl switch", target, *extra))
            phase(f"{host}: {command}")
            started = time.monotonic()
            zddd.ctl("switch", target, *extra)
            returned = time.monotonic()
            phase(then)
            usec = zddd.status()["last_switch_usec"]
            took = returned - started
            commits.append((host, f"{before} -> {target}", usec, took))
            timeline.say(host, f"{command} returned after {took * 1000:.0f} ms; data-plane "
                         f"commit {usec} µs", at=returned)

        stopping = threading.Event()
        watcher = threading.Thread(target=watch_haproxy, args=(c.haproxy, timeline, stopping),
                                   daemon=True)
        print(f"lab ready: HAProxy sees {c.haproxy.servers()}; client sends to {c.url}\n",
              flush=True)
        print("timeline (seconds since the traffic started):", flush=True)
        load = lab.loadgen("load", c.client, c.url, workers=4, interval=0.02)
        timeline.t0 = time.monotonic()
        watcher.start()
        try:
            phase(STEADY[0])
            time.sleep(2.0)
            switch("app1", app1, "backup", then=STEADY[1])
            time.sleep(2.5)
            switch("app1", app1, "main", then=STEADY[2])
            time.sleep(2.0)
            switch("app2", app2, "off", "--wait-drained=30", then=STEADY[3])
            zdddlab.wait_for(lambda: c.haproxy.servers()["app2"] not in ("UP", "DRAIN"), 10,
                            "HAProxy to take app2 out")
            time.sleep(2.0)
            switch("app2", app2, "main", then=STEADY[4])
            zdddlab.wait_for(lambda: c.haproxy.servers()["app2"] == "UP", 15,
                            "HAProxy to put app2 back")
            time.sleep(2.0)
        finally:
            records = load.finish()
            stopping.set()
            watcher.join()
        timeline.say("client", f"stopped after {len(records)} requests")
        problems = report(records, phases, commits, backend)
    print()
    if problems:
        print(f"FAILED ({backend}):\n  " + "\n  ".join(problems))
        return 1
    print(f"OK ({backend}): every request succeeded and every phase was served as expected.")
    return 0


def report(records: list[dict], phases: list[tuple[str, float]],
           commits: list[tuple[str, str, int, float]], backend: str) -> list[str]:
    """Print the tables; return what went wrong."""
    per_phase: list[Counter] = [Counter() for _ in phases]
    errors: list[dict] = []
    for r in records:
        index = max((i for i, (_, start) in enumerate(phases) if start <= r["t"]), default=0)
        per_phase[index]["sent"] += 1
        if r["ok"]:
            per_phase[index][r["body"]] += 1
        else:
            per_phase[index]["errors"] += 1
            errors.append(r)
    unexpected = {k for counts in per_phase for k in counts} - {"sent", "errors", *VHOSTS}

    print()
    cols = ["sent", "errors", *VHOSTS, *sorted(unexpected)]
    width = max(len(name) for name, _ in phases) + 2
    print("requests by the phase they were sent in (client -> HAProxy -> host:8888):")
    print(f"{'phase':<{width}}" + "".join(f"{c:>12}" for c in cols))
    for (name, _), counts in zip(phases, per_phase, strict=True):
        print(f"{name:<{width}}" + "".join(f"{counts[c]:>12}" for c in cols))
    total = sum(per_phase, Counter())
    print(f"{'total':<{width}}" + "".join(f"{total[c]:>12}" for c in cols))

    print()
    print(f"{'switch (' + backend + ')':<28}{'data-plane commit':>18}{'zddctl call':>14}")
    for host, change, usec, took in commits:
        print(f"{host + ' ' + change:<28}{str(usec) + ' µs':>18}{f'{took * 1000:.0f} ms':>14}")

    problems = []
    if errors:
        problems.append(f"{len(errors)} of {len(records)} requests failed, e.g. "
                        f"{errors[0]['body']}")
    if unexpected:
        problems.append(f"unexpected answers: {sorted(unexpected)}")
    for (name, _), counts in zip(phases, per_phase, strict=True):
        for answer, present in EXPECT.get(name, {}).items():
            if present and counts[answer] == 0:
                problems.append(f"phase '{name}': no '{answer}' answers")
            if not present and counts[answer]:
                problems.append(f"phase '{name}': {counts[answer]} '{answer}' answers, "
                                "expected none")
    return problems


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="zero-downtime switches under steady traffic")
    p.add_argument("--backend", choices=BACKENDS, default="nftables",
                   help="the data plane every zddd runs (default: nftables)")
    return p.parse_args()


if __name__ == "__main__":
    args = parse_args()
    zdddlab.run_main(lambda: main(args.backend), "demo")
