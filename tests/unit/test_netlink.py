"""The netlink codec (zddd.kernel.netlink): attributes encoded and decoded, requests numbered,
dumps and errors read from datagrams a test writes itself (a "kernel" on the other end of a
datagram socket pair, so replies the real kernel never sends can be tried: cut short, failing
in the middle), and a few reads the real kernel answers without root."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from zddd.kernel import netlink, rtnetlink

HEADER = struct.Struct("=IHHII")
FAMILY_TYPE = 0x20  # a message type of "the family's" (>= NLMSG_MIN_TYPE)


def message(kind: int, seq: int, payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(HEADER.size + len(payload), kind, flags, seq, 0) + payload + \
        b"\0" * (-len(payload) % 4)


def error(seq: int, err: int, explanation: str | None = None) -> bytes:
    """An NLMSG_ERROR as the kernel sends it to a socket with NETLINK_CAP_ACK and
    NETLINK_EXT_ACK: the error, the request's header alone, the extended-ack TLVs."""
    body = struct.pack("=i", err) + HEADER.pack(16, FAMILY_TYPE, 1, seq, 0)
    flags = netlink.NLM_F_CAPPED
    if explanation is not None:
        body += netlink.attr(netlink.NLMSGERR_ATTR_MSG, explanation.encode() + b"\0")
        flags |= netlink.NLM_F_ACK_TLVS
    return message(netlink.NLMSG_ERROR, seq, body, flags)


