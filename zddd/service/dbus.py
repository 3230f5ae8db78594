"""The D-Bus adapter: org.zddd.Steering1 over the core. The only module that imports a bus library.

Each service is an object, /org/zddd/Steering1/service/NAME with interface
org.zddd.Steering1.Service; /org/zddd/Steering1 is their ObjectManager and has the Manager
interface: what is global (Backend, Services, Reload) and, while there is exactly one service,
that service's methods and properties, so a zddd of one service is driven as before services
existed. Every method and property is declared once, in `SERVICE_METHODS`, `METHODS` and the
`*_PROPERTIES` tuples; the introspection data, the signature checks, the property getters and
PropertiesChanged are all made from those declarations. Calls are run by `_dispatch`, a message
handler that runs before dbus-fast's own: it lets a method wait (WaitDrained) without blocking
the loop, and it asks the bus who the caller is, for the log and LastSwitchCaller.
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
from ..api import (BUS_NAME, ERROR_PREFIX, INTERFACE, MAX_SECONDS, OBJECT_MANAGER, OBJECT_PATH,
                   SERVICE_INTERFACE, SERVICE_PATH, service_path)
from ..api import PROPERTIES as PROPERTIES_INTERFACE
from ..core import Observer, Snapshot, Steering
from ..logfmt import quote
from .view import DEFAULT, CoreView

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


# ---- the interfaces, declared once ------------------------------------------------------------
# Two interfaces: org.zddd.Steering1.Service on each service's object, and the Manager on
# /org/zddd/Steering1, which holds what is global (Backend, Services, Reload) and, while zddd
# steers exactly one service, that service's methods and properties too (a zddd of one service
# is driven as before services existed).

@dataclass(frozen=True)
class Property:
    """A read-only property: its D-Bus type, and how it is read. `of_snapshot` properties follow
    the service's snapshot and are announced with PropertiesChanged; the others are read fresh
    on every Get from the object (a ServiceObject, or the Manager for the Manager's own)."""

    name: str
    signature: str
    read: Callable[[Any], Any]
    of_snapshot: bool = True


@dataclass(frozen=True)
class Method:
    """A method: its arguments (name, D-Bus type), its reply type, and what runs it. A
    `per_service` method runs on a service's steering (the Manager's resolves the only one);
    the others on the Manager."""

    name: str
    args: tuple[tuple[str, str], ...]
    returns: str
    run: Callable[[Any, str, list], Awaitable[list]]  # (service or Manager, caller, body)
    per_service: bool = True

    @property
    def signature(self) -> str:
        return "".join(sig for _, sig in self.args)


NOT_SUPPORTED = "org.freedesktop.DBus.Error.NotSupported"
_SWITCH_OPTIONS = {"force": "b", "drain_timeout_usec": "t", "ramp_usec": "t"}
_WEIGHT_OPTIONS = {"force": "b", "ramp_usec": "t"}


def _usec_in_range(value: int, what: str) -> float:
    """µs from the bus as seconds; InvalidArgument over the limit (checked here, before the
    conversion to float can round a value just over it down to it)."""
    if value > MAX_SECONDS * 1_000_000:
        raise errors.InvalidArgument(f"{what} is over {MAX_SECONDS // 3600} h")
    return value / 1e6


def parse_options(options: dict, types: dict[str, str] = _SWITCH_OPTIONS) -> dict:
    """An a{sv} of options → keyword arguments of the core (force, drain_timeout, ramp);
    InvalidArgument on any unknown option or wrong type. `types`: the method's options."""
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        want = types.get(key)
        if want is None:
            raise errors.InvalidArgument(
                f"unknown option {key!r}; valid options: "
                + ", ".join(f"{k} ({t})" for k, t in types.items()))
        if value.signature != want:
            raise errors.InvalidArgument(
                f"option {key!r} must have type {want!r}, not {value.signature!r}")
        if key == "force":
            kwargs["force"] = bool(value.value)
        else:
            kwargs[key.removesuffix("_usec")] = _usec_in_range(value.value, key)
    return kwargs


async def _switch(svc, caller: str, body: list) -> list:
    svc.switch(body[0], caller=caller)
    return []


async def _switch_with_options(svc, caller: str, body: list) -> list:
    target, options = body
    svc.switch(target, caller=caller, **parse_options(options))
    return []


async def _wait_drained(svc, caller: str, body: list) -> list:
    target, timeout_usec = body
    return [await svc.wait_drained(target, _usec_in_range(timeout_usec, "timeout_usec"))]


async def _set_weights(svc, caller: str, body: list) -> list:
    weights, options = body
    kwargs = parse_options(options, _WEIGHT_OPTIONS)
    set_weights = getattr(svc, "set_weights", None)
    if set_weights is None:  # a core before weights (issue #17)
        raise DBusError(NOT_SUPPORTED, "this zddd cannot split a service between targets "
                                       "yet: use Switch")
    set_weights(dict(weights), caller=caller, **kwargs)
    return []


async def _reload(manager: "ManagerInterface", caller: str, body: list) -> list:
    log.info("event=reload_requested caller=%s", quote(caller))
    await manager.reload()
    return []


SERVICE_METHODS = {m.name: m for m in (
    Method("Switch", (("target", "s"),), "", _switch),
    Method("SwitchWithOptions", (("target", "s"), ("options", "a{sv}")), "", _switch_with_options),
    Method("WaitDrained", (("target", "s"), ("timeout_usec", "t")), "b", _wait_drained),
    Method("SetWeights", (("weights", "a{su}"), ("options", "a{sv}")), "", _set_weights),
)}
METHODS = {**SERVICE_METHODS, "Reload": Method("Reload", (), "", _reload, per_service=False)}


def _weights(snap: Snapshot) -> dict[str, int]:
    """Percent of new connections per target (a core before weights: all to the active one)."""
    weights = getattr(snap, "weights", None)
    if weights:
        return dict(weights)
    return {name: 100 if name == snap.active else 0 for name in snap.targets}


SERVICE_PROPERTIES = (
    Property("Name", "s", lambda obj: obj.service, of_snapshot=False),
    Property("ActiveTarget", "s", lambda s: s.active),
    Property("Draining", "s", lambda s: s.draining),
    Property("Targets", "a{sq}", lambda s: s.targets),
    Property("Weights", "a{su}", _weights),
    # A ramp in progress: main's weight from and to, its start (µs since the epoch) and its
    # length (µs); all 0 when none.
    Property("Ramp", "(uutt)", lambda s: list(getattr(s, "ramp", None) or (0, 0, 0, 0))),
    Property("LastSwitchUSec", "t", lambda s: s.last_switch_usec),
    Property("LastSwitchTimestamp", "t", lambda s: s.last_switch_timestamp),
    Property("LastSwitchCaller", "s", lambda s: s.last_switch_caller),
    Property("ListenPort", "q", lambda s: s.listen_port),
    Property("DrainTimeoutUSec", "t", lambda s: int(s.drain_timeout * 1e6)),
    Property("TargetsUp", "a{sb}", lambda s: s.up),
    # Read from the kernel on every Get; it changes too often for PropertiesChanged. A target
    # whose count cannot be read is absent (unknown), so a failed read never fails a GetAll.
    Property("Connections", "a{su}", lambda obj: obj.connections(), of_snapshot=False),
)
# The Manager's own; never changed but by a reload (Services), announced then.
GLOBAL_PROPERTIES = (
    Property("Backend", "s", lambda m: m.view.backend_name(), of_snapshot=False),
    Property("Services", "as", lambda m: list(m.objects), of_snapshot=False),
)
# The Manager's properties of its one service: all of the service's but its name.
SHARED_PROPERTIES = tuple(p for p in SERVICE_PROPERTIES if p.name != "Name")
PROPERTIES = GLOBAL_PROPERTIES + SHARED_PROPERTIES  # the Manager's


def _changes(props, old: Snapshot, new: Snapshot) -> dict:
    return {p.name: p.read(new) for p in props if p.of_snapshot and p.read(new) != p.read(old)}


def _variants(obj, props) -> dict:
    out = {}
    for p in props:
        out[p.name] = Variant(p.signature, getattr(obj, p.name))
    return out


def _introspection(data, methods) -> Any:
    # dbus-fast knows the properties and the signal; the methods, run by `_dispatch`, are
    # added from their declarations.
    # (dbus-fast 1.84 annotates Arg's direction as a list; it takes one ArgDirection)
    inward, outward = intr.ArgDirection.IN, intr.ArgDirection.OUT
    for m in methods.values():
        data.methods.append(intr.Method(
            m.name, [intr.Arg(sig, inward, name)  # type: ignore[arg-type]
                     for name, sig in m.args],
            [intr.Arg(m.returns, outward)] if m.returns else []))  # type: ignore[arg-type]
    return data


class ServiceObject(ServiceInterface):
    """org.zddd.Steering1.Service of one service, at /org/zddd/Steering1/service/NAME."""

    def __init__(self, manager: "ManagerInterface", name: str):
        super().__init__(SERVICE_INTERFACE)
        self.manager = manager
        self.service = name  # (self.name is dbus-fast's: the interface's name)
        self.path = service_path(name)

    def steering(self):
        """The core's steering of this service (looked up by name: a reload may replace it)."""
        try:
            return self.manager.view.services()[self.service]
        except KeyError:
            raise errors.InvalidArgument(f"no service {self.service}") from None

    def snapshot(self) -> Snapshot:
        return self.steering().snapshot()

    def connections(self) -> dict[str, int]:
        try:
            return self.steering().connection_counts()
        except Exception as e:
            log.warning("event=count_failed service=%s error=%s", self.service, quote(str(e)))
            return {}

    def values(self) -> dict:
        return _variants(self, SERVICE_PROPERTIES)

    def introspect(self):
        return _introspection(super().introspect(), SERVICE_METHODS)

    @signal()
    def Switched(self, old: str, new: str, duration_usec: int) -> "sst":
        return [old, new, duration_usec]


class ManagerInterface(ServiceInterface, Observer):
    """org.zddd.Steering1.Manager, the ObjectManager of the services' objects, the observer of
    the core that keeps them and their signals up to date, and the dispatcher of every call."""

    def __init__(self, core: Steering, reload: Callable[[], Awaitable[None]]):
        super().__init__(INTERFACE)
        self.core = core
        self.view = CoreView(core)
        self.reload = reload
        self.bus: MessageBus | None = None
        self.objects: dict[str, ServiceObject] = {
            name: ServiceObject(self, name) for name in self.view.services()}
        core.observers.append(self)

    # ---- the one service -----------------------------------------------------------------

    def several(self) -> str:
        """Why the Manager does not act on one service (several, or none), naming the objects
        to call instead."""
        paths = ", ".join(o.path for o in self.objects.values())
        if not paths:
            return "zddd steers no service"
        return (f"zddd steers {len(self.objects)} services: call {SERVICE_INTERFACE} on their "
                f"objects: {paths}")

    def only(self) -> ServiceObject:
        """The service the Manager acts on; InvalidArgument unless there is exactly one."""
        if len(self.objects) != 1:
            raise errors.InvalidArgument(self.several())
        return next(iter(self.objects.values()))

    def connections(self) -> dict[str, int]:
        return self.only().connections()

    def values(self) -> dict:
        """GetAll: the global properties, and the service's while there is one."""
        props = PROPERTIES if len(self.objects) == 1 else GLOBAL_PROPERTIES
        return _variants(self, props)

    def introspect(self):
        return _introspection(super().introspect(), METHODS)

    @signal()
    def Switched(self, old: str, new: str, duration_usec: int) -> "sst":
        return [old, new, duration_usec]

    # ---- Observer ----

    def state_changed(self, old: Snapshot, new: Snapshot) -> None:
        obj = self.objects.get(getattr(new, "service", DEFAULT))
        if obj is None:
            return
        changes = _changes(SHARED_PROPERTIES, old, new)
        if changes:
            obj.emit_properties_changed(changes)
            if len(self.objects) == 1:
                self.emit_properties_changed(changes)

    def switched(self, *event) -> None:
        # (service, old, new, duration_usec); a core of one service leaves the service out.
        service, old, new, usec = event if len(event) == 4 else (DEFAULT, *event)
        obj = self.objects.get(service)
        if obj is None:
            return
        obj.Switched(old, new, usec)
        if len(self.objects) == 1:
            self.Switched(old, new, usec)

    def services_changed(self, added: list[str], removed: list[str]) -> None:
        """A reload added or removed services: their objects follow, announced by the
        ObjectManager, and so does the Manager's view of the one service."""
        was_single = len(self.objects) == 1
        for name in removed:
            obj = self.objects.pop(name, None)
            if obj is not None and self.bus is not None:
                self.bus.unexport(obj.path, obj)
                self._send_signal("InterfacesRemoved", "oas", [obj.path, [SERVICE_INTERFACE]])
        for name in added:
            if name in self.objects:
                continue
            obj = self.objects[name] = ServiceObject(self, name)
            if self.bus is not None:
                self.bus.export(obj.path, obj)
                self._send_signal("InterfacesAdded", "oa{sa{sv}}",
                                  [obj.path, {SERVICE_INTERFACE: obj.values()}])
        self.objects = dict(sorted(self.objects.items()))
        changed = {"Services": list(self.objects)}
        invalidated: list[str] = []
        if len(self.objects) == 1 and (not was_single or added or removed):
            changed.update({p.name: getattr(self, p.name) for p in SHARED_PROPERTIES
                            if p.of_snapshot})
        elif was_single and len(self.objects) != 1:
            invalidated = [p.name for p in SHARED_PROPERTIES if p.of_snapshot]
        if self.bus is not None:
            self.emit_properties_changed(changed, invalidated)

    def _send_signal(self, member: str, signature: str, body: list) -> None:
        assert self.bus is not None
        self.bus.send(Message.new_signal(OBJECT_PATH, OBJECT_MANAGER, member, signature, body))

    # ---- dispatch ----

    def attach(self, bus: MessageBus) -> None:
        self.bus = bus
        bus.export(OBJECT_PATH, self)
        for obj in self.objects.values():
            bus.export(obj.path, obj)
        bus.add_message_handler(self._dispatch)

    def managed_objects(self, path: str) -> dict:
        """GetManagedObjects on `path`: zddd's objects below it."""
        objects = {OBJECT_PATH: {INTERFACE: self.values()}}
        objects.update({o.path: {SERVICE_INTERFACE: o.values()} for o in self.objects.values()})
        return {p: v for p, v in objects.items() if path == "/" or p.startswith(path + "/")}

    def _dispatch(self, msg: Message):
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        if msg.interface == PROPERTIES_INTERFACE:
            # GetAll of the Manager leaves out the one service's properties while there are
            # several, rather than failing; the rest is dbus-fast's.
            if (msg.member == "GetAll" and msg.signature == "s" and msg.path == OBJECT_PATH
                    and msg.body[0] == INTERFACE):
                return Message.new_method_return(msg, "a{sv}", [self.values()])
            return None
        if msg.interface == OBJECT_MANAGER:
            if msg.member == "GetManagedObjects" and msg.signature == "":
                return Message.new_method_return(msg, "a{oa{sa{sv}}}",
                                                 [self.managed_objects(msg.path or "/")])
            return None
        if msg.path == OBJECT_PATH and msg.interface == INTERFACE:
            declared, target = METHODS.get(msg.member or ""), None
        elif (msg.interface == SERVICE_INTERFACE and msg.path is not None
              and msg.path.startswith(SERVICE_PATH + "/")):
            target = self.objects.get(msg.path[len(SERVICE_PATH) + 1:])
            if target is None:
                return None  # dbus-fast answers: no such object
            declared = SERVICE_METHODS.get(msg.member or "")
        else:
            return None
        if declared is None:
            return None
        if msg.signature != declared.signature:
            return Message.new_error(
                msg, "org.freedesktop.DBus.Error.InvalidArgs",
                f"{msg.member} takes signature {declared.signature!r}, not {msg.signature!r}")
        asyncio.get_running_loop().create_task(self._call(declared, target, msg))
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

    async def _call(self, declared: Method, target: ServiceObject | None, msg: Message) -> None:
        assert self.bus is not None
        try:
            caller = await self._caller(msg.sender or "")
            if not declared.per_service:
                subject: Any = self
            else:
                subject = (target or self.only()).steering()
            body = await declared.run(subject, caller, msg.body)
            reply = Message.new_method_return(msg, declared.returns, body)
        except errors.ZdddError as e:
            reply = Message.new_error(msg, error_name(e), str(e))
        except DBusError as e:
            reply = Message.new_error(msg, e.type, e.text)
        except Exception as e:  # a bug must answer the caller, not leave it hanging
            log.exception("event=internal_error method=%s", msg.member)
            reply = Message.new_error(msg, FAILED, str(e))
        self.bus.send(reply)


def _service_getter(p: Property):
    def get(self):
        return p.read(self.snapshot() if p.of_snapshot else self)

    return _named(get, p)


def _shared_getter(p: Property):
    def get(self):
        try:
            obj = self.only()
        except errors.InvalidArgument as e:
            raise DBusError(error_name(e), str(e)) from None
        return p.read(obj.snapshot() if p.of_snapshot else obj)

    return _named(get, p)


def _global_getter(p: Property):
    def get(self):
        return p.read(self)

    return _named(get, p)


def _named(get, p: Property):
    get.__name__ = get.__qualname__ = p.name  # dbus-fast reads a property by this name
    get.__annotations__ = {"return": p.signature}
    return get


def _declare_properties() -> None:
    """Put every declared property on its class as a dbus-fast property (dbus-fast finds them
    on the class)."""
    for cls, props, getter in ((ServiceObject, SERVICE_PROPERTIES, _service_getter),
                               (ManagerInterface, GLOBAL_PROPERTIES, _global_getter),
                               (ManagerInterface, SHARED_PROPERTIES, _shared_getter)):
        for p in props:
            setattr(cls, p.name, dbus_property(access=PropertyAccess.READ)(getter(p)))


_declare_properties()


class _Bus(MessageBus):
    """dbus-fast's bus, without its own ObjectManager signals: it sends them from the exported
    object's path, where no ObjectManager client listens; the Manager sends them from its own."""

    def _emit_interface_added(self, path, interface) -> None:
        pass

    def _emit_interface_removed(self, path, removed_interfaces) -> None:
        pass


async def serve(core: Steering, bus_spec: str, reload: Callable[[], Awaitable[None]]) -> MessageBus:
    """Connect, export the Manager and the services' objects, and own the bus name. Raises
    RuntimeError if the name is taken (another zddd runs) or the bus refuses it (policy)."""
    bus = await _Bus(**bus_address(bus_spec)).connect()
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
           "describe_caller", "BUS_NAME", "OBJECT_PATH", "INTERFACE", "SERVICE_INTERFACE",
           "ERROR_PREFIX", "Message", "MessageBus", "MessageType", "Variant", "DBusError"]
