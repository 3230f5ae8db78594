"""Lab plumbing for the demo, the bench and the e2e test: network namespaces, veth links,
dbus-daemon, zddd, nginx, HAProxy and a load generator, all real processes.

Everything a `Lab` creates (namespaces, processes, a temporary directory) is removed when it is
closed, also after an exception, Ctrl-C or SIGTERM (the `with` block turns SIGTERM/SIGHUP into
SystemExit so the cleanup runs). Namespaces carry a random suffix; addresses come from the
documentation ranges 198.51.100.0/24 and 203.0.113.0/24, and nothing is routed out.

Run as root. `python labkit.py loadgen ...` is the load generator's entry point; the lab starts
it inside a client namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
VENV_BIN = REPO / ".venv" / "bin"

# The test suite's lab (namespaces, a private bus with zddd's shipped policy, zddd processes) is
# the one source of that plumbing; this module adds what the demo and the bench need on top:
# bridges, nginx, HAProxy, a load generator, and cleanup on Ctrl-C/SIGTERM.
sys.path.insert(0, str(REPO / "tests"))
import lab as testlab  # noqa: E402


class LabError(RuntimeError):
    pass


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    try:
        return subprocess.run(argv, **kw)
    except subprocess.CalledProcessError as e:
        raise LabError(f"{' '.join(argv)} failed: {(e.stderr or '').strip()}") from None


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns a true value (which is returned) or raise LabError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise LabError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        if not self.alive():
            raise LabError(f"{self.name} exited with {self.popen.returncode}:\n"
                           f"{self.log_text()[-2000:]}")


@dataclass
class Zddd:
    name: str
    netns: str
    bus: str  # the D-Bus address zddd serves on
    process: "testlab.Zddd"

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run zddctl against this zddd (from the root namespace: the bus is a unix socket)."""
        res = self.process.zddctl(*args, timeout=120)
        if check and res.returncode != 0:
            raise LabError(f"zddctl {' '.join(args)} exited {res.returncode}: "
                           f"{res.stderr.strip()}")
        return res

    def status(self) -> dict:
        return json.loads(self.ctl("status", "--json").stdout)

    def check_alive(self) -> None:
        if self.process.proc.poll() is not None:
            raise LabError(f"{self.name} exited with {self.process.proc.returncode}:\n"
                           f"{self.process.log()[-2000:]}")


@dataclass
class HAProxy:
    netns: str
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


