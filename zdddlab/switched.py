"""`python -m zdddlab.switched ADDRESS`: print "ready" once subscribed, then the body of every
zddd Switched signal on the bus at ADDRESS as a JSON line, until the bus goes away. The child
process behind zdddlab.SignalWatcher."""

from __future__ import annotations

import asyncio
import json
import sys

from .bus import INTERFACE, bus_call, connect, dbus_classes


async def watch_switched(address: str) -> None:
    _, MessageType, _ = dbus_classes()
    bus = await connect(address)
    err, _ = await bus_call(bus, "AddMatch", "s",
                            [f"type='signal',interface='{INTERFACE}',member='Switched'"],
                            interface="org.freedesktop.DBus", destination="org.freedesktop.DBus",
                            path="/org/freedesktop/DBus")
    if err:
        sys.exit(f"AddMatch: {err}")

    def on(msg):
        if msg.message_type == MessageType.SIGNAL and msg.member == "Switched":
            print(json.dumps(msg.body), flush=True)

    bus.add_message_handler(on)
    print("ready", flush=True)
    await bus.wait_for_disconnect()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m zdddlab.switched ADDRESS")
    asyncio.run(watch_switched(sys.argv[1]))
