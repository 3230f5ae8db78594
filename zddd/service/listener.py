"""A TCP listener bound before it serves: the agent's and the metrics port's.

`bind` happens before zddd touches the kernel (at start) or swaps its config (on reload), so a
port that is taken fails the start or the reload with nothing changed; `serve` starts the asyncio
server on the bound socket; `stop` closes whichever of the two exists.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
import socket

from ..config import Endpoint


class Listener(ABC):
    backlog = 128

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._server: asyncio.base_events.Server | None = None

    def bind(self, endpoint: Endpoint) -> None:
        """Bind and listen; raises OSError (nothing left open) if the address is not free."""
        self._listen(socket.socket(socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET,
                                   socket.SOCK_STREAM), endpoint)

    def _listen(self, sock: socket.socket, endpoint: Endpoint) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sock.family == socket.AF_INET6 and endpoint.host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too
            sock.bind((endpoint.host, endpoint.port))
            sock.listen(self.backlog)
        except OSError:
            sock.close()
            raise
        self._sock = sock

    @property
    def port(self) -> int:
        assert self._sock is not None
        return self._sock.getsockname()[1]

    @abstractmethod
    async def serve(self) -> None:
        """Accept and answer clients on the bound socket, in the protocol of the subclass."""

    async def _serve(self, handler, **kwargs) -> None:
        assert self._sock is not None, "bind first"
        self._server = await asyncio.start_server(handler, sock=self._sock,
                                                  backlog=self.backlog, **kwargs)

    def discard(self) -> None:
        """Close the socket of a listener that never served (a failed start or reload)."""
        if self._server is None and self._sock is not None:
            self._sock.close()
            self._sock = None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif self._sock is not None:
            self._sock.close()
        self._sock = None
