"""examples/ansible without any host: the playbook passes Debian's ansible-core syntax check with
both inventories, the inventories parse and agree with the Vagrantfile and the HAProxy example,
a playbook run without a release stops before connecting anywhere, the role's argument specs,
defaults and README name the same variables, and the roll's lock on the controller excludes a
second roll and replaces a stale one. The rolling deploy itself runs in
tests/e2e/test_ansible.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "examples" / "ansible"
PLAYBOOK = ANSIBLE / "rolling-deploy.yml"
ROLE = ANSIBLE / "roles" / "zddd_rolling_deploy"
INVENTORIES = ("vagrant.ini", "lab.ini")


def ansible(tool: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    # Ansible's state in the test's directory, not in the home of whoever runs the tests.
    env = {**os.environ, "ANSIBLE_HOME": str(tmp / "home"), "ANSIBLE_LOCAL_TEMP": str(tmp / "lt"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0"}
    return subprocess.run([tool, *args], capture_output=True, text=True, env=env, cwd=tmp,
                          timeout=120)


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_syntax_check(inventory, tmp_path):
    r = ansible("ansible-playbook", "--syntax-check", "-i", str(ANSIBLE / inventory),
                str(PLAYBOOK), tmp=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stderr, r.stderr


def hostvars(inventory: str, tmp: Path) -> dict:
    r = ansible("ansible-inventory", "-i", str(ANSIBLE / inventory), "--list", tmp=tmp)
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    assert listing["app"]["hosts"] == ["app1", "app2"], listing
    return listing["_meta"]["hostvars"]


def vagrantfile() -> tuple[dict[str, str], int]:
    text = (REPO / "Vagrantfile").read_text()
    network = dict(re.findall(r'^\s*"(\w+)"\s*=>\s*"([\d.]+)",?$', text, re.M))
    port = int(re.search(r"^LB_HOST_PORT = (\d+)$", text, re.M).group(1))
    return network, port


def test_vagrant_inventory_matches_the_vagrantfile(tmp_path):
    network, lb_host_port = vagrantfile()
    hv = hostvars("vagrant.ini", tmp_path)
    assert {h: v["ansible_host"] for h, v in hv.items()} == \
        {h: network[h] for h in ("app1", "app2")}
    for v in hv.values():
        # The load balancer as `vagrant up` forwards it to the host, and the HAProxy usage
        # vagrant/provision-lb.sh installs.
        assert v["zddd_lb_url"] == f"http://127.0.0.1:{lb_host_port}/", v
        assert v["zddd_haproxy_usage"] == "traffic-port"
        assert "traffic-port.cfg" in (REPO / "vagrant" / "provision-lb.sh").read_text()
        assert v["ansible_user"] == "vagrant" and v["ansible_become"] in (True, "true")


def test_vagrant_inventory_finds_vagrants_keys_from_the_checkout(tmp_path):
    r = ansible("ansible", "-i", str(ANSIBLE / "vagrant.ini"), "--playbook-dir", str(ANSIBLE),
                "app1", "-m", "debug", "-a", "msg={{ ansible_ssh_private_key_file }}",
                tmp=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    key = json.loads(r.stdout.split("=>", 1)[1])["msg"]
    assert os.path.normpath(key) == str(REPO / ".vagrant/machines/app1/virtualbox/private_key")


def test_lab_inventory_matches_the_test_lab(tmp_path):
    import zdddlab

    hv = hostvars("lab.ini", tmp_path)
    assert {h: v["ansible_host"] for h, v in hv.items()} == zdddlab.APP_ADDRS
    # The shipped HAProxy configs name the servers as the inventory does (the playbook checks
    # HAProxy's X-Served-By against the inventory name, and routes its check with
    # X-Zddd-Server), inside the one block marked for the rolling deploy.
    for cfg in zdddlab.HAPROXY_CONFIGS.values():
        text = cfg.read_text()
        assert set(re.findall(r"^\s*server (app\d) ", text, re.M)) == set(hv), cfg
        block = re.search(r"^\s*# ---- zddd rolling deploy .*?^\s*# ---- end of the zddd rolling "
                          r"deploy block ----$", text, re.M | re.S)
        assert block, cfg
        assert re.search(r"^\s*http-response set-header X-Served-By %s$", block[0], re.M), cfg
        assert re.search(r"^\s*use-server %\[req.hdr\(X-Zddd-Server\)\] if "
                         r"\{ req.hdr\(X-Zddd-Server\) -m found \}$", block[0], re.M), cfg


def test_without_a_release_the_playbook_stops_before_touching_a_host(tmp_path):
    r = ansible("ansible-playbook", "-i", str(ANSIBLE / "vagrant.ini"), str(PLAYBOOK),
                tmp=tmp_path)
    assert r.returncode != 0
    assert "missing required arguments: zddd_release" in r.stdout, r.stdout
    assert "unreachable=0" in r.stdout and "UNREACHABLE" not in r.stdout, r.stdout


# ---- the role's variables ----------------------------------------------------------------

def role_yaml(path: str):
    return yaml.safe_load((ROLE / path).read_text())


def test_every_variable_is_in_the_argument_specs_with_its_default_and_the_readme():
    specs = role_yaml("meta/argument_specs.yml")["argument_specs"]
    assert set(specs) == {"main", "preflight", "unlock"}, specs
    options = specs["main"]["options"]
    assert specs["preflight"]["options"] == options
    defaults = role_yaml("defaults/main.yml")
    required = {name for name, o in options.items() if o.get("required")}
    assert required == {"zddd_release", "zddd_lb_url"}
    # Every default has a spec, every optional spec a default; each has a type and a text.
    assert set(defaults) == set(options) - required, set(defaults) ^ (set(options) - required)
    for name, o in options.items():
        assert name.startswith("zddd_"), name
        assert o.get("type") in ("str", "int", "list") and o.get("description"), (name, o)
        if name in defaults and "{{" not in str(defaults[name]):
            assert o["default"] == defaults[name], (name, o["default"], defaults[name])
    # Every zddd_ variable the role or the playbook reads is one of them.
    used = set()
    for f in [*ROLE.glob("tasks/*.yml"), ROLE / "vars" / "main.yml", PLAYBOOK]:
        used |= set(re.findall(r"\b(zddd_[a-z_]+)", f.read_text()))
    used -= {"zddd_rolling_deploy", "zddd_hosts", "zddd_serial"}  # the role; the play's own
    assert used <= set(options), used - set(options)
    readme = (ROLE / "README.md").read_text()
    for name in [*options, "zddd_hosts", "zddd_serial"]:
        assert f"`{name}`" in readme, name
    for name, o in specs["unlock"]["options"].items():
        assert o["default"] == options[name]["default"], name


def role_vars(tmp: Path, *extra: str) -> dict:
    """The role's derived variables as Ansible renders them from its defaults and `extra`
    (-e NAME=VALUE), on the controller alone."""
    wanted = ["__zddd_zddctl_argv", "zddd_lock_path", "__zddd_what", "__zddd_health_url"]
    r = ansible("ansible", "localhost", "-c", "local", "-m", "debug",
                "-a", "msg={{ {" + ", ".join(f"'{w}': {w}" for w in wanted) + "} }}",
                "-e", f"@{ROLE / 'defaults' / 'main.yml'}", "-e", f"@{ROLE / 'vars' / 'main.yml'}",
                "-e", '{"__zddd_state": {"targets": {"main": {"port": 9080}}}}',
                *[a for e in extra for a in ("-e", e)], tmp=tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.split("=>", 1)[1])["msg"]


def test_zddd_service_names_the_service_to_zddctl_and_to_the_lock(tmp_path):
    """With zddd_service every zddctl command gets `-s NAME` (after the bus, before the
    command), the lock is the service's own, and main's health is fetched on the port zddctl
    status gives for the service; without it, zddctl is called as before."""
    alone = role_vars(tmp_path, "zddd_zddctl_bus=unix:path=/b")
    assert alone["__zddd_zddctl_argv"] == ["zddctl", "--bus", "unix:path=/b"]
    assert alone["zddd_lock_path"] == "/tmp/zddd-rolling-deploy.lock"
    assert alone["__zddd_what"] == "localhost"
    api = role_vars(tmp_path, "zddd_zddctl_bus=unix:path=/b", "zddd_service=api")
    assert api["__zddd_zddctl_argv"] == ["zddctl", "--bus", "unix:path=/b", "-s", "api"]
    assert api["zddd_lock_path"] == "/tmp/zddd-rolling-deploy-api.lock"
    assert api["__zddd_what"] == "service api of localhost"
    assert api["__zddd_health_url"] == "http://127.0.0.1:9080/healthz"
    given = role_vars(tmp_path, "zddd_main_health_url=http://127.0.0.1:1/up")
    assert given["__zddd_health_url"] == "http://127.0.0.1:1/up"


def tasks_named(tasks: list, pattern: str) -> list[dict]:
    """The tasks, blocks and rescues included, whose name matches `pattern`."""
    found = []
    for task in tasks:
        if re.search(pattern, task.get("name", "")):
            found.append(task)
        for key in ("block", "rescue", "always"):
            found += tasks_named(task.get(key, []), pattern)
    return found


def test_zddd_config_is_validated_by_zddd_check_config_before_it_replaces_the_file():
    """The preflight's copy of zddd_config runs zddd --check-config on the new text (validate:,
    so the old file stays when it fails), with the role's zddd command; zddd is reloaded only
    when the file changed, with the role's bus; the lab's path is the lab's zddd config."""
    preflight = role_yaml("tasks/preflight.yml")
    [install] = tasks_named(preflight, r"^Install zddd's config, checked")
    copy = install["ansible.builtin.copy"]
    assert copy["content"] == "{{ zddd_config }}" and copy["dest"] == "{{ zddd_config_path }}"
    assert copy["validate"] == "{{ zddd_daemon }} --check-config --config %s"
    [reload] = tasks_named(preflight, r"^Reload zddd")
    assert reload["ansible.builtin.command"]["argv"] == "{{ __zddd_zddctl_argv + ['reload'] }}"
    assert reload["when"] == f"{install['register']} is changed"
    [outer] = tasks_named(preflight, r"^Install zddd's config and reload")
    assert outer["when"] == "zddd_config | length > 0"
    assert role_yaml("defaults/main.yml")["zddd_config"] == ""
    lab = (ANSIBLE / "lab.ini").read_text()
    assert "zddd_config_path={{ lab_root }}/{{ inventory_hostname }}-zddd/zddd.toml" in lab


