"""Test plumbing: network namespaces, a private dbus-daemon with zddd's policy, vhosts, zddd.

Everything here creates only namespaces and processes of its own, and every `close` is safe to
call twice and after a failure. The pytest fixtures in tests/conftest.py wrap these classes.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import signal
import subprocess
import time
from contextlib import suppress
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = "/usr/bin/python3"
POLICY = REPO / "systemd" / "org.zddd.Steering1.conf"

CLIENT_V4, APP_V4 = "198.51.100.1", "198.51.100.2"
CLIENT_V6, APP_V6 = "2001:db8::1", "2001:db8::2"


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll until predicate() is truthy; return its value or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class NetNS:
    """A network namespace with loopback up; deleted (and its processes killed) on close."""

    def __init__(self, role: str):
        self.name = f"zt-{role}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.procs: list[subprocess.Popen] = []
        self.run("ip", "link", "set", "lo", "up")

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30, **kw):
        return subprocess.run(self.cmd(*argv), check=check, timeout=timeout,
                              capture_output=True, text=True, **kw)

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(self.cmd(*argv), **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with suppress(Exception):
                proc.wait(timeout=5)
        # Anything else started in the namespace (e.g. by a test directly) goes too.
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def link(a: NetNS, b: NetNS, a_addrs: tuple[str, str], b_addrs: tuple[str, str]) -> None:
    """Join two namespaces with a veth pair; each side gets an IPv4 /24 and an IPv6 /64."""
    va, vb = f"v{secrets.token_hex(4)}", f"v{secrets.token_hex(4)}"
    subprocess.run(["ip", "link", "add", va, "netns", a.name, "type", "veth", "peer", "name",
                    vb, "netns", b.name], check=True)
    for ns, dev, (v4, v6) in ((a, va, a_addrs), (b, vb, b_addrs)):
        ns.run("ip", "addr", "add", f"{v4}/24", "dev", dev)
        ns.run("ip", "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
        ns.run("ip", "link", "set", dev, "up")
    # Static IPv6 neighbours: otherwise the first IPv6 SYN after link-up is lost while the
    # link-local address is tentative, and the connection takes a 1 s retransmit.
    macs = {dev: json.loads(ns.run("ip", "-j", "link", "show", dev).stdout)[0]["address"]
            for ns, dev in ((a, va), (b, vb))}
    for ns, dev, peer, peer_v6 in ((a, va, vb, b_addrs[1]), (b, vb, va, a_addrs[1])):
        ns.run("ip", "-6", "neigh", "replace", peer_v6, "lladdr", macs[peer], "dev", dev,
               "nud", "permanent")


class Vhost:
    """tests/httpd.py on a port in a namespace, answering its name; `statuses` maps paths to
    the HTTP status they answer instead of 200 (e.g. {"/health": 404})."""

    def __init__(self, ns: NetNS, port: int, name: str, statuses: dict[str, int] | None = None):
        self.ns, self.port, self.name = ns, port, name
        self.statuses = dict(statuses or {})
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = self.ns.popen(PYTHON, str(REPO / "tests" / "httpd.py"), str(self.port),
                                  self.name, *(f"{p}={c}" for p, c in self.statuses.items()),
                                  stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready", f"vhost {self.name} failed"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>zddd-test</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <!-- The system bus' default stance: nothing may be owned or called unless a policy allows. -->
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


class Bus:
    """A private dbus-daemon configured like the system bus, with zddd's own policy file."""

    def __init__(self, tmp: Path):
        self.dir = tmp
        self.socket = tmp / "bus"
        config = tmp / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.socket, policy=POLICY))
        os.chmod(tmp, 0o755)  # unprivileged clients must reach the socket
        self.proc = subprocess.Popen(["dbus-daemon", "--nofork", "--nosyslog",
                                      f"--config-file={config}"])
        wait_for(self.socket.exists, 10, "dbus-daemon socket")
        self.address = f"unix:path={self.socket}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


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


