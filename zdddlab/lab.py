"""The Lab builder and the two topologies built with it.

`Lab` owns everything it creates (namespaces, processes, buses, zddds, bpffs pin directories,
a temporary directory) and removes all of it on close(), also after an exception; used as a
`with` block it also turns SIGTERM/SIGHUP into SystemExit and Ctrl-C into KeyboardInterrupt so
the cleanup runs. Every method that takes a namespace takes a NetNS or its name.

- `AppLab`: the integration tests' topology: a client and an app server joined by a veth
  (CLIENT_V4/V6 - APP_V4/V6), vhosts main (8080) and backup (80) in the app namespace, a private
  bus, and `start_zddd(config)` for a zddd with the lab's backend and its own bpf_pin_dir.
- `cluster(lab, usage)`: the demo's and e2e tests' topology: a client, HAProxy with the shipped
  config for `usage`, and two app servers with nginx, a bus and zddd each.
Addresses come from the documentation ranges (198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32)
and nothing is routed out.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .base import (EXAMPLES, VENV_BIN, LabError, Proc, exit_on_signal, interrupt, run,
                   wait_for)
from .bus import Bus
from .daemons import NGINX_CONF, HAProxy, Vhost, Zddd, lab_haproxy_config
from .net import NetNS, bridge, link, ns_name
from .probes import port_open



@dataclass
class Lab:
    """A set of namespaces and processes that disappears on close()."""

    prefix: str = "zdl"
    keep_tmp: bool = False
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="zddd-lab-")))
    namespaces: list[NetNS] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    closers: list = field(default_factory=list)  # called in reverse order on close
    _old_handlers: dict = field(default_factory=dict)
    _bpffs: Path | None = None  # this lab's own bpffs mount, once a pin dir was asked for

    # ---- lifetime ----

    def __enter__(self) -> "Lab":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[sig] = signal.signal(sig, exit_on_signal)
            self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    def own(self, thing):
        """Close `thing` (anything with close()) when the lab closes; returns it."""
        self.closers.append(thing.close)
        return thing

    def close(self) -> None:
        """Stop and remove everything; safe to call twice. Failures are printed, not raised,
        so the rest is still removed."""
        # Ctrl-C pressed again during cleanup must not leave namespaces behind.
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in reversed(self.procs):
                proc.stop()
            self.procs.clear()
            for close in reversed(self.closers):
                try:
                    close()
                except Exception as e:  # keep cleaning up
                    print(f"cleanup: {e}", file=sys.stderr)
            self.closers.clear()
            # NetNS.close kills whatever still runs inside, then deletes the namespace.
            for ns in reversed(self.namespaces):
                ns.close()
            self.namespaces.clear()
            if not self.keep_tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    # ---- network ----

    def netns(self, role: str) -> NetNS:
        """A new namespace (loopback up) named after `role`."""
        ns = NetNS(f"{self.prefix}{role}")
        self.namespaces.append(ns)
        return ns

    def ns(self, ns: NetNS | str) -> NetNS:
        """The lab's NetNS for a NetNS or a name."""
        if isinstance(ns, NetNS):
            return ns
        for candidate in self.namespaces:
            if candidate.name == ns:
                return candidate
        raise LabError(f"namespace {ns} is not one of this lab's")

    def bridge(self, ns: NetNS | str, cidr: str, name: str = "br0") -> str:
        return bridge(ns, cidr, name)

    def link(self, ns_a: NetNS | str, if_a: str, ns_b: NetNS | str, if_b: str, *,
             cidr_a: str | None = None, cidr_b: str | None = None,
             master_a: str | None = None) -> None:
        """A veth pair between two namespaces, created directly inside them."""
        link(ns_a, ns_b, [cidr_a] if cidr_a else [], [cidr_b] if cidr_b else [],
             a_ifname=if_a, b_ifname=if_b, master_a=master_a)

    def exec(self, ns: NetNS | str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Run `argv` inside `ns`; a failure (with the default check=True) is a LabError."""
        return run(["ip", "netns", "exec", ns_name(ns), *argv], **kw)

    def bpf_pin_dir(self, mount: bool = True) -> str:
        """A fresh pin directory for one zddd (zddd creates it). It lies on a bpffs this lab
        mounts for itself under /run and unmounts at close: not under /sys/fs/bpf, because
        `ip netns exec` remounts /sys, so pins there would vanish with a zddd started in a
        namespace and no restart could adopt them. Without `mount` (nftables needs no bpffs)
        only a path is given."""
        if not mount:
            return f"/run/zddd-lab-unused/zt-{secrets.token_hex(4)}"
        if self._bpffs is None:
            mnt = Path("/run") / f"zddd-lab-bpf-{secrets.token_hex(4)}"
            mnt.mkdir(parents=True)
            run(["mount", "-t", "bpf", "bpf", str(mnt)])
            self._bpffs = mnt

            def unmount() -> None:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
                mnt.rmdir()

            self.closers.append(unmount)
        return str(self._bpffs / f"zt-{secrets.token_hex(4)}")

    # ---- processes ----

    def spawn(self, name: str, ns: NetNS | str | None, argv: list[str], **kw) -> Proc:
        """Start a process (inside `ns`) with its output in tmp/<name>.log. It gets its own
        session so a terminal's Ctrl-C reaches only us, and we stop it in order."""
        log = self.tmp / f"{name}.log"
        full = ["ip", "netns", "exec", ns_name(ns), *argv] if ns else list(argv)
        with open(log, "wb") as out:
            proc = Proc([str(a) for a in full], name=name, log=log, stdin=subprocess.DEVNULL,
                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def dbus_daemon(self, name: str) -> Bus:
        """A private bus in tmp/<name>, configured like the system bus, with zddd's shipped
        policy (only root may call zddd's methods)."""
        directory = self.tmp / name
        directory.mkdir()
        return self.own(Bus(directory))

    def zddd(self, name: str, ns: NetNS | str, bus: Bus, config: dict | None = None) -> Zddd:
        """Start zddd in `ns` on `bus` with the lab's defaults (fast probes, state file in
        tmp/<name>, drain_timeout 20, a pin dir of its own for a BPF backend) plus `config`;
        returns once it owns its bus name."""
        directory = self.tmp / name
        directory.mkdir()
        config = {"drain_timeout": 20, **(config or {})}
        if config.get("backend", "nftables") != "nftables" and "bpf_pin_dir" not in config:
            config["bpf_pin_dir"] = self.bpf_pin_dir()
        return self.own(Zddd(self.ns(ns), bus, directory, config, name=name)).start()

    def nginx(self, name: str, ns: NetNS | str, vhosts: dict[int, str], *, workers: int = 1,
              cpus: str = "") -> Proc:
        """nginx in `ns` answering `vhosts[port]` (plus a newline) on each port."""
        root = self.tmp / name
        for sub in ("", "temp"):
            (root / sub).mkdir(exist_ok=True)
        servers = "\n".join(
            f"  server {{ listen {port} reuseport; listen [::]:{port} reuseport;\n"
            f"    location / {{ return 200 '{answer}\\n'; }} }}"
            for port, answer in vhosts.items())
        conf = root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=root, workers=workers, servers=servers))
        pin = ["taskset", "-c", cpus] if cpus else []
        proc = self.spawn(name, ns, [*pin, "nginx", "-p", str(root), "-e", str(root / "error.log"),
                                     "-c", str(conf)])
        for port in vhosts:
            wait_for(lambda p=port: proc.check_alive() or port_open(self, ns, p), 10,
                     f"{name} on port {port}")
        return proc

    def haproxy(self, name: str, ns: NetNS | str, config_text: str) -> HAProxy:
        """HAProxy in the foreground with a shipped config made lab-ready: the admin socket
        moved into tmp, no chroot/user switch, no syslog."""
        sock = self.tmp / f"{name}.sock"
        conf = self.tmp / f"{name}.cfg"
        conf.write_text(lab_haproxy_config(config_text, sock))
        run(["haproxy", "-c", "-q", "-f", str(conf)])
        proc = self.spawn(name, ns, ["haproxy", "-db", "-f", str(conf)])
        wait_for(lambda: proc.check_alive() or sock.exists(), 10, f"{name} admin socket")
        return HAProxy(ns, sock, proc)

    def loadgen(self, name: str, ns: NetNS | str, url: str, *, workers: int = 4,
                interval: float = 0.01) -> "LoadGen":
        """`python -m zdddlab.loadgen` in `ns` against `url`; returns once a request finished."""
        out = self.tmp / f"{name}.jsonl"
        proc = self.spawn(name, ns, [str(VENV_BIN / "python"), "-m", "zdddlab.loadgen",
                                     "--url", url, "--workers", str(workers),
                                     "--interval", str(interval), "--out", str(out)])
        lg = LoadGen(proc, out)
        wait_for(lambda: proc.check_alive() or lg.records(), 10, f"{name} first response")
        return lg


