"""Shared fixtures. Tests are marked by folder: unit/, integration/, e2e/, system/.

`lab` and `public_lab` are zdddlab.AppLab's: a client and an app namespace joined by a veth,
vhosts main (8080) and backup (80), a private bus, and lab.start_zddd(config, wait=True).
`lab` takes an optional indirect parameter, the backend zddd is started with:

    @pytest.mark.parametrize("lab", ["nftables", "tc"], indirect=True)

The behaviour suite runs for every backend: a module marked `pytestmark = pytest.mark.backends`
runs each of its tests that use `lab` once per backend; a test marked
`@pytest.mark.backends("nftables")` (e.g. one that reads nft's own listing) only for those named.
A module also marked `pytest.mark.beside` runs each of those a second time with the lab's
service beside another in one zddd ("nftables+beside": zdddlab.AppLab(beside=True)): the same
tests, unchanged, must pass when zddd steers two services.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from zdddlab import AppLab

LAYERS = ("unit", "integration", "e2e", "system")
ALL_BACKENDS = ("nftables", "tc", "xdp", "sk_lookup")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None and "lab" in metafunc.fixturenames:
        backends = list(marker.args or ALL_BACKENDS)
        if metafunc.definition.get_closest_marker("beside") is not None:
            backends += [f"{b}+beside" for b in backends]
        metafunc.parametrize("lab", backends, indirect=True)


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


@contextmanager
def _lab_in(tmp: Path, backend: str = "nftables"):
    backend, _, beside = backend.partition("+")
    lab = AppLab(tmp, backend=backend, beside=bool(beside))
    try:
        yield lab
    finally:
        if lab.zddd is not None:
            print(f"--- zddd log ---\n{lab.zddd.log()}", file=sys.stderr)
        lab.close()


@pytest.fixture
def lab(request, need_root, tmp_path):
    with _lab_in(tmp_path, getattr(request, "param", "nftables")) as lab:
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
