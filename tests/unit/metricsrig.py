"""The metrics server on a loopback port, its event loop in a thread of its own, so a test can
scrape it with a plain blocking client."""

from __future__ import annotations

import asyncio
import threading
from contextlib import contextmanager

from zddd.config import Endpoint
from zddd.service.metrics import MetricsServer


@contextmanager
def serving(core):
    """Yields (server, port); the server is stopped and its loop closed afterwards."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    async def start() -> MetricsServer:
        server = MetricsServer(core)
        server.bind(Endpoint("127.0.0.1", 0))
        await server.serve()
        return server

    server = call(start())
    try:
        yield server, server.port
    finally:
        call(server.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
