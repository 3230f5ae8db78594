"""HAProxy agent-check responder: one line per connection, then close.

HAProxy connects to `[agent] listen`, optionally sends its `agent-send` string, and reads one line:
`ready up` while steering to a target whose probe passes, `down` while its probe fails, `drain`
while draining, `maint` when off (the words are HAProxy's, so they live here; the core is told of
each poll and answers with its snapshot). The responder never parses
input; it only discards what the client sent so that closing does not reset the connection before
HAProxy has read the answer. That wait is bounded in time and bytes, and at most `MAX_LINGERING`
connections wait at once: beyond that a connection still gets its line but is closed right away.
So every client is answered at once, and a flood of idle connections cannot exhaust the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from ..config import OFF, Endpoint
from ..core import Snapshot
from .listener import Listener

log = logging.getLogger("zddd")

MAX_LINGERING = 256
LINGER_SECONDS = 1.0
DISCARD_BYTES = 4096


def agent_word(snap: Snapshot) -> str:
    """HAProxy's agent-check answer for a state of the core."""
    if snap.draining:
        return "drain"
    if snap.active == OFF:
        return "maint"
    return "ready up" if snap.up.get(snap.active) else "down"


class AgentResponder(Listener):
    """Bind with `bind` (before zddd touches the kernel, so a taken port fails the start or the
    reload with nothing changed), then `serve`."""

    backlog = 1024

    def __init__(self, polled):
        super().__init__()
        self.polled = polled  # () -> Snapshot: the core's agent_polled
        self.active = 0

    def bind(self, endpoint: Endpoint) -> None:
        """Bind and listen; raises OSError (the socket closed) if the address is not free."""
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET,
                                 socket.SOCK_STREAM)
        except OSError:
            if endpoint.host != "::":
                raise
            # The default "[::]" on a host booted without IPv6: IPv4 is what HAProxy can reach.
            log.warning("event=agent_ipv4_only reason=\"no IPv6 on this host\"")
            endpoint = Endpoint("0.0.0.0", endpoint.port)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listen(sock, endpoint)

    async def serve(self) -> None:
        await self._serve(self._handle)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write((agent_word(self.polled()) + "\n").encode())
            if self.active >= MAX_LINGERING:
                writer.close()  # answered; only the clean-FIN courtesy is skipped
                return
            writer.write_eof()
        except OSError:
            writer.close()
            return
        except Exception:  # the answer must never take the responder down
            log.exception("event=agent_failed")
            writer.transport.abort()
            return
        self.active += 1
        try:
            # Wait for HAProxy to close (discarding what it sent) so our close is a clean FIN.
            # A client that keeps sending past DISCARD_BYTES is not HAProxy: cut it off.
            discarded = 0
            async with asyncio.timeout(LINGER_SECONDS):
                while discarded <= DISCARD_BYTES:
                    chunk = await reader.read(DISCARD_BYTES)
                    if not chunk:
                        break
                    discarded += len(chunk)
        except (OSError, TimeoutError):
            pass
        finally:
            self.active -= 1
            writer.close()
