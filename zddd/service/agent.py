"""HAProxy agent-check responder: one line per connection, then close.

HAProxy connects to `[agent] listen`, optionally sends its `agent-send` string, and reads one line:
`ready up` while steering to a target whose probe passes, `down` while its probe fails, `drain`
while draining, `maint` when off; with `[agent] weights = true`, `ready up N%` with main's weight
N, 100 included (the words are HAProxy's, so they live here; the core is told of each poll and
answers with its snapshot). One responder serves one service: the daemon starts one per service
that has an agent endpoint, polling that service. The responder never parses
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
from ..backends import MAIN
from ..core import Snapshot
from .listener import Listener

log = logging.getLogger("zddd")

MAX_LINGERING = 256
LINGER_SECONDS = 1.0
DISCARD_BYTES = 4096


def _weights(snap: Snapshot) -> dict[str, int]:
    """Percent of new connections per target; a snapshot without weights (a core before
    weights) steers all of them to its active target."""
    weights = getattr(snap, "weights", None)
    if weights:
        return dict(weights)
    return {name: 100 if name == snap.active else 0 for name in snap.targets}


def agent_word(snap: Snapshot, *, weights: bool | None = None) -> str:
    """HAProxy's agent-check answer for one service's state. `weights` is the service's
    `[agent] weights` (None: as the snapshot says, `agent_weights`): then, while main has
    N percent of the new connections, the answer is `ready up N%`, so HAProxy gives this
    host N % of its normal share (HAProxy reads the words in any order: `ready`, `up` and a
    percentage each set one thing). At 100 too: HAProxy keeps the last percentage it was
    given until another one comes, so a bare `ready up` after `ready up 10%` would leave the
    host at 10 % for good."""
    if snap.draining:
        return "drain"
    if snap.active == OFF:
        return "maint"
    shares = _weights(snap)
    # Every target given new connections must pass its probe (one while steering all to one,
    # both while split).
    steered = [name for name, share in shares.items() if share > 0] or [snap.active]
    if not all(snap.up.get(name) for name in steered):
        return "down"
    main = shares.get(MAIN, 100)
    if weights is None:
        weights = bool(getattr(snap, "agent_weights", False))
    if weights:
        return f"ready up {main}%"
    return "ready up"


class AgentResponder(Listener):
    """Bind with `bind` (before zddd touches the kernel, so a taken port fails the start or the
    reload with nothing changed), then `serve`."""

    backlog = 1024

    def __init__(self, polled, *, weights: bool | None = None):
        super().__init__()
        self.polled = polled  # () -> Snapshot: its service's agent_polled
        # The service's `[agent] weights`; None (the daemon's way): what each snapshot says,
        # so a reload that changes it takes effect at the next poll.
        self.weights = weights
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
            writer.write((agent_word(self.polled(), weights=self.weights) + "\n").encode())
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
