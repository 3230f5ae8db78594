"""Traffic inside a system test's container while the package is upgraded under a running zddd:
a client sending requests to 127.0.0.1:8888 (each on a new connection), a connection opened
before and used after, and a watch for zddd's Switched signal."""

from __future__ import annotations

import json
import time

from machine import Machine

LOAD = r'''#!/usr/bin/python3
"""GET / on 127.0.0.1:8888, each on a new connection, until /run/load.stop exists; then one
JSON line to stdout: requests answered, failures (time and reason), the bodies seen."""
import json, os, socket, time

ok, failures, answers = 0, [], {}
while not os.path.exists("/run/load.stop"):
    try:
        with socket.create_connection(("127.0.0.1", 8888), timeout=3) as s:
            s.settimeout(3)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.0 200"):
            raise RuntimeError(f"answer {data[:60]!r}")
        ok += 1
        answers[body.decode().strip()] = answers.get(body.decode().strip(), 0) + 1
    except Exception as e:
        failures.append(f"{time.time():.3f} {e!r}")
    time.sleep(0.005)
print(json.dumps({"ok": ok, "failures": failures, "answers": answers}), flush=True)
'''

HOLD = r'''#!/usr/bin/python3
"""Opens a connection to 127.0.0.1:8888 and writes "open" to stdout; sends its request only
once /run/hold.go exists, then writes the body of the answer (or the error)."""
import os, socket, time

s = socket.create_connection(("127.0.0.1", 8888), timeout=5)
print("open", flush=True)
while not os.path.exists("/run/hold.go"):
    time.sleep(0.05)
try:
    s.settimeout(5)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    print(data.partition(b"\r\n\r\n")[2].decode().strip(), flush=True)
except Exception as e:
    print(f"error {e!r}", flush=True)
'''


class Traffic:
    """LOAD, HOLD and a watch for the Switched signal, started in the container before an
    upgrade and read after it."""

    def __init__(self, m: Machine):
        self.m = m
        m.sh("rm -f /run/load.* /run/hold.* /run/switched.*", check=True)
        m.sh("busctl monitor --system --match=\"type='signal',member='Switched'\" "
             "> /run/switched.log 2>&1 & echo $! > /run/switched.pid", check=True)
        m.sh("hold > /run/hold.out 2>&1 &", check=True)
        m.wait("grep -qx open /run/hold.out", 10, "the held connection")
        m.sh("load > /run/load.out 2>/run/load.err &", check=True)
        time.sleep(1)  # the load runs a while before the upgrade, the monitor is subscribed
        m.sh("kill -0 $(cat /run/switched.pid)", check=True)

    def held_answer(self) -> str:
        self.m.sh("touch /run/hold.go", check=True)
        self.m.wait("test $(wc -l < /run/hold.out) -ge 2", 10, "the held connection's answer")
        return self.m.sh("tail -n 1 /run/hold.out").out

    def load_result(self) -> dict:
        self.m.sh("touch /run/load.stop", check=True)
        self.m.wait("test -s /run/load.out", 15, "the load's result")
        return json.loads(self.m.sh("cat /run/load.out").out)

    def switched(self) -> list[str]:
        self.m.sh("kill $(cat /run/switched.pid)")
        log = self.m.sh("cat /run/switched.log").stdout
        # The Manager's (every version has it; a zddd of services also sends it from the
        # service's own object, the same switch).
        return [line for line in log.splitlines() if "Member=Switched" in line
                and "Interface=org.zddd.Steering1.Manager" in line]


def install_clients(m: Machine) -> None:
    """Put the two clients in the container (python3 is in every tree)."""
    m.write("/usr/local/bin/load", LOAD, 0o755)
    m.write("/usr/local/bin/hold", HOLD, 0o755)
