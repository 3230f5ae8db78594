"""Netlink: the one encoder and decoder zddd talks to the kernel's netlink families with
(rtnetlink, nf_tables, sock_diag), without pyroute2. Nothing protocol-specific lives here:
message types, fixed headers and attribute numbers belong to the modules of each family.

What callers may rely on:
- `Socket(protocol)` is one bound netlink socket, closed by `close` or a `with` block. It numbers
  its requests and skips replies to other numbers (left by an earlier request that was
  interrupted), so one socket serves any number of requests, one at a time.
- `request` sends one message with NLM_F_ACK and returns the messages that answered it before
  the kernel's acknowledgement; `dump` sends a dump request and yields each message of the
  answer as it is read, up to NLMSG_DONE.
- The kernel's refusal raises OSError with the kernel's errno (FileNotFoundError for ENOENT
  ...), what was asked in the message and, when the kernel gave one, its own explanation (the
  extended ack). A reply cut short, or an attribute longer than its message, raises OSError
  with errno EPROTO and says so: decoding never reads past what the kernel sent.
- A received message is a `Message`, (type, flags, data, start, end): its payload is
  data[start:end], not copied out of the datagram, so a dump of thousands of sockets costs
  little beyond the kernel's own work; the families' modules unpack their fixed headers in
  place (struct.unpack_from(data, start)) and their attributes with attrs(data, start + the
  header's size, end).
- `attr` encodes one attribute (`nested=True` for one that holds attributes), `attrs` decodes
  a run of them into {type: payload}, the nested and byte-order flags masked off: a nested
  attribute is decoded by calling `attrs` on its payload.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLMSG_MIN_TYPE = 0x10  # types below it are netlink's own control messages, like those above
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # on NLMSG_ERROR: the request left out; TLVs follow
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # an attribute's type without the nested and byte-order flags
NLMSGERR_ATTR_MSG = 1

_SOL_NETLINK = 270
_NETLINK_CAP_ACK, _NETLINK_EXT_ACK = 10, 11

HEADER = struct.Struct("=IHHII")  # struct nlmsghdr: length, type, flags, sequence, port id
_ATTR = struct.Struct("=HH")  # struct nlattr: length, type
_ERROR = struct.Struct("=i")
_U32, _BE32 = struct.Struct("=I"), struct.Struct("!I")

# Large enough for any one datagram the kernel sends: a dump fills at most 32 KiB per message
# batch, and a reply to a single request is smaller still.
RECV_BUFFER = 1 << 16


# One received message: (type, flags, data, start, end), its payload being data[start:end].
# A plain tuple, unpacked by its users: counting 10,000 sockets took about 6 % longer with named
# tuples (measured), and the event loop asks every 150 ms during a drain.
Message = tuple[int, int, bytes, int, int]


def attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = _ATTR.size + len(payload)
    return (_ATTR.pack(length, kind | (NLA_F_NESTED if nested else 0)) + payload
            + b"\0" * (-length % 4))


def attrs(data: bytes, start: int = 0, end: int | None = None) -> dict[int, bytes]:
    """The attributes in data[start:end] by type (a repeated type: the last one). OSError
    (EPROTO) when one claims more bytes than there are."""
    end = len(data) if end is None else end
    found = {}
    while start + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, start)
        if length < _ATTR.size or start + length > end:
            raise _malformed(f"attribute {kind & NLA_TYPE_MASK} of {length} bytes at offset "
                             f"{start} runs past its message's {end}")
        found[kind & NLA_TYPE_MASK] = data[start + _ATTR.size:start + length]
        start += (length + 3) & ~3
    return found


def u32(raw: bytes | None) -> int:
    """A u32 attribute's value in host byte order; 0 when absent."""
    return _U32.unpack_from(raw)[0] if raw else 0


def be32(raw: bytes | None) -> int:
    """A u32 attribute's value in network byte order (nf_tables' own); 0 when absent."""
    return _BE32.unpack_from(raw)[0] if raw else 0


def string(raw: bytes | None) -> str:
    """A string attribute's text, up to its NUL; "" when absent."""
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw else ""


def _malformed(what: str) -> OSError:
    return OSError(errno.EPROTO, f"netlink: malformed reply: {what}")


