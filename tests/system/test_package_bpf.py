"""The Debian package with a BPF backend on a real systemd: the .deb, python3-bpfcc and the
kernel headers in a Debian 12 container booted with systemd-nspawn, zddd switched to `tc` and
then to `sk_lookup` the way packaging/README.md tells an operator (drop-ins installed, the
other backend's data plane removed with `zddd --remove-data-plane`, `systemctl restart`).

Per backend: zddd is active and READY, 8888 reaches main, `busctl call ... Switch` flips, a
restart adopts without a flip, `systemd-analyze security` stays under 4.0 with the drop-ins, and
the package reinstalled over the running zddd (the maintainer scripts' upgrade path: the unit
restarted after unpacking) while a client sends requests and a drain is in progress fails none,
flips nothing, keeps a connection opened before it and resumes the drain
(test_package_upgrade.py does real version upgrades on nftables).

The container differs from test_package.py's in what a BPF host has: python3-bpfcc in its tree
(a base tree of its own flavor, cached beside the plain one), the host's kernel headers bound
read-only where bcc looks for them (/lib/modules/$(uname -r)/build and source, as
packaging/bpf-headers.sh links them), CAP_BPF, CAP_PERFMON and the bpf(), perf_event_open() and
pidfd_getfd() calls (systemd-nspawn grants none of them by default), and a bpffs of its own at
/sys/fs/bpf (Machine.create mounts it; destroy unmounts it).
The tests share the container and run in file order.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from machine import Machine
from test_package import (DBUS_DEST, app_server, cursor, deb, install, journal_since, prop,
                          through_8888, unit)
from traffic import Traffic, install_clients

__all__ = ["deb"]  # the fixture, imported so that this module builds the .deb the same way

DROP_INS = {"tc": ("bpf",), "sk_lookup": ("bpf", "sk-lookup")}


def header_binds() -> list[str]:
    """systemd-nspawn options that show the host's kernel headers at the same paths inside:
    /lib/modules/$(uname -r) and, when build/source are links out of it (bpf-headers.sh's
    stand-ins), their targets."""
    moddir = f"/lib/modules/{os.uname().release}"
    if not os.path.exists(f"{moddir}/build/include"):
        pytest.fail(f"no kernel headers at {moddir}/build: run `make setup` "
                    "(packaging/bpf-headers.sh)")
    binds = [f"--bind-ro={moddir}"]
    for link in ("build", "source"):
        target = os.path.realpath(f"{moddir}/{link}")
        if os.path.isdir(target) and not target.startswith(moddir + "/"):
            binds.append(f"--bind-ro={target}")
    return binds


@pytest.fixture(scope="module")
def machine(deb):
    started = time.monotonic()
    m = Machine.fresh("zddd-system-bpf-", extra=("python3-bpfcc",), flavor="bpf")
    # nspawn's own seccomp filter refuses bpf(), perf_event_open() and pidfd_getfd() to the
    # container's services (a shell entered with nsenter is not under it, so it would not tell).
    m.nspawn_args = ["--capability=CAP_BPF,CAP_PERFMON",
                     "--system-call-filter=bpf perf_event_open pidfd_getfd", *header_binds()]
    try:
        app_server(m, deb)
        install_clients(m)
        m.wait("test \"$(systemctl is-active zddd)\" = active", 30, "zddd on nftables")
        print(f"system test container (bpf) ready in {time.monotonic() - started:.1f} s "
              f"(base tree {m.base})", file=sys.stderr)
        yield m
    finally:
        m.destroy_after_journal("zddd", "app@*")


def switch_backend(m: Machine, backend: str) -> None:
    """What an operator does: stop zddd, remove the data plane it leaves behind (zddd refuses to
    start beside another backend's), install the drop-ins, set the backend, start."""
    m.sh("systemctl stop zddd && zddd --remove-data-plane", check=True, timeout=60)
    m.sh("rm -rf /etc/systemd/system/zddd.service.d", check=True)
    for name in DROP_INS[backend]:
        m.sh(f"install -D -m 0644 /usr/share/zddd/systemd/zddd-{name}.conf "
             f"/etc/systemd/system/zddd.service.d/{name}.conf", check=True)
    shipped = (m.root / "etc/zddd/zddd.toml").read_text()
    shipped = re.sub(r'^backend = ".*"\n', "", shipped, flags=re.M)
    m.write("/etc/zddd/zddd.toml", f'backend = "{backend}"\n' + shipped)
    mark = cursor(m)
    started = time.monotonic()
    r = m.sh("systemctl daemon-reload && systemctl start zddd", timeout=120)
    assert r.returncode == 0, (r.stderr, m.sh("journalctl -u zddd --no-pager -o cat -n 40").stdout)
    print(f"zddd started on {backend} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    # Started is not enough: sk_lookup starts (and warns) when the sandbox keeps it from taking
    # the vhosts' listeners, and would steer 8888 nowhere.
    log = journal_since(m, mark)
    assert f"event=start how=initial target=main backend={backend}" in log, log
    assert "level=warning" not in log and "level=error" not in log, log


def check_backend(m: Machine, backend: str) -> None:
    # Type=notify: `systemctl start` returned, so READY was sent with the data plane programmed.
    status = unit(m, "ActiveState", "StatusText", "CapabilityBoundingSet")
    assert status["ActiveState"] == "active", status
    assert status["StatusText"] == f"steering main ({backend})", status
    assert "cap_bpf" in status["CapabilityBoundingSet"].split(), status
    assert prop(m, "ActiveTarget") == 's "main"'
    assert through_8888(m) == "main v1"
    # The data plane is the BPF one: no nftables table is left to do the steering.
    assert "zddd" not in m.sh("nft list tables", check=True).stdout

    m.sh(f"busctl call {DBUS_DEST} Switch s backup", check=True)
    assert prop(m, "ActiveTarget") == 's "backup"'
    assert through_8888(m) == "backup v1"
    assert unit(m, "StatusText")["StatusText"] == f"steering backup ({backend})"
    m.sh(f"busctl call {DBUS_DEST} Switch s main", check=True)
    assert through_8888(m) == "main v1"

    before = unit(m, "MainPID")["MainPID"]
    mark = cursor(m)
    m.sh("systemctl restart zddd", check=True, timeout=120)
    assert unit(m, "MainPID")["MainPID"] != before
    log = journal_since(m, mark)
    assert re.search(rf"event=start how=adopted target=main backend={backend}", log), log
    assert "event=switch " not in log, log
    assert through_8888(m) == "main v1"

    out = m.sh("systemd-analyze security zddd.service --no-pager", check=True).stdout
    score = float(re.search(r"Overall exposure level for zddd.service: ([\d.]+)", out).group(1))
    print(f"systemd-analyze security zddd ({backend} drop-ins): {score}", file=sys.stderr)
    assert score < 4.0, out


def reinstall_with_traffic_during_a_drain(m: Machine, deb: Path, backend: str) -> None:  # noqa: F811
    """The package reinstalled over the running zddd while a client sends requests and a drain
    towards off is in progress, kept open by a connection opened before: nothing fails, nothing
    flips, the new zddd resumes the drain, and ends it once that connection has closed."""
    traffic = Traffic(m)
    m.sh(f"busctl call {DBUS_DEST} SwitchWithOptions sa{{sv}} off 1 "
         "drain_timeout_usec t 300000000", check=True)
    before = unit(m, "MainPID")["MainPID"]
    mark = cursor(m)
    started = time.monotonic()
    install(m, deb, "--reinstall")
    took = time.monotonic() - started
    assert unit(m, "MainPID")["MainPID"] != before, "the package did not restart zddd"
    assert prop(m, "ActiveTarget") == 's "main"'
    assert prop(m, "Draining") == 's "main"'
    result = traffic.load_result()
    print(f"package reinstalled on {backend} during a drain: apt took {took:.1f} s; "
          f"{result['ok']} requests, {len(result['failures'])} failed", file=sys.stderr)
    assert result["failures"] == [], result["failures"][:10]
    assert result["answers"] == {"main v1": result["ok"]} and result["ok"] > 50, result
    log = journal_since(m, mark)
    assert re.search(rf"event=start how=adopted target=main backend={backend} "
                     "resumed_drain=main", log), log
    assert "event=switch " not in log, log
    assert traffic.switched() == []
    assert traffic.held_answer() == "main v1", "the connection opened before the upgrade broke"
    # Up to 10 s after the restart the resumed drain also waits for HAProxy's agent poll.
    m.wait(f"busctl get-property {DBUS_DEST} ActiveTarget | grep -qx 's \"off\"'", 30,
           "the resumed drain to end")
    m.sh(f"busctl call {DBUS_DEST} Switch s main", check=True)
    assert through_8888(m) == "main v1"


def test_tc_backend_with_the_bpf_drop_in(machine, deb):  # noqa: F811
    switch_backend(machine, "tc")
    assert machine.sh("test -d /sys/fs/bpf/zddd/tc").returncode == 0, "no pins under bpffs"
    check_backend(machine, "tc")
    reinstall_with_traffic_during_a_drain(machine, deb, "tc")


def test_sk_lookup_backend_with_both_drop_ins(machine, deb):  # noqa: F811
    switch_backend(machine, "sk_lookup")
    # --remove-data-plane took tc's programs and pins away.
    assert machine.sh("test -e /sys/fs/bpf/zddd/tc").returncode != 0
    assert "zddd" not in machine.sh("tc filter show dev lo ingress").stdout
    check_backend(machine, "sk_lookup")
    reinstall_with_traffic_during_a_drain(machine, deb, "sk_lookup")
