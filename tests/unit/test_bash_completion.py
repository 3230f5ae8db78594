"""zddctl's bash completion (packaging/bash-completion/zddctl), run by a real bash with Debian's
bash-completion loaded, and kept in step with zddctl's own argument parser."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from zddd.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
COMPLETION = REPO / "packaging" / "bash-completion" / "zddctl"
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


def readline_words(line: str) -> list[str]:
    """The words bash hands a completion function for `line`: split at blanks, and at the
    COMP_WORDBREAKS characters = and :, which become words of their own."""
    words = [part for token in line.split() for part in re.findall(r"[=:]+|[^=:]+", token)]
    if line.endswith(" "):
        words.append("")
    return words


def complete(line: str, home: str = "/nonexistent", path: str = "/usr/bin:/bin") -> list[str]:
    """COMPREPLY for `line` with the cursor at its end."""
    assert BASH_COMPLETION.exists(), "bash-completion is not installed (make setup installs it)"
    words = readline_words(line)
    script = f"""
source {BASH_COMPLETION}
source {shlex.quote(str(COMPLETION))}
COMP_LINE={shlex.quote(line)}
COMP_POINT=${{#COMP_LINE}}
COMP_WORDS=({" ".join(shlex.quote(w) for w in words)})
COMP_CWORD={len(words) - 1}
_zddctl zddctl "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                       text=True, timeout=30, env={"PATH": path, "HOME": home})
    assert r.returncode == 0 and not r.stderr, r
    return sorted(w for w in r.stdout.splitlines() if w)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(s for a in parser._actions for s in a.option_strings)


def test_commands_and_global_options_are_zddctls():
    parser = build_parser()
    assert complete("zddctl ") == sorted(subparsers(parser))
    assert complete("zddctl -") == option_strings(parser)
    assert complete("zddctl sw") == ["switch"]


@pytest.mark.parametrize("command", ["status", "services", "switch", "wait-drained",
                                     "weights", "reload"])
def test_each_commands_options_are_its_own(command):
    expected = option_strings(subparsers(build_parser())[command])
    assert complete(f"zddctl {command} -") == expected


def test_targets():
    assert complete("zddctl switch ") == ["backup", "main", "off"]
    assert complete("zddctl switch o") == ["off"]
    assert complete("zddctl wait-drained ") == ["backup", "main"]
    # One target only; after it, options.
    assert complete("zddctl switch main ") == []
    assert complete("zddctl switch --force ") == ["backup", "main", "off"]
    assert complete("zddctl switch --wait-drained 30 ") == ["backup", "main", "off"]


def test_option_values():
    assert complete("zddctl --bus ") == ["session", "system"]
    assert complete("zddctl --bus s") == ["session", "system"]
    # Seconds: nothing to offer, and not a target either.
    assert complete("zddctl switch main --wait-drained=") == []
    assert complete("zddctl wait-drained main --timeout ") == []


def test_global_options_before_the_command_are_skipped():
    # A bus address with : and = is one word for the completion, not a command.
    assert complete("zddctl --bus unix:path=/run/x/bus sw") == ["switch"]
    assert complete("zddctl --bus unix:path=/run/x/bus switch ") == ["backup", "main", "off"]
    assert complete("zddctl -H root@app1 switch b") == ["backup"]
    assert complete("zddctl --host app1 --bus system st") == ["status"]


def test_host_completion_offers_the_hosts_ssh_knows(tmp_path):
    # bash-completion's _known_hosts_real reads ~/.ssh/config: a HOME of the test's own.
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host app1\n  HostName 198.51.100.11\n"
                                              "Host lb\n  HostName 198.51.100.1\n")
    assert complete("zddctl -H ap", home=str(tmp_path)) == ["app1"]
    assert complete("zddctl --host root@ap", home=str(tmp_path)) == ["root@app1"]


def test_weights_offer_the_targets_not_given_yet():
    assert complete("zddctl weights ") == ["backup=", "main="]
    assert complete("zddctl weights m") == ["main="]
    assert complete("zddctl -s web weights main=30 ") == ["backup="]
    assert complete("zddctl weights --ramp ") == []  # seconds
    assert complete("zddctl weights --ramp 60 ") == ["backup=", "main="]


@pytest.fixture
def fake_zddctl(tmp_path):
    """A `zddctl` first on PATH that records its arguments and answers `services` with two
    names, as zddd's would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "zddctl"
    log = tmp_path / "argv"
    script.write_text(f"""#!/bin/sh
echo "$* ZDDCTL_SSH=$ZDDCTL_SSH" >> {log}
[ "$(eval echo \\${{$#}})" = services ] && printf 'api\\nweb\\n'
""")
    script.chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin", log


def test_service_names_come_from_zddd(fake_zddctl):
    path, log = fake_zddctl
    assert complete("zddctl -s ", path=path) == ["api", "web"]
    assert complete("zddctl --service w", path=path) == ["web"]
    assert complete("zddctl --bus session -s a", path=path) == ["api"]
    assert complete("zddctl -s web sw", path=path) == ["switch"]
    assert complete("zddctl -s web switch ", path=path) == ["backup", "main", "off"]
    calls = log.read_text().splitlines()
    assert calls[0].startswith("services ")
    assert calls[2].startswith("--bus session services ")


def test_service_names_after_h_are_the_remote_hosts(fake_zddctl):
    path, log = fake_zddctl
    assert complete("zddctl -H root@app1 -s ", path=path) == ["api", "web"]
    (call,) = log.read_text().splitlines()
    # zddctl -H asks the remote zddctl; ssh must not prompt in the middle of a completion.
    assert call.startswith("-H root@app1 services ")
    assert "BatchMode=yes" in call