@pytest.fixture
def pair():
    """(a netlink.Socket whose "kernel" is the other end, that other end)."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.settimeout(2)  # a codec that waits for a reply never sent fails instead of hanging
    sock = netlink.Socket.__new__(netlink.Socket)
    sock._sock, sock._seq = ours, 0
    yield sock, kernel
    ours.close()
    kernel.close()


def sent(kernel: socket.socket) -> tuple[tuple[int, int, int, int, int], bytes]:
    data = kernel.recv(65536)
    return HEADER.unpack_from(data), data[HEADER.size:]


# ---- attributes ---------------------------------------------------------------------------

def test_attributes_round_trip_padded_and_nested():
    inner = netlink.attr(1, struct.pack("=I", 7)) + netlink.attr(2, b"abc\0")
    encoded = netlink.attr(3, b"x") + netlink.attr(4, inner, nested=True) + netlink.attr(5, b"")
    assert len(encoded) % 4 == 0
    assert netlink.attr(3, b"x") == struct.pack("=HH", 5, 3) + b"x\0\0\0"  # length excludes pad
    found = netlink.attrs(encoded)
    assert set(found) == {3, 4, 5}  # the nested flag is not part of the type
    assert found[3] == b"x" and found[5] == b""
    assert struct.unpack_from("=H", encoded, 10)[0] & netlink.NLA_F_NESTED
    nested = netlink.attrs(found[4])
    assert netlink.u32(nested[1]) == 7 and netlink.string(nested[2]) == "abc"


def test_attribute_values_and_absent_ones():
    assert netlink.be32(struct.pack("!I", 1)) == 1
    assert netlink.u32(None) == netlink.be32(None) == 0 and netlink.string(None) == ""
    # Decoding a range of a larger buffer reads only that range.
    data = b"\xff" * 8 + netlink.attr(1, b"ab") + netlink.attr(2, b"cd")
    assert netlink.attrs(data, 8, 8 + 8) == {1: b"ab"}


def test_an_attribute_longer_than_its_message_is_refused():
    data = struct.pack("=HH", 12, 1) + b"abcd"  # claims 12 bytes, has 8
    with pytest.raises(OSError) as raised:
        netlink.attrs(data)
    assert raised.value.errno == errno.EPROTO
    assert "attribute 1 of 12 bytes" in str(raised.value)


# ---- requests and dumps -------------------------------------------------------------------

def test_a_request_is_numbered_acked_and_returns_what_came_before_the_ack(pair):
    sock, kernel = pair
    kernel_sends = [message(FAMILY_TYPE, 1, b"answer"), error(1, 0)]
    for data in kernel_sends:
        kernel.send(data)
    answers = sock.request(FAMILY_TYPE + 1, b"body")
    (length, kind, flags, seq, _), body = sent(kernel)
    assert (length, kind, seq, body) == (20, FAMILY_TYPE + 1, 1, b"body")
    assert flags == netlink.NLM_F_REQUEST | netlink.NLM_F_ACK
    assert [(kind, data[start:end]) for kind, _, data, start, end in answers] == \
        [(FAMILY_TYPE, b"answer")]
    # The next one gets the next number; a late reply to the first is skipped.
    kernel.send(message(FAMILY_TYPE, 1, b"late") + error(2, 0))
    assert sock.request(FAMILY_TYPE + 1, b"") == []
    assert sent(kernel)[0][3] == 2


def test_a_dump_yields_every_message_across_datagrams_until_done(pair):
    sock, kernel = pair
    kernel.send(message(FAMILY_TYPE, 1, b"one") + message(FAMILY_TYPE, 9, b"stale")
                + message(netlink.NLMSG_NOOP, 1, b""))
    kernel.send(message(FAMILY_TYPE, 1, b"two"))
    kernel.send(message(netlink.NLMSG_DONE, 1, struct.pack("=i", 0)))
    payloads = [data[start:end] for _, _, data, start, end in sock.dump(FAMILY_TYPE, b"q")]
    assert payloads == [b"one", b"two"]
    (_, _, flags, _, _), _ = sent(kernel)
    assert flags == netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP


def test_the_kernels_refusal_is_an_oserror_with_its_errno_and_explanation(pair):
    sock, kernel = pair
    kernel.send(error(1, -errno.ENOENT, "No such table"))
    with pytest.raises(FileNotFoundError) as raised:
        sock.request(FAMILY_TYPE, b"", what="get table zt")
    assert raised.value.errno == errno.ENOENT
    assert str(raised.value.strerror) == ("get table zt: No such file or directory "
                                          "(No such table)")
    kernel.send(error(2, -errno.EPERM))
    with pytest.raises(PermissionError, match=r"netlink dump 32: Operation not permitted$"):
        list(sock.dump(FAMILY_TYPE, b""))


def test_a_dump_that_fails_in_the_middle_raises_after_what_it_gave(pair):
    sock, kernel = pair
    kernel.send(message(FAMILY_TYPE, 1, b"one"))
    kernel.send(message(netlink.NLMSG_DONE, 1, struct.pack("=i", -errno.EINTR)))
    dumped = sock.dump(FAMILY_TYPE, b"", what="list things")
    assert next(dumped)[0] == FAMILY_TYPE
    with pytest.raises(InterruptedError, match="list things"):
        next(dumped)


@pytest.mark.parametrize("reply, says", [
    (message(FAMILY_TYPE, 1, b"abcdefgh")[:-4], "a message of 24 bytes at offset 0 of a 20-byte"),
    (message(FAMILY_TYPE, 1, b"") + b"\0" * 8, "8 bytes left where a message header needs 16"),
    (HEADER.pack(8, FAMILY_TYPE, 0, 1, 0), "a message of 8 bytes"),
    (message(netlink.NLMSG_ERROR, 1, b""), "an error message without its error number"),
], ids=["cut-short", "trailing-bytes", "length-below-header", "error-without-errno"])
def test_a_malformed_reply_is_a_clear_error(pair, reply, says):
    sock, kernel = pair
    kernel.send(reply)
    with pytest.raises(OSError) as raised:
        list(sock.dump(FAMILY_TYPE, b""))
    assert raised.value.errno == errno.EPROTO
    assert "netlink: malformed reply" in str(raised.value) and says in str(raised.value)


def test_a_datagram_longer_than_the_buffer_is_refused(pair, monkeypatch):
    sock, kernel = pair
    monkeypatch.setattr(netlink, "RECV_BUFFER", 64)
    kernel.send(message(FAMILY_TYPE, 1, b"x" * 100))
    with pytest.raises(OSError, match="a datagram longer than the 64 bytes read"):
        list(sock.dump(FAMILY_TYPE, b""))


# ---- the real kernel, no root needed ------------------------------------------------------

def test_the_kernel_lists_loopback():
    lo = [link for link in rtnetlink.links() if link.name == "lo"]
    assert len(lo) == 1 and lo[0].index >= 1 and lo[0].type == 772  # ARPHRD_LOOPBACK


def test_the_kernel_refuses_an_unknown_interface_with_its_errno():
    with netlink.Socket(socket.NETLINK_ROUTE) as sock:
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0x7FFFFFF0, 0, 0)
        with pytest.raises(OSError) as raised:
            sock.request(rtnetlink.RTM_GETLINK, body, what="get link 0x7ffffff0")
        assert raised.value.errno == errno.ENODEV
        assert str(raised.value.strerror).startswith("get link 0x7ffffff0: No such device")
        # The same socket answers the next request.
        every = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0)
        assert list(sock.dump(rtnetlink.RTM_GETLINK, every))
