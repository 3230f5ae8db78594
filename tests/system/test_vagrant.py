"""The Vagrant setup without VMs (they do not boot on the machines this runs on): the very
provisioning scripts the Vagrantfile runs, run in Debian 12 containers booted with
systemd-nspawn, and the Vagrantfile checked by `vagrant validate`.

The app server tests share one container and run in file order, like an operator would:
provision, look, switch, break the health URL, provision again. The load balancer gets a
container of its own (HAProxy's :80 would clash with the backup vhost).

The containers have no network (only `lo`): the host's apt fills their package lists and
archive cache before they boot (as mmdebstrap does for the base tree), so the scripts' own
`apt-get install` runs inside, offline.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import zdddlab
from machine import HOST_PATH, Machine, host_apt
from test_package import client_deb
from test_package import deb  # noqa: F401  (dist/zddd_<version>_all.deb, rebuilt when stale)

TOP = Path(__file__).resolve().parents[2]
EXAMPLES = TOP / "examples"
# What the scripts read from the checkout (the Vagrant VMs have all of it at /vagrant).
CHECKOUT_PARTS = ("examples", "vagrant")


def prefetch(root: Path, packages: list[str]) -> None:
    """Fill the tree's apt lists and download `packages` (with what they need beyond the
    tree) into its archive cache, with the host's apt working on the tree (not booted)."""
    for args in (["update", "-q"],
                 ["install", "--download-only", "-y", "-q", "--no-install-recommends",
                  *packages]):
        p = host_apt(root, *args)
        assert p.returncode == 0, \
            f"apt-get {' '.join(args)} on {root}:\n{p.stdout[-2000:]}{p.stderr}"


def copy_checkout(m: Machine, deb: Path, path: str) -> None:  # noqa: F811
    """The parts of the checkout the scripts use, at `path` in the container, with the .deb
    in dist/ as `make deb` leaves it."""
    dest = m.root / path.lstrip("/")
    for part in CHECKOUT_PARTS:
        shutil.copytree(TOP / part, dest / part, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "dist").mkdir()
    for p in (deb, client_deb(deb)):
        shutil.copy2(p, dest / "dist" / p.name)


