#!/usr/bin/python3
"""The rolling deploy's lock on the controller: one file, created exclusively.

    rolling_deploy_lock.py take PATH RELEASE HOSTS
    rolling_deploy_lock.py release PATH

`take` writes who holds the lock (user@controller, the ansible-playbook process, the release,
the hosts, since when) into PATH, created with O_EXCL so two rolls cannot both take it. If PATH
exists and its ansible-playbook process still runs, it prints one line naming the holder and
exits 1. If that process is gone (killed, or the roll stopped without releasing: an unreachable
host ends ansible-playbook before any cleanup can run), the lock is stale: it is replaced and
the old holder is named on stdout.

`release` removes PATH if this ansible-playbook holds it (never another roll's lock).

The holder is the topmost ancestor whose command line runs ansible-playbook: Ansible runs this
script from a worker process forked from it, through a shell and the command module.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
import time


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces and parentheses: split after the last.
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def runs_ansible_playbook(pid: int) -> bool:
    return any(os.path.basename(arg) == "ansible-playbook" for arg in cmdline(pid)[:2])


def playbook_pid() -> int:
    """The ansible-playbook process this script runs under, 0 if none is found."""
    found, pid = 0, os.getppid()
    while pid > 1:
        if runs_ansible_playbook(pid):
            found = pid
        pid = parent(pid)
    return found


def describe(holder: dict) -> str:
    return (f"{holder.get('user', '?')}@{holder.get('controller', '?')} "
            f"(ansible-playbook pid {holder.get('pid', '?')}, release "
            f"{holder.get('release', '?')} to {holder.get('hosts', '?')}, since "
            f"{holder.get('since', '?')})")


def read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def take(path: str, release: str, hosts: str) -> int:
    me = {"user": getpass.getuser(), "controller": socket.gethostname(), "pid": playbook_pid(),
          "release": release, "hosts": hosts,
          "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            if not isinstance(e, FileExistsError):
                print(f"cannot create the lock {path}: {e.strerror or e}")
                return 1
            holder = read(path)
            pid = holder.get("pid", 0)
            if not holder or (pid and runs_ansible_playbook(pid)) or not pid:
                print(f"another rolling deploy holds the lock {path}: "
                      f"{describe(holder) if holder else 'holder unknown (file unreadable)'}; "
                      f"wait for it to end, or remove {path} if no such deploy runs")
                return 1
            print(f"replacing the stale lock of {describe(holder)}: that ansible-playbook "
                  "is gone")
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                print(f"cannot remove the stale lock {path}: {e.strerror or e}")
                return 1
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.write("\n")
        print(f"lock {path} taken by {describe(me)}")
        return 0
    print(f"could not take the lock {path}: another roll took it meanwhile")
    return 1


def release(path: str) -> int:
    holder = read(path)
    if holder and holder.get("pid") == playbook_pid():
        os.unlink(path)
        print(f"lock {path} released")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[1] == "take":
        return take(argv[2], argv[3], argv[4])
    if len(argv) == 3 and argv[1] == "release":
        return release(argv[2])
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
