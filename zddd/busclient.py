"""A small blocking D-Bus client: what zddctl needs of the wire protocol, and nothing more.

zddctl asks one or two questions and exits; the asyncio D-Bus libraries cost it 50-90 ms of
imports before the first byte is sent (SPEC goal: `zddctl status` within 50 ms). This speaks the
protocol itself with the standard library: a unix socket, EXTERNAL authentication, `Hello`, and
method calls whose replies are read in order, signals skipped. Strings are measured in UTF-8
bytes, so the dbus-fast 1.84 length bug (zddd/service/dbus.py) does not arise here.

Values: basic types are Python values; arrays are lists, dicts (a{..}) are dicts, structs are
lists; a variant is written from a (signature, value) pair and read as its bare value.
"""

from __future__ import annotations

import os
import socket
import struct

SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
METHOD_CALL, METHOD_RETURN, ERROR = 1, 2, 3
# Header field codes (D-Bus specification, "Message Format").
PATH, INTERFACE, MEMBER, ERROR_NAME, REPLY_SERIAL, DESTINATION, SIGNATURE = 1, 2, 3, 4, 5, 6, 8
# A message may be at most 128 MiB; more is a broken peer, not a reply.
MAX_MESSAGE = 1 << 27

# type code -> (struct format, size = alignment)
_FIXED = {"y": ("B", 1), "b": ("I", 4), "n": ("h", 2), "q": ("H", 2), "i": ("i", 4),
          "u": ("I", 4), "x": ("q", 8), "t": ("Q", 8), "d": ("d", 8), "h": ("I", 4)}


class BusError(Exception):
    """An error reply: `name` is the D-Bus error name, `text` its message."""

    def __init__(self, name: str, text: str):
        super().__init__(f"{name}: {text}")
        self.name, self.text = name, text


class ConnectError(Exception):
    """The bus cannot be reached or refused us; the message says why."""


def split_types(signature: str) -> list[str]:
    """A signature as its complete types: "sa{sv}" -> ["s", "a{sv}"]."""
    types, i = [], 0
    while i < len(signature):
        end = _type_end(signature, i)
        types.append(signature[i:end])
        i = end
    return types


def _type_end(sig: str, i: int) -> int:
    if i >= len(sig):
        raise ValueError(f"incomplete signature {sig!r}")
    code = sig[i]
    if code == "a":
        return _type_end(sig, i + 1)
    if code in "({":
        close = ")" if code == "(" else "}"
        i += 1
        while i < len(sig) and sig[i] != close:
            i = _type_end(sig, i)
        if i >= len(sig):
            raise ValueError(f"unclosed {code!r} in signature {sig!r}")
        return i + 1
    if code not in _FIXED and code not in "sogv":
        raise ValueError(f"unknown type {code!r} in signature {sig!r}")
    return i + 1


def _alignment(code: str) -> int:
    if code in _FIXED:
        return _FIXED[code][1]
    return {"s": 4, "o": 4, "a": 4, "g": 1, "v": 1}.get(code, 8)  # ( and { : 8


def _members(container: str) -> list[str]:
    """The member types of a struct "(...)" or dict entry "{...}"."""
    return split_types(container[1:-1])


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def pad(self, n: int) -> None:
        self.buf += bytes(-len(self.buf) % n)

    def write(self, t: str, value) -> None:
        code = t[0]
        self.pad(_alignment(code))
        if code in _FIXED:
            self.buf += struct.pack("<" + _FIXED[code][0], value)
        elif code in "so":
            # A string that is not valid UTF-8 (a lone surrogate from argv) would make the bus
            # drop the connection: it goes as replacement characters instead.
            data = value.encode("utf-8", "replace")
            self.buf += struct.pack("<I", len(data)) + data + b"\0"
        elif code == "g":
            data = value.encode()
            self.buf += bytes([len(data)]) + data + b"\0"
        elif code == "v":
            signature, inner = value
            self.write("g", signature)
            self.write(signature, inner)
        elif code in "({":
            for member, item in zip(_members(t), value, strict=True):
                self.write(member, item)
        else:  # "a"
            element = t[1:]
            self.buf += bytes(4)
            length_at = len(self.buf) - 4
            self.pad(_alignment(element[0]))
            start = len(self.buf)
            for item in (value.items() if element[0] == "{" else value):
                self.write(element, item)
            struct.pack_into("<I", self.buf, length_at, len(self.buf) - start)


class _Reader:
    def __init__(self, data: bytes, pos: int, byteorder: str):
        self.data, self.pos, self.order = data, pos, byteorder

    def _unpack(self, fmt: str, size: int):
        value = struct.unpack_from(self.order + fmt, self.data, self.pos)[0]
        self.pos += size
        return value

    def read(self, t: str):
        code = t[0]
        self.pos += -self.pos % _alignment(code)
        if code in _FIXED:
            value = self._unpack(*_FIXED[code])
            return bool(value) if code == "b" else value
        if code in "sog":
            n = self._unpack("I", 4) if code != "g" else self._unpack("B", 1)
            text = self.data[self.pos:self.pos + n].decode("utf-8", "replace")
            self.pos += n + 1
            return text
        if code == "v":
            return self.read(self.read("g"))
        if code in "({":
            items = [self.read(member) for member in _members(t)]
            return tuple(items) if code == "{" else items
        element = t[1:]  # "a"
        n = self._unpack("I", 4)
        self.pos += -self.pos % _alignment(element[0])
        end = self.pos + n
        items = []
        while self.pos < end:
            items.append(self.read(element))
        return dict(items) if element[0] == "{" else items