def booted(deb: Path, packages: list[str], checkout: str):  # noqa: F811
    started = time.monotonic()
    m = Machine.fresh("zddd-vagrant-")
    try:
        m.create()
        prefetch(m.root, packages)
        copy_checkout(m, deb, checkout)
        m.boot()
        print(f"container ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
        yield m
    finally:
        m.destroy_after_journal("zddd", "nginx", "haproxy")


@pytest.fixture(scope="module")
def app(deb):  # noqa: F811
    # openssh-server and sudo: what the Vagrant box has, for the playbook run from the host.
    yield from booted(deb, ["nginx-light", "openssh-server", "sudo"], "/vagrant")


@pytest.fixture(scope="module")
def lb(deb):  # noqa: F811
    # Not /vagrant: the scripts take the checkout's path from ZDDD_SRC.
    yield from booted(deb, ["haproxy"], "/root/zddd")


def provision(m: Machine, script: str) -> str:
    started = time.monotonic()
    r = m.sh(script, timeout=300)
    print(f"{script}: {time.monotonic() - started:.1f} s", file=sys.stderr)
    assert r.returncode == 0, f"{script} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def curl(m: Machine, url: str) -> str:
    r = m.sh(f"curl -sS --max-time 3 {url}")
    assert r.returncode == 0, f"curl {url}: {r.stderr}"
    return r.out


def status(m: Machine) -> dict:
    return json.loads(m.sh("zddctl status --json", check=True).stdout)


def wait_up(m: Machine, target: str, up: bool = True) -> None:
    want = "True" if up else "False"
    m.wait(f"zddctl status --json | python3 -c 'import json,sys; "
           f"sys.exit(json.load(sys.stdin)[\"targets\"][\"{target}\"][\"up\"] is not {want})'",
           10, f"zddd to see {target} {'up' if up else 'down'}")


def main_pids(m: Machine, *units: str) -> dict[str, str]:
    return {u: m.sh(f"systemctl show {u} -p MainPID --value", check=True).out for u in units}


# ---- app server ----

def test_provision_app_serves_both_vhosts_and_steers_8888_to_main(app):
    m = app
    assert m.sh("command -v nginx").returncode != 0, "nginx is in the base tree already"
    out = provision(m, "/vagrant/vagrant/provision-app.sh app1")
    assert "installing nginx-light" in out and "zddd restarted" in out, out
    for unit in ("zddd", "nginx"):
        assert m.sh(f"systemctl is-active {unit}").out == "active", \
            m.sh(f"systemctl status {unit}").stdout
        assert m.sh(f"systemctl is-enabled {unit}").out == "enabled"
    assert m.sh("dpkg-query -W -f='${Version}' zddd").out in app_deb_version(m)
    assert (m.root / "etc/zddd/zddd.toml").read_text() == (EXAMPLES / "zddd.toml").read_text()
    assert not (m.root / "etc/nginx/sites-enabled/default").exists()
    # The shipped vhosts, each with its page and its health file.
    assert curl(m, "127.0.0.1:8080") == "app1 main"
    assert curl(m, "127.0.0.1:80") == "app1 backup"
    assert curl(m, "127.0.0.1:8080/healthz") == "ok"
    assert curl(m, "[::1]:80/healthz") == "ok"
    assert curl(m, "127.0.0.1:8888") == "app1 main"
    wait_up(m, "main")
    wait_up(m, "backup")
    st = status(m)
    assert st["active_target"] == "main" and st["listen_port"] == 8888, st
    assert {n: t["port"] for n, t in st["targets"].items()} == {"main": 8080, "backup": 80}


def app_deb_version(m: Machine) -> str:
    name = next((m.root / "vagrant/dist").glob("zddd_*_all.deb")).name
    return name.split("_")[1]


def test_switch_backup_and_back(app):
    m = app
    m.sh("zddctl switch backup", check=True)
    assert curl(m, "127.0.0.1:8888") == "app1 backup"
    m.sh("zddctl switch main", check=True)
    assert curl(m, "127.0.0.1:8888") == "app1 main"


def test_zddd_health_of_main_is_its_healthz(app):
    """Without /healthz in the main release, nginx answers 503 there, zddd sees main down and
    refuses to switch to it; with it back, the switch goes through."""
    m = app
    healthz = "/srv/app/main/current/healthz"
    m.sh("zddctl switch backup", check=True)
    m.sh(f"mv {healthz} {healthz}.away", check=True)
    try:
        assert m.sh("curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:8080/healthz").out == "503"
        wait_up(m, "main", up=False)
        r = m.sh("zddctl switch main")
        assert r.returncode != 0, "zddctl switched to a main whose /healthz fails"
        assert curl(m, "127.0.0.1:8888") == "app1 backup"
    finally:
        m.sh(f"mv {healthz}.away {healthz}", check=True)
    wait_up(m, "main")
    m.sh("zddctl switch main", check=True)
    assert curl(m, "127.0.0.1:8888") == "app1 main"


def test_second_provisioning_changes_nothing(app):
    m = app
    before = main_pids(m, "zddd", "nginx")
    restarts = m.sh("systemctl show zddd -p NRestarts --value", check=True).out
    m.sh("touch /run/before-reprovision && sleep 0.05", check=True)
    out = provision(m, "/vagrant/vagrant/provision-app.sh app1")
    for word in ("installing", "installed", "created", "reloaded", "restarted"):
        assert word not in out, f"the second run did something ({word!r}):\n{out}"
    changed = m.sh("find /etc /srv /usr /var/lib/dpkg /var/lib/zddd-provision -xdev "
                   "-newer /run/before-reprovision", check=True).out
    assert changed == "", f"the second run changed files:\n{changed}"
    assert main_pids(m, "zddd", "nginx") == before
    assert m.sh("systemctl show zddd -p NRestarts --value", check=True).out == restarts
    assert curl(m, "127.0.0.1:8888") == "app1 main"


def test_a_deployed_release_survives_provisioning(app):
    m = app
    m.sh("mkdir -p /srv/app/main/releases/2 && echo 'app1 main v2' > "
         "/srv/app/main/releases/2/index.html && echo ok > /srv/app/main/releases/2/healthz && "
         "ln -sfn releases/2 /srv/app/main/current", check=True)
    provision(m, "/vagrant/vagrant/provision-app.sh app1")
    assert curl(m, "127.0.0.1:8888") == "app1 main v2"


def vagrant_box_login(m: Machine, key: Path) -> None:
    """What the debian/bookworm64 box and `vagrant up` give the host: sshd, a user vagrant
    with passwordless sudo whose authorized key is Vagrant's per-machine key, and the VM's
    private network address (here on the container's lo: it has no other interface)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    m.sh("apt-get install -y -q --no-install-recommends openssh-server sudo", check=True,
         timeout=300)
    m.sh("id vagrant >/dev/null 2>&1 || useradd -m -s /bin/bash vagrant", check=True)
    m.write("/etc/sudoers.d/vagrant", "vagrant ALL=(ALL) NOPASSWD: ALL\n", 0o440)
    m.write("/home/vagrant/.ssh/authorized_keys", key.with_suffix(".pub").read_text(), 0o600)
    m.sh("chown -R vagrant: /home/vagrant/.ssh && systemctl start ssh && "
         f"ip addr replace {zdddlab.APP_ADDRS['app1']}/32 dev lo", check=True)


def test_rolling_deploy_playbook_from_the_host(app, tmp_path):
    """The README's `ansible-playbook -i examples/ansible/vagrant.ini ...`, run on the host from
    a checkout (inside the container's network namespace, where the VM's address is), against
    the provisioned app server. Two additions: `-l app1` (there is no app2 here) and a zddd_lb_url
    where the host's HAProxy, with the shipped traffic-port config, listens in that namespace
    (the container has no lb, and its own :8080 is the main vhost)."""
    m = app
    checkout = tmp_path / "checkout"
    shutil.copytree(TOP / "examples" / "ansible", checkout / "examples" / "ansible")
    key_dir = checkout / ".vagrant" / "machines" / "app1" / "virtualbox"
    key_dir.mkdir(parents=True)
    vagrant_box_login(m, key_dir / "private_key")
    release = checkout / "build" / "release-v3"
    release.mkdir(parents=True)
    (release / "index.html").write_text("main v3\n")
    (release / "healthz").write_text("ok\n")
    previous = m.sh("readlink /srv/app/main/current", check=True).out

    netns = ["nsenter", f"--net=/proc/{m.leader}/ns/net"]
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(zdddlab.lab_haproxy_config(
        (EXAMPLES / "haproxy" / "traffic-port.cfg").read_text().replace("bind :80", "bind :8081"),
        tmp_path / "haproxy.sock"))
    haproxy = subprocess.Popen([*netns, "haproxy", "-db", "-f", str(cfg)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"PATH": HOST_PATH, "LANG": "C.UTF-8", "HOME": str(tmp_path),
           "ANSIBLE_HOME": str(tmp_path / "ansible"), "ANSIBLE_NOCOLOR": "1",
           # No ssh master left behind in the container's namespace after the run.
           "ANSIBLE_SSH_ARGS": "-o ControlMaster=no"}
    try:
        r = subprocess.run(
            [*netns, "ansible-playbook", "-i", "examples/ansible/vagrant.ini",
             "examples/ansible/rolling-deploy.yml", "-e", "zddd_release=v3",
             "-e", f"zddd_release_src={release}", "-l", "app1",
             "-e", "zddd_lb_url=http://127.0.0.1:8081/"],
            cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    finally:
        haproxy.kill()
        haproxy.wait(10)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr
    assert m.sh("readlink /srv/app/main/current").out == "releases/v3"
    assert (m.root / "srv/app/main/releases/v3/index.html").read_text() == "main v3\n"
    assert curl(m, "127.0.0.1:8888") == "main v3"
    assert status(m)["active_target"] == "main"
    # The release before is still there for a rollback.
    assert (m.root / "srv/app/main" / previous / "index.html").exists()


# ---- load balancer ----

def test_provision_lb_runs_the_shipped_haproxy_config(lb):
    m = lb
    assert m.sh("command -v haproxy").returncode != 0, "haproxy is in the base tree already"
    out = provision(m, "ZDDD_SRC=/root/zddd /root/zddd/vagrant/provision-lb.sh")
    assert "installing haproxy" in out, out
    shipped = (EXAMPLES / "haproxy/traffic-port.cfg").read_text()
    assert (m.root / "etc/haproxy/haproxy.cfg").read_text() == shipped
    m.sh("haproxy -c -f /etc/haproxy/haproxy.cfg", check=True)
    assert m.sh("systemctl is-active haproxy").out == "active", \
        m.sh("systemctl status haproxy").stdout
    assert m.sh("systemctl is-enabled haproxy").out == "enabled"
    # Its frontend on :80 answers; the app servers are not reachable from this container.
    code = m.sh("curl -s -o /dev/null -w '%{http_code}' --max-time 10 127.0.0.1:80").out
    assert code == "503", code

    pid = main_pids(m, "haproxy")
    again = provision(m, "ZDDD_SRC=/root/zddd /root/zddd/vagrant/provision-lb.sh")
    assert "install" not in again and "reloaded" not in again, again
    assert main_pids(m, "haproxy") == pid


def test_provisioning_without_a_deb_says_make_deb(lb):
    m = lb
    r = m.sh("mkdir -p /tmp/nodeb && cp -r /root/zddd/examples /root/zddd/vagrant /tmp/nodeb && "
             "ZDDD_SRC=/tmp/nodeb /tmp/nodeb/vagrant/provision-app.sh app2 </dev/null",
             timeout=300)
    assert r.returncode != 0 and "make deb" in r.stderr, r
    assert m.sh("command -v nginx").returncode != 0, "it installed nginx before it failed"


# ---- the Vagrantfile ----

def ensure_vagrant() -> None:
    """Debian's vagrant package, installed only when missing (about 250 packages)."""
    if shutil.which("vagrant", path=HOST_PATH):
        return
    started = time.monotonic()
    env = {"PATH": HOST_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "vagrant"],
                   check=True, env=env, timeout=900, capture_output=True)
    print(f"installed vagrant in {time.monotonic() - started:.1f} s", file=sys.stderr)


