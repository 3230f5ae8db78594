"""zddctl --version and -H without a remote host: what command line reaches ssh, and how ssh's
exit status becomes zddctl's. A real program stands in for ssh through $ZDDCTL_SSH (a shell
that prints its arguments or exits with a given status); real ssh is used where it fails on its
own (a closed port on loopback). The round trip through a real sshd is in
tests/e2e/test_ansible.py."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from zddd import __version__
from zddd.cli import build_parser, remote_argv


def zddctl(*args: str, ssh: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("ZDDCTL_SSH", None)
    if ssh is not None:
        env["ZDDCTL_SSH"] = ssh
    return subprocess.run([sys.executable, "-m", "zddd.cli", *args], capture_output=True,
                          text=True, env=env, timeout=30)


def test_version():
    r = zddctl("--version")
    assert (r.returncode, r.stdout) == (0, f"zddctl {__version__}\n"), r


@pytest.mark.parametrize("argv, remote", [
    (["status"], ["zddctl", "status"]),
    (["status", "--json"], ["zddctl", "status", "--json"]),
    (["--bus", "unix:path=/run/x bus", "reload"],
     ["zddctl", "--bus", "unix:path=/run/x bus", "reload"]),
    (["switch", "backup"], ["zddctl", "switch", "--", "backup"]),
    (["switch", "off", "--wait-drained"], ["zddctl", "switch", "--wait-drained", "--", "off"]),
    (["switch", "--wait-drained=5", "--force", "main"],
     ["zddctl", "switch", "--force", "--wait-drained=5.0", "--", "main"]),
    (["switch", "--", "-x"], ["zddctl", "switch", "--", "-x"]),
    (["switch", "main", "--ramp", "300"], ["zddctl", "switch", "--ramp=300.0", "--", "main"]),
    (["switch", "été"], ["zddctl", "switch", "--", "été"]),
    (["wait-drained", "main"], ["zddctl", "wait-drained", "--timeout=30.0", "--", "main"]),
    (["wait-drained", "--timeout", "0.5", "main"],
     ["zddctl", "wait-drained", "--timeout=0.5", "--", "main"]),
    (["-s", "web", "switch", "off"], ["zddctl", "--service", "web", "switch", "--", "off"]),
    (["--service", "web", "status"], ["zddctl", "--service", "web", "status"]),
    (["services"], ["zddctl", "services"]),
    (["-s", "api", "weights", "main=10", "--ramp", "60", "--force"],
     ["zddctl", "--service", "api", "weights", "--force", "--ramp=60.0", "--", "main=10"]),
    (["weights", "backup=5", "main=95"], ["zddctl", "weights", "--", "backup=5", "main=95"]),
])
def test_remote_command_line_is_the_same_command(argv, remote):
    parser = build_parser()
    args = parser.parse_args(["-H", "app1", *argv])
    assert remote_argv(args) == remote
    # The remote zddctl reads it as the same command (without -H).
    again = parser.parse_args(remote[1:])
    assert vars(again) == {**vars(args), "host": None}


ECHO_ARGS = """sh -c 'for a in "$@"; do echo "[$a]"; done' ssh"""


def test_ssh_gets_the_host_and_one_quoted_command():
    r = zddctl("-H", "root@app1", "--bus", "unix:path=/x y", "switch", "été", ssh=ECHO_ARGS)
    assert r.returncode == 0, r
    words = [line.strip("[]") for line in r.stdout.splitlines()]
    assert words[:-1] == ["-n", "-T", "-x", "-a", "--", "root@app1"], words
    # One word for the remote shell, which splits it back into zddctl's arguments.
    assert shlex.split(words[-1]) == ["zddctl", "--bus", "unix:path=/x y", "switch", "--",
                                      "été"]


def exits(status: int) -> str:
    return f"sh -c 'exit {status}' ssh"


@pytest.mark.parametrize("status", [0, 1, 2])
def test_the_remote_status_is_zddctls(status):
    r = zddctl("-H", "app1", "status", ssh=exits(status))
    assert r.returncode == status and r.stderr == "", r


@pytest.mark.parametrize("status, says", [
    (255, "zddctl: ssh to app1 failed"),
    (127, "zddctl: app1 could not run zddctl (exit 127)"),
    (3, "zddctl: zddctl on app1 exited 3"),
])
def test_other_statuses_are_failures_that_say_what_happened(status, says):
    r = zddctl("-H", "app1", "status", ssh=exits(status))
    assert r.returncode == 1 and says in r.stderr, r


def test_real_ssh_that_cannot_connect_is_exit_1_with_its_reason():
    r = zddctl("-H", "root@127.0.0.1", "status",
               ssh="ssh -p 1 -o BatchMode=yes -o ConnectTimeout=5 -F /dev/null")
    assert r.returncode == 1, r
    assert "Connection refused" in r.stderr, r.stderr  # ssh's own line
    assert r.stderr.rstrip().endswith("zddctl: ssh to root@127.0.0.1 failed (its reason is "
                                      "above)"), r.stderr


def test_ssh_missing_is_exit_1():
    r = zddctl("-H", "app1", "status", ssh="/nonexistent/ssh")
    assert r.returncode == 1 and "cannot run /nonexistent/ssh" in r.stderr, r


@pytest.mark.parametrize("argv", [
    ["-H", "app1"],                              # no command
    ["-H", "app1", "frobnicate"],                # unknown command
    ["-H", "app1", "switch"],                    # no target
    ["-H", "-oProxyCommand=touch /tmp/x", "status"],  # an ssh option, not a host
    ["-H", "app 1", "status"],
    ["-H", "", "status"],
    ["-H", "app1", "wait-drained", "main", "--timeout", "-1"],
    ["-H", "app1", "-s", "Web", "status"],       # not a service name
    ["-H", "app1", "-s", "-x", "status"],
    ["-H", "app1", "weights"],
    ["-H", "app1", "weights", "main=60", "backup=60"],
    ["-H", "app1", "weights", "main=-1"],
    ["-H", "app1", "weights", "off=100"],
])
def test_usage_errors_are_exit_2_before_any_ssh(argv):
    r = zddctl(*argv, ssh=ECHO_ARGS)
    assert r.returncode == 2 and r.stdout == "", r


# ---- --json through -H ------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--json", "switch", "off"], ["switch", "off", "--json"],
                                  ["reload", "--json"], ["wait-drained", "--json", "main"]])
def test_json_reaches_the_remote_zddctl_after_the_command(argv):
    args = build_parser().parse_args(["-H", "app1", *argv])
    remote = remote_argv(args)
    assert remote[2] == "--json", remote


@pytest.mark.parametrize("status, name", [(255, "ssh"), (127, "ssh"), (3, "ssh")])
def test_local_failures_of_h_are_json_with_json(status, name):
    r = zddctl("-H", "app1", "status", "--json", ssh=exits(status))
    assert r.returncode == 1 and r.stderr == "", r
    out = json.loads(r.stdout)
    assert out["error"] == name and "app1" in out["message"], out


def test_usage_error_with_json_is_json_on_stdout_before_any_ssh():
    r = zddctl("-H", "app1", "--json", "switch", ssh=ECHO_ARGS)
    assert r.returncode == 2 and r.stderr == "", r
    out = json.loads(r.stdout)
    assert out["error"] == "usage" and "TARGET" in out["message"], out
