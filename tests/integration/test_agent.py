"""The HAProxy agent-check responder of a real zddd, asked from the client namespace the way
HAProxy asks: connect to [agent] listen, read one line."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from zdddlab import (APP_V4, APP_V6, PYTHON, VENV_BIN, HeldConnection, agent_ask, connect_error,
                 wait_for)

pytestmark = pytest.mark.backends

# interval 0.2 + timeout 0.5 (the lab's defaults) + margin
HEALTH_NOTICES_WITHIN = 1.5


def test_answers_follow_the_state(lab):
    z = lab.start_zddd()
    assert agent_ask(lab.client, APP_V4) == "ready up"
    assert agent_ask(lab.client, APP_V6) == "ready up"  # [::] listens on both families

    lab.main.stop()
    wait_for(lambda: agent_ask(lab.client, APP_V4) == "down", HEALTH_NOTICES_WITHIN,
             "down after the main vhost died")
    lab.main.start()
    wait_for(lambda: agent_ask(lab.client, APP_V4) == "ready up", HEALTH_NOTICES_WITHIN,
             "ready up after the main vhost came back")

    assert z.zddctl("switch", "backup").returncode == 0
    assert agent_ask(lab.client, APP_V4) == "ready up"
    lab.backup.stop()
    wait_for(lambda: agent_ask(lab.client, APP_V4) == "down", HEALTH_NOTICES_WITHIN,
             "down after the backup vhost (now active) died")
    lab.backup.start()
    wait_for(lambda: agent_ask(lab.client, APP_V4) == "ready up", HEALTH_NOTICES_WITHIN,
             "ready up again")

    conn = HeldConnection(lab.client, APP_V4, 8888)
    lab.closers.append(conn.close)
    wait_for(lambda: z.prop("Connections")["backup"] == 1, 5, "the held connection")
    assert z.zddctl("switch", "off").returncode == 0
    assert agent_ask(lab.client, APP_V4) == "drain"
    assert agent_ask(lab.client, APP_V4) == "drain"
    conn.close()
    wait_for(lambda: z.prop("ActiveTarget") == "off", 3, "the drain to end")
    assert agent_ask(lab.client, APP_V4) == "maint"


def test_agent_disabled_with_an_empty_listen(lab):
    lab.start_zddd({"agent": {"listen": ""}})
    assert connect_error(lab.client, APP_V4, 8889)[0] == "ECONNREFUSED"


FLOOD = r"""
import socket, sys, time
host, n = sys.argv[1], int(sys.argv[2])
idle = [socket.create_connection((host, 8889), timeout=5) for _ in range(n)]
print("held", len(idle), flush=True)
sys.stdin.readline()
"""


def test_hundreds_of_idle_connections_do_not_stop_it_answering(lab):
    z = lab.start_zddd()
    flood = lab.client.popen(PYTHON, "-c", FLOOD, APP_V4, "600", stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert flood.stdout.readline().split() == ["held", "600"]
        for _ in range(3):
            started = time.monotonic()
            assert agent_ask(lab.client, APP_V4) == "ready up"
            # the python start-up of agent_ask is most of this; the agent itself answers in µs
            assert time.monotonic() - started < 1.0
        # The loop is free: a switch still goes through at once.
        started = time.monotonic()
        r = z.zddctl("switch", "backup")
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - started < 2.0
        assert z.prop("ActiveTarget") == "backup"
    finally:
        flood.kill()
        flood.wait()
    assert "Too many open files" not in z.log()


MISBEHAVE = r"""
import json, socket, sys, threading, time
host = sys.argv[1]
out = {}

def read_all(s):
    data = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return data.decode(errors="replace"), "eof"
            data += chunk
    except ConnectionResetError:
        return data.decode(errors="replace"), "reset"
    except socket.timeout:
        return data.decode(errors="replace"), "timeout"

# garbage, then read: one line, then the agent closes
s = socket.create_connection((host, 8889), timeout=5)
t = time.monotonic()
s.sendall(b"\x00\xff\xfe garbage \r\n\r\n" * 10)
out["garbage"] = read_all(s) + (time.monotonic() - t,)

# a client that sends a lot and keeps sending: answered or cut off, never held
s = socket.create_connection((host, 8889), timeout=5)
t = time.monotonic()
def blast():
    try:
        for _ in range(10000):
            s.sendall(b"x" * 65536)
    except OSError:
        pass
threading.Thread(target=blast, daemon=True).start()
out["blast"] = read_all(s) + (time.monotonic() - t,)

# a client that sends nothing and never closes: answered, then closed by the agent
s = socket.create_connection((host, 8889), timeout=5)
t = time.monotonic()
out["silent"] = read_all(s) + (time.monotonic() - t,)
print(json.dumps(out))
"""


def test_garbage_floods_and_silence_get_one_line_or_are_cut_off(lab):
    z = lab.start_zddd()
    r = lab.client.run(PYTHON, "-c", MISBEHAVE, APP_V4, timeout=60)
    out = json.loads(r.stdout)
    text, end, seconds = out["garbage"]
    assert (text, end) == ("ready up\n", "eof") and seconds < 2
    text, end, seconds = out["blast"]
    assert text in ("ready up\n", "") and end in ("eof", "reset") and seconds < 3
    text, end, seconds = out["silent"]
    assert (text, end) == ("ready up\n", "eof") and seconds < 2
    # and it still answers, and still switches
    assert agent_ask(lab.client, APP_V4) == "ready up"
    assert z.zddctl("switch", "backup").returncode == 0


def test_the_answer_of_a_switched_off_host_after_restart_is_maint(lab):
    z = lab.start_zddd()
    assert z.zddctl("switch", "off", "--force").returncode == 0
    z.kill()
    z.start()
    assert agent_ask(lab.client, APP_V4) == "maint"
    assert subprocess.run([str(VENV_BIN / "zddctl"), "--bus", z.bus.address, "status", "--json"],
                          capture_output=True, text=True).returncode == 0
