"""Health probes against real loopback servers: tcp, http:/path, none, timeouts, odd answers."""

from __future__ import annotations

import asyncio
import time

import pytest

from zddd.config import from_dict
from zddd.health import HealthMonitor, RiseFall

from .loopticks import LoopTicks


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def config(main: str, backup: str, main_port: int, backup_port: int, timeout: float = 0.3):
    return from_dict({"targets": {"main": {"port": main_port, "health": main},
                                  "backup": {"port": backup_port, "health": backup}},
                      "health": {"interval": 0.05, "timeout": timeout},
                      "agent": {"listen": ""}, "metrics": {"listen": ""}})


async def http_server(answer: bytes | None):
    """A loopback server that reads a request and writes `answer` (None: never answers)."""
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        if answer is None:
            await asyncio.sleep(10)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port  # nothing listens on it: connections are refused


async def probe_pair(main_answer, backup_answer, main="http:/health", backup="http:/health"):
    servers, ports = [], []
    for answer in (main_answer, backup_answer):
        if answer == "closed":
            ports.append(free_port())
        else:
            server, port = await http_server(answer)
            servers.append(server)
            ports.append(port)
    monitor = HealthMonitor(config(main, backup, *ports))
    await monitor.probe_all()
    for server in servers:
        server.close()
    return monitor


def test_http_2xx_and_3xx_pass_4xx_5xx_fail():
    async def go():
        results = {}
        for code in (200, 204, 302, 404, 500):
            m = await probe_pair(f"HTTP/1.1 {code} X\r\n\r\n".encode(), "closed")
            results[code] = (m.is_up("default", "main"), m.reason("default", "main"))
        return results

    results = run(go())
    assert results[200] == (True, "HTTP 200")
    assert results[204][0] and results[302][0]
    assert results[404] == (False, "HTTP 404")
    assert results[500] == (False, "HTTP 500")


def test_tcp_refused_and_connected():
    async def go():
        return await probe_pair(b"", "closed", main="tcp", backup="tcp")

    m = run(go())
    assert (m.is_up("default", "main"), m.reason("default", "main")) == (True, "connected")
    assert (m.is_up("default", "backup"), m.reason("default", "backup")) == (
        False, "Connection refused")


def test_none_is_up_without_any_server():
    async def go():
        return await probe_pair("closed", "closed", main="none", backup="tcp")

    m = run(go())
    assert m.is_up("default", "main") and not m.is_up("default", "backup")


def test_odd_answers_are_down_not_crashes():
    async def go():
        got = {}
        for name, answer in (("garbage", b"\x00\xffnot http\r\n"), ("empty", b""),
                             ("huge line", b"HTTP/1.1 200 " + b"x" * 200_000 + b"\r\n\r\n")):
            m = await probe_pair(answer, "closed")
            got[name] = (m.is_up("default", "main"), m.reason("default", "main"))
        return got

    got = run(go())
    assert [up for up, _ in got.values()] == [False, False, False]
    assert got["garbage"][1].startswith("not an HTTP answer")
    assert got["huge line"][1].startswith("bad answer")  # over the stream limit


def test_a_silent_server_times_out_without_blocking_the_loop():
    async def go():
        server, port = await http_server(None)
        monitor = HealthMonitor(config("http:/", "tcp", port, free_port(), timeout=0.3))
        ticks = LoopTicks()
        t = time.monotonic()
        await monitor.probe_all()
        took = time.monotonic() - t
        count = ticks.stop()
        server.close()
        return monitor, took, count

    monitor, took, ticks = run(go())
    assert not monitor.is_up("default", "main")
    assert "no answer within 0.3 s" in monitor.reason("default", "main")
    assert 0.3 <= took < 0.6
    assert ticks >= 15  # the loop kept running during the probe


def test_probe_ports_are_listed_while_probing_and_cleared_after():
    seen = []

    async def go():
        async def handle(reader, writer):
            seen.append((writer.get_extra_info("peername")[1], set(monitor.probe_ports())))
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        monitor = HealthMonitor(config("http:/", "none", server.sockets[0].getsockname()[1],
                                       free_port()))
        await monitor.probe_all()
        server.close()
        return monitor

    monitor = run(go())
    (client_port, listed), = seen
    assert client_port in listed
    assert monitor.probe_ports() == frozenset()
    assert monitor.is_up("default", "main")


def test_on_change_fires_on_first_result_and_flips_only():
    changes = []

    async def go():
        port = free_port()
        monitor = HealthMonitor(config("tcp", "none", port, free_port()),
                                on_change=lambda s, t, up: changes.append((t, up)))
        await monitor.probe_all()
        await monitor.probe_all()
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        await monitor.probe_all()
        await monitor.probe_all()
        server.close()

    run(go())
    assert changes == [("main", False), ("backup", True), ("main", True)]


def test_run_probes_on_the_interval():
    async def go():
        rounds = 0
        monitor = HealthMonitor(config("none", "none", free_port(), free_port()))
        original = monitor.probe_all

        async def counting():
            nonlocal rounds
            rounds += 1
            await original()

        monitor.probe_all = counting
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.52)
        task.cancel()
        return rounds

    assert 5 <= run(go()) <= 11  # interval 0.05 s: about 10 rounds, fewer on a busy machine