@dataclass
class Lab:
    """A set of namespaces and processes that disappears on close()."""

    prefix: str = "zdl"
    keep_tmp: bool = False
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="zddd-lab-")))
    namespaces: list["testlab.NetNS"] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    closers: list = field(default_factory=list)  # close() of the test lab's objects
    _old_handlers: dict = field(default_factory=dict)

    # ---- lifetime ----

    def __enter__(self) -> "Lab":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[sig] = signal.signal(sig, _exit_on_signal)
            self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    def close(self) -> None:
        # Ctrl-C pressed again during cleanup must not leave namespaces behind.
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in reversed(self.procs):
                stop(proc)
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

    def netns(self, role: str) -> str:
        """A new namespace (loopback up) named after `role`; returns its name."""
        ns = testlab.NetNS(f"{self.prefix}{role}")
        self.namespaces.append(ns)
        return ns.name

    def _netns_object(self, name: str) -> "testlab.NetNS":
        return next(ns for ns in self.namespaces if ns.name == name)

    def bridge(self, ns: str, cidr: str, name: str = "br0") -> str:
        _run(["ip", "-n", ns, "link", "add", name, "type", "bridge"])
        _run(["ip", "-n", ns, "addr", "add", cidr, "dev", name])
        _run(["ip", "-n", ns, "link", "set", name, "up"])
        return name

    def link(self, ns_a: str, if_a: str, ns_b: str, if_b: str, *, cidr_a: str | None = None,
             cidr_b: str | None = None, master_a: str | None = None) -> None:
        """A veth pair between two namespaces, created directly inside them."""
        _run(["ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
              "netns", ns_b])
        for ns, ifname, cidr in ((ns_a, if_a, cidr_a), (ns_b, if_b, cidr_b)):
            if cidr:
                _run(["ip", "-n", ns, "addr", "add", cidr, "dev", ifname])
        if master_a:
            _run(["ip", "-n", ns_a, "link", "set", if_a, "master", master_a])
        _run(["ip", "-n", ns_a, "link", "set", if_a, "up"])
        _run(["ip", "-n", ns_b, "link", "set", if_b, "up"])

    def exec(self, ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", ns, *argv], **kw)

    # ---- processes ----

    def spawn(self, name: str, ns: str | None, argv: list[str], **kw) -> Proc:
        """Start a process (inside `ns`) with its output in tmp/<name>.log. It gets its own
        session so a terminal's Ctrl-C reaches only us, and we stop it in order."""
        log = self.tmp / f"{name}.log"
        full = ["ip", "netns", "exec", ns, *argv] if ns else argv
        with open(log, "wb") as out:
            popen = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True, **kw)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def dbus_daemon(self, name: str) -> "testlab.Bus":
        """A private bus configured like the system bus, with zddd's shipped policy (only
        root may call zddd's methods)."""
        directory = self.tmp / name
        directory.mkdir()
        # dbus-daemon warns on stderr (no group zddd, fd limit): into a log, not the demo.
        with open(directory / "dbus-daemon.log", "wb") as log, _stderr_to(log):
            bus = testlab.Bus(directory)
        self.closers.append(bus.close)
        return bus

    def zddd(self, name: str, ns: str, bus: "testlab.Bus", config: dict | None = None) -> Zddd:
        """Start zddd in `ns` on `bus` with the test lab's defaults (fast probes, state file
        in tmp) plus `config`; returns once it owns its bus name."""
        directory = self.tmp / name
        directory.mkdir()
        process = testlab.Zddd(self._netns_object(ns), bus, directory,
                               {"drain_timeout": 20, **(config or {})})
        self.closers.append(process.close)
        try:
            process.start()
        except AssertionError as e:
            raise LabError(f"{name} did not start: {e}") from None
        return Zddd(name, ns, bus.address, process)

    def nginx(self, name: str, ns: str, vhosts: dict[int, str], *, workers: int = 1,
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

    def haproxy(self, name: str, ns: str, config_text: str) -> HAProxy:
        """HAProxy in the foreground with a shipped config made lab-ready: the admin socket
        moved into tmp, no chroot/user switch, no syslog."""
        sock = self.tmp / f"{name}.sock"
        conf = self.tmp / f"{name}.cfg"
        conf.write_text(lab_haproxy_config(config_text, sock))
        _run(["haproxy", "-c", "-q", "-f", str(conf)])
        proc = self.spawn(name, ns, ["haproxy", "-db", "-f", str(conf)])
        wait_for(lambda: proc.check_alive() or sock.exists(), 10, f"{name} admin socket")
        return HAProxy(ns, sock, proc)

    def loadgen(self, name: str, ns: str, url: str, *, workers: int = 4,
                interval: float = 0.01) -> "LoadGen":
        out = self.tmp / f"{name}.jsonl"
        proc = self.spawn(name, ns, [sys.executable, str(Path(__file__).resolve()), "loadgen",
                                     "--url", url, "--workers", str(workers),
                                     "--interval", str(interval), "--out", str(out)])
        lg = LoadGen(proc, out)
        wait_for(lambda: proc.check_alive() or lg.records(), 10, f"{name} first response")
        return lg


@contextlib.contextmanager
def _stderr_to(file):
    """Point fd 2 at `file` while children started inside the block inherit it."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# Set once Ctrl-C was pressed. A terminal's Ctrl-C also reaches the lab's daemons that share our
# process group, so a failure seen just after it is a consequence, not the story to tell.
interrupted = threading.Event()


def _interrupt(signum, frame):
    interrupted.set()
    raise KeyboardInterrupt


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def run_main(main, name: str) -> None:
    """Run a demo or bench `main` and exit with its status: 2 when the lab could not be built,
    130 when interrupted (everything removed either way)."""
    try:
        sys.exit(main())
    except (LabError, subprocess.TimeoutExpired) as e:
        if interrupted.is_set():
            print(f"\n{name}: interrupted; namespaces and processes removed", file=sys.stderr)
            sys.exit(130)
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; namespaces and processes removed", file=sys.stderr)
        sys.exit(130)


def stop(proc: Proc, timeout: float = 5.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if proc.popen.poll() is None:
        try:
            os.killpg(proc.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.popen.wait()


def port_open(lab: Lab, ns: str, port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP connect from inside `ns` to host:port is accepted."""
    res = subprocess.run(["ip", "netns", "exec", ns, "timeout", "3", "bash", "-c",
                          f"exec 3<>/dev/tcp/{host}/{port}"], capture_output=True)
    return res.returncode == 0


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


# ---- the demo's topology ----------------------------------------------------------------

LB_APP_ADDR = "198.51.100.1"      # the load balancer on the app servers' bridge
APP_ADDRS = {"app1": "198.51.100.11", "app2": "198.51.100.12"}
LB_CLIENT_ADDR = "203.0.113.1"    # the load balancer's frontend, as the client sees it
CLIENT_ADDR = "203.0.113.10"
HAPROXY_CONFIGS = {"traffic-port": EXAMPLES / "haproxy" / "traffic-port.cfg",
                   "health-port": EXAMPLES / "haproxy" / "health-port.cfg"}


@dataclass
class AppServer:
    name: str
    netns: str
    addr: str
    zddd: Zddd
    nginx: Proc


@dataclass
class Cluster:
    lb: str
    client: str
    apps: dict[str, AppServer]
    haproxy: HAProxy
    url: str = f"http://{LB_CLIENT_ADDR}/"


def cluster(lab: Lab, usage: str = "traffic-port", zddd_config: dict | None = None) -> Cluster:
    """A client, a load balancer running HAProxy with the shipped config for `usage`, and two
    app servers, each with nginx serving "<host> main" on 8080 and "<host> backup" on 80, its
    own dbus-daemon (zddd owns one bus name per bus) and zddd. Returns once HAProxy has every
    server UP."""
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
        nginx = lab.nginx(f"{name}-nginx", ns, {8080: f"{name} main", 80: f"{name} backup"})
        apps[name] = AppServer(name, ns, addr, lab.zddd(f"{name}-zddd", ns, bus, zddd_config),
                               nginx)
    haproxy = lab.haproxy("haproxy", lb, HAPROXY_CONFIGS[usage].read_text())
    # "UP 1/2" is HAProxy's initial state before the first check: wait for checks to pass.
    wait_for(lambda: set(haproxy.servers().values()) == {"UP"}, 15,
             "HAProxy to see every server UP")
    return Cluster(lb, client, apps, haproxy)


# ---- load generator ---------------------------------------------------------------------

@dataclass
class LoadGen:
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
        stop(self.proc)
        return self.records()


def _loadgen_worker(url: str, interval: float, stopping: threading.Event, out, lock) -> None:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    while not stopping.is_set():
        started = time.monotonic()
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=5)
        try:
            conn.request("GET", parts.path or "/", headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace").strip()
            ok = resp.status == 200
            if not ok:
                body = f"HTTP {resp.status}: {body[:60]}"
        except (OSError, http.client.HTTPException) as e:
            ok, body = False, f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        line = json.dumps({"t": started, "d": round(time.monotonic() - started, 6), "ok": ok,
                           "body": body})
        with lock:
            out.write(line + "\n")
            out.flush()
        pause = interval - (time.monotonic() - started)
        if pause > 0:
            stopping.wait(pause)


def loadgen_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="labkit.py loadgen")
    p.add_argument("--url", required=True)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--interval", type=float, default=0.01,
                   help="seconds between request starts per worker")
    p.add_argument("--out", required=True)
    p.add_argument("--duration", type=float, default=600,
                   help="stop by itself after this long (bounded load)")
    args = p.parse_args(argv)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stopping.set())
    signal.signal(signal.SIGINT, lambda *a: stopping.set())
    lock = threading.Lock()
    with open(args.out, "w") as out:
        threads = [threading.Thread(target=_loadgen_worker,
                                    args=(args.url, args.interval, stopping, out, lock))
                   for _ in range(args.workers)]
        for t in threads:
            t.start()
        stopping.wait(args.duration)
        stopping.set()
        for t in threads:
            t.join()
    return 0


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


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "loadgen":
        sys.exit(loadgen_main(sys.argv[2:]))
    print("usage: labkit.py loadgen --url URL --out FILE [--workers N] [--interval S]",
          file=sys.stderr)
    sys.exit(2)
