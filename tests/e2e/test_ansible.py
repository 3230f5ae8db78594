"""Fleet operations end to end: examples/ansible/rolling-deploy.yml rolls a release across both
app servers while a client sends steady traffic through HAProxy, in both HAProxy usages, and
`zddctl -H` drives a host over ssh.

The lab is the e2e topology (zdddlab) with what a fleet needs on top, built here:
each app namespace runs the shipped nginx vhosts (examples/nginx/) serving a versioned release
layout in the lab's directory (main/current -> releases/<name>), zddd probing their /healthz,
and an sshd of the test's own (Debian's openssh-server, a host key and a client key generated
for the test, listening only on the host's address inside its namespace, killed at teardown).
Ansible and zddctl -H run inside the load balancer's namespace with examples/ansible/lab.ini.

The tests of one usage share one lab and run in file order, like an operator would: ssh checks, a
roll to r2, the same roll again (nothing changes), a changed build named r2 (refused), a --check of
r9 (nothing changes), a roll to r3 that fails on app2, a roll to r4 that fails on app1, a roll to
r5 with a second roll started meanwhile (refused by the lock), r5 again pruning old releases, a
roll to r6 whose rollback fails too, r7 with app2 unreachable from the start, r8 with app2
unreachable at its turn, r8 again with a new zddd config (--check, then installed and reloaded,
then the same again), r10 with a config zddd --check-config refuses (the health-port usage runs
only r2, its re-run and r3). A second lab, of eight app servers, rolls r2. A third runs two
services (web and api) on each host behind examples/haproxy/two-services.cfg: a roll without
zddd_service stops naming them, and one with zddd_service=api rolls api while web keeps its
traffic and its target.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import zdddlab

REPO = zdddlab.REPO

ANSIBLE = REPO / "examples" / "ansible"
PLAYBOOK = ANSIBLE / "rolling-deploy.yml"
SSHD = "/usr/sbin/sshd"
HOSTS = tuple(zdddlab.APP_ADDRS)

pytestmark = pytest.mark.e2e


# ---- the lab ----------------------------------------------------------------------------

SSHD_CONFIG = """# The test's own sshd: its own keys and files, root by key only, nothing of the
# host's.
ListenAddress {addr}:22
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
PidFile none
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The lab's files live under /tmp, which is world-writable: StrictModes would refuse them.
StrictModes no
# What an installed zddd gives a login: zddctl on PATH (here the checkout's venv). SHLVL=1:
# bash run by sshd then skips root's ~/.bashrc (bash reads it only at shell level 1), which on
# the development machines puts pyenv first on PATH and costs 0.6 s per command.
SetEnv PATH={venv_bin}:/usr/sbin:/usr/bin:/sbin:/bin SHLVL=1
Subsystem sftp /usr/lib/openssh/sftp-server
"""

SSH_CONFIG = """Host *
    User root
    IdentityFile {dir}/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile {dir}/known_hosts
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 5
"""


def keygen(path: Path) -> str:
    """A new ed25519 key pair at `path` (and .pub); returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f",
                    str(path)], check=True, capture_output=True)
    return path.with_suffix(".pub").read_text().strip()


def ssh_setup(lab: zdddlab.Lab, hosts: dict[str, str]) -> Path:
    """The client side: a key, known_hosts with each app host's own host key, an ssh_config
    (examples/ansible/lab.ini points Ansible at it). Returns the directory."""
    directory = lab.tmp / "ssh"
    directory.mkdir()
    client_pub = keygen(directory / "id_ed25519")
    (directory / "authorized_keys").write_text(client_pub + "\n")
    known = []
    for name, addr in hosts.items():
        host_pub = keygen(directory / f"{name}_host_key")
        known.append(f"{addr} {host_pub}")
    (directory / "known_hosts").write_text("\n".join(known) + "\n")
    (directory / "ssh_config").write_text(SSH_CONFIG.format(dir=directory))
    return directory


def start_sshd(lab: zdddlab.Lab, name: str, ns: str, addr: str, ssh_dir: Path) -> zdddlab.Proc:
    conf = ssh_dir / f"{name}_sshd_config"
    conf.write_text(SSHD_CONFIG.format(addr=addr, host_key=ssh_dir / f"{name}_host_key",
                                       authorized_keys=ssh_dir / "authorized_keys",
                                       venv_bin=zdddlab.VENV_BIN))
    # sshd's privilege separation directory is compiled in; the package's tmpfiles create it at
    # boot, which this machine has not had.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    zdddlab.run([SSHD, "-t", "-f", str(conf)])
    proc = lab.spawn(f"{name}-sshd", ns, [SSHD, "-D", "-e", "-f", str(conf)])
    zdddlab.wait_for(lambda: proc.check_alive() or zdddlab.port_open(lab, ns, 22, host=addr), 10,
                    f"{name}'s sshd")
    return proc


def release(root: Path, vhost: str, name: str, page: str, healthy: bool = True) -> Path:
    """A release directory under root/<vhost>/releases/<name> with index.html (and healthz)."""
    directory = root / vhost / "releases" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "index.html").write_text(page + "\n")
    if healthy:
        (directory / "healthz").write_text("ok\n")
    return directory


def current(app_root: Path, vhost: str = "main") -> str:
    return os.readlink(app_root / vhost / "current")


def start_nginx(lab: zdddlab.Lab, name: str, ns: str, app_root: Path) -> zdddlab.Proc:
    """nginx with the shipped vhosts (main :8080, backup :80), their roots moved from /srv/app
    to the host's layout in the lab."""
    root = lab.tmp / f"{name}-nginx"
    (root / "temp").mkdir(parents=True)
    servers = "\n".join((REPO / "examples" / "nginx" / f"{v}.conf").read_text()
                        .replace("/srv/app/", f"{app_root}/") for v in ("main", "backup"))
    conf = root / "nginx.conf"
    # Workers as root: the releases are in the lab's directory, which only root may read.
    conf.write_text("user root;\n" + zdddlab.NGINX_CONF.format(root=root, workers=1,
                                                               servers=servers))
    proc = lab.spawn(f"{name}-nginx", ns, ["nginx", "-p", str(root), "-e",
                                           str(root / "error.log"), "-c", str(conf)])
    for port in (8080, 80):
        zdddlab.wait_for(lambda p=port: proc.check_alive() or zdddlab.port_open(lab, ns, p), 10,
                        f"{name}'s nginx on {port}")
    return proc


ZDDD_CONFIG = {"targets": {"main": {"port": 8080, "health": "http:/healthz"},
                           "backup": {"port": 80, "health": "http:/healthz"}}}


