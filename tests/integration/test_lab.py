"""The lab itself: the steering readers agree with each other and with the traffic, the backend
parameter reaches zddd's config, and closing a lab leaves nothing behind."""

from __future__ import annotations

import subprocess

import pytest

from zdddlab import (APP_V4, STEERING_READERS, AppLab, http_get, read_nftables, read_with_zddd)


def test_steered_to_readers_agree_with_the_traffic(lab, monkeypatch):
    z = lab.start_zddd()
    for target, force in (("backup", ()), ("off", ("--force",)), ("main", ())):
        assert z.zddctl("switch", target, *force).returncode == 0
        assert read_nftables(z) == read_with_zddd(z) == target
        if target != "off":
            assert http_get(lab.client, APP_V4, 8888) == target
    # A backend without a reader of the lab's own is read with zddd's code.
    monkeypatch.delitem(STEERING_READERS, "nftables")
    z.call("Switch", "s", "backup")
    assert z.steered_to() == "backup"
    z.kill()
    lab.app.run("nft", "delete", "table", "inet", "zddd")
    assert read_nftables(z) is None and read_with_zddd(z) is None


@pytest.mark.parametrize("lab", ["nftables"], indirect=True)
def test_the_backend_parameter_reaches_zddd(lab):
    z = lab.start_zddd()
    assert lab.backend == z.backend == z.config["backend"] == "nftables"
    assert z.config["bpf_pin_dir"] == lab.pin_dir
    assert lab.pin_dir.startswith("/run/zddd-lab-")
    assert z.prop("Backend") == "nftables"
    assert z.steered_to() == "main"


def test_closing_a_lab_leaves_nothing_behind(need_root, tmp_path):
    lab = AppLab(tmp_path)
    try:
        z = lab.start_zddd()
        names = [lab.client.name, lab.app.name]
        procs = [z.proc, lab.bus.proc, lab.main.proc, lab.backup.proc]
    finally:
        lab.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names), listed
    assert all(p.poll() is not None for p in procs)
    assert tmp_path.exists()  # the caller's directory: kept
    lab.close()  # twice is fine
    own = AppLab()
    own.close()
    assert not own.tmp.exists()  # a directory of its own: removed
