"""The D-Bus adapter: org.zddd.Steering1 over the core. The only module that imports a bus library.

Every method and property is declared once, in `METHODS` and `PROPERTIES`; the introspection
data, the signature checks, the property getters and PropertiesChanged are all made from those
declarations. Calls are run by `_dispatch`, a message handler that runs before dbus-fast's own:
it lets a method wait (WaitDrained) without blocking the loop, and it asks the bus who the
caller is, for the log and LastSwitchCaller.
"""

from __future__ import annotations

import asyncio
import logging
import pwd
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

try:
    from dbus_fast import BusType, DBusError, Message, MessageType, Variant
    from dbus_fast import introspection as intr
    from dbus_fast.aio import MessageBus
    from dbus_fast.constants import PropertyAccess, RequestNameReply
    from dbus_fast.service import ServiceInterface, dbus_property, signal
except ImportError:  # Debian may carry only the original dbus-next; the API is the same.
    from dbus_next import BusType, DBusError, Message, MessageType, Variant  # type: ignore
    from dbus_next import introspection as intr  # type: ignore
    from dbus_next.aio import MessageBus  # type: ignore
    from dbus_next.constants import PropertyAccess, RequestNameReply  # type: ignore
    from dbus_next.service import ServiceInterface, dbus_property, signal  # type: ignore

from .. import errors
from ..api import BUS_NAME, ERROR_PREFIX, INTERFACE, MAX_SECONDS, OBJECT_PATH
from ..core import Observer, Snapshot, Steering
from ..logfmt import quote

log = logging.getLogger("zddd")


# ---- strings on the wire ----------------------------------------------------------------------
# dbus-fast before 2.x (Debian 12 ships 1.84) writes a string's length in characters, not bytes,
# so any non-ASCII string sent (an error echoing the caller's target, an unknown property's name
# in the library's own reply, a target a client passes on) is malformed and the bus daemon drops
# the connection. Every message, ours or the library's, is marshalled in one place, the aio
# writer's `buffer_message`; there its body is handed over with strings whose len() is their
# UTF-8 size, made valid for the bus first (no NUL, no lone surrogate). `install_wire_fix` puts
# that in place where the bug shows; `connect` (the daemon's and zddctl's way onto the bus) calls
# it, so the patch is applied only in processes that connect, once.

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


_wire_fix_checked = False


def install_wire_fix() -> None:
    """Make every message this process sends byte-correct, if its dbus-fast needs it. Checked
    and installed once per process; later calls do nothing."""
    global _wire_fix_checked
    if _wire_fix_checked:
        return
    _wire_fix_checked = True
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

    aio_bus._MessageWriter.buffer_message = buffer_message  # type: ignore[method-assign]


FAILED = "org.freedesktop.DBus.Error.Failed"


def bus_address(spec: str) -> dict:
    """Keyword arguments for MessageBus from --bus system|session|ADDRESS. Whoever asks is
    about to connect, so the wire fix is put in place here too (zddctl connects this way; it
    should call `connect`)."""
    install_wire_fix()
    if spec == "system":
        return {"bus_type": BusType.SYSTEM}
    if spec == "session":
        return {"bus_type": BusType.SESSION}
    return {"bus_address": spec}


async def connect(spec: str) -> MessageBus:
    """A connection to the bus named by --bus system|session|ADDRESS, with the wire fix in
    place. Raises what dbus-fast raises when the bus cannot be reached."""
    return await MessageBus(**bus_address(spec)).connect()


# ---- errors -----------------------------------------------------------------------------------
# One D-Bus error name per condition, found by class hierarchy: a subclass of a condition is
# that condition. A ZdddError outside all of them still answers the caller, as Failed.
_ERROR_NAMES: dict[type, str] = {cls: ERROR_PREFIX + cls.__name__ for cls in (
    errors.InvalidTarget, errors.InvalidArgument, errors.TargetUnhealthy,
    errors.BackendFailure, errors.InvalidConfig)}


def error_name(exc: errors.ZdddError) -> str:
    for cls in type(exc).__mro__:
        if cls in _ERROR_NAMES:
            return _ERROR_NAMES[cls]
    return FAILED


# ---- who called -------------------------------------------------------------------------------
_SESSION_SCOPE = re.compile(r"/session-([A-Za-z0-9_]+)\.scope(?:/|$)")


