"""zddctl's own D-Bus wire code (zddd/busclient.py) against dbus-fast's, the library the daemon
speaks with: what one writes the other reads back the same, byte for byte where dbus-fast is
right (ASCII), and strings measured in UTF-8 bytes where dbus-fast 1.84 is not."""

from __future__ import annotations

import io
import struct

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast._private.unmarshaller import Unmarshaller

from zddd import busclient
from zddd.busclient import _Reader, _Writer, split_types

BODIES = [
    ("s", ["main"]),
    ("st", ["backup", 60_000_000]),
    ("sa{sv}", ["off", {"force": Variant("b", True), "drain_timeout_usec": Variant("t", 5)}]),
    ("a{sv}", [{"ActiveTarget": Variant("s", "main"), "ListenPort": Variant("q", 8888),
                "Targets": Variant("a{sq}", {"main": 8080, "backup": 80}),
                "TargetsUp": Variant("a{sb}", {"main": True, "backup": False}),
                "Connections": Variant("a{si}", {"main": 2, "backup": -1}),
                "LastSwitchUSec": Variant("t", 2**63 + 5)}]),
    ("a(yv)", [[[1, Variant("o", "/org/zddd/Steering1")], [8, Variant("g", "sa{sv}")]]]),
    ("ayasxdn", [b"\x01\x02", ["a", "bc"], -(2**40), 1.5, -3]),
]


def _walk(value, variant):
    """A dbus-fast value with each Variant replaced by `variant(it)`, bytes by a list."""
    if isinstance(value, Variant):
        return variant(value)
    if isinstance(value, dict):
        return {k: _walk(v, variant) for k, v in value.items()}
    if isinstance(value, (list, tuple, bytes)):
        return [_walk(v, variant) for v in value]
    return value


def ours(value):
    """A dbus-fast value as busclient writes it: variants as (signature, value) pairs."""
    return _walk(value, lambda v: (v.signature, ours(v.value)))


def bare(value):
    """A dbus-fast value as busclient reads it: variants unwrapped, structs as lists."""
    return _walk(value, lambda v: bare(v.value))


def write(signature: str, body: list) -> bytes:
    w = _Writer()
    for t, v in zip(split_types(signature), body, strict=True):
        w.write(t, ours(v))
    return bytes(w.buf)


def dbus_fast_body(signature: str, body: list) -> bytes:
    wire = Message(path="/a", interface="a.b", member="c", signature=signature,
                   body=body)._marshall(False)
    fields_len = struct.unpack_from("<I", wire, 12)[0]
    return wire[16 + fields_len + (-(16 + fields_len) % 8):]


@pytest.mark.parametrize("signature, body", BODIES, ids=[b[0] for b in BODIES])
def test_written_as_dbus_fast_writes_it(signature, body):
    assert write(signature, body) == dbus_fast_body(signature, body)


@pytest.mark.parametrize("signature, body", BODIES, ids=[b[0] for b in BODIES])
def test_reads_what_dbus_fast_writes(signature, body):
    data = dbus_fast_body(signature, body)
    reader = _Reader(data, 0, "<")
    assert [reader.read(t) for t in split_types(signature)] == bare(body)
    assert reader.pos == len(data)


def test_a_whole_call_is_a_message_dbus_fast_reads():
    sent = []

    class Socket:
        def sendall(self, data):
            sent.append(data)

    conn = busclient.Connection.__new__(busclient.Connection)
    conn.sock, conn._buf, conn._serial = Socket(), b"", 6
    reply = Message.new_method_return(Message(path="/", member="x", serial=7, sender=":1.1"),
                                      "b", [True])
    conn._buf = reply._marshall(False)
    assert conn.call("org.zddd.Steering1", "/org/zddd/Steering1", "org.zddd.Steering1.Manager",
                     "WaitDrained", "st", ["main", 5]) == [True]
    unmarshaller = Unmarshaller(io.BytesIO(sent[0]))
    msg = unmarshaller.unmarshall()
    assert (msg.message_type, msg.serial, msg.destination, msg.path, msg.interface,
            msg.member, msg.signature, msg.body) == (
        MessageType.METHOD_CALL, 7, "org.zddd.Steering1", "/org/zddd/Steering1",
        "org.zddd.Steering1.Manager", "WaitDrained", "st", ["main", 5])


def test_non_ascii_strings_are_measured_in_bytes():
    assert write("s", ["été"]) == struct.pack("<I", 5) + "été".encode() + b"\0"
    # A lone surrogate (an undecodable argv byte) goes as a replacement, never invalid UTF-8.
    data = write("s", ["a\udcff"])
    data[4:-1].decode("utf-8")
    assert _Reader(write("s", ["été"]), 0, "<").read("s") == "été"


def test_big_endian_messages_are_read_too():
    data = struct.pack(">I", 2) + b"ab\0" + bytes(1) + struct.pack(">Q", 7)
    reader = _Reader(data, 0, ">")
    assert (reader.read("s"), reader.read("t")) == ("ab", 7)


@pytest.mark.parametrize("signature", ["a", "(s", "a{s", "z", "a{sv"])
def test_bad_signatures_are_refused(signature):
    with pytest.raises(ValueError):
        split_types(signature)


@pytest.mark.parametrize("address, socket", [
    ("unix:path=/run/dbus/system_bus_socket", "/run/dbus/system_bus_socket"),
    ("unix:path=/tmp/a%20b,guid=1234", "/tmp/a b"),
    ("tcp:host=localhost,port=1;unix:abstract=zddd%2fbus", b"\0zddd/bus"),
])
def test_addresses(address, socket):
    assert busclient._socket_address(address) == socket


@pytest.mark.parametrize("address", ["", "nonsense", "unix:", "tcp:host=h,port=1"])
def test_addresses_without_a_unix_socket_are_refused(address):
    with pytest.raises(busclient.ConnectError):
        busclient._socket_address(address)
