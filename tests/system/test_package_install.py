"""Fresh installs of the Debian package in a Debian 12 container booted with systemd-nspawn:
what a plain `apt install` pulls, the README's quick start followed by the package, and the
client package alone (a deploy host, CI runner or laptop that runs `zddctl -H`).

The container's apt has Debian's package lists (filled by the host's apt before the boot; the
container itself has no network), so apt can see python3-bpfcc, LLVM and the kernel headers and
would pull them if the package recommended them. The tests share the container and run in file
order.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from machine import Machine, host_apt
from test_package import DBUS_DEST, _version, app_server, client_deb, deb, prop, through_8888

__all__ = ["deb"]  # the fixture, imported so that this module builds the .deb the same way

# What a tc/xdp/sk_lookup host needs and an nftables host must not get from a plain install.
BPF_STACK = re.compile(r"^Inst (python3-bpfcc|libbpfcc|bpfcc-tools|llvm|libllvm|clang|libclang"
                       r"|linux-headers|linux-kbuild)\S*", re.M)
# The quick start's private bus, as the README has it.
BUS = "unix:path=/tmp/zddd-bus"


def _lists(m: Machine) -> None:
    """Debian's lists in the tree, and an sshd in its archive cache for `zddctl -H`."""
    for args in (["update", "-q"], ["install", "--download-only", "-y", "-q",
                                    "--no-install-recommends", "openssh-server", "openssh-client"]):
        p = host_apt(m.root, *args)
        assert p.returncode == 0, \
            f"apt-get {' '.join(args)} on {m.root}:\n{p.stdout[-2000:]}{p.stderr}"


@pytest.fixture(scope="module")
def machine(deb):  # noqa: F811
    m = Machine.fresh("zddd-system-install-")
    try:
        app_server(m, None, before_boot=_lists)
        for p in (deb, client_deb(deb)):
            (m.root / "root" / p.name).write_bytes(p.read_bytes())
        yield m
    finally:
        m.destroy_after_journal("zddd")


def debs(deb: Path) -> str:  # noqa: F811
    return f"/root/{deb.name} /root/{client_deb(deb).name}"


def test_a_plain_install_pulls_no_bpf_compiler_or_headers(machine, deb):  # noqa: F811
    """`apt install ./zddd*.deb` with apt's defaults (recommends on): no bcc, LLVM or headers.
    They are suggested, and apt sees them."""
    m = machine
    r = m.sh(f"apt-get install -s {debs(deb)}", check=True, timeout=120)
    assert re.search(r"^Inst zddd ", r.stdout, re.M) and re.search(r"^Inst zddctl ", r.stdout,
                                                                   re.M), r.stdout
    assert BPF_STACK.findall(r.stdout) == [], r.stdout
    # apt sees them (so the check above could fail): bcc brings LLVM.
    r = m.sh("apt-get install -s python3-bpfcc", check=True, timeout=120)
    assert {"python3-bpfcc", "libllvm"} <= set(BPF_STACK.findall(r.stdout)), r.stdout
    suggests = m.sh(f"dpkg-deb -f /root/{deb.name} Suggests", check=True).out
    assert "python3-bpfcc" in suggests and "linux-headers-amd64" in suggests, suggests


