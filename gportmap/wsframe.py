"""RFC 6455 framing, the parts a byte bridge needs, without per-byte Python loops.

The bridge never assembles whole messages: it forwards each frame's payload in
buffer-sized pieces as it arrives, so a peer announcing a 2 GiB frame costs no
memory (its header alone is rejected against ``maxMessageSize``). Unmasking XORs
whole chunks as big integers, which is about as fast as a C loop for 64 KiB.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass

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


class FrameError(Exception):
    """The peer broke the protocol; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Header:
    fin: bool
    opcode: int
    length: int
    mask: bytes | None
    size: int  # bytes the header took


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` answer to a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def parse_header(data: bytes | bytearray | memoryview) -> Header | None:
    """Decode a frame header from the start of ``data``; None if more bytes are needed.

    Raises FrameError for what no well-behaved peer sends: reserved bits, unknown
    opcodes, fragmented or oversized control frames, non-minimal 64-bit lengths.
    """
    if len(data) < 2:
        return None
    first, second = data[0], data[1]
    if first & 0x70:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
    opcode = first & 0x0F
    if opcode not in DATA_OPCODES and opcode not in CONTROL_OPCODES:
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
    fin = bool(first & 0x80)
    masked = bool(second & 0x80)
    length = second & 0x7F
    size = 2
    if length == 126:
        if len(data) < 4:
            return None
        (length,) = struct.unpack_from("!H", data, 2)
        size = 4
    elif length == 127:
        if len(data) < 10:
            return None
        (length,) = struct.unpack_from("!Q", data, 2)
        if length >> 63:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "frame length has its top bit set")
        size = 10
    if opcode in CONTROL_OPCODES and (not fin or length > 125):
        raise FrameError(CLOSE_PROTOCOL_ERROR, "control frames must be whole and at most 125 bytes")
    mask = None
    if masked:
        if len(data) < size + 4:
            return None
        mask = bytes(data[size : size + 4])
        size += 4
    return Header(fin, opcode, length, mask, size)


def encode_header(opcode: int, length: int, mask: bytes | None = None, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask is not None else 0
    if length < 126:
        head = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, length)
    return head + mask if mask is not None else head


def mask_in_place(view: memoryview, mask: bytes, offset: int = 0) -> None:
    """XOR ``view`` with ``mask``, ``offset`` bytes into the frame's payload
    (payloads arrive in pieces: the mask keeps rotating across them)."""
    n = len(view)
    if not n:
        return
    shift = offset % 4
    rotated = mask[shift:] + mask[:shift]
    key = (rotated * (n // 4 + 1))[:n]
    view[:] = (int.from_bytes(view, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode("utf-8")[:123]


def parse_close(payload: bytes) -> int:
    """The close code of a close frame's payload (1005, "no status", when absent)."""
    if len(payload) >= 2:
        return struct.unpack_from("!H", payload)[0]
    return 1005
