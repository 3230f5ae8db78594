"""The sock_diag connection counter against real loopback connections (no root needed: the
inet_diag dump is open to any user, and the ports are ephemeral ones of the test's own)."""

from __future__ import annotations

import socket

import pytest

from zddd.connections import ConnectionCounter
from zddd.kernel.sock_diag import port_filter


@pytest.fixture
def listeners():
    """Three listeners on ephemeral ports: dual-stack [::] when the host has IPv6, else IPv4."""
    socks = []
    for _ in range(3):
        try:
            s = socket.socket(socket.AF_INET6)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
        except OSError:
            s = socket.socket(socket.AF_INET)
            s.bind(("127.0.0.1", 0))
        s.listen(512)
        socks.append(s)
    yield socks
    for s in socks:
        s.close()


def connect(listener, n: int, host: str = "127.0.0.1") -> list[socket.socket]:
    out = []
    for _ in range(n):
        c = socket.create_connection((host, listener.getsockname()[1]))
        out += [c, listener.accept()[0]]
    return out


def test_counts_server_sides_per_port_over_ipv4_and_ipv6(listeners):
    main, backup, other = listeners
    held = connect(main, 3) + connect(backup, 1) + connect(other, 5)
    if main.family == socket.AF_INET6:
        held += connect(main, 2, "::1")
    ports = {"main": main.getsockname()[1], "backup": backup.getsockname()[1]}
    counts = ConnectionCounter().count(ports)
    assert counts == {"main": 3 + (2 if main.family == socket.AF_INET6 else 0), "backup": 1}
    for s in held:
        s.close()
    assert ConnectionCounter().count(ports) == {"main": 0, "backup": 0}


def test_a_single_port_filter_and_probe_ports_excluded(listeners):
    main = listeners[0]
    held = connect(main, 4)
    probe_client = held[0].getsockname()[1]
    counter = ConnectionCounter(lambda: frozenset({probe_client}))
    assert counter.count({"main": main.getsockname()[1]}) == {"main": 3}
    for s in held:
        s.close()


def test_the_kernel_filters_so_other_connections_cost_nothing(listeners, monkeypatch):
    # Decoding 600 other sockets in Python took ~120 ms a count: only the matching socket may
    # reach Python at all (a row count, not a timing, so a busy machine cannot fail it).
    main, _, other = listeners
    held = connect(other, 300) + connect(main, 1)
    rows = []
    dump = ConnectionCounter._dump

    def counting(diag, family, bytecode, seq):
        for row in dump(diag, family, bytecode, seq):
            rows.append(row)
            yield row

    monkeypatch.setattr(ConnectionCounter, "_dump", staticmethod(counting))
    assert ConnectionCounter().count({"main": main.getsockname()[1]}) == {"main": 1}
    assert len(rows) == 1, rows
    for s in held:
        s.close()


def test_port_filter_layout():
    one = port_filter([8080])
    assert len(one) == 8
    three = port_filter([80, 8080, 9000])
    assert len(three) == 12 * 3 - 4


def test_sockets_on_the_listen_port_are_attributed_by_the_backend(listeners):
    """Steered connections all have the listen port as local port: the counter hands them to
    `attribute` (one call per count, IPv4 given unmapped) and counts what it names."""
    main, backup, listen = listeners
    held = connect(listen, 2) + connect(main, 1)
    if listen.family == socket.AF_INET6:
        held += connect(listen, 1, "::1")
    clients = {s.getsockname()[1]: s.getsockname()[0] for s in held[0::2]}
    seen = []

    def attribute(flows):
        seen.append(list(flows))
        return ["backup" if flow.remote_port % 2 else "main" for flow in flows]

    counter = ConnectionCounter(attribute=attribute)
    ports = {"main": main.getsockname()[1], "backup": backup.getsockname()[1]}
    counts = counter.count(ports, {listen.getsockname()[1]})
    assert len(seen) == 1
    flows = seen[0]
    on_listen = [s for s in held[0::2] if s.getpeername()[1] == listen.getsockname()[1]]
    assert sorted(f.remote_port for f in flows) == sorted(s.getsockname()[1] for s in on_listen)
    for flow in flows:
        assert flow.local_port == listen.getsockname()[1]
        if clients[flow.remote_port] in ("127.0.0.1", "::ffff:127.0.0.1"):
            assert flow.family == socket.AF_INET and flow.remote_addr == bytes([127, 0, 0, 1])
        else:
            assert flow.family == socket.AF_INET6 and flow.remote_addr == socket.inet_pton(
                socket.AF_INET6, "::1")
    odd = sum(f.remote_port % 2 for f in flows)
    assert counts == {"main": 1 + len(flows) - odd, "backup": odd}
    # Without an attribute callback the listen port is not even dumped.
    assert ConnectionCounter().count(ports) == {"main": 1, "backup": 0}
    for s in held:
        s.close()


def test_any_stops_at_the_first_connection_found(listeners, monkeypatch):
    # A drain asks "any left?" every 50 ms: with 300 connections left it must not read them
    # all (that was a quarter of a core with 10,000 held), and with none it must say so.
    main, backup, _ = listeners
    held = connect(main, 300)
    rows = []
    dump = ConnectionCounter._dump

    def counting(diag, family, bytecode, seq):
        for row in dump(diag, family, bytecode, seq):
            rows.append(row)
            yield row

    monkeypatch.setattr(ConnectionCounter, "_dump", staticmethod(counting))
    counter = ConnectionCounter()
    assert counter.any({"main": main.getsockname()[1]}) is True
    assert len(rows) == 1, len(rows)
    assert counter.any({"backup": backup.getsockname()[1]}) is False
    for s in held:
        s.close()
    assert counter.any({"main": main.getsockname()[1]}) is False


def test_any_attributes_sockets_on_a_listen_port(listeners):
    listen, main, _ = listeners
    held = connect(listen, 3)
    ports = {"main": main.getsockname()[1], "backup": 1}
    nobody = ConnectionCounter(attribute=lambda flows: [None for _ in flows])
    mine = ConnectionCounter(attribute=lambda flows: ["backup" for _ in flows])
    listening = {listen.getsockname()[1]}
    assert nobody.any(ports, listening) is False
    assert mine.any(ports, listening) is True
    for s in held:
        s.close()
