"""examples/haproxy/ as HAProxy 2.6 reads them: every file passes `haproxy -c` as shipped, uses
the 2.2+ health-check form, retries a refused connection on another server, and the two usages
say where `zddctl switch backup` makes sense; two-services.cfg sends each backend to its own
service's listen and agent ports, those of the two-service example in packaging/zddd.toml.
tests/e2e/test_haproxy.py runs the usages with real traffic, tests/e2e/test_ansible.py the
two-service one."""

from __future__ import annotations

import re
import shutil
import tomllib
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {name: REPO / "examples" / "haproxy" / f"{name}.cfg"
           for name in ("health-port", "traffic-port")}
TWO_SERVICES = REPO / "examples" / "haproxy" / "two-services.cfg"
EVERY = {**CONFIGS, "two-services": TWO_SERVICES}


def directives(path: Path) -> list[str]:
    """The config's lines without comments, blank lines and indentation."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


@pytest.mark.parametrize("usage", EVERY)
def test_haproxy_accepts_the_example_as_shipped(usage):
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed: `make setup` installs it")
    r = subprocess.run(["haproxy", "-c", "-f", str(EVERY[usage])], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[WARNING]" not in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("usage", EVERY)
def test_the_check_uses_http_check_send(usage):
    lines = directives(EVERY[usage])
    # The 2.2+ form: `option httpchk` alone, the request in `http-check send`.
    assert "option httpchk" in lines
    assert not any(re.match(r"option httpchk\s+\S", line) for line in lines), lines
    send = [line for line in lines if line.startswith("http-check send")]
    assert len(send) == 1 and "meth GET" in send[0] and "uri /healthz" in send[0], send


@pytest.mark.parametrize("usage", EVERY)
def test_a_refused_connection_is_retried_on_another_server(usage):
    lines = directives(EVERY[usage])
    retries = [int(line.split()[1]) for line in lines if line.startswith("retries ")]
    assert retries and retries[0] >= 1, lines
    # `redispatch 1`: every retry goes to another server (plain `redispatch` waits for the last).
    assert "option redispatch 1" in lines, lines


@pytest.mark.parametrize("usage", EVERY)
def test_drained_backends_close_server_connections(usage):
    assert "option http-server-close" in directives(EVERY[usage])


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


def shipped_services() -> dict:
    """The commented two-service example at the end of packaging/zddd.toml, uncommented."""
    text = (REPO / "packaging" / "zddd.toml").read_text()
    block = text[text.index("\n#[services."):]
    return tomllib.loads(re.sub(r"^#", "", block, flags=re.M))["services"]


def test_the_shipped_two_service_example_is_one_config():
    services = shipped_services()
    assert set(services) == {"web", "api"}, services
    ports = [p for s in services.values() for p in
             (s["listen_port"], s["targets"]["main"]["port"], s["targets"]["backup"]["port"],
              int(s["agent"]["listen"].rsplit(":", 1)[1]))]
    assert len(ports) == len(set(ports)), ports


def test_two_services_each_backend_uses_its_service_ports():
    """Backend NAME's servers take traffic on service NAME's listen port and ask its agent;
    each backend has the rolling deploy's block, and a frontend of its own."""
    text = TWO_SERVICES.read_text()
    sections = re.split(r"^(?=\S)", text, flags=re.M)
    backends = {m[1]: body for body in sections if (m := re.match(r"backend (\w+)", body))}
    services = shipped_services()
    assert set(backends) == set(services), backends.keys()
    for name, body in backends.items():
        service = services[name]
        agent = int(service["agent"]["listen"].rsplit(":", 1)[1])
        servers = re.findall(r"^\s*server (app\d) ([\d.]+):(\d+) (.*)$", body, re.M)
        assert {s[0] for s in servers} == {"app1", "app2"}, servers
        for _, _, port, options in servers:
            assert int(port) == service["listen_port"], (name, port)
            assert f"agent-check agent-port {agent} " in options + " ", (name, options)
        assert "use-server %[req.hdr(X-Zddd-Server)]" in body and "X-Served-By %s" in body
        assert re.search(rf"^frontend \w+\n(\s+.*\n)*?\s+default_backend {name}$", text, re.M)