class Socket:
    """A netlink socket of `protocol` (socket.NETLINK_ROUTE, NETLINK_NETFILTER 12, ...) in the
    calling thread's network namespace."""

    def __init__(self, protocol: int):
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   protocol)
        try:
            self._sock.bind((0, 0))
            # Errors carry the kernel's explanation, and not a copy of the request (4.12+;
            # older kernels just say less).
            for option in (_NETLINK_EXT_ACK, _NETLINK_CAP_ACK):
                try:
                    self._sock.setsockopt(_SOL_NETLINK, option, 1)
                except OSError:
                    pass
        except BaseException:
            self._sock.close()
            raise
        self._seq = 0

    def __enter__(self) -> "Socket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def request(self, msg_type: int, body: bytes, what: str | None = None) -> list[Message]:
        """Send one request with NLM_F_ACK; the messages answering it, once the kernel
        acknowledged it. `what` names the request in errors."""
        seq = self._send(msg_type, NLM_F_REQUEST | NLM_F_ACK, body)
        answers = []
        while True:
            for message in self._receive(seq):
                if message[0] >= NLMSG_MIN_TYPE:
                    answers.append(message)
                elif message[0] == NLMSG_ERROR:
                    self._check(message, what or f"netlink request {msg_type}")
                    return answers

    def dump(self, msg_type: int, body: bytes, what: str | None = None) -> Iterator[Message]:
        """Send a dump request; yield every message of the answer. Errors (at the start or in
        the middle of the dump) raise OSError, naming `what`."""
        seq = self._send(msg_type, NLM_F_REQUEST | NLM_F_DUMP, body)
        while True:
            for message in self._receive(seq):
                if message[0] >= NLMSG_MIN_TYPE:
                    yield message
                elif message[0] in (NLMSG_DONE, NLMSG_ERROR):
                    self._check(message, what or f"netlink dump {msg_type}")
                    return

    def _send(self, msg_type: int, flags: int, body: bytes) -> int:
        self._seq = self._seq % 0xFFFFFFFF + 1
        self._sock.send(HEADER.pack(HEADER.size + len(body), msg_type, flags, self._seq, 0)
                        + body)
        return self._seq

    def _receive(self, seq: int) -> list[Message]:
        """The messages numbered `seq` in the next datagram (a list, not a generator: a dump of
        thousands of sockets pays for one generator, the caller's)."""
        data, _, msg_flags, _ = self._sock.recvmsg(RECV_BUFFER)
        if msg_flags & socket.MSG_TRUNC:
            raise _malformed(f"a datagram longer than the {RECV_BUFFER} bytes read")
        header, header_size = HEADER.unpack_from, HEADER.size
        messages = []
        offset, size = 0, len(data)
        while offset < size:
            if offset + header_size > size:
                raise _malformed(f"{size - offset} bytes left where a message header needs 16")
            length, kind, flags, msg_seq, _ = header(data, offset)
            end = offset + length
            if length < header_size or end > size:
                raise _malformed(f"a message of {length} bytes at offset {offset} of a "
                                 f"{size}-byte datagram")
            if msg_seq == seq:
                messages.append((kind, flags, data, offset + header_size, end))
            offset += (length + 3) & ~3
        return messages

    @staticmethod
    def _check(message: Message, what: str) -> None:
        """Raise the error an NLMSG_ERROR or NLMSG_DONE carries (nothing for 0: an ack, or a
        dump's end)."""
        kind, flags, data, start, end = message
        if end - start < _ERROR.size:
            if kind == NLMSG_DONE:
                return  # some families end a dump with an empty NLMSG_DONE
            raise _malformed(f"{what}: an error message without its error number")
        (error,) = _ERROR.unpack_from(data, start)
        if error >= 0:
            return
        text = f"{what}: {os.strerror(-error)}"
        if flags & NLM_F_ACK_TLVS:
            # After the error number an NLMSG_ERROR repeats the request: its header alone when
            # capped (NETLINK_CAP_ACK), else all of it. The TLVs follow.
            tlvs = start + _ERROR.size
            if kind == NLMSG_ERROR and tlvs + HEADER.size <= end:
                tlvs += HEADER.size if flags & NLM_F_CAPPED else HEADER.unpack_from(data, tlvs)[0]
            try:
                explanation = string(attrs(data, tlvs, end).get(NLMSGERR_ATTR_MSG))
            except OSError:
                explanation = ""
            if explanation:
                text += f" ({explanation})"
        raise OSError(-error, text)