def test_the_quick_start_then_the_package_starts_at_initial(machine, deb):  # noqa: F811
    """The README's quick start (a private bus, zddd in the foreground, `switch off`) and its
    teardown (stop zddd, `zddd --remove-data-plane`, stop the bus), then the package's unit:
    it starts at `initial` (main), not at the `off` the quick start left."""
    m = machine
    # The package installed but its unit not started yet (policy-rc.d, as in an image build),
    # so the quick start runs the package's /usr/bin/zddd first.
    m.write("/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755)
    m.sh(f"apt-get install -y -q {debs(deb)}", check=True, timeout=180)
    assert m.sh("systemctl is-active zddd").out == "inactive"

    m.sh(f"dbus-daemon --session --fork --address={BUS} --print-pid > /tmp/bus.pid",
         check=True)
    m.sh(f"zddd --bus {BUS} > /tmp/zddd.log 2>&1 & echo $! > /tmp/zddd.pid", check=True)
    m.wait(f"zddctl --bus {BUS} status", 30, "the quick start's zddd")
    m.sh(f"zddctl --bus {BUS} switch off --wait-drained=30", check=True, timeout=60)
    assert '"active_target": "off"' in m.sh(f"zddctl --bus {BUS} status --json").out
    assert m.sh("nft list table inet zddd").returncode == 0  # the trap: off, in the kernel

    # The teardown.
    m.sh("kill $(cat /tmp/zddd.pid) && while kill -0 $(cat /tmp/zddd.pid) 2>/dev/null; "
         "do sleep 0.1; done", check=True, timeout=30)
    r = m.sh("zddd --remove-data-plane", check=True, timeout=30)
    print(r.stdout)
    m.sh("kill $(cat /tmp/bus.pid)", check=True)
    assert m.sh("nft list table inet zddd").returncode != 0, "the teardown left the table"

    m.sh("rm /usr/sbin/policy-rc.d", check=True)
    # The unit never ran before: its journal is this start's alone.
    assert "event=start" not in m.sh("journalctl -u zddd --no-pager -o cat").stdout
    m.sh("systemctl start zddd", check=True, timeout=60)
    assert prop(m, "ActiveTarget") == 's "main"'
    log = m.sh("journalctl -u zddd --no-pager -o cat").stdout
    assert re.search(r"event=start how=initial target=main", log), log
    assert through_8888(m) == "main v1"


def test_the_client_package_alone(machine, deb):  # noqa: F811
    """zddctl without zddd and without what only the daemon needs (nftables, its Python
    binding, pyroute2, sdnotify, prometheus-client, dbus-fast): it runs, and nothing steers."""
    m = machine
    m.sh("systemctl stop zddd && zddd --remove-data-plane && apt-get purge -y -q zddd && "
         "dpkg --purge python3-nftables libnftables1 nftables python3-pyroute2 python3-sdnotify "
         "python3-prometheus-client python3-dbus-fast python3-dbus-next", check=True, timeout=120)
    m.sh(f"apt-get install -y -q /root/{client_deb(deb).name}", check=True, timeout=120)
    listing = m.sh("dpkg-query -W -f='${Package} ${Status}\\n' zddd zddctl python3-nftables "
                   "python3-pyroute2 python3-dbus-fast 2>/dev/null").stdout
    installed = [line.split()[0] for line in listing.splitlines() if "ok installed" in line]
    assert installed == ["zddctl"], listing

    assert m.sh("zddctl --version", check=True).out == f"zddctl {_version()}"
    assert "switch" in m.sh("zddctl --help", check=True).out
    # No daemon here: a bus command says so and fails; nothing of zddd's exists or runs.
    # (r is compared with the same command over ssh below.)
    r = m.sh("zddctl status")
    assert r.returncode == 1 and r.stderr.strip(), r
    assert m.sh("systemctl cat zddd.service").returncode != 0
    assert m.sh("test -e /usr/bin/zddd").returncode != 0
    assert m.sh("pgrep -x zddd").returncode != 0
    assert m.sh(f"busctl status {DBUS_DEST.split()[0]}").returncode != 0

    # -H through a real sshd (this machine's own: its zddctl answers the same, exit 1 and the
    # reason, as the local one).
    m.sh("apt-get install -y -q --no-install-recommends openssh-server openssh-client && "
         "mkdir -p -m 700 /root/.ssh && ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519 "
         "&& cp /root/.ssh/id_ed25519.pub /root/.ssh/authorized_keys && "
         "systemctl is-active ssh", check=True, timeout=120)
    remote = m.sh("ZDDCTL_SSH='ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new' "
                  "zddctl -H root@127.0.0.1 status", timeout=30)
    assert (remote.returncode, remote.stdout) == (r.returncode, r.stdout), remote
    assert r.stderr.strip() in remote.stderr, (r.stderr, remote.stderr)
