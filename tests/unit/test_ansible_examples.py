"""examples/ansible without any host: the playbook passes Debian's ansible-core syntax check with
both inventories, the inventories parse and agree with the Vagrantfile and the HAProxy example,
and a playbook run without a release stops before connecting anywhere. The rolling deploy itself
runs in tests/e2e/test_ansible.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "examples" / "ansible"
PLAYBOOK = ANSIBLE / "rolling-deploy.yml"
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
        assert v["lb_url"] == f"http://127.0.0.1:{lb_host_port}/", v
        assert v["haproxy_usage"] == "traffic-port"
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
    # HAProxy's X-Served-By against the inventory name).
    for cfg in zdddlab.HAPROXY_CONFIGS.values():
        text = cfg.read_text()
        assert set(re.findall(r"^\s*server (app\d) ", text, re.M)) == set(hv), cfg
        assert re.search(r"^\s*http-response set-header X-Served-By %s$", text, re.M), cfg


def test_without_a_release_the_playbook_stops_before_touching_a_host(tmp_path):
    r = ansible("ansible-playbook", "-i", str(ANSIBLE / "vagrant.ini"), str(PLAYBOOK),
                tmp=tmp_path)
    assert r.returncode != 0
    assert "set -e release=NAME" in r.stdout, r.stdout
    assert "unreachable=0" in r.stdout and "UNREACHABLE" not in r.stdout, r.stdout