# ---- the roll's lock on the controller ---------------------------------------------------

LOCK = ROLE / "files" / "rolling_deploy_lock.py"


def lock(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LOCK), *args], capture_output=True, text=True,
                          cwd=tmp, timeout=30)


def test_a_lock_held_by_a_running_ansible_playbook_stops_a_second_roll(tmp_path):
    path = tmp_path / "roll.lock"
    # A process that is, by its command line, an ansible-playbook, holding the lock.
    holder = subprocess.Popen(["bash", "-c", "exec -a ansible-playbook sleep 60"])
    try:
        path.write_text(json.dumps({"user": "alice", "controller": "ci1", "pid": holder.pid,
                                    "release": "r7", "hosts": "app1,app2",
                                    "since": "2026-12-06T01:00:00Z"}))
        r = lock("take", str(path), "r8", "app1", tmp=tmp_path)
        assert r.returncode == 1, r
        assert r.stdout.startswith(f"another rolling deploy holds the lock {path}: alice@ci1 "
                                   f"(ansible-playbook pid {holder.pid}, release r7 to "
                                   "app1,app2, since 2026-12-06T01:00:00Z)"), r.stdout
        assert json.loads(path.read_text())["release"] == "r7"
        # Not ours to release: it stays.
        assert lock("release", str(path), tmp=tmp_path).returncode == 0
        assert path.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_whose_ansible_playbook_is_gone_is_replaced(tmp_path):
    path = tmp_path / "roll.lock"
    gone = subprocess.Popen(["true"])
    gone.wait()
    path.write_text(json.dumps({"user": "bob", "controller": "laptop", "pid": gone.pid,
                                "release": "r1", "hosts": "app1", "since": "then"}))
    r = lock("take", str(path), "r2", "app1,app2", tmp=tmp_path)
    assert r.returncode == 0, r
    assert "replacing the stale lock of bob@laptop" in r.stdout, r.stdout
    assert json.loads(path.read_text())["release"] == "r2"


