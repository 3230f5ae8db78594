"""The daemons a lab runs: zddd, small test vhosts, nginx's config, HAProxy.

`Zddd` is a real zddd process in a namespace on a private `Bus`, with a config of the lab's
defaults (state file in its directory, fast probes) plus overrides. It is what tests drive
(`zddctl`, `call`, `prop`) and what the demo and bench drive (`ctl`, `status`, which raise
LabError on failure). `steered_to()` reads where the kernel steers new connections, through a
reader per backend (`STEERING_READERS`); a backend without a reader of the lab's own is read by
zddd's own backend code, run in the namespace.
"""

from __future__ import annotations

import atexit
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .base import PYTHON, REPO, VENV_BIN, LabError, Proc, wait_for
from .bus import INTERFACE, PROPERTIES, Bus, dbus_call, name_has_owner
from .net import NetNS
from .probes import without_counters

SERVICE_PATH = "/org/zddd/Steering1/service/"
SERVICE_INTERFACE = "org.zddd.Steering1.Service"
SERVICE_METHODS = ("Switch", "SwitchWithOptions", "WaitDrained", "SetWeights")


def _toml_value(value) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def to_toml(config: dict) -> str:
    """Enough TOML for zddd configs: top-level scalars/lists and nested tables."""
    lines, tables = [], []

    def emit(prefix: str, table: dict) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if prefix:
            tables.append(f"[{prefix}]")
            tables.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        else:
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{k}" if prefix else k, v)

    emit("", config)
    return "\n".join(lines + tables) + "\n"


# The keys of one service in the single-service form (SPEC "Services").
SERVICE_KEYS = ("listen_port", "initial", "drain_timeout", "targets", "agent")
# The second service of a lab run with two (`beside`): its vhosts are the lab's to start.
BESIDE = {"listen_port": 9888, "targets": {"main": {"port": 9080}, "backup": {"port": 90}}}


def as_services(config: dict, name: str) -> dict:
    """A single-service config as the many-service form: its service is `name`, with the
    single form's defaults written out, beside service "api" (BESIDE)."""
    one = {k: v for k, v in config.items() if k in SERVICE_KEYS}
    rest = {k: v for k, v in config.items() if k not in SERVICE_KEYS}
    targets = one.get("targets", {})
    one["targets"] = {t: {"port": port, **targets.get(t, {})}
                      for t, port in (("main", 8080), ("backup", 80))}
    one.setdefault("listen_port", 8888)
    one.setdefault("agent", {"listen": "[::]:8889"})
    beside = {**BESIDE, "drain_timeout": one.get("drain_timeout", 30)}
    return {**rest, "services": {name: one, "api": beside}}


