"""Upgrading and downgrading the Debian package over a running zddd, with traffic flowing, in a
Debian 12 container booted with systemd-nspawn (the nftables backend).

The test builds versions of the tree with packaging/build-deb.sh (ZDDD_DEB_VERSION): +test1,
+test2 and +test3 of the tree as it is, and +test4 with the nftables layout version bumped (what
a release that changes the table's layout looks like to an older zddd). An operator's
`apt-get install ./zddd_<next>.deb ./zddctl_<next>.deb` over a running zddd must not fail a
request, flip the host (ActiveTarget unchanged, no Switched), break an established connection,
or lose a drain in progress. The package restarts the unit after the new files are in place;
the data plane, in the kernel, outlives the restart.

A client in the container sends requests to 127.0.0.1:8888, each on a new connection, for the
whole upgrade; another opens a connection before it and sends its request after (traffic.py).
The tests share one container and run in file order.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from machine import HOST_PATH, Machine
from test_package import (DBUS_DEST, _version, app_server, cursor, install, journal_since, prop,
                          through_8888, unit)
from traffic import Traffic, install_clients

TOP = Path(__file__).resolve().parents[2]
# What build-deb.sh builds from (and README.md, docs/, examples/ that the package ships).
TREE = ("zddd", "bpf", "systemd", "packaging", "pyproject.toml", "README.md", "docs", "examples")
# The last commit whose package was one: zddd 0.1.0 with zddctl and the Python modules inside.
SINGLE_PACKAGE_COMMIT = "c40027d"


def build(tmp: Path, version: str, layout: int | None = None) -> Path:
    """dist/zddd_<version>_all.deb (and its zddctl) of a copy of the tree, built as `version`
    by build-deb.sh; with `layout`, the copy's nftables backend writes that layout version."""
    src = tmp / f"tree-{version}"
    src.mkdir()
    for name in TREE:
        path = TOP / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.exists():
            shutil.copy2(path, src / name)
    if layout is not None:
        nft = src / "zddd/backends/nftables.py"
        text, n = re.subn(r"^LAYOUT_VERSION = \d+$", f"LAYOUT_VERSION = {layout}",
                          nft.read_text(), flags=re.M)
        assert n == 1, "zddd/backends/nftables.py has no `LAYOUT_VERSION = N` line"
        nft.write_text(text)
    p = subprocess.run(["sh", "packaging/build-deb.sh"], cwd=src, capture_output=True, text=True,
                       timeout=600, env={"PATH": HOST_PATH, "LANG": "C.UTF-8", "HOME": "/root",
                                         "ZDDD_DEB_VERSION": version})
    assert p.returncode == 0, f"build-deb.sh ({version}):\n{p.stdout[-3000:]}{p.stderr}"
    deb = src / "dist" / f"zddd_{version}_all.deb"
    assert deb.exists(), p.stdout[-2000:]
    return deb