def _environ(pid: int, proc: Path) -> dict[str, str]:
    try:
        raw = (proc / str(pid) / "environ").read_bytes()
    except OSError:  # gone, or not ours to read (another uid without CAP_SYS_PTRACE)
        return {}
    pairs = (entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _logind_session(pid: int, proc: Path, sessions: Path) -> dict[str, str]:
    """The systemd-logind session record of the process, {} if it is in none."""
    try:
        match = _SESSION_SCOPE.search((proc / str(pid) / "cgroup").read_text())
        if match is None:
            return {}
        text = (sessions / match.group(1)).read_text()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def describe_caller(uid: int, pid: int | None, *, proc: Path = Path("/proc"),
                    sessions: Path = Path("/run/systemd/sessions")) -> str:
    """"uid=UID", and " ssh=USER@HOST" when the calling process runs in an ssh login (as
    `zddctl -H` does on the remote host). The host comes from the process' logind session
    (REMOTE_HOST, set by sshd through pam_systemd and not the caller's to change), else from
    SSH_CONNECTION in its environment where zddd may read it (same uid, or CAP_SYS_PTRACE):
    advisory, like any login record. Best-effort: whatever cannot be read is left out. Under
    the shipped unit (ProtectProc=invisible, no CAP_SYS_PTRACE) zddd sees the processes of
    root callers only, so `zddctl -H` as root or through sudo (which keeps the login session)
    is named with its ssh origin, and a caller of group zddd as its uid alone."""
    who = f"uid={uid}"
    if pid is None or pid <= 0:
        return who
    session = _logind_session(pid, proc, sessions)
    host = session.get("REMOTE_HOST", "") if session.get("SERVICE", "sshd") == "sshd" else ""
    user = session.get("USER", "")
    if not host:
        env = _environ(pid, proc)
        host = env.get("SSH_CONNECTION", "").split(" ", 1)[0]
        user = env.get("USER") or env.get("LOGNAME") or ""
    if not host:
        return who
    return f"{who} ssh={user or _user_name(uid)}@{host}"


# ---- the interface, declared once -------------------------------------------------------------

@dataclass(frozen=True)
class Property:
    """A read-only property: its D-Bus type, and how it is read. `of_snapshot` properties follow
    the core's snapshot and are announced with PropertiesChanged; the others are read fresh on
    every Get."""

    name: str
    signature: str
    read: Callable[[Any], Any]  # Snapshot -> value, or ManagerInterface -> value
    of_snapshot: bool = True


@dataclass(frozen=True)
class Method:
    """A method: its arguments (name, D-Bus type), its reply type, and what runs it."""

    name: str
    args: tuple[tuple[str, str], ...]
    returns: str
    run: Callable[["ManagerInterface", str, list], Awaitable[list]]  # (caller, body) -> reply

    @property
    def signature(self) -> str:
        return "".join(sig for _, sig in self.args)


_OPTION_TYPES = {"force": "b", "drain_timeout_usec": "t"}


def _usec_in_range(value: int, what: str) -> float:
    """µs from the bus as seconds; InvalidArgument over the limit (checked here, before the
    conversion to float can round a value just over it down to it)."""
    if value > MAX_SECONDS * 1_000_000:
        raise errors.InvalidArgument(f"{what} is over {MAX_SECONDS // 3600} h")
    return value / 1e6


def parse_options(options: dict) -> dict:
    """SwitchWithOptions' a{sv} → keyword arguments of Steering.switch; InvalidArgument on any
    unknown option or wrong type."""
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        want = _OPTION_TYPES.get(key)
        if want is None:
            raise errors.InvalidArgument(
                f"unknown option {key!r}; valid options: "
                + ", ".join(f"{k} ({t})" for k, t in _OPTION_TYPES.items()))
        if value.signature != want:
            raise errors.InvalidArgument(
                f"option {key!r} must have type {want!r}, not {value.signature!r}")
        if key == "force":
            kwargs["force"] = bool(value.value)
        else:
            kwargs["drain_timeout"] = _usec_in_range(value.value, "drain_timeout_usec")
    return kwargs


async def _switch(iface: "ManagerInterface", caller: str, body: list) -> list:
    iface.core.switch(body[0], caller=caller)
    return []


async def _switch_with_options(iface: "ManagerInterface", caller: str, body: list) -> list:
    target, options = body
    iface.core.switch(target, caller=caller, **parse_options(options))
    return []


async def _wait_drained(iface: "ManagerInterface", caller: str, body: list) -> list:
    target, timeout_usec = body
    return [await iface.core.wait_drained(target, _usec_in_range(timeout_usec, "timeout_usec"))]


async def _reload(iface: "ManagerInterface", caller: str, body: list) -> list:
    log.info("event=reload_requested caller=%s", quote(caller))
    await iface.reload()
    return []


METHODS = {m.name: m for m in (
    Method("Switch", (("target", "s"),), "", _switch),
    Method("SwitchWithOptions", (("target", "s"), ("options", "a{sv}")), "", _switch_with_options),
    Method("WaitDrained", (("target", "s"), ("timeout_usec", "t")), "b", _wait_drained),
    Method("Reload", (), "", _reload),
)}

PROPERTIES = (
    Property("ActiveTarget", "s", lambda s: s.active),
    Property("Draining", "s", lambda s: s.draining),
    Property("Backend", "s", lambda s: s.backend),
    Property("Targets", "a{sq}", lambda s: s.targets),
    Property("LastSwitchUSec", "t", lambda s: s.last_switch_usec),
    Property("LastSwitchTimestamp", "t", lambda s: s.last_switch_timestamp),
    Property("LastSwitchCaller", "s", lambda s: s.last_switch_caller),
    Property("ListenPort", "q", lambda s: s.listen_port),
    Property("DrainTimeoutUSec", "t", lambda s: int(s.drain_timeout * 1e6)),
    Property("TargetsUp", "a{sb}", lambda s: s.up),
    # Read from the kernel on every Get; it changes too often for PropertiesChanged. A target
    # whose count cannot be read is absent (unknown), so a failed read never fails a GetAll.
    Property("Connections", "a{su}", lambda iface: iface.connections(), of_snapshot=False),
)


class ManagerInterface(ServiceInterface, Observer):
    def __init__(self, core: Steering, reload: Callable[[], Awaitable[None]]):
        super().__init__(INTERFACE)
        self.core = core
        self.reload = reload
        self.bus: MessageBus | None = None
        core.observers.append(self)

    def connections(self) -> dict[str, int]:
        try:
            return self.core.service().connection_counts()
        except Exception as e:
            log.warning("event=count_failed error=%s", quote(str(e)))
            return {}

    def introspect(self):
        # dbus-fast knows the properties and the signal; the methods, run by `_dispatch`, are
        # added from METHODS.
        data = super().introspect()
        for m in METHODS.values():
            data.methods.append(intr.Method(
                m.name, [intr.Arg(sig, intr.ArgDirection.IN, name) for name, sig in m.args],
                [intr.Arg(m.returns, intr.ArgDirection.OUT)] if m.returns else []))
        return data

    @signal()
    def Switched(self, old: str, new: str, duration_usec: int) -> "sst":
        return [old, new, duration_usec]

    # ---- Observer ----

    def state_changed(self, old: Snapshot, new: Snapshot) -> None:
        changes = {p.name: p.read(new) for p in PROPERTIES
                   if p.of_snapshot and p.read(new) != p.read(old)}
        if changes:
            self.emit_properties_changed(changes)

    def switched(self, service: str, old: str, new: str, duration_usec: int) -> None:
        self.Switched(old, new, duration_usec)

    # ---- dispatch ----

    def attach(self, bus: MessageBus) -> None:
        self.bus = bus
        bus.export(OBJECT_PATH, self)
        bus.add_message_handler(self._dispatch)

    def _dispatch(self, msg: Message):
        if (msg.message_type != MessageType.METHOD_CALL or msg.path != OBJECT_PATH
                or msg.interface != INTERFACE or msg.member not in METHODS):
            return None
        declared = METHODS[msg.member]
        if msg.signature != declared.signature:
            return Message.new_error(
                msg, "org.freedesktop.DBus.Error.InvalidArgs",
                f"{msg.member} takes signature {declared.signature!r}, not {msg.signature!r}")
        asyncio.get_running_loop().create_task(self._call(declared, msg))
        return True

    async def _caller(self, sender: str) -> str:
        # Asked on every call, never cached: a cache keyed by unique names only grows, and a
        # unique name's owner is the bus' to vouch for at the time of the call.
        assert self.bus is not None
        try:
            reply = await self.bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="GetConnectionCredentials",
                signature="s", body=[sender]))
            assert reply is not None
            creds = reply.body[0]
            uid = int(creds["UnixUserID"].value)
        except Exception:
            return f"{sender}(uid=?)"
        pid = creds.get("ProcessID")
        return describe_caller(uid, int(pid.value) if pid is not None else None)

    async def _call(self, declared: Method, msg: Message) -> None:
        assert self.bus is not None
        try:
            caller = await self._caller(msg.sender or "")
            body = await declared.run(self, caller, msg.body)
            reply = Message.new_method_return(msg, declared.returns, body)
        except errors.ZdddError as e:
            reply = Message.new_error(msg, error_name(e), str(e))
        except Exception as e:  # a bug must answer the caller, not leave it hanging
            log.exception("event=internal_error method=%s", msg.member)
            reply = Message.new_error(msg, FAILED, str(e))
        self.bus.send(reply)


def _getter(p: Property):
    def get(self):
        return p.read(self.core.snapshot() if p.of_snapshot else self)

    get.__name__ = get.__qualname__ = p.name  # dbus-fast reads a property by this name
    get.__annotations__ = {"return": p.signature}
    return get


def _declare_properties() -> None:
    """Put every property of PROPERTIES on ManagerInterface as a dbus-fast property (dbus-fast
    finds them on the class)."""
    for p in PROPERTIES:
        setattr(ManagerInterface, p.name, dbus_property(access=PropertyAccess.READ)(_getter(p)))


_declare_properties()


async def serve(core: Steering, bus_spec: str, reload: Callable[[], Awaitable[None]]) -> MessageBus:
    """Connect, export the interface and own the bus name. Raises RuntimeError if the name is
    taken (another zddd runs) or the bus refuses it (policy)."""
    bus = await connect(bus_spec)
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


__all__ = ["serve", "connect", "install_wire_fix", "bus_address", "error_name",
           "describe_caller", "BUS_NAME", "OBJECT_PATH", "INTERFACE", "ERROR_PREFIX", "Message",
           "MessageBus", "MessageType", "Variant", "DBusError"]
