"""examples/haproxy/ as HAProxy 2.6 reads them: both files pass `haproxy -c` as shipped, use the
2.2+ health-check form, retry a refused connection on another server, and say in which usage
`zddctl switch backup` makes sense. tests/e2e/test_haproxy.py runs them with real traffic."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {name: REPO / "examples" / "haproxy" / f"{name}.cfg"
           for name in ("health-port", "traffic-port")}


def directives(path: Path) -> list[str]:
    """The config's lines without comments, blank lines and indentation."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


@pytest.mark.parametrize("usage", CONFIGS)
def test_haproxy_accepts_the_example_as_shipped(usage):
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: `make setup` installs it")
    r = subprocess.run(["haproxy", "-c", "-f", str(CONFIGS[usage])], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[WARNING]" not in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("usage", CONFIGS)
def test_the_check_uses_http_check_send(usage):
    lines = directives(CONFIGS[usage])
    # The 2.2+ form: `option httpchk` alone, the request in `http-check send`.
    assert "option httpchk" in lines
    assert not any(re.match(r"option httpchk\s+\S", line) for line in lines), lines
    send = [line for line in lines if line.startswith("http-check send")]
    assert len(send) == 1 and "meth GET" in send[0] and "uri /healthz" in send[0], send


@pytest.mark.parametrize("usage", CONFIGS)
def test_a_refused_connection_is_retried_on_another_server(usage):
    lines = directives(CONFIGS[usage])
    retries = [int(line.split()[1]) for line in lines if line.startswith("retries ")]
    assert retries and retries[0] >= 1, lines
    # `redispatch 1`: every retry goes to another server (plain `redispatch` waits for the last).
    assert "option redispatch 1" in lines, lines


@pytest.mark.parametrize("usage", CONFIGS)
def test_drained_backends_close_server_connections(usage):
    assert "option http-server-close" in directives(CONFIGS[usage])


def test_the_comments_say_where_switch_backup_makes_sense():
    health = CONFIGS["health-port"].read_text()
    traffic = CONFIGS["traffic-port"].read_text()
    assert re.search(r"switch backup\s+makes no sense in this usage", health), health
    assert re.search(r"switch backup .*\n(#.*\n)*#.*usage where backup makes sense", traffic)


def test_the_health_port_example_gives_the_own_port_fix():
    text = CONFIGS["health-port"].read_text()
    assert "listen 8081;" in text and re.search(r"\[targets\.main\]\n#\s+port = 8081", text)
    # Main servers take traffic on 8080 and are checked through zddd's listen port.
    lines = directives(CONFIGS["health-port"])
    mains = [line for line in lines if line.startswith("server ") and " backup" not in line]
    assert mains and all(":8080 check port 8888 agent-check" in line for line in mains), mains
