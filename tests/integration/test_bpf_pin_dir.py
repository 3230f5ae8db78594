"""The BPF backends' pin directory, through the real daemon: it belongs to one network namespace
(a second zddd elsewhere that is given it refuses, exit 78, and the first one's traffic is
untouched), it must lie on a bpffs that outlives zddd (one zddd would have to mount in a private
mount namespace is refused), and the flow map's size is a restart key whose restart keeps the
established flows."""

from __future__ import annotations

import secrets
import subprocess
import time

import pytest
from zdddlab import (APP_V4, APP_V6, REPO, AppLab, KeepAlive, LabError, Zddd, http_get, to_toml,
                     wait_for)

pytestmark = pytest.mark.backends("tc", "xdp", "sk_lookup")
EXIT_CONFIG = 78


def switch(z, target: str) -> None:
    r = z.zddctl("switch", target)
    assert r.returncode == 0, r.stderr


def refusal(z) -> str:
    """The one log line of a refused start."""
    lines = [line for line in z.log().splitlines() if "event=start_refused" in line]
    assert len(lines) == 1, z.log()
    return lines[0]


def test_a_zddd_in_another_namespace_refuses_a_pin_dir_in_use(lab):
    z = lab.start_zddd()
    switch(z, "backup")
    before = z.data_plane()
    owner_ino = z._netns_inode()
    tmp = lab.tmp / "other"
    tmp.mkdir()
    other = AppLab(tmp, backend=lab.backend)
    lab.closers.append(other.close)
    second = other.start_zddd({"bpf_pin_dir": lab.pin_dir}, wait=False)
    assert second.proc.wait(timeout=90) == EXIT_CONFIG, second.log()
    line = refusal(second)
    assert owner_ino in line and f"ip netns {lab.app.name}" in line, line
    assert "bpf_pin_dir" in line, line
    time.sleep(0.6)  # two reconcile rounds of the first: nothing to repair either
    assert z.data_plane() == before
    assert "drift_repaired" not in z.log()
    assert http_get(lab.client, APP_V4, 8888) == "backup"
    switch(z, "main")
    assert http_get(lab.client, APP_V4, 8888) == "main"


def test_a_pin_dir_that_needs_a_private_bpffs_is_refused(lab):
    """Under `ip netns exec` /sys is the namespace's own sysfs, without a bpffs: one zddd
    mounted there would die with it, and the data plane with it."""
    pin_dir = f"/sys/fs/bpf/zt-{secrets.token_hex(3)}"
    z = lab.start_zddd({"bpf_pin_dir": pin_dir}, wait=False)
    assert z.proc.wait(timeout=90) == EXIT_CONFIG, z.log()
    line = refusal(z)
    assert "bpf_pin_dir" in line and "mount -t bpf" in line and "own mount namespace" in line
    assert z.steered_to() is None
    assert lab.app.run("findmnt", "-n", "-t", "bpf", "/sys/fs/bpf", check=False).stdout == ""


def test_on_a_host_bpffs_the_data_plane_survives_kill_9_and_is_adopted(lab):
    """The lab's pin dir lies on a bpffs mounted on the host in a test directory."""
    z = lab.start_zddd()
    switch(z, "backup")
    held = KeepAlive(lab.client, APP_V4, 8888)
    try:
        assert held.get() == "backup"
        before = z.data_plane()
        z.kill()
        assert http_get(lab.client, APP_V4, 8888) == "backup"
        assert held.get() == "backup"
        z.start()
        assert z.data_plane() == before, "adopted without a flip or a rebuild"
        assert "how=adopted" in z.log()
        assert held.get() == "backup"
    finally:
        held.close()


@pytest.mark.backends("tc", "xdp")
def test_flow_entries_is_a_restart_key_and_a_restart_keeps_the_flows(lab):
    z = lab.start_zddd({"bpf_flow_entries": 4096})
    held = KeepAlive(lab.client, APP_V4, 8888)
    try:
        assert held.get() == "main"
        switch(z, "backup")
        z.write_config(to_toml(dict(z.config, bpf_flow_entries=8192)))
        r = z.zddctl("reload")
        assert r.returncode == 1 and "bpf_flow_entries" in r.stderr, r
        assert "needs a restart" in r.stderr, r
        assert held.get() == "main"
        # The restart with the new size: the flows are carried over into the new map.
        z.kill()
        z.config["bpf_flow_entries"] = 8192
        z.write_config()
        z.start()
        assert held.get() == "main"
        assert http_get(lab.client, APP_V4, 8888) == "backup"
        assert "event=flows_carried_over" in z.log()
    finally:
        held.close()


def _bump_layout_version(lab) -> None:
    """Write the stamp a newer zddd would: the same data plane, a layout version above ours."""
    import os
    import struct

    from zddd.backends import rewrite, sk_lookup
    from zddd.kernel import bpf as kbpf

    if lab.backend == "sk_lookup":
        path, size, version = f"{lab.pin_dir}/sk_lookup_meta", sk_lookup._META.size, \
            sk_lookup.LAYOUT_VERSION
    else:
        path, size, version = f"{lab.pin_dir}/{lab.backend}/stamp", rewrite.STAMP_SIZE, \
            rewrite.LAYOUT_VERSION
    fd = kbpf.obj_get(path)
    try:
        stamp = bytearray(kbpf.map_lookup(fd, b"\0\0\0\0", size))
        assert struct.unpack_from("=I", stamp, 4)[0] == version
        struct.pack_into("=I", stamp, 4, version + 1)
        kbpf.map_update(fd, b"\0\0\0\0", bytes(stamp))
    finally:
        os.close(fd)


