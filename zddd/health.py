"""Health probes of the targets, on an interval, without blocking the event loop.

A probe connects to the target's port at its health address (by default the loopback, IPv4
then IPv6): `tcp` passes when the connection is accepted, `http:/path` when a GET of the path
(with the configured Host header) is answered 2xx or 3xx, `none` always passes. A target's
state follows HAProxy's rise and fall: the first probe decides, then it turns up after `rise`
passed probes in a row and down after `fall` failed ones. The client ports of probes in flight
are exposed so connection counts can leave zddd's own probes out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Callable

from .config import Config, Target
from .logfmt import quote

log = logging.getLogger("zddd")

LOOPBACKS = ("127.0.0.1", "::1")
WILDCARD = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


class RiseFall:
    """One target's up/down state from its probe results, HAProxy's way: the first result
    decides; after that it takes `rise` passes in a row to turn up and `fall` failures in a row
    to turn down (a result that agrees with the state starts the count again)."""

    def __init__(self, rise: int = 1, fall: int = 1):
        self.rise, self.fall = rise, fall
        self.up: bool | None = None
        self.against = 0  # results in a row that disagree with `up`

    def feed(self, passed: bool) -> bool:
        """Take one probe result; the state after it."""
        if self.up is None or passed == self.up:
            self.up, self.against = passed, 0
            return passed
        self.against += 1
        if self.against >= (self.rise if passed else self.fall):
            self.up, self.against = passed, 0
        return self.up

    def pending(self) -> str:
        """What the results against the state amount to so far ("" when none)."""
        if not self.against:
            return ""
        need = self.fall if self.up else self.rise
        return f"{self.against} of {need} {'failures' if self.up else 'passes'} to turn " \
               f"{'down' if self.up else 'up'}"


Key = tuple[str, str]  # (service, target)


class HealthMonitor:
    """Every target of every service, probed concurrently on the one event loop."""

    def __init__(self, config: Config,
                 on_change: Callable[[str, str, bool], None] = lambda s, t, u: None,
                 gate: Callable[[str, str], str | None] = lambda service, target: None):
        self.config = config
        self.on_change = on_change
        # The data plane's word on a target (the backend's target_problem): a vhost that answers
        # but cannot be steered to is down all the same.
        self.gate = gate
        self._up: dict[Key, bool] = {}
        self._reasons: dict[Key, str] = {}
        self._counts: dict[Key, RiseFall] = {}
        # Replaced, never mutated: the metrics thread reads it while probes run in the loop.
        self._probe_ports: frozenset[int] = frozenset()
        self._task: asyncio.Task | None = None

    def is_up(self, service: str, target: str) -> bool:
        return self._up.get((service, target), False)

    def reason(self, service: str, target: str) -> str:
        return self._reasons.get((service, target), "not probed yet")

    def probe_ports(self) -> frozenset[int]:
        """Client ports of probe connections now open. Safe to call from any thread."""
        return self._probe_ports

    async def probe_all(self) -> None:
        """Probe every target once, concurrently, and record the results."""
        targets = [(s.name, t) for s in self.config.services.values()
                   for t in s.targets.values()]
        results = await asyncio.gather(*(self._probe(t) for _, t in targets))
        for (service, target), (passed, reason) in zip(targets, results, strict=True):
            key = (service, target.name)
            counts = self._counts.setdefault(key, RiseFall())
            counts.rise, counts.fall = target.health.rise, target.health.fall
            up = counts.feed(passed)
            if counts.pending():
                reason = f"{reason} ({counts.pending()})"
            # The data plane's word is not a probe: it counts at once, not towards fall.
            problem = self.gate(service, target.name) if up else None
            if problem:
                up, reason = False, problem
            self._record(key, up, reason)
        known = {(s, t.name) for s, t in targets}
        for key in set(self._up) - known:  # a service a reload removed
            del self._up[key], self._reasons[key]
            self._counts.pop(key, None)

    def _record(self, key: Key, up: bool, reason: str) -> None:
        before = self._up.get(key)
        self._up[key] = up
        self._reasons[key] = reason
        service, name = key
        if before is not None and before != up:
            where = "" if self.config.single else f" service={service}"
            log.info("event=health%s target=%s up=%s reason=%s", where, name,
                     "yes" if up else "no", quote(reason))
        if before != up:
            self.on_change(service, name, up)

    async def _probe(self, target: Target) -> tuple[bool, str]:
        if target.health.kind == "none":
            return True, "not probed (health = none)"
        try:
            return await asyncio.wait_for(self._connect_and_check(target),
                                          self.config.health_timeout)
        except asyncio.TimeoutError:
            return False, f"no answer within {self.config.health_timeout} s"
        except OSError as e:
            return False, os.strerror(e.errno) if e.errno else str(e)
        except Exception as e:  # e.g. an over-long status line: the target is down, not zddd
            return False, f"bad answer: {e}"

    async def _connect_and_check(self, target: Target) -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        address = target.health.address
        for host in (address,) if address else LOOPBACKS:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as e:
                last = e
                continue
            port = 0
            try:
                sock.setblocking(False)
                # Bind first so the port is listed before the connection exists: a count taken
                # while the handshake completes never sees the probe. The loopback is bound as
                # such; another address takes the source the kernel's routing gives it.
                source = host if host in LOOPBACKS else WILDCARD[family]
                sock.bind((source, 0))
                port = sock.getsockname()[1]
                self._probe_ports = self._probe_ports | {port}
                try:
                    await loop.sock_connect(sock, (host, target.port))
                except OSError as e:
                    last = e
                    continue
                if target.health.kind == "tcp":
                    return True, "connected"
                reader, writer = await asyncio.open_connection(sock=sock)
                try:
                    return await self._http(reader, writer, target)
                finally:
                    writer.close()
            finally:
                # Keep the port listed until the socket is gone, so it is never counted.
                sock.close()
                self._probe_ports = self._probe_ports - {port}
        assert last is not None
        raise last

    @staticmethod
    async def _http(reader, writer, target: Target) -> tuple[bool, str]:
        writer.write(f"GET {target.health.path} HTTP/1.0\r\nHost: {target.health.host}\r\n"
                     "User-Agent: zddd-health\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.decode("latin-1").split()
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            return False, f"not an HTTP answer: {status_line[:60]!r}"
        code = int(parts[1])
        if 200 <= code < 400:
            return True, f"HTTP {code}"
        return False, f"HTTP {code}"

    async def run(self) -> None:
        """Probe forever on the configured interval (the first round is `probe_all`)."""
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                await self.probe_all()
            except Exception:  # never let one bad round stop the probing for good
                log.exception("event=health_round_failed")

    def reconfigure(self, config: Config) -> None:
        self.config = config
