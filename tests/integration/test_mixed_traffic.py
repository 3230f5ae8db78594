"""One client, steered then direct: the connections through 8888 must not get in the way of the
same client's direct connections to the vhost afterwards.

A rewriting backend (nftables, tc, xdp) steering to the vhost's own port shares its TCP tuple
space with direct clients: the vhost's TIME_WAIT sockets of steered flows then reject direct
SYNs from the same client ports, each costing a 1 s retransmit (measured by `make bench`). The
documented mitigation gives the vhost a second listen port used only as zddd's target; sk_lookup
never rewrites, so it needs none. Both are checked here: no SYN retransmit, no slow connect."""

import pytest
from zdddlab import APP_V4, Vhost
from zdddlab.measure import SYN_RETRANS, tcp_counters

pytestmark = pytest.mark.backends

CLIENT = r"""
import socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
slowest = 0.0
for _ in range(count):
    s = socket.socket()
    t = time.monotonic()
    s.connect((host, port))
    slowest = max(slowest, time.monotonic() - t)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    body = b""
    while chunk := s.recv(4096):
        body += chunk
    s.close()
    assert body.endswith(sys.argv[4].encode() + b"\n"), body
print(slowest)
"""


def requests(lab, port: int, count: int, answer: str) -> float:
    """`count` close-after-one-request connections from the client; the slowest connect, s."""
    r = lab.client.run("/usr/bin/python3", "-c", CLIENT, APP_V4, str(port), str(count), answer,
                       timeout=120)
    return float(r.stdout)


def test_steered_then_direct_from_one_client_never_waits(lab):
    rewriting = lab.backend != "sk_lookup"
    config = {}
    if rewriting:
        # The mitigation: the main vhost listens on a port of its own for zddd.
        own = Vhost(lab.app, 8081, "main")
        lab.closers.append(own.stop)
        config = {"targets": {"main": {"port": 8081}}}
    lab.start_zddd(config)
    # 64 client ports, 300 connections each way: every port is used several times over.
    lab.client.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40063")
    before = tcp_counters(lab.client)[SYN_RETRANS]
    requests(lab, 8888, 300, "main")
    slowest = requests(lab, 8080, 300, "main")
    retransmits = tcp_counters(lab.client)[SYN_RETRANS] - before
    assert retransmits == 0 and slowest < 0.5, (retransmits, slowest)