@dataclass
class LoadGen:
    """A running load generator (Lab.loadgen) and the file it records requests in."""

    proc: Proc
    out: Path

    def records(self) -> list[dict]:
        """Every finished request so far: {"t": start (monotonic), "d": seconds, "ok": bool,
        "body": answer or error}."""
        try:
            lines = self.out.read_text().splitlines()
        except OSError:
            return []
        result = []
        for line in lines:
            try:
                result.append(json.loads(line))
            except ValueError:
                pass  # a line being written right now
        return result

    def finish(self) -> list[dict]:
        self.proc.stop()
        return self.records()


# ---- the integration tests' topology ------------------------------------------------------

CLIENT_V4, APP_V4 = "198.51.100.1", "198.51.100.2"
CLIENT_V6, APP_V6 = "2001:db8::1", "2001:db8::2"


class AppLab(Lab):
    """A client namespace and an app-server namespace joined by a veth, vhosts main (8080) and
    backup (80) in the app namespace, a private bus in `tmp`, and (after start_zddd) a zddd
    whose config names `backend` and a bpf_pin_dir of this lab's. `tmp` given: the caller's,
    kept at close; None: a new one, removed at close."""

    def __init__(self, tmp: Path | None = None, *, backend: str = "nftables", prefix: str = "",
                 beside: bool = False):
        if tmp is None:
            super().__init__(prefix=prefix)
        else:
            super().__init__(prefix=prefix, keep_tmp=True, tmp=tmp)
        self.backend = backend
        # Run zddd's one service as service "web" beside a second, "api" (BESIDE), with vhosts
        # of its own ("api-main", "api-backup"): what tests see must not change.
        self.beside = beside
        self.zddd: Zddd | None = None
        try:
            self.client = self.netns("cli")
            self.app = self.netns("app")
            link(self.client, self.app, (CLIENT_V4, CLIENT_V6), (APP_V4, APP_V6))
            self.main = Vhost(self.app, 8080, "main")
            self.closers.append(self.main.stop)
            self.backup = Vhost(self.app, 80, "backup")
            self.closers.append(self.backup.stop)
            if beside:
                for port, name in ((9080, "api-main"), (90, "api-backup")):
                    vhost = Vhost(self.app, port, name)
                    self.closers.append(vhost.stop)
            self.bus = self.own(Bus(self.tmp))
            self.pin_dir = self.bpf_pin_dir(mount=backend != "nftables")
        except BaseException:
            self.close()
            raise

    def start_zddd(self, config: dict | None = None, wait: bool = True) -> Zddd:
        """A zddd in the app namespace on the lab's bus; `config` overrides the lab's
        defaults (Zddd's, plus this lab's backend and bpf_pin_dir)."""
        config = {"backend": self.backend, "bpf_pin_dir": self.pin_dir, **(config or {})}
        self.zddd = self.own(Zddd(self.app, self.bus, self.tmp, config,
                                  service="web" if self.beside else None))
        return self.zddd.start(wait=wait)


