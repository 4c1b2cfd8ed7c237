"""The PROXY protocol header a tcp rule with ``proxyProtocol`` sends to its target
first (SPEC §3), so that the target learns the client's address instead of
gportmap's.

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
import struct

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