class Zddd:
    """A real zddd process in `ns` on `bus`, its files (config, log, state) in `tmp`. `config`
    holds overrides of the lab defaults; `backend` is the configured one ("nftables" unless
    the config says otherwise). With `service`, the config (still written by tests in the
    single-service form) is run as that service beside a second one, and zddctl, calls and
    properties go to that service."""

    def __init__(self, ns: NetNS, bus: Bus, tmp: Path, config: dict | None = None, *,
                 name: str = "zddd", service: str | None = None):
        self.name, self.ns, self.bus, self.tmp = name, ns, bus, tmp
        self.service = service
        self.config_path = tmp / "zddd.toml"
        self.log_path = tmp / "zddd.log"
        self.state_path = tmp / "state.json"
        self.config = {"state_file": str(self.state_path), "drain_timeout": 10,
                       "health": {"interval": 0.2, "timeout": 0.5}}
        self.config.update(config or {})
        self.proc: Proc | None = None
        self._log = None
        self.write_config()

    @property
    def backend(self) -> str:
        return self.config.get("backend", "nftables")

    def write_config(self, text: str | None = None) -> None:
        config = self.config
        if "services" in config:
            # A test's own services: the lab's default drain_timeout goes into each of them.
            default = {k: v for k, v in config.items() if k in SERVICE_KEYS}
            config = {k: v for k, v in config.items() if k not in SERVICE_KEYS}
            config["services"] = {name: {**default, **svc}
                                  for name, svc in self.config["services"].items()}
        elif self.service:
            config = as_services(config, self.service)
        self.config_path.write_text(text if text is not None else to_toml(config))

    # ---- lifetime ----

    def start(self, wait: bool = True) -> "Zddd":
        """Start zddd; with `wait`, return once it owns its bus name (LabError if it exits)."""
        self._log = open(self.log_path, "a")
        self.proc = self.ns.popen(str(VENV_BIN / "zddd"), "--config", str(self.config_path),
                                  "--bus", self.bus.address, stdout=self._log,
                                  stderr=subprocess.STDOUT)
        if wait:
            # A BPF backend compiles with bcc first: seconds, more with parallel test workers.
            wait_for(lambda: self.proc.poll() is not None or self.owns_name(),
                     15 if self.backend == "nftables" else 60, f"{self.name} to own its bus name")
            self.check_alive()
        return self

    def owns_name(self) -> bool:
        return name_has_owner(self.bus.address)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send `sig` and wait for the exit; returns the exit status, once the bus name is
        released."""
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=10)
        self._close_log()
        wait_for(lambda: not self.owns_name(), 5, "the bus name to be released")
        return rc

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
            raise LabError(f"{self.name} exited with {rc}:\n{self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        if self.proc:
            self.proc.close()
        self._close_log()

    # ---- talking to it ----

    def zddctl(self, *args: str, user: str | None = None, timeout: float = 60):
        """zddctl against this zddd (from the root namespace: the bus is a unix socket), as
        `user` if given; the CompletedProcess, whatever the exit status."""
        argv = [str(VENV_BIN / "zddctl"), "--bus", self.bus.address,
                *(("-s", self.service) if self.service else ()), *args]
        kw = {}
        if user:
            # Another user may not be able to reach the checkout (a clone in /root is 0700):
            # run zddctl from a world-readable copy of the package, with Debian's python.
            argv = [PYTHON, "-m", "zddd.cli", *argv[1:]]
            kw = {"cwd": "/", "env": {**os.environ, "PYTHONPATH": str(public_package())}}
            # Numeric ids: Debian's nobody has group nogroup, not a group named after it.
            pw = pwd.getpwnam(user)
            argv = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
                    *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """zddctl; with `check`, a non-zero exit is a LabError carrying zddctl's stderr."""
        res = self.zddctl(*args, timeout=120)
        if check and res.returncode != 0:
            raise LabError(f"zddctl {' '.join(args)} exited {res.returncode}: "
                           f"{res.stderr.strip()}")
        return res

    def status(self) -> dict:
        return json.loads(self.ctl("status", "--json").stdout)

    def call(self, member: str, signature: str = "", *body, timeout: float = 60):
        """Call a Manager method (the service's, for a switch method of a lab's service);
        returns (error_name or None, reply body)."""
        if self.service and member in SERVICE_METHODS:
            return dbus_call(self.bus.address, member, signature, list(body), timeout,
                             SERVICE_INTERFACE, path=SERVICE_PATH + self.service)
        return dbus_call(self.bus.address, member, signature, list(body), timeout)

    def prop(self, name: str):
        if self.service:
            err, body = dbus_call(self.bus.address, "Get", "ss", [SERVICE_INTERFACE, name], 10,
                                  interface=PROPERTIES, path=SERVICE_PATH + self.service)
            if err is None:
                return body[0].value
        err, body = dbus_call(self.bus.address, "Get", "ss", [INTERFACE, name], 10,
                              interface=PROPERTIES)
        if err is not None:
            raise LabError(f"Get {name}: {err} {body}")
        return body[0].value

    # ---- the kernel's view ----

    def nft(self) -> dict:
        """The kernel's view of zddd's table in the namespace (JSON), or {} if absent."""
        r = self.ns.run("nft", "-j", "list", "table", "inet", "zddd", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else {}

    def steered_to(self) -> str | None:
        """The target the kernel steers new connections to ("off" when zddd's data plane is
        there but steers nowhere), or None when nothing of zddd's is in the kernel."""
        return STEERING_READERS.get(self.backend, read_with_zddd)(self)

    def data_plane(self) -> object:
        """Everything of zddd's in the kernel, comparable between two moments: equal means
        nothing was rewritten or re-attached (packet counters left out). nftables: the table's
        listing with handles; BPF: where it steers, each pin's inode (a re-pin makes a new
        one), and the programs attached in the namespace by id."""
        if self.backend == "nftables":
            return without_counters(self.nft())
        pins = {}
        root = Path(self.config["bpf_pin_dir"])
        for path in sorted(root.rglob("*")) if root.exists() else ():
            pins[str(path.relative_to(root))] = path.stat().st_ino
        attached = self.ns.run("bpftool", "-j", "net", "show", check=False).stdout
        links = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True,
                               text=True).stdout
        netns_links = sorted(
            (link.get("prog_id"), link.get("netns_ino")) for link in json.loads(links or "[]")
            if link.get("type") == "netns" and link.get("attach_type") == "sk_lookup"
            and str(link.get("netns_ino")) == self._netns_inode())
        return {"steering": self.steered_to(), "pins": pins,
                "attached": json.loads(attached or "[]"), "links": netns_links}

    def _netns_inode(self) -> str:
        return self.ns.run("stat", "-L", "-c", "%i", "/proc/self/ns/net").stdout.strip()


