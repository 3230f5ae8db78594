"""Shared fixtures. Tests are marked by folder: unit/, integration/, e2e/, system/."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import (APP_V4, APP_V6, CLIENT_V4, CLIENT_V6, Bus, NetNS, Vhost, Zddd,  # noqa: E402
                 link)

LAYERS = ("unit", "integration", "e2e", "system")


def pytest_collection_modifyitems(config, items):
    for item in items:
        layer = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts[0]
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture
def need_root():
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, nftables): run it with sudo "
                    "or select the fast tests with -m unit")


class Lab:
    """A client namespace and an app-server namespace joined by a veth, vhosts main (8080) and
    backup (80) in the app namespace, a private bus, and (after start_zddd) a zddd."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.closers = []
        self.client = self._own(NetNS("cli"))
        self.app = self._own(NetNS("app"))
        link(self.client, self.app, (CLIENT_V4, CLIENT_V6), (APP_V4, APP_V6))
        self.main = Vhost(self.app, 8080, "main")
        self.closers.append(self.main.stop)
        self.backup = Vhost(self.app, 80, "backup")
        self.closers.append(self.backup.stop)
        self.bus = self._own(Bus(tmp))
        self.zddd: Zddd | None = None

    def _own(self, thing):
        self.closers.append(thing.close)
        return thing

    def start_zddd(self, config: dict | None = None, wait: bool = True) -> Zddd:
        self.zddd = self._own(Zddd(self.app, self.bus, self.tmp, config))
        return self.zddd.start(wait=wait)

    def close(self):
        for close in reversed(self.closers):
            try:
                close()
            except Exception as e:  # keep cleaning up
                print(f"cleanup: {e}", file=sys.stderr)


@contextmanager
def _lab_in(tmp: Path):
    lab = Lab(tmp)
    try:
        yield lab
    finally:
        if lab.zddd is not None:
            print(f"--- zddd log ---\n{lab.zddd.log()}", file=sys.stderr)
        lab.close()


@pytest.fixture
def lab(need_root, tmp_path):
    with _lab_in(tmp_path) as lab:
        yield lab


@pytest.fixture
def public_lab(need_root):
    """A lab whose bus socket other users can reach (pytest's tmp dirs are private to root),
    for tests that run zddctl as an unprivileged user."""
    tmp = Path(tempfile.mkdtemp(prefix="zddd-lab-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    try:
        with _lab_in(tmp) as lab:
            yield lab
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