def fleet_cluster(lab: zdddlab.Lab, usage: str,
                  hosts: dict[str, str] = zdddlab.APP_ADDRS) -> zdddlab.Cluster:
    """zdddlab.cluster's topology with release layouts, the shipped vhosts and sshd; every host
    starts on release r1 ("<host> main r1"). With more `hosts` than the shipped HAProxy config
    names, its server lines are repeated for each. Returns once HAProxy has every server UP."""
    lb = lab.netns("lb")
    client = lab.netns("client")
    lab.bridge(lb, f"{zdddlab.LB_APP_ADDR}/24")
    lab.link(lb, "client", client, "eth0", cidr_a=f"{zdddlab.LB_CLIENT_ADDR}/24",
             cidr_b=f"{zdddlab.CLIENT_ADDR}/24")
    ssh_dir = ssh_setup(lab, hosts)
    apps = {}
    for name, addr in hosts.items():
        ns = lab.netns(name)
        lab.link(lb, name, ns, "eth0", cidr_b=f"{addr}/24", master_a="br0")
        app_root = lab.tmp / name / "srv" / "app"
        for vhost, page in (("main", f"{name} main r1"), ("backup", f"{name} backup")):
            release(app_root, vhost, "r1", page)
            (app_root / vhost / "current").symlink_to("releases/r1")
        nginx = start_nginx(lab, name, ns, app_root)
        bus = lab.dbus_daemon(f"{name}-bus")  # lab.ini: <lab_root>/<host>-bus/bus
        zddd = lab.zddd(f"{name}-zddd", ns, bus, ZDDD_CONFIG)
        start_sshd(lab, name, ns, addr, ssh_dir)
        apps[name] = zdddlab.AppServer(name, ns, addr, zddd, nginx)
    haproxy = lab.haproxy("haproxy", lb, haproxy_config(usage, hosts))
    zdddlab.wait_for(lambda: set(haproxy.servers().values()) == {"UP"}, 30,
                    "HAProxy to see every server UP")
    return zdddlab.Cluster(lb, client, apps, haproxy)


def haproxy_config(usage: str, hosts: dict[str, str]) -> str:
    """The shipped config for `usage`; for other hosts than it names, app1's server lines
    repeated for each of `hosts` in place of the shipped ones."""
    text = zdddlab.HAPROXY_CONFIGS[usage].read_text()
    if hosts == zdddlab.APP_ADDRS:
        return text
    lines = text.splitlines()
    servers = [i for i, line in enumerate(lines) if re.match(r"\s*server app\d", line)]
    app1 = [line for line in lines if re.match(r"\s*server app1[ -]", line)]
    ours = [line.replace("app1", name).replace(zdddlab.APP_ADDRS["app1"] + ":", addr + ":")
            for name, addr in hosts.items() for line in app1]
    return "\n".join(lines[:servers[0]] + ours + lines[servers[-1] + 1:]) + "\n"


def lab_for(usage: str, hosts: dict[str, str] = zdddlab.APP_ADDRS):
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, nftables)")
    lab = zdddlab.Lab(prefix="ans")
    try:
        cluster = fleet_cluster(lab, usage, hosts)
        yield lab, cluster
    finally:
        for proc in lab.procs:
            if proc.name.endswith(("-sshd", "haproxy")) or not proc.alive():
                print(f"--- {proc.name} ---\n{proc.log_text()[-2000:]}", file=sys.stderr)
        lab.close()


@pytest.fixture(scope="module", params=["traffic-port", "health-port"])
def fleet(request):
    yield from lab_for(request.param)


# ---- driving it ---------------------------------------------------------------------------

def app_root(lab: zdddlab.Lab, host: str) -> Path:
    return lab.tmp / host / "srv" / "app"


def ansible_env(lab: zdddlab.Lab) -> dict[str, str]:
    """Ansible's state in the lab's directory, not in root's home."""
    tmp = lab.tmp / "ansible"
    return {**os.environ, "ANSIBLE_HOME": str(tmp / "home"),
            "ANSIBLE_LOCAL_TEMP": str(tmp / "local"), "ANSIBLE_REMOTE_TEMP": str(tmp / "remote"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp / "cp"), "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0"}


def playbook_argv(lab: zdddlab.Lab, usage: str, *extra: str,
                  inventory: Path = ANSIBLE / "lab.ini") -> list[str]:
    return ["ansible-playbook", "-i", str(inventory), str(PLAYBOOK),
            "-e", f"lab_root={lab.tmp}", "-e", f"zddd_haproxy_usage={usage}", *extra]


