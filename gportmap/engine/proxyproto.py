"""The PROXY protocol header a tcp rule with ``proxyProtocol`` sends to its target
first (SPEC §3), so that the target learns the client's address instead of
gportmap's; and the parser of one a rule with ``acceptProxy`` receives from a
trusted proxy (SPEC §13: ``parse_header``, sans-IO; read from the socket by
``gportmap.engine.proxyaccept``).

The format is HAProxy's "The PROXY protocol, Versions 1 & 2"
(https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt, cited below as
"spec" with its section numbers):

- version 1 (spec 2.1) is one text line,
  ``PROXY TCP4|TCP6 <src ip> <dst ip> <src port> <dst port>\\r\\n``, at most 107
  bytes; ``PROXY UNKNOWN\\r\\n`` when the addresses cannot be expressed;
- version 2 (spec 2.2) is binary: the 12-byte signature, a version/command byte
  (0x21: version 2, PROXY), a family/transport byte (0x11 TCP over IPv4, 0x21 TCP
  over IPv6), the length of the address block (12 or 36) in network order, then
  source address, destination address, source port, destination port. Without
  usable addresses it is the LOCAL command (0x20) with family UNSPEC (0x00) and
  no address block: the receiver then uses the connection's own endpoints, as
  spec 2.2 asks, and HAProxy's ``send-proxy-v2`` does the same.

The source is the client's address (``getpeername`` of the accepted socket), the
destination the address the client connected to (its ``getsockname``). A client
of a dual-stack listener (``"::"``) arriving over IPv4 shows up as an
IPv4-mapped IPv6 address (``::ffff:192.0.2.1``); it is written as the IPv4
address it is (TCP4 / AF_INET), as HAProxy does, so that the target sees the
same client whichever way the rule listens.

Everything here is a pure function of the address tuples: no I/O, and no address
makes it raise (one it cannot express gives UNKNOWN or LOCAL; only a version other
than "v1"/"v2", which the config never lets through, is a ValueError). It runs for
every connection of such a rule; the fuzz tests in ``tests/test_fuzz.py`` hold it
to that.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

#: What ``proxyProtocol`` may be set to.
VERSIONS = ("v1", "v2")

#: The longest version 1 line, CRLF included (spec 2.1): a receiver may read at
#: most this many bytes looking for the end of the line.
V1_MAX_LENGTH = 107

#: The first 12 bytes of every version 2 header (spec 2.2): chosen so that no
#: text protocol and no version 1 line starts with them.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

#: Version 2, and its commands (spec 2.2, the 13th byte).
V2_PROXY = 0x21
V2_LOCAL = 0x20

#: Address family (high nibble) and transport (low nibble), the 14th byte.
V2_TCP4 = 0x11
V2_TCP6 = 0x21
V2_UNSPEC = 0x00

_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
_V2_LOCAL = V2_SIGNATURE + bytes((V2_LOCAL, V2_UNSPEC)) + b"\x00\x00"

Ip = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[Ip, int]


def header(version: str, source: object, destination: object) -> bytes:
    """The header of ``version`` ("v1" or "v2") for a connection from ``source`` to
    ``destination`` (socket address tuples, as ``getpeername``/``getsockname`` of the
    accepted socket return them)."""
    if version == "v1":
        return v1_header(source, destination)
    if version == "v2":
        return v2_header(source, destination)
    raise ValueError(f"unknown PROXY protocol version {version!r} (expected one of: {', '.join(VERSIONS)})")


def v1_header(source: object, destination: object) -> bytes:
    """The version 1 text line (spec 2.1). Both addresses must be of one family;
    otherwise, or when either is not an IP address and port, ``PROXY UNKNOWN``
    (as HAProxy writes for a mixed pair)."""
    src, dst = endpoint(source), endpoint(destination)
    if src is None or dst is None or src[0].version != dst[0].version:
        return _V1_UNKNOWN
    family = "TCP4" if src[0].version == 4 else "TCP6"
    return f"PROXY {family} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode("ascii")


def v2_header(source: object, destination: object) -> bytes:
    """The version 2 binary header (spec 2.2). A mixed IPv4/IPv6 pair is written as
    IPv6 with the IPv4 side mapped (``::ffff:a.b.c.d``), as HAProxy does; without two
    usable addresses, the LOCAL command with family UNSPEC."""
    src, dst = endpoint(source), endpoint(destination)
    if src is None or dst is None:
        return _V2_LOCAL
    src_ip, dst_ip = src[0], dst[0]
    if src_ip.version == dst_ip.version == 4:
        family = V2_TCP4
    else:
        family = V2_TCP6
        src_ip, dst_ip = _as_v6(src_ip), _as_v6(dst_ip)
    addresses = src_ip.packed + dst_ip.packed + struct.pack("!HH", src[1], dst[1])
    return V2_SIGNATURE + struct.pack("!BBH", V2_PROXY, family, len(addresses)) + addresses


def endpoint(address: object) -> Endpoint | None:
    """(IP, port) of a socket address tuple, or None when it is none: an AF_UNIX
    path, an empty tuple, a host that is not an IP literal, a port outside
    0-65535. An IPv6 zone (``fe80::1%eth0``) is dropped (neither version can carry
    it) and an IPv4-mapped IPv6 address becomes the IPv4 address it carries."""
    if not isinstance(address, tuple) or len(address) < 2:
        return None
    host, port = address[0], address[1]
    if not isinstance(host, str) or type(port) is not int or not 0 <= port <= 0xFFFF:
        return None
    try:
        ip: Ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, port


def _as_v6(ip: Ip) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)


# --- receiving: the sans-IO parser of an incoming header (``acceptProxy``) ----------

#: The fixed part of a version 2 header: signature, version/command, family, length.
V2_FIXED = 16
#: The ASCII start of every version 1 line (spec 2.1).
V1_PREFIX = b"PROXY "
#: Address block sizes of the version 2 families (spec 2.2): INET, INET6, UNIX.
_V2_FAMILY_SIZES = {0x1: 12, 0x2: 36, 0x3: 216}
_V2_PORTS = struct.Struct("!HH")


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY protocol header (or one longer than allowed); the
    text says why, for the ``proxy_header`` rejection. The only exception
    ``parse_header`` raises, whatever the input."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A received header: how many bytes it took (what follows is the client's
    data), its version, and the client's and destination's (host, port) as the
    sender saw them. ``source`` is None when the header carries no address to use
    (v1 ``UNKNOWN``, v2 ``LOCAL``, family ``UNSPEC`` or ``UNIX``): spec 2.1/2.2 then
    has the receiver keep the connection's own endpoints."""

    length: int
    version: int
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def parse_header(data: bytes, max_v2_length: int = 4096) -> ProxyHeader | None:
    """The header at the start of ``data``, or None while it is incomplete. Raises
    only ProxyHeaderError. ``max_v2_length`` bounds a version 2 header's address
    and TLV block (its length field); a longer one is refused, not awaited.

    None guarantees that *every* byte of ``data`` belongs to the header: a reader
    may consume them all and ask again with more, and never takes a byte of what
    follows the header. TLVs (spec 2.2.7) are skipped, not checked."""
    data = bytes(data[: max(V1_MAX_LENGTH, V2_FIXED + max_v2_length)])
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data, max_v2_length)
    if data[:1] == V1_PREFIX[:1] or not data:
        return _parse_v1(data)
    raise ProxyHeaderError("the connection does not start with a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[: len(V1_PREFIX)]
    if head != V1_PREFIX[: len(head)]:
        raise ProxyHeaderError("the connection does not start with a PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
        stray = data.find(b"\r")
        if 0 <= stray < len(data) - 1 or b"\n" in data:
            raise ProxyHeaderError("PROXY v1 line not ended by CRLF")
        return None
    line, length = data[:end], end + 2
    if b"\r" in line or b"\n" in line:
        raise ProxyHeaderError("PROXY v1 line not ended by CRLF")
    try:
        words = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return ProxyHeader(length, 1)  # the rest of the line is ignored (spec 2.1)
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1 line is not 'PROXY TCP4|TCP6|UNKNOWN src dst sport dport'")
    family = socket.AF_INET if words[1] == "TCP4" else socket.AF_INET6
    source = (_v1_ip(words[2], family), _v1_port(words[4]))
    destination = (_v1_ip(words[3], family), _v1_port(words[5]))
    return ProxyHeader(length, 1, source, destination)


def _v1_ip(text: str, family: int) -> str:
    """The address in its canonical spelling. ``inet_pton`` reads exactly the
    dotted quads (no leading zeros) and RFC 4291 texts; no zone, no prefix."""
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text))
    except (OSError, ValueError):  # ValueError: a NUL in the text
        kind = "IPv4" if family == socket.AF_INET else "IPv6"
        raise ProxyHeaderError(f"PROXY v1 address {text[:45]!r} is not an {kind} address") from None