# ---- the demo's and e2e tests' topology ---------------------------------------------------

LB_APP_ADDR = "198.51.100.1"      # the load balancer on the app servers' bridge
APP_ADDRS = {"app1": "198.51.100.11", "app2": "198.51.100.12"}
LB_CLIENT_ADDR = "203.0.113.1"    # the load balancer's frontend, as the client sees it
CLIENT_ADDR = "203.0.113.10"
HAPROXY_CONFIGS = {"traffic-port": EXAMPLES / "haproxy" / "traffic-port.cfg",
                   "health-port": EXAMPLES / "haproxy" / "health-port.cfg"}


@dataclass
class AppServer:
    name: str
    netns: NetNS
    addr: str
    zddd: Zddd
    nginx: Proc


@dataclass
class Cluster:
    lb: NetNS
    client: NetNS
    apps: dict[str, AppServer]
    haproxy: HAProxy
    url: str = f"http://{LB_CLIENT_ADDR}/"


def cluster(lab: Lab, usage: str = "traffic-port", zddd_config: dict | None = None,
            own_port: int | None = None) -> Cluster:
    """A client, a load balancer running HAProxy with the shipped config for `usage`, and two
    app servers, each with nginx serving "<host> main" on 8080 and "<host> backup" on 80, its
    own dbus-daemon (zddd owns one bus name per bus) and zddd. With `own_port`, nginx serves
    main there too and it is zddd's main target (the README's fix for mixed traffic). Returns
    once HAProxy has every server UP."""
    lb = lab.netns("lb")
    client = lab.netns("client")
    lab.bridge(lb, f"{LB_APP_ADDR}/24")
    lab.link(lb, "client", client, "eth0", cidr_a=f"{LB_CLIENT_ADDR}/24",
             cidr_b=f"{CLIENT_ADDR}/24")
    apps = {}
    for name, addr in APP_ADDRS.items():
        ns = lab.netns(name)
        lab.link(lb, name, ns, "eth0", cidr_b=f"{addr}/24", master_a="br0")
        bus = lab.dbus_daemon(f"{name}-bus")
        vhosts = {8080: f"{name} main", 80: f"{name} backup"}
        config = zddd_config
        if own_port is not None:
            vhosts[own_port] = f"{name} main"
            config = {**(zddd_config or {}), "targets": {"main": {"port": own_port}}}
        nginx = lab.nginx(f"{name}-nginx", ns, vhosts)
        apps[name] = AppServer(name, ns, addr, lab.zddd(f"{name}-zddd", ns, bus, config), nginx)
    haproxy = lab.haproxy("haproxy", lb, HAPROXY_CONFIGS[usage].read_text())
    # "UP 1/2" is HAProxy's initial state before the first check: wait for checks to pass.
    wait_for(lambda: set(haproxy.servers().values()) == {"UP"}, 15,
             "HAProxy to see every server UP")
    return Cluster(lb, client, apps, haproxy)