def playbook(lab: zdddlab.Lab, c: zdddlab.Cluster, usage: str, *extra: str,
             timeout: float = 150, inventory: Path = ANSIBLE / "lab.ini",
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """ansible-playbook with examples/ansible/lab.ini, from the load balancer's namespace."""
    started = time.monotonic()
    argv = playbook_argv(lab, usage, *extra, inventory=inventory)
    result = lab.exec(c.lb, argv, env={**ansible_env(lab), **(env or {})}, cwd=lab.tmp,
                      check=False, timeout=timeout)
    print(f"ansible-playbook took {time.monotonic() - started:.1f} s:\n{result.stdout}"
          f"{result.stderr}", file=sys.stderr)
    return result


class RotationWatch:
    """Samples HAProxy's stats socket every 50 ms: which main servers (app1, app2) are in
    rotation, i.e. in a state that takes new requests ("UP", "UP 1/2")."""

    def __init__(self, haproxy: zdddlab.HAProxy, hosts: tuple[str, ...] = HOSTS):
        self.haproxy = haproxy
        self.hosts = hosts
        self.samples: list[tuple[float, dict[str, str]]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                servers = self.haproxy.servers()
                self.samples.append((time.monotonic(),
                                     {h: servers.get(h, "?") for h in self.hosts}))
            except OSError:
                pass
            self.stopping.wait(0.05)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()

    def both_out(self) -> list:
        return [(t, s) for t, s in self.samples
                if not any(state.startswith("UP") for state in s.values())]

    def ever_out(self, host: str) -> bool:
        return any(not s[host].startswith("UP") for _, s in self.samples)


def rolled(lab: zdddlab.Lab, c: zdddlab.Cluster, usage: str, *extra: str, **kw):
    """Run the playbook under steady load with HAProxy watched; returns (result, records,
    watch, finished) where `finished` is the monotonic time the playbook ended."""
    load = lab.loadgen("load", c.client, c.url, workers=4, interval=0.02)
    watch = RotationWatch(c.haproxy, tuple(c.apps))
    try:
        time.sleep(0.5)
        result = playbook(lab, c, usage, *extra, **kw)
        finished = time.monotonic()
        time.sleep(1.5)
    finally:
        watch.stop()
        records = load.finish()
    return result, records, watch, finished


def answers(records: list[dict], start: float = 0, end: float = float("inf")) -> Counter:
    return Counter(r["body"] if r["ok"] else "ERROR" for r in records if start <= r["t"] < end)


def failed(records: list[dict]) -> list[dict]:
    return [r for r in records if not r["ok"]]


def direct(lab: zdddlab.Lab, c: zdddlab.Cluster, host: str, port: int = 8888) -> str:
    """What the host answers on `port`, asked from the load balancer's namespace."""
    r = lab.exec(c.lb, ["curl", "-sS", "--max-time", "3",
                        f"http://{c.apps[host].addr}:{port}/"], check=False)
    return r.stdout.strip() if r.returncode == 0 else f"curl failed: {r.stderr.strip()}"


def assert_rotation_kept(watch: RotationWatch, usage: str) -> None:
    assert len(watch.samples) > 50, "HAProxy was hardly sampled"
    assert not watch.both_out(), f"both hosts out of rotation: {watch.both_out()[:3]}"
    if usage == "health-port":
        # The playbook took each host out in turn (switch off): the watch could have seen it.
        assert watch.ever_out("app1") and watch.ever_out("app2"), watch.samples[::20]



def start_playbook(lab: zdddlab.Lab, c: zdddlab.Cluster, usage: str, *extra: str,
                   env: dict[str, str] | None = None) -> subprocess.Popen:
    """playbook(), in the background: its output (stdout and stderr) from communicate()."""
    return subprocess.Popen(["ip", "netns", "exec", c.lb.name,
                             *playbook_argv(lab, usage, *extra)],
                            env={**ansible_env(lab), **(env or {})}, cwd=lab.tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def recap(out: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP: host -> {"ok": n, "changed": n, "unreachable": n, "failed": n, ...}."""
    return {host: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
            for host, counts in re.findall(r"^(\S+)\s+: (ok=.*)$", out, re.M)}


def last_failure(out: str, host: str) -> str:
    """The message of the last task that failed on `host` (the one that stopped it)."""
    failures = re.findall(rf"fatal: \[{host}\]: FAILED! => (.*)", out)
    assert failures, out[-3000:]
    return json.loads(failures[-1])["msg"]


def releases(lab: zdddlab.Lab, host: str) -> set[str]:
    return {p.name for p in (app_root(lab, host) / "main" / "releases").iterdir()}


def zddd_logs(c: zdddlab.Cluster) -> dict[str, int]:
    """Where each host's zddd log ends now, for switches_since."""
    return {host: len(app.zddd.log()) for host, app in c.apps.items()}


def switches_since(c: zdddlab.Cluster, marks: dict[str, int]) -> dict[str, list[str]]:
    """Each host's switch and drain events zddd logged since `marks` (zddd_logs)."""
    return {host: [line for line in app.zddd.log()[marks[host]:].splitlines()
                   if "event=switch" in line or "event=drain" in line]
            for host, app in c.apps.items()}


def sshd(lab: zdddlab.Lab, host: str) -> zdddlab.Proc:
    return next(p for p in lab.procs if p.name == f"{host}-sshd")


# ---- zddctl -H ----------------------------------------------------------------------------

def zddctl_h(lab: zdddlab.Lab, c: zdddlab.Cluster, *args: str, host: str = "app1",
             bus: bool = True) -> subprocess.CompletedProcess:
    """zddctl -H root@<host address> [--bus <host's bus>] ARGS, from the load balancer."""
    ssh = f"ssh -F {lab.tmp / 'ssh' / 'ssh_config'}"
    address = zdddlab.APP_ADDRS.get(host, host)
    argv = [str(zdddlab.VENV_BIN / "zddctl"), "-H", f"root@{address}"]
    if bus:
        argv += ["--bus", c.apps[host].zddd.bus.address]
    return lab.exec(c.lb, [*argv, *args], env={**os.environ, "ZDDCTL_SSH": ssh}, check=False,
                    timeout=60)


@pytest.mark.parametrize("fleet", ["traffic-port"], indirect=True)
def test_zddctl_over_ssh_gives_the_remote_output_and_exit_status(fleet):
    lab, c = fleet
    app1 = c.apps["app1"].zddd
    local = app1.ctl("status", "--json")
    remote = zddctl_h(lab, c, "status", "--json")
    assert remote.returncode == 0, remote.stderr

    def strip(st: dict) -> dict:  # connection counts change with HAProxy's checks
        return {**st, "targets": {n: {**t, "connections": None}
                                  for n, t in st["targets"].items()}}

    assert strip(json.loads(remote.stdout)) == strip(json.loads(local.stdout))
    # A refusal on the remote host: its message and its exit status 1, as run there.
    here = app1.ctl("switch", "été", check=False)
    there = zddctl_h(lab, c, "switch", "été")
    assert (there.returncode, there.stdout, there.stderr) == (1, here.stdout, here.stderr)
    assert "InvalidTarget" in there.stderr and "Traceback" not in there.stderr
    # A switch made over ssh is a switch on that host, not here.
    there = zddctl_h(lab, c, "switch", "backup")
    assert (there.returncode, there.stdout) == (0, "switched to backup\n"), there
    assert app1.status()["active_target"] == "backup"
    assert direct(lab, c, "app1") == "app1 backup"
    there = zddctl_h(lab, c, "switch", "main")
    assert there.returncode == 0 and app1.status()["active_target"] == "main", there
    # A usage error is found before any connection: exit 2, nothing from ssh.
    there = zddctl_h(lab, c, "switch")
    assert there.returncode == 2 and "ssh" not in there.stderr, there
    # ssh failing (nothing listens on the load balancer's own port 22): one line, exit 1.
    there = zddctl_h(lab, c, "status", host="127.0.0.1", bus=False)
    assert there.returncode == 1, there
    assert "zddctl: ssh to root@127.0.0.1 failed" in there.stderr, there.stderr
    # The remote zddctl cannot reach a bus: the remote failure, exit 1.
    there = zddctl_h(lab, c, "--bus", "unix:path=/nonexistent", "status", bus=False)
    assert there.returncode == 1 and "cannot connect" in there.stderr, there


# ---- the rolling deploy ---------------------------------------------------------------------

def test_rolling_deploy_under_load(fleet, request):
    lab, c = fleet
    usage = request.node.callspec.params["fleet"]
    build = lab.tmp / "build" / "r2"
    build.mkdir(parents=True)
    (build / "index.html").write_text("main r2\n")
    (build / "healthz").write_text("ok\n")

    result, records, watch, finished = rolled(lab, c, usage, "-e", "zddd_release=r2",
                                              "-e", f"zddd_release_src={build}")

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert not failed(records), failed(records)[:5]
    assert_rotation_kept(watch, usage)
    seen = answers(records)
    assert seen["app1 main r1"] > 0 and seen["app2 main r1"] > 0, seen
    if usage == "traffic-port":
        # Each host served from its backup vhost while its main vhost was being deployed.
        assert seen["app1 backup"] > 0 and seen["app2 backup"] > 0, seen
    # After the roll, every answer is the new release, from both hosts.
    assert set(answers(records, finished)) == {"main r2"}, answers(records, finished)
    for host in HOSTS:
        assert current(app_root(lab, host)) == "releases/r2"
        assert c.apps[host].zddd.status()["active_target"] == "main"
        assert direct(lab, c, host, 8080) == "main r2"
    assert re.search(r"app1\s*: ok=\d+\s+changed=\d+\s+unreachable=0\s+failed=0",
                     result.stdout), result.stdout[-1500:]


def test_the_same_release_again_changes_nothing(fleet, request):
    """A second run of r2 on a fleet that has it: changed=0 on every host, and not one switch
    (zddd logged none)."""
    lab, c = fleet
    usage = request.node.callspec.params["fleet"]
    build = lab.tmp / "build" / "r2"
    marks = zddd_logs(c)
    before = {host: releases(lab, host) for host in HOSTS}

    result = playbook(lab, c, usage, "-e", "zddd_release=r2", "-e", f"zddd_release_src={build}")

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    counts = recap(result.stdout)
    assert set(counts) == set(HOSTS), result.stdout[-1500:]
    for host in HOSTS:
        assert counts[host]["changed"] == 0 and counts[host]["failed"] == 0, counts
        assert current(app_root(lab, host)) == "releases/r2"
        assert releases(lab, host) == before[host]
    assert switches_since(c, marks) == {host: [] for host in HOSTS}


@pytest.mark.parametrize("fleet", ["traffic-port"], indirect=True)
def test_a_changed_build_under_the_active_release_name_changes_nothing(fleet, request):
    """The build of r2 changed on the controller, and r2 is what the hosts serve: the roll
    stops at the preflight, naming the hosts, and the served files stay as they were."""
    lab, c = fleet
    usage = request.node.callspec.params["fleet"]
    build = lab.tmp / "build" / "r2-changed"
    build.mkdir(parents=True)
    (build / "index.html").write_text("main r2, rebuilt\n")
    (build / "healthz").write_text("ok\n")
    marks = zddd_logs(c)

    result = playbook(lab, c, usage, "-e", "zddd_release=r2", "-e", f"zddd_release_src={build}")

    assert result.returncode != 0, result.stdout[-3000:]
    for host in HOSTS:
        msg = last_failure(result.stdout, host)
        assert msg.startswith(f"{host}: release r2 is active and differs from {build}"), msg
        assert direct(lab, c, host, 8080) == "main r2"
    assert switches_since(c, marks) == {host: [] for host in HOSTS}
    assert not (lab.tmp / "rolling-deploy.lock").exists()


@pytest.mark.parametrize("fleet", ["traffic-port"], indirect=True)
def test_check_mode_reports_the_roll_and_changes_nothing(fleet, request):
    """--check with a new release: exit 0, each host reported as one the roll would change
    (staged, cycled), and nothing changed: no switch, current and the releases as they were,
    zddd on main."""
    lab, c = fleet
    usage = request.node.callspec.params["fleet"]
    build = lab.tmp / "build" / "r9"
    build.mkdir(parents=True)
    (build / "index.html").write_text("main r9\n")
    (build / "healthz").write_text("ok\n")
    marks = zddd_logs(c)
    before = {host: (current(app_root(lab, host)), releases(lab, host)) for host in HOSTS}

    result = playbook(lab, c, usage, "--check", "-e", "zddd_release=r9",
                      "-e", f"zddd_release_src={build}")

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    counts = recap(result.stdout)
    for host in HOSTS:
        assert counts[host]["changed"] >= 2 and counts[host]["failed"] == 0, counts
        assert f"would take {host} off main (zddctl switch backup)" in result.stdout
        assert (current(app_root(lab, host)), releases(lab, host)) == before[host]
        assert c.apps[host].zddd.status()["active_target"] == "main"
    assert switches_since(c, marks) == {host: [] for host in HOSTS}
    assert not (lab.tmp / "rolling-deploy.lock").exists()


def test_a_release_failing_its_health_check_on_the_second_host_stops_the_roll(fleet, request):
    """r3 is staged on both hosts, but app2's copy has no /healthz: app1 ends on r3, app2 is
    rolled back to r2 and serves, and the playbook fails naming app2."""
    lab, c = fleet
    usage = request.node.callspec.params["fleet"]
    release(app_root(lab, "app1"), "main", "r3", "app1 main r3")
    release(app_root(lab, "app2"), "main", "r3", "app2 main r3 broken", healthy=False)

    result, records, watch, finished = rolled(lab, c, usage, "-e", "zddd_release=r3",
                                              "-e", "zddd_main_up_wait=5")

    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    # The last failure reported is the one that stopped the roll (the first is the health
    # check's, which the rollback handled).
    failures = re.findall(r"fatal: \[app2\]: FAILED! => (.*)", out)
    assert failures, out[-3000:]
    msg = json.loads(failures[-1])["msg"]
    assert msg.startswith("app2: deploying r3 failed") and "rolled back to releases/r2" in msg, \
        msg
    assert not failed(records), failed(records)[:5]
    assert_rotation_kept(watch, usage)
    assert current(app_root(lab, "app1")) == "releases/r3"
    assert current(app_root(lab, "app2")) == "releases/r2"
    for host in HOSTS:
        assert c.apps[host].zddd.status()["active_target"] == "main"
    # The broken release never answered a client; afterwards both hosts serve from main.
    assert "app2 main r3 broken" not in answers(records)
    assert set(answers(records, finished)) == {"app1 main r3", "main r2"}, \
        answers(records, finished)


# The roll's order does not depend on the usage: one usage is enough, and saves half a minute.
@pytest.mark.parametrize("fleet", ["traffic-port"], indirect=True)
def test_a_failure_on_the_first_host_leaves_the_others_untouched(fleet, request):
    """r4 passes its health check on app1, the first host, but does not serve r4: the check
    through the load balancer fails after app1 is back on main, app1 is taken off main again
    and rolled back, and app2 is never touched."""
    lab, c = fleet
    usage = request.node.callspec.params["fleet"]
    release(app_root(lab, "app1"), "main", "r4", "app1 main wrong build")
    release(app_root(lab, "app2"), "main", "r4", "app2 main r4")
    app2_log = len(c.apps["app2"].zddd.log())

    result = playbook(lab, c, usage, "-e", "zddd_release=r4", "-e", "zddd_lb_verify_wait=3")

    out = result.stdout + result.stderr
    assert result.returncode != 0 and "fatal: [app1]" in out, out[-3000:]
    assert re.search(r"TASK \[.*Take the host off main again before the rollback\] \*+\n"
                     r"changed: \[app1\]", out), out[-3000:]
    # app2 passed the preflight (staged, checked), and the roll never reached it.
    roll = out.split("PLAY [Rolling deploy", 1)[1]
    assert "[app2]" not in roll, roll[-3000:]
    assert current(app_root(lab, "app1")) == "releases/r3"
    assert current(app_root(lab, "app2")) == "releases/r2"
    assert direct(lab, c, "app1") == "app1 main r3"
    # Not one switch on app2: its zddd logged none since.
    since = c.apps["app2"].zddd.log()[app2_log:]
    assert "event=switch" not in since and "event=drain" not in since, since
    for host in HOSTS:
        assert c.apps[host].zddd.status()["active_target"] == "main"


@pytest.mark.parametrize("fleet", ["traffic-port"], indirect=True)
def test_a_second_roll_fails_fast_naming_the_one_that_runs(fleet, request):
    """While a roll of r5 runs, a second one fails at once with a message naming the first
    (user, controller, release, hosts); the first ends well and prunes old releases: the newest
    three stay, and always the one served before (app2's r2)."""
    lab, c = fleet
    usage = request.node.callspec.params["fleet"]
    for host in HOSTS:
        release(app_root(lab, host), "main", "r5", "main r5")
    lock = lab.tmp / "rolling-deploy.lock"
    first = start_playbook(lab, c, usage, "-e", "zddd_release=r5")
    try:
        zdddlab.wait_for(lambda: first.poll() is not None or lock.exists(), 60,
                         "the first roll to take its lock")
        assert lock.exists(), first.communicate()[0][-3000:]
        started = time.monotonic()
        second = playbook(lab, c, usage, "-e", "zddd_release=r5")
        took = time.monotonic() - started
        out, _ = first.communicate(timeout=150)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    print(f"first roll:\n{out}", file=sys.stderr)
    assert second.returncode != 0
    msg = last_failure(second.stdout, "app1")
    assert msg.startswith(f"another rolling deploy holds the lock {lock}: root@"), msg
    assert "release r5 to app1,app2" in msg, msg
    assert all(n["changed"] == 0 for n in recap(second.stdout).values()), second.stdout[-2000:]
    assert took < 20, took
    assert first.returncode == 0, out[-3000:]
    assert not lock.exists()
    for host in HOSTS:
        assert current(app_root(lab, host)) == "releases/r5"
    # app1 had r1..r5 (r3 served before); app2 r1..r5 with r2 served before, kept.
    assert releases(lab, "app1") == {"r3", "r4", "r5"}
    assert releases(lab, "app2") == {"r2", "r3", "r4", "r5"}


@pytest.mark.parametrize("fleet", ["traffic-port"], indirect=True)
def test_pruning_keeps_zddd_keep_releases_without_cycling_a_host(fleet, request):
    """r5 again with zddd_keep_releases=1: the old releases go (reported changed), no host is
    switched."""
    lab, c = fleet
    usage = request.node.callspec.params["fleet"]
    marks = zddd_logs(c)

    result = playbook(lab, c, usage, "-e", "zddd_release=r5", "-e", "zddd_keep_releases=1")

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    counts = recap(result.stdout)
    for host in HOSTS:
        assert releases(lab, host) == {"r5"}
        assert counts[host]["changed"] == 1, counts
    assert switches_since(c, marks) == {host: [] for host in HOSTS}


@pytest.mark.parametrize("fleet", ["traffic-port"], indirect=True)
def test_a_failed_rollback_still_ends_with_the_message_naming_the_host(fleet, request):
    """r6 fails its health check on app1, and so does r5, the release it rolls back to (its
    healthz removed meanwhile): the roll still ends with app1's own message, saying the
    rollback failed too, the lock is released and app2 is not touched."""
    lab, c = fleet
    usage = request.node.callspec.params["fleet"]
    release(app_root(lab, "app1"), "main", "r6", "app1 main r6 broken", healthy=False)
    release(app_root(lab, "app2"), "main", "r6", "app2 main r6")
    healthz = app_root(lab, "app1") / "main" / "releases" / "r5" / "healthz"
    marks = zddd_logs(c)
    healthz.unlink()
    try:
        result = playbook(lab, c, usage, "-e", "zddd_release=r6", "-e", "zddd_main_up_wait=3")
    finally:
        healthz.write_text("ok\n")
    app1 = c.apps["app1"].zddd
    try:
        out = result.stdout + result.stderr
        assert result.returncode != 0, out[-3000:]
        msg = last_failure(out, "app1")
        assert msg.startswith('app1: deploying r6 failed at "Wait for main\'s health'), msg
        assert ("The rollback of app1 to releases/r5 failed too, at \"Wait for main's health "
                "after the rollback") in msg, msg
        assert "app1 needs a look by hand" in msg and "the hosts after app1 were not touched" \
            in msg, msg
        assert not (lab.tmp / "rolling-deploy.lock").exists()
        assert switches_since(c, marks)["app2"] == []
        assert current(app_root(lab, "app1")) == "releases/r5"
        # Left where the rollback stopped: off main, serving from its backup vhost.
        assert app1.status()["active_target"] == "backup"
        assert direct(lab, c, "app1") == "app1 backup"
    finally:
        # What the operator does by hand: main is healthy again, so back to main.
        zdddlab.wait_for(lambda: app1.ctl("switch", "main", check=False).returncode == 0, 15,
                         "app1 back on main")


@pytest.mark.parametrize("fleet", ["traffic-port"], indirect=True)
def test_an_unreachable_host_stops_the_roll_before_it_starts(fleet, request):
    """app2's sshd is down: the roll stops at the preflight with a message naming app2, and
    app1 is not switched."""
    lab, c = fleet
    usage = request.node.callspec.params["fleet"]
    release(app_root(lab, "app1"), "main", "r7", "main r7")
    marks = zddd_logs(c)
    sshd(lab, "app2").stop()
    try:
        # No ssh connection kept open from an earlier run: a new one meets the stopped sshd.
        result = playbook(lab, c, usage, "-e", "zddd_release=r7",
                          env={"ANSIBLE_SSH_ARGS": "-o ControlMaster=no"})
    finally:
        lab.procs.remove(sshd(lab, "app2"))
        start_sshd(lab, "app2", c.apps["app2"].netns, c.apps["app2"].addr, lab.tmp / "ssh")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    msg = last_failure(out, "app2")
    assert msg.startswith("app2 is unreachable (") and msg.endswith(
        "the roll did not start and no host was changed"), msg
    assert "PLAY [Rolling deploy" not in out, out[-3000:]
    assert switches_since(c, marks) == {host: [] for host in HOSTS}
    assert current(app_root(lab, "app1")) == "releases/r5"
    assert not (lab.tmp / "rolling-deploy.lock").exists()


@pytest.mark.parametrize("fleet", ["traffic-port"], indirect=True)
def test_a_host_unreachable_at_its_turn_stops_the_roll_there(fleet, request):
    """app2's sshd stops while app1 is being deployed: app1 ends on r8, and the roll stops at
    app2 with a message naming it; app2 is not switched and the lock is released."""
    lab, c = fleet
    usage = request.node.callspec.params["fleet"]
    for host in HOSTS:
        release(app_root(lab, host), "main", "r8", "main r8")
    marks = zddd_logs(c)
    no_master = {"ANSIBLE_SSH_ARGS": "-o ControlMaster=no"}
    roll = start_playbook(lab, c, usage, "-e", "zddd_release=r8", env=no_master)
    try:
        zdddlab.wait_for(lambda: roll.poll() is not None or switches_since(c, marks)["app1"],
                         90, "app1's turn")
        sshd(lab, "app2").stop()
        out, _ = roll.communicate(timeout=150)
    finally:
        if roll.poll() is None:
            roll.kill()
            roll.wait()
        if not sshd(lab, "app2").alive():
            lab.procs.remove(sshd(lab, "app2"))
            start_sshd(lab, "app2", c.apps["app2"].netns, c.apps["app2"].addr,
                       lab.tmp / "ssh")
    print(out, file=sys.stderr)
    assert roll.returncode != 0, out[-3000:]
    msg = last_failure(out, "app2")
    assert msg.startswith("app2 is unreachable (") and msg.endswith(
        "the roll stopped before it; app2 and the hosts after it were not touched"), msg
    assert current(app_root(lab, "app1")) == "releases/r8"
    assert c.apps["app1"].zddd.status()["active_target"] == "main"
    assert current(app_root(lab, "app2")) == "releases/r5"
    assert switches_since(c, marks)["app2"] == []
    assert not (lab.tmp / "rolling-deploy.lock").exists()


# ---- zddd's config, installed by the preflight ----------------------------------------------

def zddd_config_var(lab: zdddlab.Lab, c: zdddlab.Cluster, text: str) -> str:
    """-e zddd_config=TEXT as JSON (the text has newlines), with app1's own paths in it (its
    state file) made a template for each host."""
    here = str(c.apps["app1"].zddd.config_path.parent)
    assert here in text, text
    templated = text.replace(here, "{{ lab_root }}/{{ inventory_hostname }}-zddd")
    return json.dumps({"zddd_config": templated})


def reloads_since(c: zdddlab.Cluster, marks: dict[str, int]) -> dict[str, int]:
    """How many reloads each host's zddd made since `marks` (zddd_logs)."""
    return {host: len(re.findall(r"\bevent=reload(?:\s|$)", app.zddd.log()[marks[host]:],
                                 re.M))
            for host, app in c.apps.items()}


@pytest.mark.parametrize("fleet", ["traffic-port"], indirect=True)
def test_zddd_config_is_installed_checked_and_reloaded_where_it_changed(fleet, request):
    """zddd_config with [health] interval 0.2 -> 0.5: --check reports it and changes nothing;
    the roll installs it on every host and reloads each zddd once; the same text again reloads
    none."""
    lab, c = fleet
    usage = request.node.callspec.params["fleet"]
    for host in HOSTS:
        release(app_root(lab, host), "main", "r8", "main r8")
    old = c.apps["app1"].zddd.config_path.read_text()
    assert "interval = 0.2\n" in old, old
    new = old.replace("interval = 0.2\n", "interval = 0.5\n")
    config = zddd_config_var(lab, c, new)
    before = {host: app.zddd.config_path.read_text() for host, app in c.apps.items()}

    marks = zddd_logs(c)
    result = playbook(lab, c, usage, "-e", "zddd_release=r8", "-e", config, "--check")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    task = re.search(r"TASK \[.*Install zddd's config, checked .*\n((?:.+\n)+)",
                     result.stdout)
    assert task and sorted(task[1].split()) == ["[app1]", "[app2]", "changed:", "changed:"], \
        result.stdout[-3000:]
    assert {host: app.zddd.config_path.read_text() for host, app in c.apps.items()} == before
    assert reloads_since(c, marks) == {host: 0 for host in HOSTS}

    marks = zddd_logs(c)
    result = playbook(lab, c, usage, "-e", "zddd_release=r8", "-e", config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    for host, app in c.apps.items():
        text = app.zddd.config_path.read_text()
        assert "interval = 0.5\n" in text and str(app.zddd.state_path) in text, text
        assert app.zddd.status()["active_target"] == "main"
        assert current(app_root(lab, host)) == "releases/r8"
    # Each zddd took the new file: one reload, logged by zddd itself.
    assert reloads_since(c, marks) == {host: 1 for host in HOSTS}, \
        [app.zddd.log()[-1500:] for app in c.apps.values()]

    marks = zddd_logs(c)
    result = playbook(lab, c, usage, "-e", "zddd_release=r8", "-e", config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert reloads_since(c, marks) == {host: 0 for host in HOSTS}
    assert switches_since(c, marks) == {host: [] for host in HOSTS}
    counts = recap(result.stdout)
    assert all(counts[host]["changed"] == 0 for host in HOSTS), counts


@pytest.mark.parametrize("fleet", ["traffic-port"], indirect=True)
def test_a_zddd_config_that_fails_check_config_stops_the_roll_before_any_switch(fleet, request):
    """listen_port = 70000: zddd --check-config refuses it on app1 (and app2); the roll stops at
    the preflight with app1's name and the key, the old file stays, nothing is switched or
    reloaded, the lock is released."""
    lab, c = fleet
    usage = request.node.callspec.params["fleet"]
    for host in HOSTS:
        release(app_root(lab, host), "main", "r10", "main r10")
    old = c.apps["app1"].zddd.config_path.read_text()
    config = zddd_config_var(lab, c, "listen_port = 70000\n" + old)
    before = {host: app.zddd.config_path.read_text() for host, app in c.apps.items()}
    currents = {host: current(app_root(lab, host)) for host in HOSTS}
    marks = zddd_logs(c)

    result = playbook(lab, c, usage, "-e", "zddd_release=r10", "-e", config)

    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    msg = last_failure(out, "app1")
    assert msg.startswith("app1: the new zddd config at "), msg
    assert "refused by zddd --check-config (zddd: invalid config: listen_port: port 70000" \
        in msg and msg.endswith("the old file is in place; no host was switched"), msg
    assert "PLAY [Rolling deploy" not in out, out[-3000:]
    assert {host: app.zddd.config_path.read_text() for host, app in c.apps.items()} == before
    assert {host: current(app_root(lab, host)) for host in HOSTS} == currents
    assert switches_since(c, marks) == {host: [] for host in HOSTS}
    assert reloads_since(c, marks) == {host: 0 for host in HOSTS}
    assert not (lab.tmp / "rolling-deploy.lock").exists()


# ---- eight hosts ----------------------------------------------------------------------------

EIGHT = {f"app{i}": f"198.51.100.{10 + i}" for i in range(1, 9)}


@pytest.fixture(scope="module")
def fleet_of_eight():
    yield from lab_for("traffic-port", EIGHT)


def test_eight_hosts_each_checked_through_the_load_balancer_at_once(fleet_of_eight):
    """Eight app servers behind the shipped traffic-port config. The check through the load
    balancer asks HAProxy's stats socket for the host's state and sends one request routed to
    it (X-Zddd-Server): with zddd_lb_verify_wait=2, two round robin tries over eight servers
    would miss most hosts and roll back a good release; here every host passes, under load."""
    lab, c = fleet_of_eight
    inventory = lab.tmp / "eight.ini"
    text = (ANSIBLE / "lab.ini").read_text()
    hosts = "".join(f"{h} ansible_host={a}\n" for h, a in EIGHT.items())
    inventory.write_text(re.sub(r"^\[app\]\n(?:app\d .*\n)+", f"[app]\n{hosts}", text,
                                flags=re.M))
    build = lab.tmp / "build" / "r2"
    build.mkdir(parents=True)
    (build / "index.html").write_text("main r2\n")
    (build / "healthz").write_text("ok\n")

    result, records, watch, finished = rolled(
        lab, c, "traffic-port", "-e", "zddd_release=r2", "-e", f"zddd_release_src={build}",
        "-e", "zddd_lb_verify_wait=2", inventory=inventory, timeout=400)

    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "Roll back" not in out
    counts = recap(result.stdout)
    assert set(counts) == set(EIGHT) and all(n["failed"] == 0 for n in counts.values()), counts
    assert not failed(records), failed(records)[:5]
    assert len(watch.samples) > 50 and not watch.both_out()
    for host, app in c.apps.items():
        assert current(app_root(lab, host)) == "releases/r2"
        assert app.zddd.status()["active_target"] == "main"
    assert set(answers(records, finished)) == {"main r2"}, answers(records, finished)
    # Each host's check took one request through the load balancer: no retry of it.
    tries = re.findall(r"FAILED - RETRYING: \[(app\d)[^\]]*\]: Ask the load balancer", out)
    assert not tries, tries


# ---- one service of two rolled: -e zddd_service=api ---------------------------------------

# Two services on every host, as packaging/zddd.toml's example and
# examples/haproxy/two-services.cfg have them: service -> (listen, main, backup, agent port).
TWO_SERVICES = {"web": (8888, 8080, 80, 8889), "api": (9888, 9080, 9081, 9889)}
SERVICE_INTERFACE = "org.zddd.Steering1.Service"


def service_vhosts(name: str, app_root: Path) -> str:
    """The shipped main and backup vhosts moved to service `name`'s ports and layout."""
    _, main, backup, _ = TWO_SERVICES[name]
    text = ""
    for vhost, port, shipped in (("main", main, 8080), ("backup", backup, 80)):
        conf = (REPO / "examples" / "nginx" / f"{vhost}.conf").read_text()
        conf = re.sub(rf"listen (\[::\]:)?{shipped};", rf"listen \g<1>{port};", conf)
        text += conf.replace("/srv/app/", f"{app_root}/") + "\n"
    return text


def two_service_cluster(lab: zdddlab.Lab) -> zdddlab.Cluster:
    """fleet_cluster's topology with services web and api on each host behind
    two-services.cfg: each service's vhosts serve "<host> <service> main r1" and "<host>
    <service> backup" from its own layout (web: srv/app, api: srv/api); one zddd per host
    steers both."""
    lb = lab.netns("lb")
    client = lab.netns("client")
    lab.bridge(lb, f"{zdddlab.LB_APP_ADDR}/24")
    lab.link(lb, "client", client, "eth0", cidr_a=f"{zdddlab.LB_CLIENT_ADDR}/24",
             cidr_b=f"{zdddlab.CLIENT_ADDR}/24")
    ssh_dir = ssh_setup(lab, zdddlab.APP_ADDRS)
    apps = {}
    for host, addr in zdddlab.APP_ADDRS.items():
        ns = lab.netns(host)
        lab.link(lb, host, ns, "eth0", cidr_b=f"{addr}/24", master_a="br0")
        servers = ""
        for service in TWO_SERVICES:
            root = service_root(lab, host, service)
            for vhost, page in (("main", f"{host} {service} main r1"),
                                ("backup", f"{host} {service} backup")):
                release(root, vhost, "r1", page)
                (root / vhost / "current").symlink_to("releases/r1")
            servers += service_vhosts(service, root)
        nginx_root = lab.tmp / f"{host}-nginx"
        (nginx_root / "temp").mkdir(parents=True)
        conf = nginx_root / "nginx.conf"
        conf.write_text("user root;\n" + zdddlab.NGINX_CONF.format(root=nginx_root, workers=1,
                                                                   servers=servers))
        nginx = lab.spawn(f"{host}-nginx", ns, ["nginx", "-p", str(nginx_root), "-e",
                                                str(nginx_root / "error.log"), "-c", str(conf)])
        for _, main, backup, _ in TWO_SERVICES.values():
            for port in (main, backup):
                zdddlab.wait_for(lambda p=port, n=nginx, s=ns: n.check_alive() or
                                 zdddlab.port_open(lab, s, p), 10, f"{host}'s nginx on {port}")
        bus = lab.dbus_daemon(f"{host}-bus")
        directory = lab.tmp / f"{host}-zddd"
        directory.mkdir()
        zddd = zdddlab.Zddd(ns, bus, directory, {"services": {
            name: {"listen_port": listen, "drain_timeout": 20,
                   "targets": {"main": {"port": main, "health": "http:/healthz"},
                               "backup": {"port": backup, "health": "http:/healthz"}},
                   "agent": {"listen": f"[::]:{agent}"}}
            for name, (listen, main, backup, agent) in TWO_SERVICES.items()}}, name=f"{host}-zddd")
        # The lab's default drain_timeout is a single-service key: each service has its own.
        zddd.config.pop("drain_timeout", None)
        zddd.write_config()
        lab.own(zddd).start()
        start_sshd(lab, host, ns, addr, ssh_dir)
        apps[host] = zdddlab.AppServer(host, ns, addr, zddd, nginx)
    haproxy = lab.haproxy("haproxy", lb, (zdddlab.EXAMPLES / "haproxy" /
                                          "two-services.cfg").read_text())
    zdddlab.wait_for(lambda: all(set(haproxy.servers(b).values()) == {"UP"}
                                 for b in TWO_SERVICES), 30,
                     "HAProxy to see every server UP in both backends")
    return zdddlab.Cluster(lb, client, apps, haproxy)


def service_root(lab: zdddlab.Lab, host: str, service: str) -> Path:
    return lab.tmp / host / "srv" / ("app" if service == "web" else service)


@pytest.fixture(scope="module")
def two_service_fleet():
    if os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, nftables)")
    lab = zdddlab.Lab(prefix="ans2")
    try:
        yield lab, two_service_cluster(lab)
    finally:
        for proc in lab.procs:
            if proc.name.endswith(("-sshd", "haproxy")) or not proc.alive():
                print(f"--- {proc.name} ---\n{proc.log_text()[-2000:]}", file=sys.stderr)
        lab.close()


def service_prop(app: zdddlab.AppServer, service: str, name: str):
    err, body = zdddlab.dbus_call(app.zddd.bus.address, "Get", "ss", [SERVICE_INTERFACE, name],
                                  10, interface=zdddlab.PROPERTIES,
                                  path=f"{zdddlab.OBJECT_PATH}/service/{service}")
    if err is not None:
        raise zdddlab.LabError(f"Get {service} {name}: {err} {body}")
    return body[0].value


class ServiceWatch:
    """Samples every 100 ms, per host, service `service`'s ActiveTarget (its D-Bus object) and
    HAProxy's state of the host in backend `service`."""

    def __init__(self, c: zdddlab.Cluster, service: str):
        self.c, self.service = c, service
        self.samples: list[tuple[float, dict[str, tuple[str, str]]]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                servers = self.c.haproxy.servers(self.service)
                self.samples.append((time.monotonic(), {
                    host: (service_prop(app, self.service, "ActiveTarget"),
                           servers.get(host, "?"))
                    for host, app in self.c.apps.items()}))
            except (OSError, zdddlab.LabError):
                pass
            self.stopping.wait(0.1)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


API_EXTRA = ("-e", "zddd_service=api",
             "-e", "zddd_app_root={{ lab_root }}/{{ inventory_hostname }}/srv/api",
             "-e", "zddd_lb_url=http://127.0.0.1:8000/", "-e", "zddd_haproxy_backend=api")


def test_without_zddd_service_a_host_with_two_services_stops_the_roll(two_service_fleet):
    """The role cannot tell which service to roll: the preflight stops, naming both, and no
    service of any host is switched."""
    lab, c = two_service_fleet
    before = {host: {s: service_prop(app, s, "LastSwitchTimestamp") for s in TWO_SERVICES}
              for host, app in c.apps.items()}

    result = playbook(lab, c, "traffic-port", "-e", "zddd_release=r2")

    assert result.returncode != 0, result.stdout[-3000:]
    for host, app in c.apps.items():
        msg = last_failure(result.stdout, host)
        assert msg.startswith(f"{host}: zddd steers several services ("), msg
        assert "web" in msg and "api" in msg and "set zddd_service" in msg, msg
        assert {s: service_prop(app, s, "LastSwitchTimestamp") for s in TWO_SERVICES} == \
            before[host]
    assert not (lab.tmp / "rolling-deploy.lock").exists()


def test_rolling_one_service_leaves_the_other_alone(two_service_fleet):
    """api rolled to r2 across both hosts (zddd_service=api, api's layout, load-balancer URL
    and HAProxy backend) under steady load on both services: api's hosts went to their api
    backup vhost in turn and came back with r2; web answered every request from both hosts'
    web main vhosts, its ActiveTarget sampled on both hosts never left main, HAProxy kept both
    hosts UP in backend web, and web's LastSwitchTimestamp is what it was before the roll."""
    lab, c = two_service_fleet
    build = lab.tmp / "build" / "api-r2"
    build.mkdir(parents=True)
    (build / "index.html").write_text("api main r2\n")
    (build / "healthz").write_text("ok\n")
    web_switched = {host: service_prop(app, "web", "LastSwitchTimestamp")
                    for host, app in c.apps.items()}
    web_load = lab.loadgen("load-web", c.client, c.url, workers=2, interval=0.02)
    api_load = lab.loadgen("load-api", c.client, f"http://{zdddlab.LB_CLIENT_ADDR}:8000/",
                           workers=2, interval=0.02)
    web_watch, api_watch = ServiceWatch(c, "web"), ServiceWatch(c, "api")
    try:
        time.sleep(0.5)
        result = playbook(lab, c, "traffic-port", "-e", "zddd_release=r2",
                          "-e", f"zddd_release_src={build}", *API_EXTRA)
        finished = time.monotonic()
        time.sleep(1.5)
    finally:
        web_watch.stop()
        api_watch.stop()
        web_records, api_records = web_load.finish(), api_load.finish()

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    # api: rolled, host by host, through its backup vhost, with no request lost.
    assert not failed(api_records), failed(api_records)[:5]
    seen = answers(api_records)
    assert seen["app1 api backup"] > 0 and seen["app2 api backup"] > 0, seen
    assert set(answers(api_records, finished)) == {"api main r2"}, answers(api_records, finished)
    assert {t for _, s in api_watch.samples for t, _ in s.values()} == {"main", "backup"}
    for host, app in c.apps.items():
        assert current(service_root(lab, host, "api")) == "releases/r2"
        assert current(service_root(lab, host, "web")) == "releases/r1"
        assert service_prop(app, "api", "ActiveTarget") == "main"
    # web: untouched all along.
    assert not failed(web_records), failed(web_records)[:5]
    web_seen = answers(web_records)
    assert set(web_seen) == {"app1 web main r1", "app2 web main r1"}, web_seen
    assert len(web_watch.samples) > 20, "web was hardly sampled"
    states = {state for _, s in web_watch.samples for state in s.values()}
    assert states == {("main", "UP")}, states
    assert {host: service_prop(app, "web", "LastSwitchTimestamp")
            for host, app in c.apps.items()} == web_switched