def _v1_port(text: str) -> int:
    if not (text.isdigit() and text.isascii() and len(text) <= 5) or (len(text) > 1 and text[0] == "0"):
        raise ProxyHeaderError(f"PROXY v1 port {text[:8]!r} is not a port number")
    port = int(text)
    if port > 0xFFFF:
        raise ProxyHeaderError(f"PROXY v1 port {port} is not a port number")
    return port


def _parse_v2(data: bytes, max_v2_length: int) -> ProxyHeader | None:
    head = data[: len(V2_SIGNATURE)]
    if head != V2_SIGNATURE[: len(head)]:
        raise ProxyHeaderError("the connection does not start with a PROXY protocol header")
    if len(data) < V2_FIXED:
        if len(data) > len(V2_SIGNATURE):
            _v2_command(data[12])
        return None
    command = _v2_command(data[12])
    family, transport = data[13] >> 4, data[13] & 0x0F
    if family > 0x3 or transport > 0x2:
        raise ProxyHeaderError(f"PROXY v2 family/transport byte 0x{data[13]:02x} is not defined")
    size = int.from_bytes(data[14:16], "big")
    if size > max_v2_length:
        raise ProxyHeaderError(f"PROXY v2 header of {V2_FIXED + size} bytes, more than {V2_FIXED + max_v2_length}")
    length = V2_FIXED + size
    if len(data) < length:
        return None
    if command == V2_LOCAL & 0x0F or family in (0x0, 0x3):
        return ProxyHeader(length, 2)  # LOCAL, UNSPEC, UNIX: the connection's own endpoints
    need = _V2_FAMILY_SIZES[family]
    if size < need:
        raise ProxyHeaderError(f"PROXY v2 address block of {size} bytes, less than the {need} of its family")
    block = data[V2_FIXED : V2_FIXED + need]
    half = (need - 4) // 2
    kind = socket.AF_INET if family == 0x1 else socket.AF_INET6
    src, dst = socket.inet_ntop(kind, block[:half]), socket.inet_ntop(kind, block[half : 2 * half])
    sport, dport = _V2_PORTS.unpack(block[2 * half :])
    return ProxyHeader(length, 2, (src, sport), (dst, dport))


def _v2_command(byte: int) -> int:
    if byte >> 4 != 0x2:
        raise ProxyHeaderError(f"PROXY v2 version nibble {byte >> 4} is not 2")
    if byte & 0x0F > 0x1:
        raise ProxyHeaderError(f"PROXY v2 command {byte & 0x0F} is neither LOCAL nor PROXY")
    return byte & 0x0F
