"""RFC 6455 framing, the parts a byte bridge needs, without per-byte Python loops.

The bridge never assembles whole messages: it forwards each frame's payload in
buffer-sized pieces as it arrives, so a peer announcing a 2 GiB frame costs no
memory (its header alone is rejected against ``maxMessageSize``).

Unmasking is XOR with a 4-byte key that repeats, and Python has no vectorised XOR
on buffers. Two C-speed tricks cover it: for a small piece, one big-integer XOR
(its cost is a few fixed calls); for a large piece, one ``bytes.translate`` per
key byte over the extended slice of every fourth byte, done in place in the
receive buffer (about 3x faster than the big integers at 64 KiB, which pay two
conversions in and one out).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import NamedTuple

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
DATA_OPCODES = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})
CONTROL_OPCODES = frozenset({OP_CLOSE, OP_PING, OP_PONG})

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

#: The largest header: 2 bytes, 8 bytes of extended length, 4 bytes of mask.
MAX_HEADER = 14
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_KNOWN_OPCODES = DATA_OPCODES | CONTROL_OPCODES
_U16, _U64 = struct.Struct("!H"), struct.Struct("!Q")
_HEAD16, _HEAD64 = struct.Struct("!BBH"), struct.Struct("!BBQ")
#: An all-zero key (legal, and what some clients send): XOR with it changes nothing.
_NO_MASK = bytes(4)


class FrameError(Exception):
    """The peer broke the protocol; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Header(NamedTuple):
    """One parsed frame header (a tuple: made once per frame, so it must be cheap)."""

    fin: bool
    opcode: int
    length: int
    mask: bytes | None
    size: int  # bytes the header took


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` answer to a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def parse_header(data: bytes | bytearray | memoryview, pos: int = 0) -> Header | None:
    """Decode a frame header from ``data[pos:]``; None if more bytes are needed.

    Raises FrameError for what no well-behaved peer sends: reserved bits, unknown
    opcodes, fragmented or oversized control frames, a 64-bit length with its top
    bit set. ``pos`` lets the reader parse frame after frame out of one receive
    buffer without slicing it.

    A length in a longer encoding than needed (126 in 16 bits, say) is accepted,
    although RFC 6455 says the minimal form MUST be used. Chromium refuses such
    frames; websockify, gevent-websocket, websocket-client and the ``websockets``
    library take them. A bridge is no safer for refusing them: the length is just
    as exact, and every limit (``maxMessageSize``, 125 bytes for control frames)
    applies to the decoded value. So a lax client that works through websockify
    keeps working here. Frames we send always use the minimal form.
    """
    available = len(data) - pos
    if available < 2:
        return None
    first, second = data[pos], data[pos + 1]
    if first & 0x70:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
    opcode = first & 0x0F
    if opcode not in _KNOWN_OPCODES:
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
    fin = bool(first & 0x80)
    length = second & 0x7F
    size = 2
    if length == 126:
        if available < 4:
            return None
        (length,) = _U16.unpack_from(data, pos + 2)
        size = 4
    elif length == 127:
        if available < 10:
            return None
        (length,) = _U64.unpack_from(data, pos + 2)
        if length >> 63:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "frame length has its top bit set")
        size = 10
    if opcode >= OP_CLOSE and (not fin or length > 125):  # opcodes 0x8.. are the control frames
        raise FrameError(CLOSE_PROTOCOL_ERROR, "control frames must be whole and at most 125 bytes")
    mask = None
    if second & 0x80:
        if available < size + 4:
            return None
        mask = bytes(data[pos + size : pos + size + 4])
        size += 4
    return Header(fin, opcode, length, mask, size)


def encode_header(opcode: int, length: int, mask: bytes | None = None, fin: bool = True) -> bytes:
    """The minimal header for a frame of ``length`` payload bytes."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask is not None else 0
    if length < 126:
        head = bytes((first, mask_bit | length))
    elif length < 1 << 16:
        head = _HEAD16.pack(first, mask_bit | 126, length)
    else:
        head = _HEAD64.pack(first, mask_bit | 127, length)
    return head + mask if mask is not None else head


def _xor_tables() -> list[bytes]:
    """``bytes.translate`` tables, one per key byte: table k maps b to b ^ k."""
    identity = int.from_bytes(bytes(range(256)), "big")
    return [(identity ^ int.from_bytes(bytes((k,)) * 256, "big")).to_bytes(256, "big") for k in range(256)]


#: 64 KiB, built once at import (well under a millisecond).
_XOR_TABLES = _xor_tables()
#: Below this many bytes one big-integer XOR is cheaper than four translate passes
#: (measured on CPython 3.11: they break even around 256 bytes).
_SMALL = 256


def _rotated(mask: bytes, offset: int) -> bytes:
    shift = offset & 3
    return mask[shift:] + mask[:shift] if shift else mask


def _xor_small(view: memoryview, key: bytes) -> None:
    n = len(view)
    pad = key * (n // 4 + 1)
    view[:] = (int.from_bytes(view, "big") ^ int.from_bytes(pad[:n], "big")).to_bytes(n, "big")


def unmask_range(buf: bytearray, start: int, end: int, mask: bytes, offset: int = 0) -> None:
    """XOR ``buf[start:end]`` in place with ``mask``, ``offset`` bytes into the
    frame's payload (payloads arrive in pieces: the key keeps rotating across them).

    Takes the bytearray itself, not a memoryview of it: extended-slice reads and
    writes of a bytearray are C loops, those of a memoryview are not. Masking is
    its own inverse, so this both masks and unmasks.
    """
    n = end - start
    if n <= 0 or mask == _NO_MASK:
        return
    key = _rotated(mask, offset)
    if n < _SMALL:
        with memoryview(buf) as view:
            _xor_small(view[start:end], key)
        return
    tables = _XOR_TABLES
    for phase in range(4):  # every fourth byte shares one key byte
        lane = slice(start + phase, end, 4)
        buf[lane] = buf[lane].translate(tables[key[phase]])


def mask_in_place(view: memoryview, mask: bytes, offset: int = 0) -> None:
    """XOR a writable ``view`` with ``mask``, ``offset`` bytes into the frame's payload.

    The general form for any buffer; the bridge, which knows where its pooled
    bytearray is, calls ``unmask_range`` and so skips the two copies made here for
    large pieces.
    """
    n = len(view)
    if not n or mask == _NO_MASK:
        return
    if n < _SMALL:
        _xor_small(view, _rotated(mask, offset))
        return
    scratch = bytearray(view)
    unmask_range(scratch, 0, n, mask, offset)
    view[:] = scratch


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode("utf-8")[:123]


def parse_close(payload: bytes) -> int:
    """The close code of a close frame's payload (1005, "no status", when absent)."""
    if len(payload) >= 2:
        return struct.unpack_from("!H", payload)[0]
    return 1005
