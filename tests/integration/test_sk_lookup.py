"""The sk_lookup backend driven directly (tests/backend_driver.py) inside an app namespace:
steering in both families without rewriting, adoption, drift repair, listener changes, removal
and per-target connection counts. Each test has its own namespaces and its own bpffs mount
(pins in a host-visible bpffs, so a second driver process can adopt them), removed at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import subprocess
import time
from contextlib import suppress
from pathlib import Path

import pytest
from lab import (APP_V4, APP_V6, CLIENT_V4, CLIENT_V6, REPO, HeldConnection, KeepAlive, NetNS,
                 Vhost, connect_error, http_get, link, wait_for)

from zddd import bpfsys

pytestmark = pytest.mark.usefixtures("need_root")

LISTEN = 8888
DRIVER = REPO / "tests" / "backend_driver.py"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"


class Driver:
    """tests/backend_driver.py running a backend in a namespace."""

    def __init__(self, ns: NetNS, desired: dict, backend: str = "sk_lookup"):
        self.proc = ns.popen(str(VENV_PYTHON), str(DRIVER), backend, json.dumps(desired),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line and json.loads(line).get("ready"), "the backend driver did not start"

    def __call__(self, op: str, **args):
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the backend driver died during {op}"
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{op}: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


class SkLab:
    """Client and app namespaces, vhosts main (8080) and backup (80) in the app namespace, a
    bpffs of the test's own, and a driver for the sk_lookup backend in the app namespace."""

    def __init__(self):
        self.closers = []
        self.client = self._own(NetNS("cli"))
        self.app = self._own(NetNS("app"))
        link(self.client, self.app, (CLIENT_V4, CLIENT_V6), (APP_V4, APP_V6))
        self.main = Vhost(self.app, 8080, "main")
        self.closers.append(self.main.stop)
        self.backup = Vhost(self.app, 80, "backup")
        self.closers.append(self.backup.stop)
        self.bpffs = Path(f"/run/zt-bpf-{secrets.token_hex(3)}")
        self.bpffs.mkdir()
        self.closers.append(self._unmount)
        subprocess.run(["mount", "-t", "bpf", "bpf", str(self.bpffs)], check=True)
        self.pin_dir = self.bpffs / "zddd"
        self.desired = {"listen_port": LISTEN, "ports": {"main": 8080, "backup": 80},
                        "pin_dir": str(self.pin_dir), "flow_entries": 4096}
        self.driver = self.new_driver()
        self.driver("probe")

    def _own(self, thing):
        self.closers.append(thing.close)
        return thing

    def new_driver(self, **overrides) -> Driver:
        return self._own(Driver(self.app, {**self.desired, **overrides}))

    def _unmount(self) -> None:
        subprocess.run(["umount", str(self.bpffs)], capture_output=True)
        self.bpffs.rmdir()

    def get(self, host: str, path: str = "/") -> str:
        return http_get(self.client, host, LISTEN, path)

    def refused(self, host: str) -> bool:
        return connect_error(self.client, host, LISTEN)[0] == "ECONNREFUSED"

    def pins(self) -> set[str]:
        return set(os.listdir(self.pin_dir)) if self.pin_dir.exists() else set()

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception as e:  # keep cleaning up
                print(f"cleanup: {e}")


@pytest.fixture
def skl():
    lab = SkLab()
    try:
        yield lab
    finally:
        lab.close()


def test_main_backup_off_in_both_families(skl):
    first = skl.driver("switch", target="main")
    assert first["layout"] == 1 and first["flip"]
    for host in (APP_V4, APP_V6):
        assert skl.get(host) == "main"
    skl.driver("switch", target="backup")
    for host in (APP_V4, APP_V6):
        assert skl.get(host) == "backup"
    # Local clients are steered too (the program runs on every socket lookup in the namespace).
    assert http_get(skl.app, "127.0.0.1", LISTEN) == "backup"
    assert http_get(skl.app, "::1", LISTEN) == "backup"
    skl.driver("switch", target=None)
    assert skl.refused(APP_V4) and skl.refused(APP_V6)
    # Direct traffic is never touched.
    assert http_get(skl.client, APP_V4, 8080) == "main"
    assert skl.driver("read")["state"] == {"active": None, "intact": True, "problems": []}