class Zddd:
    """A real zddd process in a namespace, on a private bus. `config` holds overrides of the
    test defaults (state file in the test's tmp dir, fast health probes)."""

    def __init__(self, ns: NetNS, bus: Bus, tmp: Path, config: dict | None = None):
        self.ns, self.bus, self.tmp = ns, bus, tmp
        self.config_path = tmp / "zddd.toml"
        self.log_path = tmp / "zddd.log"
        self.state_path = tmp / "state.json"
        self.config = {"state_file": str(self.state_path), "drain_timeout": 10,
                       "health": {"interval": 0.2, "timeout": 0.5}}
        self.config.update(config or {})
        self.proc: subprocess.Popen | None = None
        self.write_config()

    def write_config(self, text: str | None = None) -> None:
        self.config_path.write_text(text if text is not None else to_toml(self.config))

    def start(self, wait: bool = True) -> "Zddd":
        self._log = open(self.log_path, "a")
        self.proc = self.ns.popen(str(VENV_BIN / "zddd"), "--config", str(self.config_path),
                                  "--bus", self.bus.address, stdout=self._log,
                                  stderr=subprocess.STDOUT)
        if wait:
            wait_for(lambda: self.proc.poll() is not None or self.owns_name(), 15,
                     "zddd to own its bus name")
            assert self.proc.poll() is None, f"zddd exited:\n{self.log()}"
        return self

    def owns_name(self) -> bool:
        r = subprocess.run(["busctl", f"--address={self.bus.address}", "status",
                            "org.zddd.Steering1"], capture_output=True)
        return r.returncode == 0

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=10)
        self._log.close()
        wait_for(lambda: not self.owns_name(), 5, "the bus name to be released")
        return rc

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def zddctl(self, *args: str, user: str | None = None, timeout: float = 60):
        argv = [str(VENV_BIN / "zddctl"), "--bus", self.bus.address, *args]
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

    def call(self, member: str, signature: str = "", *body, timeout: float = 60):
        """Call a Manager method; returns (error_name or None, reply body)."""
        return dbus_call(self.bus.address, member, signature, list(body), timeout)

    def prop(self, name: str):
        err, body = dbus_call(self.bus.address, "Get", "ss",
                              ["org.zddd.Steering1.Manager", name], 10,
                              interface="org.freedesktop.DBus.Properties")
        assert err is None, err
        return body[0].value

    def nft(self) -> dict:
        """The kernel's view of zddd's table in the namespace (JSON), or {} if absent."""
        r = self.ns.run("nft", "-j", "list", "table", "inet", "zddd", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else {}

    def steered_to(self) -> str | None:
        """The chain the steer map's element points at, read straight from the kernel."""
        for item in self.nft().get("nftables", []):
            m = item.get("map")
            if m and m["name"] == "steer":
                elems = m.get("elem", [])
                return elems[0][1]["goto"]["target"].removeprefix("steer_") if elems else "off"
        return None

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


_public_package: Path | None = None


def public_package() -> Path:
    """A directory every user can read holding a copy of the `zddd` package (for PYTHONPATH),
    made once per test process and removed at its exit."""
    global _public_package
    if _public_package is None:
        import atexit
        import shutil
        import tempfile

        top = Path(tempfile.mkdtemp(prefix="zddd-pkg-"))
        atexit.register(shutil.rmtree, top, True)
        shutil.copytree(REPO / "zddd", top / "zddd",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for path in [top, *top.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        _public_package = top
    return _public_package


def dbus_call(address: str, member: str, signature: str, body: list, timeout: float,
              interface: str = "org.zddd.Steering1.Manager"):
    from zddd.service.dbus import Message, MessageBus, MessageType

    async def go():
        bus = await MessageBus(bus_address=address).connect()
        try:
            reply = await asyncio.wait_for(bus.call(Message(
                destination="org.zddd.Steering1", path="/org/zddd/Steering1",
                interface=interface, member=member, signature=signature, body=body)), timeout)
        finally:
            bus.disconnect()
        if reply.message_type == MessageType.ERROR:
            return reply.error_name, reply.body
        return None, reply.body

    return asyncio.run(go())


def http_get(ns: NetNS, host: str, port: int, path: str = "/", timeout: float = 5) -> str:
    """One request from inside `ns` with curl; returns the body or raises on failure."""
    url = f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"
    r = ns.run("curl", "-sS", "--max-time", str(timeout), url, check=False)
    if r.returncode != 0:
        raise ConnectionError(r.stderr.strip())
    return r.stdout.strip()


class KeepAlive:
    """An HTTP/1.1 connection held open from inside a namespace (a child process), so a test
    can send requests on the same TCP connection before and after a switch."""

    SCRIPT = r"""
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
for line in sys.stdin:
    path = line.strip()
    c.request("GET", path)
    r = c.getresponse()
    print(r.read().decode().strip(), flush=True)
"""

    def __init__(self, ns: NetNS, host: str, port: int):
        self.proc = ns.popen(PYTHON, "-c", self.SCRIPT, host, str(port), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)

    def get(self, path: str = "/") -> str:
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        if not line:
            raise ConnectionError("the kept-alive connection broke")
        return line

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


def connect_error(ns: NetNS, host: str, port: int, timeout: float = 3) -> tuple[str, float]:
    """One TCP connect from inside `ns`: ("ok" or the errno name, seconds it took)."""
    script = r"""
import errno, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(timeout)
t = time.monotonic()
try:
    s.connect((host, port))
    what = "ok"
except socket.timeout:
    what = "timeout"
except OSError as e:
    what = errno.errorcode.get(e.errno, str(e.errno))
print(what, time.monotonic() - t)
"""
    out = ns.run(PYTHON, "-c", script, host, str(port), str(timeout)).stdout.split()
    return out[0], float(out[1])


def scrape_metrics(ns: NetNS, endpoint: str = "127.0.0.1:9488") -> dict[str, float]:
    """zddd's Prometheus endpoint scraped from inside `ns`: {"name{labels}": value}."""
    r = ns.run("curl", "-sS", "--max-time", "5", f"http://{endpoint}/metrics")
    samples = {}
    for line in r.stdout.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def without_counters(listing: dict) -> dict:
    """An nft JSON listing with packet/byte counts removed (they change with traffic); handles
    stay, so a rewritten table does not compare equal."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in ("packets", "bytes")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip(listing)


# ---- drains, agent-check, signals (issue 3) ---------------------------------------------------

def agent_ask(ns: NetNS, host: str, port: int = 8889, timeout: float = 3) -> str:
    """One HAProxy-style agent-check from inside `ns`: connect, read one line, close."""
    script = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
f = s.makefile("rb")
print(f.readline().decode().strip())
"""
    return ns.run(PYTHON, "-c", script, host, str(port), str(timeout),
                  timeout=timeout + 10).stdout.strip()


class HeldConnection:
    """A plain TCP connection opened from inside `ns` and held open (by a child process) until
    `close`, which closes it and returns the CLOCK_MONOTONIC time of the close (the clock is
    shared by all processes and namespaces, so tests can measure from that moment)."""

    SCRIPT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("open", s.getsockname()[1], flush=True)
sys.stdin.readline()
s.close()
print(time.monotonic(), flush=True)
"""

    def __init__(self, ns: NetNS, host: str, port: int):
        self.proc = ns.popen(PYTHON, "-c", self.SCRIPT, host, str(port), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "open":
            self.proc.kill()
            raise ConnectionError(f"could not connect to {host}:{port}")
        self.local_port = int(line[1])

    def close(self) -> float:
        """Close the connection; the monotonic time it was closed at (now, if already gone)."""
        if self.proc.poll() is not None:
            return time.monotonic()
        self.proc.stdin.write("close\n")
        self.proc.stdin.flush()
        closed_at = float(self.proc.stdout.readline())
        self.proc.wait(timeout=5)
        return closed_at


class SignalWatcher:
    """Collects zddd's Switched signals on the bus (a child process subscribed with AddMatch).
    `switched()` is the list of (from, to, duration_usec) received so far."""

    SCRIPT = r"""
import asyncio, json, sys
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="AddMatch", signature="s",
        body=["type='signal',interface='org.zddd.Steering1.Manager',member='Switched'"]))
    def on(msg):
        if msg.message_type == MessageType.SIGNAL and msg.member == "Switched":
            print(json.dumps(msg.body), flush=True)
    bus.add_message_handler(on)
    print("ready", flush=True)
    await bus.wait_for_disconnect()

asyncio.run(main())
"""

    def __init__(self, bus: Bus):
        import threading

        self.proc = subprocess.Popen([str(VENV_BIN / "python"), "-c", self.SCRIPT, bus.address],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready", "signal watcher failed"
        self._seen: list[tuple] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._seen.append(tuple(json.loads(line)))

    def switched(self) -> list[tuple]:
        return list(self._seen)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


class NftMonitor:
    """`nft monitor` in a namespace: every ruleset change made there while it runs. `changes()`
    gives the event lines that concern zddd's table."""

    def __init__(self, ns: NetNS):
        self.ns = ns
        self.proc = ns.popen("nft", "monitor", "ruleset", stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        import threading

        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # Ready once it reports a change to a table of the test's own (it subscribes some time
        # after starting, so keep making changes until one shows).
        probes: list[str] = []
        deadline = time.monotonic() + 5
        while not any(p in line for p in probes for line in self.lines):
            assert time.monotonic() < deadline, "nft monitor did not start"
            probes.append(f"zt_probe_{secrets.token_hex(3)}")
            ns.run("nft", "add", "table", "inet", probes[-1])
            with suppress(AssertionError):
                wait_for(lambda: any(probes[-1] in line for line in self.lines), 0.2, "")
        for probe in probes:
            ns.run("nft", "delete", "table", "inet", probe)
        wait_for(lambda: any(f"delete table inet {probes[-1]}" in line for line in self.lines),
                 5, "nft monitor")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def changes(self) -> list[str]:
        return [line for line in self.lines if " inet zddd" in line]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