# ---- rise and fall (HAProxy's counts), the Host header, the probed address -------------------

def states(rise: int, fall: int, results: str) -> str:
    """The state after each result of `results` ("+" passed, "-" failed), as "U"/"D"."""
    counts = RiseFall(rise, fall)
    return "".join("U" if counts.feed(r == "+") else "D" for r in results)


@pytest.mark.parametrize("rise, fall, results, expected", [
    (1, 1, "+-+--+", "UDUDDU"),          # the default: every probe decides
    (1, 3, "+--+---", "UUUUUUD"),        # down on the 3rd failure in a row only
    (2, 1, "-+-++", "DDDDU"),            # up on the 2nd pass in a row only
    (2, 3, "---+-++", "DDDDDDU"),        # the first result decides at once
    (2, 3, "++--+---+-++", "UUUUUUUDDDDU"),
])
def test_rise_and_fall_count_results_in_a_row(rise, fall, results, expected):
    assert states(rise, fall, results) == expected


def test_pending_says_how_far_the_count_is():
    counts = RiseFall(2, 3)
    counts.feed(True)
    assert counts.pending() == ""
    counts.feed(False)
    assert counts.pending() == "1 of 3 failures to turn down"
    counts.feed(False)
    counts.feed(False)
    assert counts.up is False and counts.pending() == ""
    counts.feed(True)
    assert counts.pending() == "1 of 2 passes to turn up"


def test_a_monitor_turns_down_after_fall_failures_and_up_after_rise_passes():
    changes = []

    async def go():
        port = free_port()
        cfg = from_dict({"targets": {"main": {"port": port, "health": "tcp"},
                                     "backup": {"port": free_port(), "health": "none"}},
                         "health": {"interval": 0.05, "timeout": 0.3, "rise": 2, "fall": 3},
                         "agent": {"listen": ""}, "metrics": {"listen": ""}})
        monitor = HealthMonitor(cfg, on_change=lambda s, t, up: changes.append((t, up)))
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        seen = []
        await monitor.probe_all()
        seen.append(monitor.is_up("default", "main"))
        server.close()
        await server.wait_closed()
        for _ in range(3):
            await monitor.probe_all()
            seen.append(monitor.is_up("default", "main"))
        reason = monitor.reason("default", "main")
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        for _ in range(2):
            await monitor.probe_all()
            seen.append(monitor.is_up("default", "main"))
        server.close()
        return seen, reason

    seen, reason = run(go())
    assert seen == [True, True, True, False, False, True]
    assert reason == "Connection refused"
    assert changes == [("main", True), ("backup", True), ("main", False), ("main", True)]


def test_the_host_header_and_the_address_are_the_configured_ones():
    requests = {}

    async def go():
        async def handle(reader, writer):
            address, port = writer.get_extra_info("sockname")[:2]
            requests[port] = (address, await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
            writer.close()

        # 127.0.0.2 is a loopback address too, but not the one probed by default.
        main = await asyncio.start_server(handle, "127.0.0.2", 0)
        backup = await asyncio.start_server(handle, "127.0.0.1", 0)
        ports = [s.sockets[0].getsockname()[1] for s in (main, backup)]
        cfg = from_dict({"targets": {"main": {"port": ports[0], "health": "http:/healthz",
                                              "health_host": "main.example:8080"},
                                     "backup": {"port": ports[1], "health": "http:/",
                                                "health_address": "127.0.0.1"}},
                         "health": {"address": "127.0.0.2", "host": "app.example"},
                         "agent": {"listen": ""}, "metrics": {"listen": ""}})
        monitor = HealthMonitor(cfg)
        await monitor.probe_all()
        for server in (main, backup):
            server.close()
        return monitor, ports

    monitor, (main_port, backup_port) = run(go())
    assert monitor.is_up("default", "main") and monitor.is_up("default", "backup")
    address, request = requests[main_port]
    assert address == "127.0.0.2"
    assert request.startswith(b"GET /healthz HTTP/1.0\r\nHost: main.example:8080\r\n"), request
    address, request = requests[backup_port]
    assert address == "127.0.0.1"
    assert request.startswith(b"GET / HTTP/1.0\r\nHost: app.example\r\n"), request


def test_an_address_where_nothing_listens_is_down():
    async def go():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = from_dict({"targets": {"main": {"port": port, "health": "tcp",
                                              "health_address": "127.0.0.3"},
                                     "backup": {"port": free_port(), "health": "none"}},
                         "agent": {"listen": ""}, "metrics": {"listen": ""}})
        monitor = HealthMonitor(cfg)
        await monitor.probe_all()
        server.close()
        return monitor

    monitor = run(go())
    # 127.0.0.1 answers on that port; the configured address alone is probed.
    assert (monitor.is_up("default", "main"), monitor.reason("default", "main")) == (
        False, "Connection refused")