_public_package: Path | None = None


def public_package() -> Path:
    """A directory every user can read holding a copy of the `zddd` package (for PYTHONPATH),
    made once per process and removed at its exit."""
    global _public_package
    if _public_package is None:
        top = Path(tempfile.mkdtemp(prefix="zddd-pkg-"))
        atexit.register(shutil.rmtree, top, True)
        shutil.copytree(REPO / "zddd", top / "zddd",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for path in [top, *top.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        _public_package = top
    return _public_package


def read_nftables(zddd: Zddd) -> str | None:
    """The chain the steer map's element for zddd's listen port points at ("split_N" for a
    split), read straight from the kernel; the map holds one element per service."""
    port = zddd.config.get("listen_port", 8888)
    for item in zddd.nft().get("nftables", []):
        m = item.get("map")
        if m and m["name"] == "steer":
            targets = [e[1]["goto"]["target"] for e in m.get("elem", []) if e[0] == port]
            return targets[0].removeprefix("steer_") if targets else "off"
    return None


READ_WITH_ZDDD = r"""
import json, sys
from zddd.backends import Desired, backend_class, weight_target
from zddd.config import load
config = load(sys.argv[1])
service = sys.argv[2] if len(sys.argv) > 2 else next(iter(config.services))
state = backend_class(config.backend)().read(Desired.from_config(config, {}))
print(json.dumps(None if state is None else weight_target(state.weights.get(service)) or "off"))
"""


def read_with_zddd(zddd: Zddd) -> str | None:
    """What zddd's own backend code reads from the kernel, run in the namespace with zddd's
    config: for backends the lab has no reader of its own for (not independent of zddd, so a
    test that can should read the kernel itself)."""
    r = zddd.ns.run(str(VENV_BIN / "python"), "-c", READ_WITH_ZDDD, str(zddd.config_path),
                    check=False)
    if r.returncode != 0:
        raise LabError(f"reading {zddd.backend}'s steering failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


def _pinned_u32(path: str, key: int = 0) -> int | None:
    """Element `key` of a pinned array (or u32-keyed hash) map of u32, read with bpftool (not
    zddd's code); None when nothing is pinned there or the key has no element."""
    r = subprocess.run(["bpftool", "-j", "map", "lookup", "pinned", path, "key",
                        *(str(b) for b in key.to_bytes(4, "little"))],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    value = json.loads(r.stdout)["value"]
    return int.from_bytes(bytes(int(b, 16) for b in value[:4]), "little")


def _target_ports(zddd: Zddd) -> dict[str, int]:
    ports = {"main": 8080, "backup": 80}
    for name, spec in zddd.config.get("targets", {}).items():
        ports[name] = spec.get("port", ports[name])
    return ports


def read_rewriting_bpf(zddd: Zddd) -> str | None:
    """tc and xdp: the lab service's entry in the pinned `services` hash (listen port -> slot,
    main port, backup port), then that slot of the `active` array: 0 off, else 1 + main's
    weight (100: main, 0: backup, between: split)."""
    directory = f"{zddd.config['bpf_pin_dir']}/{zddd.backend}"
    if not Path(directory, "services").exists():
        return None
    slot = _pinned_u32(f"{directory}/services", zddd.config.get("listen_port", 8888))
    if slot is None:
        return "off"  # the data plane is there, this service is not steered
    value = _pinned_u32(f"{directory}/active", slot)
    if value is None:
        return "?"
    return {0: "off", 1: "backup", 101: "main"}.get(value, "split" if value < 101 else "?")


def read_sk_lookup(zddd: Zddd) -> str | None:
    """sk_lookup: the pinned `services` hash gives the listen port's slot, and that element of
    the pinned `active` array holds 0 for off, else 1 + main's weight (a layout without
    `services`, zddd <= cd0a822: element 0 holds 1 + the target's index in name order)."""
    pin_dir = zddd.config["bpf_pin_dir"]
    if not Path(f"{pin_dir}/sk_lookup_services").exists():
        index = _pinned_u32(f"{pin_dir}/sk_lookup_active")
        if index is None:
            return None
        names = sorted(_target_ports(zddd))
        return "off" if index == 0 else names[index - 1] if index <= len(names) else "?"
    slot = _pinned_u32(f"{pin_dir}/sk_lookup_services", zddd.config.get("listen_port", 8888))
    if slot is None:
        return "off"  # the data plane is there, this service is not steered
    value = _pinned_u32(f"{pin_dir}/sk_lookup_active", slot)
    if value is None:
        return "?"
    return {0: "off", 1: "backup", 101: "main"}.get(value, "split" if value < 101 else "?")


# Backend name -> a reader of where that backend steers, independent of zddd's code.
STEERING_READERS: dict[str, Callable[[Zddd], str | None]] = {
    "nftables": read_nftables, "tc": read_rewriting_bpf, "xdp": read_rewriting_bpf,
    "sk_lookup": read_sk_lookup}


class Vhost:
    """tests/httpd.py on a port in a namespace, answering its name; `statuses` maps paths to
    the HTTP status they answer instead of 200 (e.g. {"/health": 404})."""

    def __init__(self, ns: NetNS, port: int, name: str, statuses: dict[str, int] | None = None):
        self.ns, self.port, self.name = ns, port, name
        self.statuses = dict(statuses or {})
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        self.proc = self.ns.popen(PYTHON, str(REPO / "tests" / "httpd.py"), str(self.port),
                                  self.name, *(f"{p}={c}" for p, c in self.statuses.items()),
                                  stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.stop()
            raise LabError(f"vhost {self.name} failed to start on port {self.port}")

    def stop(self) -> None:
        if self.proc:
            self.proc.close()


NGINX_CONF = """worker_processes {workers};
pid {root}/nginx.pid;
daemon off;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  default_type text/plain;
  keepalive_requests 1000000;
  client_body_temp_path {root}/temp/body;
  proxy_temp_path {root}/temp/proxy;
  fastcgi_temp_path {root}/temp/fastcgi;
  uwsgi_temp_path {root}/temp/uwsgi;
  scgi_temp_path {root}/temp/scgi;
{servers}
}}
"""


@dataclass
class HAProxy:
    """A running HAProxy (see Lab.haproxy) and its admin socket."""

    netns: NetNS | str
    socket_path: Path
    proc: Proc

    def command(self, cmd: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(self.socket_path))
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stat(self, backend: str = "app") -> dict[str, dict[str, str]]:
        """Server name → its `show stat` row (status, check_status, agent_status, ...)."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = (dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line)
        return {row["svname"]: row for row in rows if row.get("pxname") == backend
                and row.get("svname") not in ("FRONTEND", "BACKEND")}

    def servers(self, backend: str = "app") -> dict[str, str]:
        """Server name → HAProxy status (UP, DOWN, MAINT, DRAIN, "UP 1/2", ...)."""
        return {name: row["status"] for name, row in self.stat(backend).items()}


def lab_haproxy_config(text: str, admin_socket: Path) -> str:
    """The shipped config with what needs a full system replaced: the admin socket path, the
    chroot and user switch (harmless, but the lab needs none), syslog and daemon mode."""
    out = []
    replaced = False
    for line in text.splitlines():
        word = line.split()[:2]
        if word[:2] == ["stats", "socket"]:
            indent = line[:len(line) - len(line.lstrip())]
            line = f"{indent}stats socket {admin_socket} mode 600 level admin"
            replaced = True
        elif word[:1] in (["chroot"], ["user"], ["group"], ["daemon"], ["log"]):
            continue
        out.append(line)
    if not replaced:
        raise LabError("the HAProxy config has no `stats socket` line to point at the lab")
    return "\n".join(out) + "\n"
