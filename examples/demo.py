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
back, then runs a canary on app1 (backup first, then `zddctl weights main=10`, `main=50`,
`switch main`, each step held 3 s), then prints who answered in each phase, the share of app1's
answers each of its targets served in each canary step (measured by the client), and how long
each data-plane commit took.

With `--services 2` (`make demo SERVICES=2`) every host runs two apps, `web` and `api`, each a
zddd service with its own listen port, vhosts and agent (packaging/zddd.toml's two-service
example), behind examples/haproxy/two-services.cfg (web on the load balancer's :80, api on
:8000). While a client sends to each without pause, the demo flips app1's api main -> backup ->
main and drains app2's api to off and back, and shows, in a table per service, that web kept its
target and its traffic on both hosts the whole time.

Every zddd runs the data plane `--backend` names (nftables unless given; tc, xdp and sk_lookup
need bcc and kernel headers, and each zddd gets a pin dir of its own on the lab's bpffs):
`make demo BACKEND=tc`.

Exit status: 0 when every request succeeded and every phase looked as expected, 1 otherwise,
2 when the lab could not be built, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter

import zdddlab
from zddd.config import BACKENDS

HOSTS = ("app1", "app2")
VHOSTS = tuple(f"{h} {v}" for h in HOSTS for v in ("main", "backup"))
STEADY = ("both hosts on main", "app1 on backup", "app1 back on main", "app2 off",
          "app2 back on main")
# The canary on app1 after them: main's weight in each step, and the step's phase.
CANARY = ((10, "app1 canary main=10%"), (50, "app1 canary main=50%"),
          (100, "app1 canary main=100%"))
# How far a step's measured share of main may be from its weight before the demo calls it
# wrong: a few hundred requests per step, so a few points of chance either way.
CANARY_TOLERANCE = 12
# What each steady phase must (True) or must not (False) have served. The phases while a
# zddctl call runs are left out: the commit happens at some moment inside them.
EXPECT = {
    STEADY[0]: {"app1 main": True, "app2 main": True, "app1 backup": False,
                "app2 backup": False},
    STEADY[1]: {"app1 backup": True, "app1 main": False, "app2 main": True},
    STEADY[2]: {"app1 main": True, "app1 backup": False, "app2 main": True},
    STEADY[3]: {"app1 main": True, "app2 main": False, "app2 backup": False},
    STEADY[4]: {"app1 main": True, "app2 main": True},
    CANARY[0][1]: {"app1 main": True, "app1 backup": True, "app2 main": True},
    CANARY[1][1]: {"app1 main": True, "app1 backup": True, "app2 main": True},
    CANARY[2][1]: {"app1 main": True, "app1 backup": False, "app2 main": True},
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

        def weights(host: str, zddd: zdddlab.Zddd, main_weight: int, *, then: str) -> None:
            command = f"zddctl weights main={main_weight}"
            phase(f"{host}: {command}")
            started = time.monotonic()
            zddd.ctl("weights", f"main={main_weight}")
            returned = time.monotonic()
            phase(then)
            status = zddd.status()
            took = returned - started
            commits.append((host, f"weights main={main_weight}", status["last_switch_usec"],
                            took))
            split = status.get("weights") or next(
                (one.get("weights") for one in status.get("services", {}).values()), None)
            timeline.say(host, f"{command} returned after {took * 1000:.0f} ms; data-plane "
                         f"commit {status['last_switch_usec']} µs; weights now {split}",
                         at=returned)

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
            # The canary: app1 to backup (the new release would be deployed on main now),
            # then main's weight in steps; each new connection picks its target once.
            switch("app1", app1, "backup", then="app1 on backup again")
            time.sleep(1.0)
            for weight, name in CANARY:
                if weight < 100:
                    weights("app1", app1, weight, then=name)
                else:
                    switch("app1", app1, "main", then=name)
                time.sleep(3.0)
        finally:
            records = load.finish()
            stopping.set()
            watcher.join()
        timeline.say("client", f"stopped after {len(records)} requests")
        problems = report(records, phases, commits, backend)
        problems += canary_report(records, phases)
    print()
    if problems:
        print(f"FAILED ({backend}):\n  " + "\n  ".join(problems))
        return 1
    print(f"OK ({backend}): every request succeeded and every phase was served as expected.")
    return 0


def report(records: list[dict], phases: list[tuple[str, float]],
           commits: list[tuple[str, str, int, float]], backend: str, *,
           vhosts: tuple[str, ...] = VHOSTS, expect: dict | None = None,
           title: str = "client -> HAProxy -> host:8888", prefix: str = "") -> list[str]:
    """Print the tables (the commits' only when `commits`); return what went wrong, each
    prefixed with `prefix`."""
    expect = EXPECT if expect is None else expect
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
    unexpected = {k for counts in per_phase for k in counts} - {"sent", "errors", *vhosts}

    print()
    cols = ["sent", "errors", *vhosts, *sorted(unexpected)]
    width = max(len(name) for name, _ in phases) + 2
    cw = max(12, *(len(c) + 2 for c in cols))
    print(f"requests by the phase they were sent in ({title}):")
    print(f"{'phase':<{width}}" + "".join(f"{c:>{cw}}" for c in cols))
    for (name, _), counts in zip(phases, per_phase, strict=True):
        print(f"{name:<{width}}" + "".join(f"{counts[c]:>{cw}}" for c in cols))
    total = sum(per_phase, Counter())
    print(f"{'total':<{width}}" + "".join(f"{total[c]:>{cw}}" for c in cols))

    if commits:
        print()
        print(f"{'switch (' + backend + ')':<28}{'data-plane commit':>18}{'zddctl call':>14}")
        for host, change, usec, took in commits:
            print(f"{host + ' ' + change:<28}{str(usec) + ' µs':>18}"
                  f"{f'{took * 1000:.0f} ms':>14}")

    problems = []
    if errors:
        problems.append(f"{len(errors)} of {len(records)} requests failed, e.g. "
                        f"{errors[0]['body']}")
    if unexpected:
        problems.append(f"unexpected answers: {sorted(unexpected)}")
    for (phase, _), counts in zip(phases, per_phase, strict=True):
        for answer, present in expect.get(phase, {}).items():
            if present and counts[answer] == 0:
                problems.append(f"phase '{phase}': no '{answer}' answers")
            if not present and counts[answer]:
                problems.append(f"phase '{phase}': {counts[answer]} '{answer}' answers, "
                                "expected none")
    return [prefix + p for p in problems]


def canary_report(records: list[dict], phases: list[tuple[str, float]]) -> list[str]:
    """Print the share of app1's answers each target served in each canary step, as the client
    counted them; return the steps whose share of main is off by more than CANARY_TOLERANCE."""
    bounds = [(name, start, phases[i + 1][1] if i + 1 < len(phases) else float("inf"))
              for i, (name, start) in enumerate(phases)]
    print()
    print("canary on app1, measured by the client (app1's answers in each step):")
    print(f"{'step':<24}{'weight':>8}{'app1 main':>12}{'app1 backup':>13}{'main share':>12}")
    problems = []
    for weight, step in CANARY:
        start, end = next((b, e) for name, b, e in bounds if name == step)
        seen = Counter(r["body"] for r in records if r["ok"] and start <= r["t"] < end)
        main, backup = seen["app1 main"], seen["app1 backup"]
        share = 100 * main / (main + backup) if main + backup else float("nan")
        print(f"{step:<24}{str(weight) + ' %':>8}{main:>12}{backup:>13}{share:>10.1f} %")
        if not abs(share - weight) <= CANARY_TOLERANCE:
            problems.append(f"canary step {step}: main served {share:.1f} % of app1's answers, "
                            f"weight {weight} %")
    return problems


# ---- two services per host (--services 2) ------------------------------------------------

# packaging/zddd.toml's two-service example (and examples/haproxy/two-services.cfg's ports):
# service -> (listen port, main port, backup port, agent port).
SERVICES = {"web": (8888, 8080, 80, 8889), "api": (9888, 9080, 9081, 9889)}
API_URL = f"http://{zdddlab.LB_CLIENT_ADDR}:8000/"
STEADY2 = ("both hosts on main", "app1's api on backup", "app1's api back on main",
           "app2's api off", "app2's api back on main")
# web: every phase served by both hosts' main vhosts, never a backup one.
WEB_VHOSTS = tuple(f"{h} web {v}" for h in HOSTS for v in ("main", "backup"))
EXPECT_WEB = {phase: {"app1 web main": True, "app2 web main": True, "app1 web backup": False,
                      "app2 web backup": False} for phase in STEADY2}
API_VHOSTS = tuple(f"{h} api {v}" for h in HOSTS for v in ("main", "backup"))
EXPECT_API = {
    STEADY2[0]: {"app1 api main": True, "app2 api main": True, "app1 api backup": False,
                 "app2 api backup": False},
    STEADY2[1]: {"app1 api backup": True, "app1 api main": False, "app2 api main": True},
    STEADY2[2]: {"app1 api main": True, "app1 api backup": False, "app2 api main": True},
    STEADY2[3]: {"app1 api main": True, "app2 api main": False, "app2 api backup": False},
    STEADY2[4]: {"app1 api main": True, "app2 api main": True},
}


def services_config(backend: str) -> dict:
    """zddd's config for SERVICES, in the many-service form."""
    return {"backend": backend, "services": {
        name: {"listen_port": listen, "drain_timeout": 20,
               "targets": {"main": {"port": main}, "backup": {"port": backup}},
               "agent": {"listen": f"[::]:{agent}"}}
        for name, (listen, main, backup, agent) in SERVICES.items()}}


def start_services_zddd(lab: zdddlab.Lab, name: str, ns: zdddlab.NetNS, bus: zdddlab.Bus,
                        backend: str) -> zdddlab.Zddd:
    directory = lab.tmp / name
    directory.mkdir()
    config = services_config(backend)
    if backend != "nftables":
        config["bpf_pin_dir"] = lab.bpf_pin_dir()
    zddd = zdddlab.Zddd(ns, bus, directory, config, name=name)
    # The lab's default drain_timeout is a single-service key: each service has its own here.
    zddd.config.pop("drain_timeout", None)
    zddd.write_config()
    return lab.own(zddd).start()


def service_status(zddd: zdddlab.Zddd, service: str) -> dict:
    """`zddctl -s SERVICE status --json`: that service's keys."""
    status = json.loads(zddd.ctl("-s", service, "status", "--json").stdout)
    return status.get("services", {}).get(service, status)


def two_service_cluster(lab: zdddlab.Lab, backend: str) -> zdddlab.Cluster:
    """zdddlab.cluster's topology with two services per host and two-services.cfg."""
    lb = lab.netns("lb")
    client = lab.netns("client")
    lab.bridge(lb, f"{zdddlab.LB_APP_ADDR}/24")
    lab.link(lb, "client", client, "eth0", cidr_a=f"{zdddlab.LB_CLIENT_ADDR}/24",
             cidr_b=f"{zdddlab.CLIENT_ADDR}/24")
    apps = {}
    for host, addr in zdddlab.APP_ADDRS.items():
        ns = lab.netns(host)
        lab.link(lb, host, ns, "eth0", cidr_b=f"{addr}/24", master_a="br0")
        bus = lab.dbus_daemon(f"{host}-bus")
        vhosts = {port: f"{host} {name} {target}" for name, (_, main, backup, _) in
                  SERVICES.items() for target, port in (("main", main), ("backup", backup))}
        nginx = lab.nginx(f"{host}-nginx", ns, vhosts)
        apps[host] = zdddlab.AppServer(host, ns, addr,
                                       start_services_zddd(lab, f"{host}-zddd", ns, bus, backend),
                                       nginx)
    haproxy = lab.haproxy("haproxy", lb, (zdddlab.EXAMPLES / "haproxy" /
                                          "two-services.cfg").read_text())
    zdddlab.wait_for(lambda: all(set(haproxy.servers(b).values()) == {"UP"} for b in SERVICES),
                     15, "HAProxy to see every server UP in both backends")
    return zdddlab.Cluster(lb, client, apps, haproxy)


def main_two_services(backend: str) -> int:
    print("\n\n".join(__doc__.split("\n\n")[1:4]), flush=True)
    print(f"\nbackend: {backend}", flush=True)
    with zdddlab.Lab(prefix="zdemo") as lab:
        print("building the lab ...", flush=True)
        c = two_service_cluster(lab, backend)
        app1, app2 = c.apps["app1"].zddd, c.apps["app2"].zddd
        timeline = Timeline()
        phases: list[tuple[str, float]] = []
        commits: list[tuple[str, str, int, float]] = []
        web_before = {h: service_status(a.zddd, "web") for h, a in c.apps.items()}

        def phase(name: str) -> None:
            phases.append((name, time.monotonic()))
            timeline.say("phase", f"-- {name}")

        def switch(host: str, zddd: zdddlab.Zddd, target: str, *extra: str, then: str) -> None:
            before = service_status(zddd, "api")["active_target"]
            command = " ".join(("zddctl -s api switch", target, *extra))
            phase(f"{host}: {command}")
            started = time.monotonic()
            zddd.ctl("-s", "api", "switch", target, *extra)
            returned = time.monotonic()
            phase(then)
            usec = service_status(zddd, "api")["last_switch_usec"]
            took = returned - started
            commits.append((host, f"api {before} -> {target}", usec, took))
            timeline.say(host, f"{command} returned after {took * 1000:.0f} ms; data-plane "
                         f"commit {usec} µs", at=returned)

        stopping = threading.Event()
        watchers = [threading.Thread(target=watch_backend, daemon=True,
                                     args=(c.haproxy, b, timeline, stopping)) for b in SERVICES]
        print(f"lab ready: HAProxy sees web {c.haproxy.servers('web')}, api "
              f"{c.haproxy.servers('api')}; clients send to {c.url} (web) and {API_URL} (api)\n",
              flush=True)
        print("timeline (seconds since the traffic started):", flush=True)
        web = lab.loadgen("load-web", c.client, c.url, workers=2, interval=0.02)
        api = lab.loadgen("load-api", c.client, API_URL, workers=2, interval=0.02)
        timeline.t0 = time.monotonic()
        for w in watchers:
            w.start()
        try:
            phase(STEADY2[0])
            time.sleep(2.0)
            switch("app1", app1, "backup", then=STEADY2[1])
            time.sleep(2.5)
            switch("app1", app1, "main", then=STEADY2[2])
            time.sleep(2.0)
            switch("app2", app2, "off", "--wait-drained=30", then=STEADY2[3])
            zdddlab.wait_for(lambda: c.haproxy.servers("api")["app2"] not in ("UP", "DRAIN"),
                             10, "HAProxy to take app2 out of api")
            time.sleep(2.0)
            switch("app2", app2, "main", then=STEADY2[4])
            zdddlab.wait_for(lambda: c.haproxy.servers("api")["app2"] == "UP", 15,
                             "HAProxy to put app2 back into api")
            time.sleep(2.0)
        finally:
            web_records, api_records = web.finish(), api.finish()
            stopping.set()
            for w in watchers:
                w.join()
        timeline.say("client", f"stopped after {len(web_records)} web and {len(api_records)} "
                     "api requests")
        problems = report(api_records, phases, commits, backend, vhosts=API_VHOSTS,
                          expect=EXPECT_API, title="api: client -> HAProxy :8000 -> host:9888",
                          prefix="api: ")
        problems += report(web_records, phases, [], backend, vhosts=WEB_VHOSTS,
                           expect=EXPECT_WEB, title="web: client -> HAProxy :80 -> host:8888",
                           prefix="web: ")
        print()
        for host, a in c.apps.items():
            after = service_status(a.zddd, "web")
            keys = ("active_target", "last_switch_usec", "last_switch_timestamp_usec")
            same = all(after[k] == web_before[host][k] for k in keys)
            print(f"{host} web: {after['active_target']} before and after, never switched: "
                  f"{'yes' if same else 'NO'}")
            if not same:
                problems.append(f"web: {host}'s web changed: "
                                f"{ {k: web_before[host][k] for k in keys} } -> "
                                f"{ {k: after[k] for k in keys} }")
    print()
    if problems:
        print(f"FAILED ({backend}, two services):\n  " + "\n  ".join(problems))
        return 1
    print(f"OK ({backend}, two services): every request succeeded, api was rolled and web kept "
          "its target and its traffic on both hosts.")
    return 0


def watch_backend(haproxy: zdddlab.HAProxy, backend: str, timeline: Timeline,
                  stopping: threading.Event):
    """Print every change of HAProxy's view of one backend's servers."""
    last: dict[str, str] = {}
    while not stopping.is_set():
        try:
            now = haproxy.servers(backend)
        except OSError:
            now = last
        for name, status in now.items():
            if last.get(name) != status:
                if name in last:
                    timeline.say("haproxy", f"{backend}/{name}: {last[name]} -> {status}")
                last[name] = status
        stopping.wait(0.05)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="zero-downtime switches under steady traffic")
    p.add_argument("--backend", choices=BACKENDS, default="nftables",
                   help="the data plane every zddd runs (default: nftables)")
    p.add_argument("--services", type=int, choices=(1, 2), default=1,
                   help="services per host: 1 (default) or 2 (web and api, api rolled)")
    return p.parse_args()


if __name__ == "__main__":
    args = parse_args()
    demo = main_two_services if args.services == 2 else main
    zdddlab.run_main(lambda: demo(args.backend), "demo")
