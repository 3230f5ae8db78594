"""The D-Bus adapter: org.zddd.Steering1 over the core. The only module that imports a bus library.

Methods are declared on the ServiceInterface so that introspection shows them, but calls are
dispatched by `_dispatch`, a message handler that runs before dbus-fast's own: it lets a method
wait (WaitDrained) without blocking the loop, and it learns the caller's uid for the log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

try:
    from dbus_fast import BusType, DBusError, Message, MessageType, Variant
    from dbus_fast.aio import MessageBus
    from dbus_fast.constants import PropertyAccess, RequestNameReply
    from dbus_fast.service import ServiceInterface, dbus_property, method, signal
except ImportError:  # Debian may carry only the original dbus-next; the API is the same.
    from dbus_next import BusType, DBusError, Message, MessageType, Variant  # type: ignore
    from dbus_next.aio import MessageBus  # type: ignore
    from dbus_next.constants import PropertyAccess, RequestNameReply  # type: ignore
    from dbus_next.service import ServiceInterface, dbus_property, method, signal  # type: ignore

from .. import errors
from ..api import BUS_NAME, ERROR_PREFIX, INTERFACE, OBJECT_PATH
from ..core import MAX_WAIT_SECONDS, Observer, Snapshot, Steering

log = logging.getLogger("zddd")


# ---- strings on the wire ----------------------------------------------------------------------
# dbus-fast before 2.x (Debian 12 ships 1.84) writes a string's length in characters, not bytes,
# so any non-ASCII string zddd sends (an error echoing the caller's target, an unknown property's
# name in the library's own reply) is malformed and the bus daemon drops zddd's connection.
# Every message, ours or the library's, is marshalled in one place, the aio writer's
# `buffer_message`; there its body is handed over with strings whose len() is their UTF-8 size,
# made valid for the bus first (no NUL, no lone surrogate). Installed only where the bug shows.

class _WireStr(str):
    """A str whose len() is its UTF-8 length, which is what the buggy marshaller writes."""

    def __len__(self) -> int:
        return len(self.encode())


def bus_safe(value):
    """`value` with every string made valid for the bus and measured in bytes."""
    if isinstance(value, str):
        text = value.encode("utf-8", "replace").decode("utf-8").replace("\0", "\\0")
        return _WireStr(text)
    if isinstance(value, Variant):
        return Variant(value.signature, bus_safe(value.value))
    if isinstance(value, dict):
        return {bus_safe(k): bus_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [bus_safe(v) for v in value]
    return value


def _marshaller_counts_characters() -> bool:
    wire = Message(path="/a", interface="a.b", member="c", signature="s",
                   body=["\u00e9"])._marshall(False)
    return not wire.endswith(b"\x02\x00\x00\x00\xc3\xa9\x00")


def _install_wire_fix() -> None:
    try:
        from dbus_fast.aio import message_bus as aio_bus
    except ImportError:  # dbus-next: pure Python, measures bytes
        return
    if not _marshaller_counts_characters():
        return
    original = aio_bus._MessageWriter.buffer_message

    def buffer_message(self, msg, future=None):
        body = msg.body
        msg.body = bus_safe(body)
        try:
            original(self, msg, future)
        finally:
            msg.body = body

    aio_bus._MessageWriter.buffer_message = buffer_message


_install_wire_fix()


_ERRORS = {
    errors.InvalidTarget: "InvalidTarget",
    errors.InvalidArgument: "InvalidArgument",
    errors.TargetUnhealthy: "TargetUnhealthy",
    errors.BackendFailure: "BackendFailure",
    errors.InvalidConfig: "InvalidConfig",
}
_OPTION_TYPES = {"force": "b", "drain_timeout_usec": "t"}
# The properties that follow the core's snapshot, and how each is read from one.
_SNAPSHOT_PROPERTIES = {
    "ActiveTarget": lambda s: s.active,
    "Draining": lambda s: s.draining,
    "Backend": lambda s: s.backend,
    "Targets": lambda s: s.targets,
    "LastSwitchUSec": lambda s: s.last_switch_usec,
    "ListenPort": lambda s: s.listen_port,
    "DrainTimeoutUSec": lambda s: int(s.drain_timeout * 1e6),
    "TargetsUp": lambda s: s.up,
}


def bus_address(spec: str) -> dict:
    """Keyword arguments for MessageBus from --bus system|session|ADDRESS."""
    if spec == "system":
        return {"bus_type": BusType.SYSTEM}
    if spec == "session":
        return {"bus_type": BusType.SESSION}
    return {"bus_address": spec}


def error_name(exc: errors.ZdddError) -> str:
    return ERROR_PREFIX + _ERRORS[type(exc)]


def parse_options(options: dict) -> dict:
    """SwitchWithOptions' a{sv} → keyword arguments of Steering.switch; InvalidArgument on any
    unknown option or wrong type."""
    kwargs = {}
    for key, value in options.items():
        want = _OPTION_TYPES.get(key)
        if want is None:
            raise errors.InvalidArgument(
                f"unknown option {key!r}; valid options: force (b), drain_timeout_usec (t)")
        if value.signature != want:
            raise errors.InvalidArgument(
                f"option {key!r} must have type {want!r}, not {value.signature!r}")
        if key == "force":
            kwargs["force"] = bool(value.value)
        else:
            if value.value > MAX_WAIT_SECONDS * 1_000_000:
                raise errors.InvalidArgument("drain_timeout_usec is over 24 h")
            kwargs["drain_timeout"] = value.value / 1e6
    return kwargs


class ManagerInterface(ServiceInterface, Observer):
    def __init__(self, core: Steering, reload: Callable[[], Awaitable[None]]):
        super().__init__(INTERFACE)
        self.core = core
        self._reload = reload
        core.observers.append(self)

    # Declared for introspection; `_dispatch` runs the calls (see the module docstring).
    @method()
    def Switch(self, target: "s"):  # noqa: F821
        raise AssertionError("dispatched by _dispatch")

    @method()
    def SwitchWithOptions(self, target: "s", options: "a{sv}"):  # noqa: F821
        raise AssertionError("dispatched by _dispatch")

    @method()
    def WaitDrained(self, target: "s", timeout_usec: "t") -> "b":  # noqa: F821
        raise AssertionError("dispatched by _dispatch")

    @method()
    def Reload(self):
        raise AssertionError("dispatched by _dispatch")

    def _now(self, name: str):
        return _SNAPSHOT_PROPERTIES[name](self.core.snapshot())

    @dbus_property(access=PropertyAccess.READ)
    def ActiveTarget(self) -> "s":  # noqa: F821
        return self._now("ActiveTarget")

    @dbus_property(access=PropertyAccess.READ)
    def Draining(self) -> "s":  # noqa: F821
        return self._now("Draining")

    @dbus_property(access=PropertyAccess.READ)
    def Backend(self) -> "s":  # noqa: F821
        return self._now("Backend")

    @dbus_property(access=PropertyAccess.READ)
    def Targets(self) -> "a{sq}":  # noqa: F821
        return self._now("Targets")

    @dbus_property(access=PropertyAccess.READ)
    def LastSwitchUSec(self) -> "t":  # noqa: F821
        return self._now("LastSwitchUSec")

    @dbus_property(access=PropertyAccess.READ)
    def ListenPort(self) -> "q":  # noqa: F821
        return self._now("ListenPort")

    @dbus_property(access=PropertyAccess.READ)
    def DrainTimeoutUSec(self) -> "t":  # noqa: F821
        return self._now("DrainTimeoutUSec")

    @dbus_property(access=PropertyAccess.READ)
    def TargetsUp(self) -> "a{sb}":  # noqa: F821
        return self._now("TargetsUp")

    # Read fresh from the kernel on every Get; it changes too often for PropertiesChanged.
    @dbus_property(access=PropertyAccess.READ)
    def Connections(self) -> "a{su}":  # noqa: F821
        return self.core.connection_counts()

    @signal()
    def Switched(self, old: str, new: str, duration_usec: int) -> "sst":
        return [old, new, duration_usec]

    # ---- Observer ----

    def state_changed(self, old: Snapshot, new: Snapshot) -> None:
        changes = {name: get(new) for name, get in _SNAPSHOT_PROPERTIES.items()
                   if get(new) != get(old)}
        if changes:
            self.emit_properties_changed(changes)

    def switched(self, old: str, new: str, duration_usec: int) -> None:
        self.Switched(old, new, duration_usec)

    # ---- dispatch ----

    _SIGNATURES = {"Switch": "s", "SwitchWithOptions": "sa{sv}", "WaitDrained": "st",
                   "Reload": ""}

    def attach(self, bus: MessageBus) -> None:
        self.bus = bus
        bus.export(OBJECT_PATH, self)
        bus.add_message_handler(self._dispatch)

    def _dispatch(self, msg: Message):
        if (msg.message_type != MessageType.METHOD_CALL or msg.path != OBJECT_PATH
                or msg.interface != INTERFACE or msg.member not in self._SIGNATURES):
            return None
        if msg.signature != self._SIGNATURES[msg.member]:
            return Message.new_error(
                msg, "org.freedesktop.DBus.Error.InvalidArgs",
                f"{msg.member} takes signature {self._SIGNATURES[msg.member]!r}, "
                f"not {msg.signature!r}")
        asyncio.get_running_loop().create_task(self._call(msg))
        return True

    async def _caller(self, sender: str) -> str:
        # Asked on every call, never cached: a cache keyed by unique names only grows, and a
        # unique name's owner is the bus' to vouch for at the time of the call.
        try:
            reply = await self.bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="GetConnectionUnixUser",
                signature="s", body=[sender]))
            return f"uid={int(reply.body[0])}"
        except Exception:
            return f"{sender}(uid=?)"

    async def _call(self, msg: Message) -> None:
        try:
            caller = await self._caller(msg.sender)
            if msg.member == "Switch":
                self.core.switch(msg.body[0], caller=caller)
                reply = Message.new_method_return(msg)
            elif msg.member == "SwitchWithOptions":
                target, options = msg.body
                self.core.switch(target, caller=caller, **parse_options(options))
                reply = Message.new_method_return(msg)
            elif msg.member == "WaitDrained":
                target, timeout_usec = msg.body
                if timeout_usec > MAX_WAIT_SECONDS * 1_000_000:
                    raise errors.InvalidArgument("timeout_usec is over 24 h")
                drained = await self.core.wait_drained(target, timeout_usec / 1e6)
                reply = Message.new_method_return(msg, "b", [drained])
            else:
                log.info("event=reload_requested caller=%s", caller)
                await self._reload()
                reply = Message.new_method_return(msg)
        except errors.ZdddError as e:
            reply = Message.new_error(msg, error_name(e), str(e))
        except Exception as e:  # a bug must answer the caller, not leave it hanging
            log.exception("event=internal_error method=%s", msg.member)
            reply = Message.new_error(msg, "org.freedesktop.DBus.Error.Failed", str(e))
        self.bus.send(reply)


async def serve(core: Steering, bus_spec: str, reload: Callable[[], Awaitable[None]]) -> MessageBus:
    """Connect, export the interface and own the bus name. Raises RuntimeError if the name is
    taken (another zddd runs) or the bus refuses it (policy)."""
    bus = await MessageBus(**bus_address(bus_spec)).connect()
    iface = ManagerInterface(core, reload)
    iface.attach(bus)
    try:
        reply = await bus.request_name(BUS_NAME)
    except DBusError as e:
        bus.disconnect()
        raise RuntimeError(f"the bus refused the name {BUS_NAME}: {e.text}") from None
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        bus.disconnect()
        raise RuntimeError(f"{BUS_NAME} is owned by another process (is zddd running?)")
    return bus


__all__ = ["serve", "bus_address", "BUS_NAME", "OBJECT_PATH", "INTERFACE", "ERROR_PREFIX",
           "Message", "MessageBus", "MessageType", "Variant", "DBusError"]
