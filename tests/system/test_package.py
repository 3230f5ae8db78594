"""The Debian package on a real systemd: build the .deb, install it with apt in a Debian 12
container booted with systemd-nspawn, and check what an operator relies on.

The tests share one container and run in file order: each one starts from the state the
previous ones leave (zddd running, steering to main), and the last one reboots it with a broken
config. Two stand-in apps serve the vhosts: app@main on 8080 and app@backup on 80, units made
from the example app@.service that the package ships.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from machine import HOST_PATH, Machine, Result

TOP = Path(__file__).resolve().parents[2]
DBUS_DEST = "org.zddd.Steering1 /org/zddd/Steering1 org.zddd.Steering1.Manager"
# What the package is built from: a .deb older than any of these is rebuilt.
SOURCES = ("zddd", "systemd", "packaging", "bpf", "pyproject.toml")

# The stand-in application of app@.service: serves ROOT/index.html on PORT, `--check` fails on a
# release whose page says BROKEN, SIGHUP re-reads the page.
APP = r'''#!/usr/bin/python3
import argparse, http.server, pathlib, signal, socket, sys

p = argparse.ArgumentParser()
p.add_argument("--port", type=int)
p.add_argument("--root", required=True)
p.add_argument("--check", action="store_true")
args = p.parse_args()
page = pathlib.Path(args.root) / "index.html"

def load():
    body = page.read_bytes()
    if b"BROKEN" in body:
        sys.exit(f"app: {page} is a broken release")
    return body

if args.check:
    load()
    sys.exit(0)
body = load()

def reread(*_):
    global body
    body = load()

signal.signal(signal.SIGHUP, reread)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

Server(("::", args.port), Handler).serve_forever()
'''


def _version() -> str:
    text = (TOP / "zddd/__init__.py").read_text()
    return re.search(r'^__version__ = "(.*)"$', text, re.M).group(1)


def _newest_source_mtime() -> float:
    newest = 0.0
    for name in SOURCES:
        path = TOP / name
        files = [path] if path.is_file() else [p for p in path.rglob("*")
                                               if p.is_file() and "__pycache__" not in p.parts]
        newest = max([newest] + [p.stat().st_mtime for p in files])
    return newest


def client_deb(deb: Path) -> Path:
    """The zddctl package built beside the zddd package `deb` (zddd depends on the zddctl of
    its own version)."""
    return deb.with_name(deb.name.replace("zddd_", "zddctl_", 1))


@pytest.fixture(scope="module")
def deb() -> Path:
    """dist/zddd_<version>_all.deb (with dist/zddctl_<version>_all.deb beside it), rebuilt with
    `make deb` unless newer than its sources."""
    path = TOP / "dist" / f"zddd_{_version()}_all.deb"
    if not all(p.exists() and p.stat().st_mtime >= _newest_source_mtime()
               for p in (path, client_deb(path))):
        subprocess.run(["make", "-C", str(TOP), "deb"], check=True, timeout=900,
                       env={"PATH": HOST_PATH, "LANG": "C.UTF-8", "HOME": "/root"})
    assert path.exists() and client_deb(path).exists(), f"make deb did not produce {path}"
    return path


def install(m: Machine, deb: Path, *apt_options: str) -> Result:
    """`apt-get install` the zddd package `deb` and its zddctl, copied into the container, as an
    operator installs a .deb (maintainer scripts, the unit started or restarted)."""
    for p in (deb, client_deb(deb)):
        shutil.copy(p, m.root / "root" / p.name)
    return m.sh(f"apt-get install -y -q {' '.join(apt_options)} "
                f"/root/{deb.name} /root/{client_deb(deb).name}", check=True, timeout=180)


def app_server(m: Machine, deb: Path | None, users: tuple[str, ...] = (),
               before_boot=None) -> None:
    """Create and boot `m` as an app server: `users` added, the example app@.service running
    main (8080) and backup (80), then the .deb (and its zddctl) installed with apt, as an
    operator would (the package starts zddd); `deb` None leaves that to the caller.
    `before_boot(m)` runs on the created tree before it boots."""
    m.create()
    if before_boot is not None:
        before_boot(m)
    m.write("/usr/local/bin/app", APP, 0o755)
    for name, port in (("main", 8080), ("backup", 80)):
        m.write(f"/etc/default/app-{name}", f"PORT={port}\n")
        m.write(f"/srv/app/{name}/index.html", f"{name} v1\n")
    # The example unit as the package ships it (the same file as in the checkout).
    m.write("/etc/systemd/system/app@.service", (TOP / "systemd/app@.service").read_text())
    m.boot()
    for user in users:
        m.sh(f"useradd --system --no-create-home {user}", check=True)
    m.sh("systemctl enable --now app@main app@backup", check=True)
    m.wait("curl -sf 127.0.0.1:8080 && curl -sf 127.0.0.1:80", 15, "the apps")
    if deb is not None:
        install(m, deb)


@pytest.fixture(scope="module")
def machine(deb):
    started = time.monotonic()
    m = Machine.fresh("zddd-system-")
    try:
        app_server(m, deb, users=("alice", "bob"))
        m.sh("usermod -a -G zddd bob", check=True)
        print(f"system test container ready in {time.monotonic() - started:.1f} s "
              f"(base tree {m.base})", file=sys.stderr)
        yield m
    finally:
        m.destroy_after_journal("zddd", "app@*")


def prop(m: Machine, name: str, user: str | None = None) -> str:
    r = m.sh(f"busctl get-property {DBUS_DEST} {name}", user=user)
    assert r.returncode == 0, r.stderr
    return r.out


def through_8888(m: Machine) -> str:
    r = m.sh("curl -sS --max-time 3 127.0.0.1:8888")
    assert r.returncode == 0, f"curl 127.0.0.1:8888: {r.stderr}"
    return r.out


def unit(m: Machine, *props: str) -> dict[str, str]:
    r = m.sh(f"systemctl show zddd -p {','.join(props)}", check=True)
    return dict(line.split("=", 1) for line in r.stdout.splitlines())


def journal_since(m: Machine, cursor: str) -> str:
    return m.sh(f"journalctl -u zddd --no-pager -o cat --after-cursor='{cursor}'").stdout


def cursor(m: Machine) -> str:
    r = m.sh("journalctl -u zddd -n 0 --show-cursor --no-pager", check=True)
    return r.stdout.strip().rsplit("-- cursor: ", 1)[-1]


def test_package_installs_and_starts_zddd(machine):
    m = machine
    assert m.sh("systemctl is-active zddd").out == "active", m.sh("systemctl status zddd").stdout
    assert m.sh("systemctl is-enabled zddd").out == "enabled"
    m.sh("systemctl start zddd", check=True)
    assert m.sh("systemctl is-active zddd").out == "active"
    # Type=notify: when `systemctl restart` returns, READY was sent, so the name is owned and
    # the data plane programmed: the very next call is answered.
    r = m.sh(f"systemctl restart zddd && busctl get-property {DBUS_DEST} ActiveTarget")
    assert r.returncode == 0 and r.out == 's "main"', r
    status = unit(m, "StatusText", "Type", "WatchdogUSec", "NotifyAccess")
    assert status["Type"] == "notify"
    assert status["StatusText"] == "steering main (nftables)", status
    assert status["WatchdogUSec"] == "10s"
    assert m.sh("getent group zddd").returncode == 0, "postinst did not create group zddd"
    # The conffile and the shipped example unit are what the checkout has.
    assert m.sh("dpkg-query -W -f='${Conffiles}' zddd").out.split()[0] == "/etc/zddd/zddd.toml"
    assert (m.root / "usr/share/zddd/systemd/app@.service").read_text() == \
        (TOP / "systemd/app@.service").read_text()
    assert m.sh("nft list table inet zddd").returncode == 0


def test_readme_docs_and_examples_are_shipped(machine):
    """What zddd(8) points at and what an operator copies is in /usr/share/doc/zddd, as the
    checkout has it: README.md, docs/*.md, the HAProxy and nginx examples and the Ansible role."""
    doc = machine.root / "usr/share/doc/zddd"
    assert (doc / "README.md").read_text() == (TOP / "README.md").read_text()
    for page in (TOP / "docs").glob("*.md"):
        assert (doc / "docs" / page.name).read_text() == page.read_text(), page
    for part in ("haproxy", "nginx", "ansible"):
        files = [p for p in (TOP / "examples" / part).rglob("*") if p.is_file()]
        assert files, part
        for p in files:
            shipped = doc / "examples" / p.relative_to(TOP / "examples")
            assert shipped.read_bytes() == p.read_bytes(), shipped
    for page in (TOP / "packaging/man").glob("*.[0-9]"):
        for path in re.findall(r"/usr/share/doc/zddd/[\w./-]*\w", page.read_text()):
            assert (machine.root / path.lstrip("/")).exists(), f"{page.name} names {path}"


def test_sandbox_exposure_below_4(machine):
    out = machine.sh("systemd-analyze security zddd.service --no-pager", check=True).stdout
    score = float(re.search(r"Overall exposure level for zddd.service: ([\d.]+)", out).group(1))
    print(f"systemd-analyze security zddd: {score}", file=sys.stderr)
    assert score < 4.0, out


def test_port_8888_reaches_main(machine):
    assert through_8888(machine) == "main v1"
    assert prop(machine, "ActiveTarget") == 's "main"'


def test_busctl_switch_flips_the_host(machine):
    m = machine
    m.sh(f"busctl call {DBUS_DEST} Switch s backup", check=True)
    assert prop(m, "ActiveTarget") == 's "backup"'
    assert through_8888(m) == "backup v1"
    assert unit(m, "StatusText")["StatusText"] == "steering backup (nftables)"
    m.sh(f"busctl call {DBUS_DEST} Switch s main", check=True)
    assert through_8888(m) == "main v1"


def test_policy_anyone_reads_only_root_and_group_zddd_call(machine):
    m = machine
    # alice: no group. She reads, introspects and pings, and is refused the methods.
    assert prop(m, "ActiveTarget", user="alice") == 's "main"'
    m.sh("busctl introspect org.zddd.Steering1 /org/zddd/Steering1", user="alice", check=True)
    m.sh("busctl call org.zddd.Steering1 /org/zddd/Steering1 org.freedesktop.DBus.Peer Ping",
         user="alice", check=True)
    r = m.sh(f"busctl call {DBUS_DEST} Switch s backup", user="alice")
    assert r.returncode != 0 and "Access denied" in r.stderr, r
    r = m.sh("zddctl switch backup", user="alice")
    assert r.returncode == 1 and "permission denied" in r.stderr, r
    assert m.sh("zddctl status --json", user="alice", check=True).out.count('"main"') >= 1
    assert prop(m, "ActiveTarget") == 's "main"'
    # bob is in group zddd: he may switch.
    m.sh("zddctl switch backup", user="bob", check=True)
    assert through_8888(m) == "backup v1"
    m.sh("zddctl switch main", user="bob", check=True)
    assert through_8888(m) == "main v1"


def test_reload_fails_visibly_on_a_broken_config_and_succeeds_on_a_good_one(machine):
    m = machine

    def journal() -> str:
        return m.sh("journalctl -u zddd --no-pager -o cat").stdout

    good = (m.root / "etc/zddd/zddd.toml").read_text()
    m.write("/etc/zddd/zddd.toml", good + '\nlisten_port = "eighty"\n')
    asked = journal().count("event=reload")
    r = m.sh("systemctl reload zddd")
    assert r.returncode != 0, "systemctl reload succeeded with a broken config"
    assert m.sh("systemctl is-active zddd").out == "active"
    log = journal()
    # Caught by ExecReload's zddd --check-config, before the running zddd was asked.
    assert "zddd: invalid config: listen_port" in log, log[-2000:]
    assert log.count("event=reload") == asked, log[-2000:]
    assert through_8888(m) == "main v1"
    # What only the running zddd can judge is refused by it: a key that needs a restart.
    m.write("/etc/zddd/zddd.toml", good + "\nlisten_port = 8887\n")
    r = m.sh("systemctl reload zddd")
    assert r.returncode != 0, "systemctl reload succeeded with a restart-only change"
    log = m.sh("journalctl -u zddd --no-pager -o cat -n 20").stdout
    assert "InvalidConfig" in log and "needs a restart" in log, log
    assert through_8888(m) == "main v1"

    m.write("/etc/zddd/zddd.toml", good + "\ndrain_timeout = 7\n")
    m.sh("systemctl reload zddd", check=True)
    assert prop(m, "DrainTimeoutUSec") == "t 7000000"
    assert m.sh("systemctl is-active zddd").out == "active"
    assert through_8888(m) == "main v1"


def test_kill_leaves_traffic_and_the_restart_adopts(machine):
    m = machine
    before = unit(m, "MainPID", "NRestarts")
    mark = cursor(m)
    # Kill, and in the same breath (before systemd's RestartSec=1s) fetch through 8888.
    r = m.sh("systemctl kill -s KILL zddd && curl -sS --max-time 3 127.0.0.1:8888 && "
             "systemctl show zddd -p SubState --value")
    assert r.returncode == 0, r.stderr
    page, state = r.stdout.splitlines()
    assert page == "main v1"
    assert state in ("auto-restart", "failed", "activating"), \
        f"zddd was {state} right after the kill: the curl did not run while it was down"
    m.wait("test \"$(systemctl is-active zddd)\" = active", 30, "zddd to be restarted")
    after = unit(m, "MainPID", "NRestarts")
    assert after["MainPID"] != before["MainPID"]
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    log = journal_since(m, mark)
    assert re.search(r"event=start how=adopted target=main", log), log
    assert "event=switch " not in log, log
    assert through_8888(m) == "main v1"


def test_metrics_are_served(machine):
    m = machine
    m.sh("zddctl switch backup && zddctl switch main", check=True)
    out = m.sh("curl -sSf 127.0.0.1:9488/metrics", check=True).stdout
    assert 'zddd_active_target{service="default",target="main"} 1.0' in out
    assert 'zddd_target_up{service="default",target="main"} 1.0' in out
    assert 'zddd_build_info{backend="nftables",version="' in out
    assert _switch_results(m)["backup"] >= 1, out
    # The sandbox lets the scrape-time kernel reads (sock_diag, nft counters) through.
    assert "zddd_collection_errors_total 0.0" in out, out


def test_watchdog_restarts_a_stalled_zddd(machine):
    """A stopped process sends no pings: the watchdog (10 s) aborts it and systemd restarts
    it; traffic keeps flowing meanwhile."""
    m = machine
    m.wait("test \"$(systemctl is-active zddd)\" = active", 30, "zddd to be active")
    before = unit(m, "MainPID", "NRestarts")
    # `kill -STOP 0` would stop the caller's own process group: the test run itself.
    assert int(before["MainPID"]) > 0, before
    m.sh(f"kill -STOP {before['MainPID']}", check=True)
    assert through_8888(m) == "main v1"
    m.wait(f"test \"$(systemctl show zddd -p MainPID --value)\" != {before['MainPID']} && "
           "test \"$(systemctl is-active zddd)\" = active", 45, "the watchdog restart",
           interval=1)
    assert "watchdog" in m.sh("journalctl -b --no-pager -o cat -u zddd").stdout.lower()
    assert int(unit(m, "NRestarts")["NRestarts"]) == int(before["NRestarts"]) + 1
    assert through_8888(m) == "main v1"


def test_the_bus_daemon_going_away_restarts_zddd_with_one_clear_line(machine):
    """zddd cannot be controlled without the bus: it exits non-zero saying so, the unit brings
    it back once the bus is back, and traffic never notices."""
    m = machine
    before = unit(m, "MainPID", "NRestarts")
    mark = cursor(m)
    m.sh("systemctl kill -s KILL dbus.service && sleep 0.5 && systemctl start dbus.service",
         check=True, timeout=30)
    assert through_8888(m) == "main v1"
    m.wait(f"test \"$(systemctl show zddd -p MainPID --value)\" != {before['MainPID']} && "
           "test \"$(systemctl is-active zddd)\" = active && "
           f"busctl get-property {DBUS_DEST} ActiveTarget", 60, "zddd back on the bus",
           interval=1)
    assert m.sh(f"busctl get-property {DBUS_DEST} ActiveTarget").out == 's "main"'
    log = journal_since(m, mark)
    assert "event=bus_lost" in log, log
    assert "Traceback" not in log, log
    assert re.search(r"event=start how=adopted target=main", log), log
    assert through_8888(m) == "main v1"


def test_bpf_drop_in_applies_and_keeps_nftables_working(machine):
    """The inactive drop-in, installed as the operator would: the unit gets the BPF
    privileges, bpffs is mounted on the host, and zddd (still on nftables) restarts and adopts.
    The tc/xdp backends themselves are tested where bcc and kernel headers are."""
    m = machine
    m.sh("install -D -m 0644 /usr/share/zddd/systemd/zddd-bpf.conf "
         "/etc/systemd/system/zddd.service.d/bpf.conf && systemctl daemon-reload && "
         "systemctl restart zddd", check=True)
    try:
        caps = unit(m, "CapabilityBoundingSet")["CapabilityBoundingSet"].split()
        assert {"cap_bpf", "cap_perfmon", "cap_sys_admin", "cap_net_admin"} <= set(caps), caps
        assert m.sh("systemctl is-active zddd").out == "active"
        assert m.sh("findmnt -n -o FSTYPE /sys/fs/bpf").out == "bpf"
        assert through_8888(m) == "main v1"
    finally:
        m.sh("rm -r /etc/systemd/system/zddd.service.d && systemctl daemon-reload && "
             "systemctl restart zddd", check=True)
    assert unit(m, "CapabilityBoundingSet")["CapabilityBoundingSet"] == "cap_net_admin"
    assert through_8888(m) == "main v1"


def _switch_results(m: Machine) -> dict[str, int]:
    out = m.sh("curl -sSf 127.0.0.1:9488/metrics", check=True).stdout
    results = {}
    for labels, value in re.findall(r'^zddd_switches_total\{([^}]*)\} ([\d.]+)$', out, re.M):
        named = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if named.get("result") == "ok":
            results[named["target"]] = int(float(value))
    return results


def test_app_reload_hook(machine):
    m = machine
    m.sh("install -D -m 0644 /usr/share/zddd/systemd/app-reload.conf "
         "/etc/systemd/system/app@main.service.d/zddd-reload.conf && systemctl daemon-reload",
         check=True)
    assert through_8888(m) == "main v1"

    # A good release: traffic goes to backup for the reload and comes back to main.
    switches = _switch_results(m)
    m.write("/srv/app/main/index.html", "main v2\n")
    m.sh("systemctl reload app@main", check=True, timeout=150)
    assert prop(m, "ActiveTarget") == 's "main"'
    assert through_8888(m) == "main v2"
    now = _switch_results(m)
    assert now["backup"] == switches["backup"] + 1 and now["main"] == switches["main"] + 1, \
        (switches, now)

    # A broken release: the app's check fails, the reload fails, traffic stays on backup.
    m.write("/srv/app/main/index.html", "main v3 BROKEN\n")
    r = m.sh("systemctl reload app@main", timeout=150)
    assert r.returncode != 0, "systemctl reload app@main succeeded with a broken release"
    assert prop(m, "ActiveTarget") == 's "backup"'
    assert through_8888(m) == "backup v1"
    assert m.sh("systemctl is-active app@main").out == "active"
    assert m.sh("curl -sS 127.0.0.1:8080").out == "main v2"  # the running app is untouched

    # Fixed: the next reload brings traffic back to main.
    m.write("/srv/app/main/index.html", "main v4\n")
    m.sh("systemctl reload app@main", check=True, timeout=150)
    assert prop(m, "ActiveTarget") == 's "main"'
    assert through_8888(m) == "main v4"


def test_config_broken_at_boot_fails_the_unit_and_programs_nothing(machine):
    m = machine
    # The journal lives in /run and goes with the reboot: show it now, for a failure later.
    print("--- journal before the reboot ---\n" + m.sh(
        "journalctl -u zddd -u 'app@*' --no-pager -o short-monotonic").stdout, file=sys.stderr)
    m.poweroff()
    m.write("/etc/zddd/zddd.toml", "[targets.main]\nport = 70000\n")
    m.boot()
    m.wait("systemctl is-failed zddd", 30, "zddd.service to fail")
    status = unit(m, "ExecMainStatus", "NRestarts", "Result")
    assert status == {"ExecMainStatus": "78", "NRestarts": "0", "Result": "exit-code"}, status
    log = m.sh("journalctl -b -u zddd --no-pager -o cat").stdout
    assert "invalid config: targets.main.port: port 70000 is out of range" in log, log
    assert "zddd" not in m.sh("nft list tables", check=True).stdout
    assert m.sh("curl -sS --max-time 3 127.0.0.1:8888").returncode != 0


def test_zddctl_version_and_bash_completion(machine):
    m = machine
    version = re.search(r'^__version__ = "(.*)"$', (TOP / "zddd/__init__.py").read_text(),
                        re.M).group(1)
    assert m.sh("zddctl --version").out == f"zddctl {version}"
    shipped = m.root / "usr/share/bash-completion/completions/zddctl"
    assert shipped.read_text() == (TOP / "packaging/bash-completion/zddctl").read_text()