def build_single_package(tmp: Path) -> Path | None:
    """The zddd .deb as SINGLE_PACKAGE_COMMIT built it, or None when the checkout does not have
    that commit (a shallow clone)."""
    commit = f"{SINGLE_PACKAGE_COMMIT}^{{commit}}"
    if subprocess.run(["git", "-C", str(TOP), "cat-file", "-e", commit],
                      capture_output=True).returncode != 0:
        return None
    src = tmp / "tree-single"
    src.mkdir()
    subprocess.run(f"git -C {TOP} archive {SINGLE_PACKAGE_COMMIT} | tar -x -C {src}", shell=True,
                   check=True, timeout=120)
    p = subprocess.run(["sh", "packaging/build-deb.sh"], cwd=src, capture_output=True, text=True,
                       timeout=600, env={"PATH": HOST_PATH, "LANG": "C.UTF-8", "HOME": "/root"})
    assert p.returncode == 0, \
        f"build-deb.sh ({SINGLE_PACKAGE_COMMIT}):\n{p.stdout[-3000:]}{p.stderr}"
    return next((src / "dist").glob("zddd_*_all.deb"))


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> dict[str, Path | None]:
    tmp = tmp_path_factory.mktemp("debs")
    base = _version()
    started = time.monotonic()
    built: dict[str, Path | None] = {"single": build_single_package(tmp)}
    built.update({f"test{n}": build(tmp, f"{base}+test{n}") for n in (1, 2, 3)})
    built["test4"] = build(tmp, f"{base}+test4", layout=3)
    print(f"{len(built)} versions built in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return built


@pytest.fixture(scope="module")
def machine(debs):
    m = Machine.fresh("zddd-system-upgrade-")
    try:
        app_server(m, None)
        install_clients(m)
        single = debs["single"]
        if single is None:
            install(m, debs["test1"])
        else:
            shutil.copy(single, m.root / "root" / single.name)
            m.sh(f"apt-get install -y -q /root/{single.name}", check=True, timeout=180)
        m.wait("test \"$(systemctl is-active zddd)\" = active", 30, "zddd")
        yield m
    finally:
        m.destroy_after_journal("zddd")


def installed_version(m: Machine) -> tuple[str, str]:
    r = m.sh("dpkg-query -W -f='${Version}\\n' zddd zddctl", check=True)
    return tuple(r.out.splitlines())


def upgrade(m: Machine, deb: Path, *apt_options: str) -> tuple[float, dict[str, str], str]:
    """Install `deb` over the running zddd; the time apt took, the unit's MainPID and
    NRestarts before, and what apt printed."""
    before = unit(m, "MainPID", "NRestarts")
    started = time.monotonic()
    r = install(m, deb, *apt_options)
    return time.monotonic() - started, before, r.stdout + r.stderr


def upgrade_with_traffic(m: Machine, deb: Path, label: str) -> None:
    """Upgrade to `deb` while the clients run: nothing fails, flips or breaks."""
    version = deb.name.split("_")[1]
    assert through_8888(m) == "main v1"
    traffic = Traffic(m)
    mark = cursor(m)
    took, before, printed = upgrade(m, deb)
    assert installed_version(m) == (version, version)
    assert "is not running" not in printed, printed[-2000:]
    # Restarted by the package (a new process) without a restart loop, and READY again.
    now = unit(m, "MainPID", "NRestarts", "ActiveState")
    assert now["MainPID"] != before["MainPID"] and now["ActiveState"] == "active", now
    assert now["NRestarts"] == before["NRestarts"], now
    assert prop(m, "ActiveTarget") == 's "main"'
    assert traffic.held_answer() == "main v1", "the connection opened before the upgrade broke"
    result = traffic.load_result()
    switched = traffic.switched()
    print(f"upgrade {label}: apt took {took:.1f} s; {result['ok']} requests, "
          f"{len(result['failures'])} failed", file=sys.stderr)
    assert result["failures"] == [], result["failures"][:10]
    assert result["answers"] == {"main v1": result["ok"]} and result["ok"] > 50, result
    assert switched == [], switched
    log = journal_since(m, mark)
    assert re.search(r"event=start how=adopted target=main backend=nftables", log), log
    assert f"event=ready version={version}" in log, log
    assert "event=switch " not in log, log
    assert "level=warning" not in log and "level=error" not in log, log


def test_upgrade_from_the_single_package(machine, debs):
    """Up to 0.1.0 zddctl was in the zddd package; the upgrade moves it to package zddctl."""
    if debs["single"] is None:
        pytest.skip(f"no commit {SINGLE_PACKAGE_COMMIT} in this checkout (a shallow clone)")
    m = machine
    assert m.sh("dpkg-query -W -f='${Version}' zddd").out == "0.1.0"
    upgrade_with_traffic(m, debs["test1"], "from the single package to +test1")
    assert m.sh("dpkg -S /usr/bin/zddctl").out.startswith("zddctl:")
    assert m.sh("zddctl status --json", check=True).out.count('"main"') >= 1


def test_upgrade_with_traffic_flowing_is_no_flip(machine, debs):
    if debs["single"] is not None:
        assert installed_version(machine)[0].endswith("+test1")
    upgrade_with_traffic(machine, debs["test2"], "+test1 -> +test2")


def test_upgrade_during_a_drain_resumes_it(machine, debs):
    """A drain towards off that a held connection keeps open: after the upgrade the new zddd
    resumes it (kernel still steering to main, Draining main) and ends it once the connection
    closes."""
    m = machine
    base = _version()
    traffic = Traffic(m)
    m.sh(f"busctl call {DBUS_DEST} SwitchWithOptions sa{{sv}} off 1 "
         "drain_timeout_usec t 300000000", check=True)
    assert prop(m, "Draining") == 's "main"'
    assert prop(m, "ActiveTarget") == 's "main"'
    mark = cursor(m)
    took, _, _ = upgrade(m, debs["test3"])
    assert installed_version(m) == (f"{base}+test3", f"{base}+test3")
    assert prop(m, "Draining") == 's "main"'
    assert prop(m, "ActiveTarget") == 's "main"'
    log = journal_since(m, mark)
    assert re.search(r"event=start how=adopted target=main backend=nftables resumed_drain=main",
                     log), log
    result = traffic.load_result()  # before the drain ends: then 8888 refuses, as it should
    print(f"upgrade +test2 -> +test3 during a drain: apt took {took:.1f} s; {result['ok']} "
          f"requests, {len(result['failures'])} failed", file=sys.stderr)
    assert result["failures"] == [], result["failures"][:10]
    assert result["answers"] == {"main v1": result["ok"]}, result
    assert prop(m, "Draining") == 's "main"', "the drain ended while the held connection was open"
    assert traffic.held_answer() == "main v1"
    # The held connection closed: the resumed drain ends and the steering goes.
    # Up to 10 s after the restart the resumed drain also waits for HAProxy's agent poll.
    m.wait(f"busctl get-property {DBUS_DEST} ActiveTarget | grep -qx 's \"off\"'", 30,
           "the resumed drain to end")
    assert prop(m, "Draining") == 's ""'
    switched = traffic.switched()
    assert len(switched) == 1, switched  # main -> off, at the drain's end, not at the upgrade
    m.sh("zddctl switch main", check=True)
    assert through_8888(m) == "main v1"


def test_upgrade_to_a_newer_layout_then_downgrade_leaves_traffic_alone(machine, debs):
    """+test4 writes layout v3. Going back to +test3 (which writes v2) must not touch the v3
    table: 8888 keeps reaching main, and the old zddd does not start over it."""
    m = machine
    base = _version()
    upgrade(m, debs["test4"])
    assert installed_version(m) == (f"{base}+test4", f"{base}+test4")
    assert m.sh("systemctl is-active zddd").out == "active"
    assert "layout_v3" in m.sh("nft list table inet zddd", check=True).stdout
    assert through_8888(m) == "main v1"

    mark = cursor(m)
    _, _, printed = upgrade(m, debs["test3"], "--allow-downgrades")
    assert installed_version(m) == (f"{base}+test3", f"{base}+test3")
    # The older zddd has started and read the table (whether it is restarted after is the
    # next test's question).
    m.wait(f"journalctl -u zddd --no-pager -o cat --after-cursor='{mark}' | grep -q 'newer zddd'",
           30, "the older zddd to read the newer table")
    assert "layout_v3" in m.sh("nft list table inet zddd", check=True).stdout
    assert through_8888(m) == "main v1"
    # apt completed (the maintainer scripts ignore a failed restart) and said so.
    assert "zddd.service is not running" in printed, printed[-2000:]


def test_downgrade_refuses_with_exit_78_and_one_line_naming_the_way_out(machine):
    m = machine
    m.wait("test \"$(systemctl show zddd -p SubState --value)\" = failed", 30,
           "zddd.service to be failed")
    status = unit(m, "ExecMainStatus", "Result")
    assert status == {"ExecMainStatus": "78", "Result": "exit-code"}, status
    time.sleep(3)  # RestartSec=1s: a restart would have happened by now
    restarts = unit(m, "NRestarts")["NRestarts"]
    errors = [line for line in m.sh("journalctl -b -u zddd --no-pager -o cat").stdout
              .splitlines() if "level=error" in line and "newer zddd" in line]
    assert len(errors) == 1, errors
    assert "--remove-data-plane" in errors[0] or "install" in errors[0], errors
    assert restarts == unit(m, "NRestarts")["NRestarts"]