def test_a_free_lock_is_taken_once(tmp_path):
    path = tmp_path / "roll.lock"
    r = lock("take", str(path), "r2", "app1,app2", tmp=tmp_path)
    assert r.returncode == 0 and path.exists(), r
    # Outside ansible-playbook no process holds it (pid 0): it never looks stale.
    assert json.loads(path.read_text())["pid"] == 0
    again = lock("take", str(path), "r3", "app1", tmp=tmp_path)
    assert again.returncode == 1 and "another rolling deploy holds the lock" in again.stdout


# ---- canary steps ----------------------------------------------------------------------------

@pytest.mark.parametrize("extra, word", [
    ({"zddd_canary_steps": [50, 10]}, "got steps [50, 10]"),
    ({"zddd_canary_steps": [0, 100]}, "got steps [0, 100]"),
    ({"zddd_canary_steps": [10, 150]}, "got steps [10, 150]"),
    ({"zddd_canary_steps": [10, 100], "zddd_canary_abort_query": "up == 0"},
     "needs zddd_canary_prometheus_url"),
])
def test_bad_canary_variables_stop_the_roll_before_touching_a_host(tmp_path, extra, word):
    r = ansible("ansible-playbook", "-i", str(ANSIBLE / "vagrant.ini"), str(PLAYBOOK),
                "-e", "zddd_release=r2", "-e", "zddd_lb_url=http://lb/", "-e", json.dumps(extra),
                tmp=tmp_path)
    assert r.returncode != 0
    assert "zddd_canary_steps must be a list of main's percents" in r.stdout, r.stdout[-2000:]
    assert word in r.stdout, r.stdout[-2000:]
    # The check comes before anything connects to a host.
    assert "UNREACHABLE" not in r.stdout, r.stdout[-2000:]


WATCH = ROLE / "files" / "canary_watch.py"


def test_a_canary_step_without_a_query_is_held_for_its_seconds():
    started = time.monotonic()
    r = subprocess.run([sys.executable, str(WATCH), "", "", "1.5", "5", "app1", "10"],
                       capture_output=True, text=True, timeout=30)
    took = time.monotonic() - started
    assert r.returncode == 0, r
    assert r.stdout.strip() == "app1: canary step main=10% held 1.5 s (no abort query)"
    assert 1.5 <= took < 5, took


def test_a_canary_step_whose_prometheus_cannot_be_asked_aborts_naming_host_and_step():
    # Port 9 on loopback: nothing listens there, every ask is refused at once.
    r = subprocess.run([sys.executable, str(WATCH), "http://127.0.0.1:9", "up == 0", "30", "0.2",
                        "app2", "50"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r
    assert r.stdout.startswith("app2: canary step main=50% not watched: Prometheus at "
                               "http://127.0.0.1:9 could not be asked 3 times in a row"), r.stdout
