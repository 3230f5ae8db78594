"""Probes run from inside a namespace: HTTP requests, TCP connects, held connections, the
agent-check, metrics scrapes, and watching nftables changes.

Each helper that talks to the network runs a short-lived child process inside the namespace
(curl or Debian's python3), so the test process itself never enters a namespace. Helpers that
hold something open (KeepAlive, HeldConnection, NftMonitor) are closed with `close()`.
"""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from contextlib import suppress

from .base import PYTHON, LabError, wait_for
from .net import NetNS, ns_name


def port_open(lab, ns: NetNS | str, port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP connect from inside `ns` to host:port is accepted (`lab` is unused; it
    stays for the callers that pass one)."""
    res = subprocess.run(["ip", "netns", "exec", ns_name(ns), "timeout", "3", "bash", "-c",
                          f"exec 3<>/dev/tcp/{host}/{port}"], capture_output=True)
    return res.returncode == 0


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
        self.proc.close()


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
            self.proc.close()
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


class NftMonitor:
    """`nft monitor` in a namespace: every ruleset change made there while it runs. `changes()`
    gives the event lines that concern zddd's table."""

    def __init__(self, ns: NetNS):
        self.ns = ns
        self.proc = ns.popen("nft", "monitor", "ruleset", stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # Ready once it reports a change to a table of the test's own (it subscribes some time
        # after starting, so keep making changes until one shows).
        probes: list[str] = []
        deadline = time.monotonic() + 5
        while not any(p in line for p in probes for line in self.lines):
            if time.monotonic() > deadline:
                self.close()
                raise LabError("nft monitor did not start")
            probes.append(f"zt_probe_{secrets.token_hex(3)}")
            ns.run("nft", "add", "table", "inet", probes[-1])
            with suppress(LabError):
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
        self.proc.close()
