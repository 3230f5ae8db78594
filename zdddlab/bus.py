"""A private bus and the one way the lab talks D-Bus.

`Bus` is a dbus-daemon configured like the system bus (nothing may be owned or called unless a
policy allows) with zddd's shipped policy file, so the tests exercise the real access rules.
`bus_call` is the lab's one D-Bus caller (on an open connection: the bench keeps one to time
calls); `dbus_call` wraps it in a connection of its own. Both return (error name or None, reply
body) and never raise for a D-Bus error. `SignalWatcher` collects zddd's Switched signals from a
child process (`python -m zdddlab.switched ADDRESS`), so a test's blocking calls never stall it.

The names below are zddd's external contract (SPEC.md), stated here rather than imported from
the daemon so that the lab does not depend on the daemon's internals.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
from pathlib import Path

from .base import REPO, VENV_BIN, LabError, Proc, wait_for

BUS_NAME = "org.zddd.Steering1"
OBJECT_PATH = "/org/zddd/Steering1"
INTERFACE = "org.zddd.Steering1.Manager"
PROPERTIES = "org.freedesktop.DBus.Properties"
POLICY = REPO / "systemd" / "org.zddd.Steering1.conf"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>zddd-test</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <!-- The system bus' default stance: nothing may be owned or called unless a policy allows. -->
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


class Bus:
    """A private dbus-daemon in directory `tmp` (socket `tmp/bus`, its warnings in
    `tmp/dbus-daemon.log`); `address` is what clients connect to, also its str()."""

    def __init__(self, tmp: Path):
        self.dir = tmp
        self.socket = tmp / "bus"
        config = tmp / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.socket, policy=POLICY))
        os.chmod(tmp, 0o755)  # unprivileged clients must reach the socket
        # It warns on stderr (no group zddd, fd limit): into a log, not the demo's output.
        with open(tmp / "dbus-daemon.log", "ab") as log:
            self.proc = Proc(["dbus-daemon", "--nofork", "--nosyslog",
                              f"--config-file={config}"], stdout=log, stderr=log)
        self.address = f"unix:path={self.socket}"
        wait_for(lambda: self.socket.exists() or self.proc.poll() is not None, 10,
                 "dbus-daemon socket")
        if self.proc.poll() is not None:
            raise LabError(f"dbus-daemon exited: {(tmp / 'dbus-daemon.log').read_text()}")

    def __str__(self) -> str:
        return self.address

    def close(self) -> None:
        self.proc.close()


def dbus_classes():
    """(Message, MessageType, MessageBus) from dbus-fast, or dbus-next where Debian has only
    that (the API is the same)."""
    try:
        from dbus_fast import Message, MessageType
        from dbus_fast.aio import MessageBus
    except ImportError:
        from dbus_next import Message, MessageType  # type: ignore
        from dbus_next.aio import MessageBus  # type: ignore
    return Message, MessageType, MessageBus


async def connect(address: str):
    """An open connection (a dbus-fast MessageBus) to the bus at `address`."""
    return await dbus_classes()[2](bus_address=address).connect()


async def bus_call(bus, member: str, signature: str = "", body=(), *,
                   interface: str = INTERFACE, destination: str = BUS_NAME,
                   path: str = OBJECT_PATH, timeout: float | None = None):
    """Call `member` on an open connection; (error name or None, reply body)."""
    Message, MessageType, _ = dbus_classes()
    reply = await asyncio.wait_for(bus.call(Message(
        destination=destination, path=path, interface=interface, member=member,
        signature=signature, body=list(body))), timeout)
    if reply.message_type == MessageType.ERROR:
        return reply.error_name, reply.body
    return None, reply.body


def dbus_call(address: str, member: str, signature: str = "", body=(), timeout: float = 60,
              interface: str = INTERFACE, *, destination: str = BUS_NAME,
              path: str = OBJECT_PATH):
    """Call a method of zddd's (a Manager method unless `interface` says otherwise) on a
    connection of its own; (error name or None, reply body)."""

    async def go():
        bus = await connect(address)
        try:
            return await bus_call(bus, member, signature, body, interface=interface,
                                  destination=destination, path=path, timeout=timeout)
        finally:
            bus.disconnect()

    return asyncio.run(go())


def name_has_owner(address: str, name: str = BUS_NAME) -> bool:
    """Whether someone owns `name` on the bus (False when the bus cannot be reached)."""
    try:
        err, body = dbus_call(address, "NameHasOwner", "s", [name], 5,
                              interface="org.freedesktop.DBus",
                              destination="org.freedesktop.DBus", path="/org/freedesktop/DBus")
    except (OSError, EOFError, asyncio.TimeoutError):
        return False
    return err is None and bool(body[0])


class SignalWatcher:
    """Collects zddd's Switched signals on the bus (a child process subscribed with AddMatch).
    `switched()` is the list of (from, to, duration_usec) received so far."""

    def __init__(self, bus: Bus | str):
        address = bus.address if isinstance(bus, Bus) else bus
        self.proc = Proc([str(VENV_BIN / "python"), "-m", "zdddlab.switched", address],
                         name="signal watcher", stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise LabError("signal watcher failed")
        self._seen: list[tuple] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._seen.append(tuple(json.loads(line)))

    def switched(self) -> list[tuple]:
        return list(self._seen)

    def close(self) -> None:
        self.proc.close()
