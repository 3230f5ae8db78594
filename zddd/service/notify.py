"""systemd notification (READY, STATUS, WATCHDOG) through sdnotify; silent outside systemd."""

from __future__ import annotations

import asyncio
import os

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self._sd = sdnotify.SystemdNotifier()

    def ready(self, status: str) -> None:
        self._sd.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._sd.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self._sd.notify("STOPPING=1")

    def reloaded(self, status: str) -> None:
        self._sd.notify(f"READY=1\nSTATUS={status}")

    async def watchdog(self) -> None:
        """Ping at half the watchdog interval for as long as the event loop runs: a stalled
        loop stops the pings and systemd restarts zddd."""
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        pid = os.environ.get("WATCHDOG_PID")
        if usec <= 0 or (pid and pid != str(os.getpid())):
            return
        while True:
            self._sd.notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)