def _unescape(value: str) -> bytes:
    """A D-Bus address value with its %XX escapes decoded (urllib.parse would cost zddctl
    milliseconds of imports for this)."""
    parts = value.split("%")
    out = bytearray(parts[0].encode())
    for part in parts[1:]:
        out += bytes.fromhex(part[:2]) + part[2:].encode()
    return bytes(out)


def _socket_address(address: str) -> str | bytes:
    """The first unix: entry of a D-Bus address ("unix:path=..." or "unix:abstract=...")."""
    for entry in address.split(";"):
        transport, _, params = entry.partition(":")
        if transport != "unix":
            continue
        keys = dict(p.partition("=")[::2] for p in params.split(",") if p)
        if "path" in keys:
            return _unescape(keys["path"]).decode("utf-8", "surrogateescape")
        if "abstract" in keys:
            return b"\0" + _unescape(keys["abstract"])
    raise ConnectError(f"{address!r} has no unix:path= or unix:abstract= address "
                       "(zddctl speaks to a bus over a unix socket)")


def resolve(spec: str) -> str:
    """The bus address meant by --bus system|session|ADDRESS."""
    if spec == "system":
        return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS
    if spec == "session":
        address = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
        if not address:
            raise ConnectError("DBUS_SESSION_BUS_ADDRESS is not set")
        return address
    return spec


class Connection:
    """One authenticated connection to a bus; `call` blocks until the reply."""

    def __init__(self, spec: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._buf = b""
        self._serial = 0
        try:
            self.sock.connect(_socket_address(resolve(spec)))
            self._authenticate()
            self.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                      "Hello")
        except (OSError, ValueError) as e:  # ValueError: a NUL in a path, a bad %XX escape
            self.close()
            raise ConnectError(e.strerror if isinstance(e, OSError) and e.strerror
                               else str(e)) from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def _authenticate(self) -> None:
        uid = str(os.geteuid()).encode().hex()
        self.sock.sendall(b"\0AUTH EXTERNAL " + uid.encode() + b"\r\n")
        line = self._line()
        if not line.startswith(b"OK "):
            raise ConnectError(f"the bus refused authentication: {line.decode('latin-1')!r}")
        self.sock.sendall(b"BEGIN\r\n")

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            self._fill(len(self._buf) + 1)
            if len(self._buf) > 4096:
                raise ConnectError("not a D-Bus server (no authentication reply)")
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def _fill(self, size: int) -> None:
        while len(self._buf) < size:
            chunk = self.sock.recv(max(65536, size - len(self._buf)))
            if not chunk:
                raise ConnectionResetError(0, "the bus closed the connection")
            self._buf += chunk

    def _take(self, size: int) -> bytes:
        self._fill(size)
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def _receive(self) -> tuple[int, dict, bytes, int]:
        """One message: (type, header fields, whole message, offset of the body)."""
        fixed = self._take(16)
        order = {ord("l"): "<", ord("B"): ">"}.get(fixed[0])
        if order is None:
            raise ConnectionResetError(0, "the bus sent a message that is not D-Bus")
        body_len, _serial, fields_len = struct.unpack_from(order + "III", fixed, 4)
        body_at = 16 + fields_len + (-(16 + fields_len) % 8)
        if body_at + body_len > MAX_MESSAGE:
            raise ConnectionResetError(0, "the bus sent an over-long message")
        data = fixed + self._take(body_at - 16 + body_len)
        fields = dict(_Reader(data, 12, order).read("a(yv)"))
        return fixed[1], fields, data, body_at

    def call(self, destination: str, path: str, interface: str, member: str,
             signature: str = "", body: list | tuple = ()) -> list:
        """Call a method and return the reply's body; an error reply raises BusError."""
        self._serial += 1
        serial = self._serial
        fields = [(PATH, ("o", path)), (INTERFACE, ("s", interface)), (MEMBER, ("s", member)),
                  (DESTINATION, ("s", destination))]
        if signature:
            fields.append((SIGNATURE, ("g", signature)))
        payload = _Writer()
        for t, value in zip(split_types(signature), body, strict=True):
            payload.write(t, value)
        header = _Writer()
        header.buf += b"l" + bytes([METHOD_CALL, 0, 1])
        header.buf += struct.pack("<II", len(payload.buf), serial)
        header.write("a(yv)", fields)
        header.pad(8)
        try:
            self.sock.sendall(bytes(header.buf + payload.buf))
            while True:
                kind, got, data, body_at = self._receive()
                if kind in (METHOD_RETURN, ERROR) and got.get(REPLY_SERIAL) == serial:
                    break
            order = "<" if data[0] == ord("l") else ">"
            reader = _Reader(data, body_at, order)
            values = [reader.read(t) for t in split_types(got.get(SIGNATURE, ""))]
        except OSError as e:
            raise ConnectError(f"lost the bus connection: {e.strerror or e}") from None
        except (ValueError, struct.error, IndexError, RecursionError) as e:
            raise ConnectError(f"malformed reply from the bus: {e}") from None
        if kind == ERROR:
            name = got.get(ERROR_NAME, "org.freedesktop.DBus.Error.Failed")
            raise BusError(name, values[0] if values and isinstance(values[0], str) else name)
        return values