def test_a_data_plane_of_a_newer_layout_is_refused_and_left_alone(lab):
    """A downgrade: the older zddd must neither rebuild the newer data plane (its flows would
    break) nor loop on restarts. Exit 78, one line naming the way out, traffic unchanged."""
    z = lab.start_zddd()
    switch(z, "backup")
    z.kill()
    _bump_layout_version(lab)
    before = z.data_plane()
    z.start(wait=False)
    assert z.proc.wait(timeout=90) == EXIT_CONFIG, z.log()
    line = refusal(z)
    assert "written by a newer zddd" in line and "--remove-data-plane" in line, line
    assert z.data_plane() == before
    assert http_get(lab.client, APP_V4, 8888) == "backup"


def test_a_stamp_whose_inode_now_names_another_namespace_is_taken_over(lab):
    """A namespace's inode is reused once it is gone: a stamp of a gone namespace may name, by
    inode, a live one that never ran zddd. The stamp's cookie tells them apart: this zddd takes
    the pin dir over instead of refusing it (seen in CI, where test namespaces come and go)."""
    import os

    from zddd.backends import pinned
    from zddd.kernel import bpf as kbpf

    reuser = lab.netns("reuser")
    inode = os.stat(f"/run/netns/{reuser.name}").st_ino
    os.makedirs(lab.pin_dir, exist_ok=True)
    fd = kbpf.map_create(kbpf.BPF_MAP_TYPE_ARRAY, 4, pinned._OWNER.size, 1)
    try:
        kbpf.map_update(fd, b"\0\0\0\0", pinned._OWNER.pack(
            pinned.OWNER_MAGIC, pinned.OWNER_VERSION, inode, 0xDEAD))  # not reuser's cookie
        kbpf.obj_pin(fd, f"{lab.pin_dir}/{pinned.OWNER_PIN}")
    finally:
        os.close(fd)
    z = lab.start_zddd()
    switch(z, "backup")
    assert http_get(lab.client, APP_V4, 8888) == "backup"
    assert "start_refused" not in z.log()


# The one-service layout (v1) is what cd0a822 builds; cd0a822 itself changed only the backend
# contract (its backends do not run on it), so its parent runs that layout's code.
OLD_COMMIT = "cd0a822~1"
OLD_MAIN = "import sys; from zddd.daemon import main; sys.exit(main())"


def _old_tree(tmp) -> str:
    same = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", OLD_COMMIT, "cd0a822",
                           "--", "bpf", "zddd/backends/rewrite.py", "zddd/backends/pinned.py"])
    assert same.returncode == 0, "the old tree must build cd0a822's layout"
    tree = tmp / "old-zddd"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", OLD_COMMIT, "zddd", "bpf"],
                             check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return str(tree)


@pytest.mark.backends("tc", "xdp")
def test_a_zddd_upgraded_from_the_one_service_layout_keeps_every_flow(lab):
    """The zddd of cd0a822 (one service compiled into its programs) runs the data plane and is
    stopped; this zddd starts on it and adopts it as service "default": connections held
    through the listen port keep answering from the vhost they started on, new connections go
    where they went before, and a switch afterwards works."""
    old = _old_tree(lab.tmp)
    z = lab.own(Zddd(lab.app, lab.bus, lab.tmp, {"backend": lab.backend,
                                                 "bpf_pin_dir": lab.pin_dir}))
    lab.zddd = z
    # Debian's python3 (bcc, pyroute2, dbus-fast are Debian's): the venv's would import this
    # tree's zddd through its editable install whatever PYTHONPATH says.
    with open(z.log_path, "a") as log:
        old_zddd = lab.app.popen("env", "-C", old, f"PYTHONPATH={old}", "/usr/bin/python3",
                                 "-c", OLD_MAIN, "--config", str(z.config_path), "--bus",
                                 lab.bus.address, stdout=log, stderr=subprocess.STDOUT)
    held = []
    try:
        wait_for(lambda: old_zddd.poll() is not None or z.owns_name(), 60, "the old zddd")
        if old_zddd.poll() is not None:
            raise LabError(f"the old zddd exited: {z.log()}")
        held = [KeepAlive(lab.client, host, 8888) for host in (APP_V4, APP_V6)]
        assert [k.get() for k in held] == ["main", "main"]
        switch(z, "backup")
        held.append(KeepAlive(lab.client, APP_V4, 8888))
        assert held[-1].get() == "backup"
    finally:
        old_zddd.terminate()
        old_zddd.wait(timeout=10)
    wait_for(lambda: not z.owns_name(), 5, "the old zddd's bus name to be released")
    assert http_get(lab.client, APP_V4, 8888) == "backup"
    assert _layout_version(lab) == 1
    try:
        z.start()
        assert _layout_version(lab) == 2
        assert [k.get() for k in held] == ["main", "main", "backup"]
        assert http_get(lab.client, APP_V6, 8888) == "backup"
        assert z.steered_to() == "backup"
        assert "drift_repaired" not in z.log()
        switch(z, "main")
        assert http_get(lab.client, APP_V4, 8888) == "main"
        assert [k.get() for k in held] == ["main", "main", "backup"]
    finally:
        for k in held:
            k.close()


def _layout_version(lab) -> int:
    import os
    import struct

    from zddd.kernel import bpf as kbpf

    fd = kbpf.obj_get(f"{lab.pin_dir}/{lab.backend}/stamp")
    try:
        return struct.unpack_from("=I", kbpf.map_lookup(fd, b"\0\0\0\0", 56), 4)[0]
    finally:
        os.close(fd)
