"""The README's quick start, pasted as one block, works on a machine where nothing else runs:
the block is taken from README.md as it is and run by bash inside a fresh network namespace and
a private mount namespace (a tmpfs over /var/lib, so the default state file stays in the test),
with only its bus socket path moved into the test's directory. `make setup` is left out (the
suite runs after it)."""

from __future__ import annotations

import re
import subprocess

from zdddlab import REPO, NetNS

QUICK_START = re.compile(r"## Five-minute quick start\n\n```sh\n(.*?)```", re.S)


def test_the_readme_quick_start_works_pasted_as_one_block(need_root, tmp_path):
    block = QUICK_START.search((REPO / "README.md").read_text()).group(1)
    assert block.startswith("make setup\n"), block
    assert "/tmp/zddd-bus" in block
    block = block.removeprefix("make setup\n").replace("/tmp/zddd-bus", str(tmp_path / "bus"))
    ns = NetNS("qs")
    try:
        script = ("mount -t tmpfs zt-quickstart /var/lib || exit 97\n" + block
                  + "\necho quick-start-done\nkill %1\nwait %1\n")
        r = subprocess.run(ns.cmd("unshare", "--mount", "--propagation", "private", "bash",
                                  "-c", script),
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        ns.close()
    out = r.stdout + r.stderr
    assert "quick-start-done" in r.stdout, out
    assert "not running" not in out and "Traceback" not in out, out
    assert "active target: main" in r.stdout, out
    # Nothing listens on :80 here: the switch to backup is refused, and says why.
    assert "TargetUnhealthy" in r.stderr, out
    assert "draining main towards off" in r.stdout and "main is drained" in r.stdout, out
