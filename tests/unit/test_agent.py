"""The agent-check responder on a loopback port: one line per connection, bounded, never stuck."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from zddd.config import Endpoint
from zddd.core import Snapshot
from zddd.service import agent as agent_mod
from zddd.service.agent import AgentResponder, agent_word

from .loopticks import LoopTicks


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def snap(active: str, draining: str = "", up=None, weights=None) -> Snapshot:
    """A snapshot of service "default"."""
    return Snapshot(active=active, draining=draining, backend="nftables", listen_port=8888,
                    targets={"main": 8080, "backup": 80},
                    up={"main": True, "backup": True} if up is None else up,
                    service="default", weights=weights or {})


SNAPSHOTS = {
    "ready up": snap("main"),
    "down": snap("main", up={"main": False, "backup": True}),
    "drain": snap("main", "main"),
    "maint": snap("off"),
}


@pytest.mark.parametrize("word", SNAPSHOTS)
def test_agent_words_follow_the_core_state(word):
    assert agent_word(SNAPSHOTS[word]) == word
    # With weights, main's share even at 100: HAProxy keeps a percentage until told another.
    with_weights = {"ready up": "ready up 100%", "down": "down", "drain": "drain",
                    "maint": "maint"}[word]
    assert agent_word(SNAPSHOTS[word], weights=True) == with_weights


@pytest.mark.parametrize("weights, agent_weights, word", [
    ({"main": 30, "backup": 70}, True, "ready up 30%"),
    ({"main": 30, "backup": 70}, False, "ready up"),
    ({"main": 99, "backup": 1}, True, "ready up 99%"),
    ({"main": 100, "backup": 0}, True, "ready up 100%"),
    ({"main": 100, "backup": 0}, False, "ready up"),
    ({"main": 0, "backup": 100}, True, "ready up 0%"),
])
def test_agent_weights_give_haproxy_mains_share(weights, agent_weights, word):
    active = {100: "main", 0: "backup"}.get(weights["main"], "split")
    assert agent_word(snap(active, weights=weights), weights=agent_weights) == word


def test_a_split_is_up_only_while_both_targets_pass_their_probes():
    split = {"main": 30, "backup": 70}
    assert agent_word(snap("split", up={"main": True, "backup": False}, weights=split),
                      weights=True) == "down"
    assert agent_word(snap("split", up={"main": False, "backup": True}, weights=split)) == "down"
    # Draining (a switch to off from a split) and off win over weights.
    assert agent_word(snap("split", "split", weights=split), weights=True) == "drain"
    assert agent_word(snap("off", weights={"main": 0, "backup": 0}), weights=True) == "maint"


async def started(answer, **kw) -> tuple[AgentResponder, int]:
    """A responder whose core answers with the snapshot for the word `answer()` names."""
    responder = AgentResponder(lambda: SNAPSHOTS[answer()], **kw)
    responder.bind(Endpoint("127.0.0.1", 0))
    await responder.serve()
    return responder, responder._server.sockets[0].getsockname()[1]


async def ask(port: int, send: bytes = b"") -> tuple[bytes, float]:
    """Connect, send, read to EOF: (everything read, seconds it took)."""
    t = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if send:
        writer.write(send)
    data = await reader.read(-1)
    writer.close()
    return data, time.monotonic() - t


def test_one_line_per_connection_from_the_current_answer():
    answers = iter(["ready up", "drain", "maint"])

    async def go():
        responder, port = await started(lambda: next(answers))
        try:
            got = [(await ask(port))[0] for _ in range(3)]
        finally:
            await responder.stop()
        return got

    assert run(go()) == [b"ready up\n", b"drain\n", b"maint\n"]


def test_answers_without_waiting_for_input_and_closes_after_the_client_does():
    async def go():
        responder, port = await started(lambda: "ready up")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t = time.monotonic()
            line = await asyncio.wait_for(reader.readline(), 1)
            answered = time.monotonic() - t
            writer.write(b"agent-send string\n")
            eof = await asyncio.wait_for(reader.read(-1), 2)
            writer.close()
            assert responder.active <= 1
        finally:
            await responder.stop()
        return line, answered, eof

    line, answered, eof = run(go())
    assert line == b"ready up\n" and answered < 0.1 and eof == b""


def test_a_client_that_never_closes_is_let_go_after_the_linger_bound():
    async def go():
        responder, port = await started(lambda: "maint")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            data = await reader.read(-1)  # the answer, then the agent's FIN (half-close)
            await asyncio.sleep(0.1)
            waiting = responder.active  # it waits for our FIN, which never comes...
            await asyncio.sleep(agent_mod.LINGER_SECONDS + 0.2)
            let_go = responder.active  # ...but only for so long
            writer.close()
        finally:
            await responder.stop()
        return data, waiting, let_go

    assert run(go()) == (b"maint\n", 1, 0)


def test_garbage_and_floods_get_their_line_or_are_cut_off():
    async def blaster(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t = time.monotonic()
        first = await reader.readline()
        try:
            for _ in range(200):  # 12.8 MB: far more than the responder discards
                writer.write(b"x" * 65536)
                await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            pass
        writer.close()
        return first, time.monotonic() - t

    async def go():
        responder, port = await started(lambda: "ready up")
        try:
            garbage = await ask(port, b"\x00\xff\r\n" * 1000)
            flood = await blaster(port)
            after = await ask(port)
        finally:
            await responder.stop()
        return garbage, flood, after

    garbage, flood, after = run(go())
    assert garbage[0] == b"ready up\n" and garbage[1] < 2
    assert flood[0] == b"ready up\n" and flood[1] < 3  # cut off, not read forever
    assert after[0] == b"ready up\n"


def test_hundreds_of_idle_connections_all_get_answered_and_a_fresh_one_promptly():
    async def go():
        responder, port = await started(lambda: "ready up")
        idle = []
        try:
            for _ in range(agent_mod.MAX_LINGERING + 300):
                idle.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.1)
            lingering = responder.active
            t = time.monotonic()
            data, _ = await ask(port)
            fresh = time.monotonic() - t
            lines = [await asyncio.wait_for(r.readline(), 2) for r, _ in idle]
        finally:
            for _, w in idle:
                w.close()
            await responder.stop()
        return lingering, data, fresh, lines

    lingering, data, fresh, lines = run(go())
    assert lingering <= agent_mod.MAX_LINGERING
    assert data == b"ready up\n"
    assert fresh < agent_mod.LINGER_SECONDS  # answered at once, not after a slot frees up
    assert set(lines) == {b"ready up\n"}


def test_a_failing_answer_does_not_stop_the_responder():
    calls = []

    def answer():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug")
        return "ready up"

    async def go():
        responder, port = await started(answer)
        try:
            first = await ask(port)
            second = await ask(port)
        finally:
            await responder.stop()
        return first[0], second[0]

    assert run(go()) == (b"", b"ready up\n")


def test_the_loop_stays_free_while_clients_linger():
    async def go():
        responder, port = await started(lambda: "ready up")
        ticks = LoopTicks()
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(100)]
        await asyncio.sleep(0.5)
        count = ticks.stop()
        for _, w in conns:
            w.close()
        await responder.stop()
        return count

    assert run(go()) >= 25


def test_the_responder_answers_for_its_service_with_its_weights_setting():
    polled = []
    half = snap("split", weights={"main": 50, "backup": 50})

    def service_polled():
        polled.append(1)
        return half

    async def go():
        responder = AgentResponder(service_polled, weights=True)
        responder.bind(Endpoint("127.0.0.1", 0))
        await responder.serve()
        try:
            first = (await ask(responder.port))[0]
            responder.weights = False  # a reload turned [agent] weights off
            second = (await ask(responder.port))[0]
        finally:
            await responder.stop()
        return first, second

    assert run(go()) == (b"ready up 50%\n", b"ready up\n")
    assert len(polled) == 2  # each answer told the service it was polled


def test_without_a_setting_the_snapshot_says_whether_the_agent_gives_weights():
    split = snap("split", weights={"main": 25, "backup": 75})
    assert agent_word(split) == "ready up"
    assert agent_word(dataclasses.replace(split, agent_weights=True)) == "ready up 25%"
    assert agent_word(dataclasses.replace(split, agent_weights=True), weights=False) == "ready up"
