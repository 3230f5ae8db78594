"""The README's quick start, pasted as one block, works on a machine where nothing else runs, and
its teardown leaves the machine as it found it: no zddd, no bus, no table, no pins, no state.

The block is taken from README.md as it is (not copied here) and run by bash inside a fresh
network namespace and a private mount namespace (a tmpfs over /var/lib, so the default state
file stays in the test), with only its bus paths moved into the test's directory. Its first line,
`make setup-demo`, is left out (the suite runs after `make setup`)."""

from __future__ import annotations

import re
import subprocess

from zdddlab import REPO, NetNS

QUICK_START = re.compile(r"\n## Quick start\n.*?```sh\n(.*?)```", re.S)
SETUP = "make setup-demo"

# Run after the block, in the same namespaces: what the quick start may have left behind.
LEFT_BEHIND = """
echo quick-start-done
nft list table inet zddd >/dev/null 2>&1 && echo "left: table inet zddd"
[ -e /sys/fs/bpf/zddd ] && echo "left: pins in /sys/fs/bpf/zddd"
[ -e /var/lib/zddd/state.json ] && echo "left: /var/lib/zddd/state.json"
jobs -r | grep . && echo "left: a background job"
echo checked
"""


def quick_start() -> str:
    return QUICK_START.search((REPO / "README.md").read_text()).group(1)


def test_the_readme_quick_start_has_a_teardown():
    block = quick_start()
    assert block.splitlines()[0].split("#")[0].strip() == SETUP, block
    teardown = block[block.index("# Teardown"):]
    for step in ("kill %1", "zddd --remove-data-plane", 'kill "$(cat /tmp/zddd-bus.pid)"'):
        assert step in teardown, (step, teardown)


def test_the_readme_quick_start_works_pasted_as_one_block_and_cleans_up(need_root, tmp_path):
    block = quick_start()
    assert "/tmp/zddd-bus" in block
    bus = tmp_path / "bus"
    block = block.split("\n", 1)[1].replace("/tmp/zddd-bus", str(bus))
    ns = NetNS("qs")
    try:
        script = "mount -t tmpfs zt-quickstart /var/lib || exit 97\n" + block + LEFT_BEHIND
        r = subprocess.run(ns.cmd("unshare", "--mount", "--propagation", "private", "bash",
                                  "-c", script),
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        # The namespace still exists here: the teardown, not its removal, took the table.
        table = ns.run("nft", "list", "table", "inet", "zddd", check=False)
    finally:
        ns.close()
    out = r.stdout + r.stderr
    assert "checked" in r.stdout, out
    assert "not running" not in out and "Traceback" not in out, out
    assert "active target: main" in r.stdout, out
    # Nothing listens on :80 here: the switch to backup is refused, and says why.
    assert "TargetUnhealthy" in r.stderr, out
    assert "draining main towards off" in r.stdout and "main is drained" in r.stdout, out
    # The teardown: zddd removed its table and saved state, and said so.
    assert "removed the nftables data plane" in r.stdout, out
    assert "removed the saved state" in r.stdout, out
    assert "left:" not in r.stdout, out
    assert table.returncode != 0, table.stdout
    # No zddd and no dbus-daemon of the quick start's is left (they would name the bus path).
    procs = subprocess.run(["pgrep", "-af", str(bus)], capture_output=True, text=True)
    assert procs.stdout == "", procs.stdout
    assert not bus.exists() and not bus.with_name("bus.pid").exists()