def vagrant_validate(directory: Path, tmp: Path) -> subprocess.CompletedProcess:
    # --ignore-provider: no provider works here; VAGRANT_DOTFILE_PATH keeps .vagrant/ out of
    # the checkout.
    return subprocess.run(
        ["vagrant", "validate", "--ignore-provider", "--no-tty"], cwd=directory,
        capture_output=True, text=True, timeout=120,
        env={"PATH": HOST_PATH, "LANG": "C.UTF-8", "HOME": "/root",
             "VAGRANT_DOTFILE_PATH": str(tmp / "dot"), "VAGRANT_CHECKPOINT_DISABLE": "1"})


def test_vagrant_validate(tmp_path):
    ensure_vagrant()
    r = vagrant_validate(TOP, tmp_path)
    assert r.returncode == 0 and "Vagrantfile validated successfully" in r.stdout, r
    # It checks that the provisioning scripts exist: without them it fails.
    shutil.copy(TOP / "Vagrantfile", tmp_path / "Vagrantfile")
    r = vagrant_validate(tmp_path, tmp_path)
    assert r.returncode != 0 and "vagrant/provision-app.sh" in r.stdout + r.stderr, r


def test_vagrantfile_addresses_are_the_demos():
    """The HAProxy example and the demo address the app servers; the Vagrantfile must agree."""
    text = (TOP / "Vagrantfile").read_text()
    network = dict(re.findall(r'^\s*"(\w+)"\s*=>\s*"([\d.]+)",?$', text, re.M))
    assert network == {**zdddlab.APP_ADDRS, "lb": zdddlab.LB_APP_ADDR}, network
    cfg = (EXAMPLES / "haproxy/traffic-port.cfg").read_text()
    servers = dict(re.findall(r"^\s*server (\w+) ([\d.]+):8888", cfg, re.M))
    assert servers == zdddlab.APP_ADDRS, servers
