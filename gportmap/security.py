"""Client admission by address, the target allowlist, and TLS contexts.

Everything here is decided from the validated config: networks are parsed once
per rule server, contexts are built once per server (so a renewed certificate
applies when the rule is reloaded), and no check reads from the client.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import struct
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter

import gevent.ssl

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_network(text: str) -> IPNetwork:
    """An IP or CIDR; ValueError says why not. Host bits are allowed (10.1.2.3/8)."""
    return ipaddress.ip_network(text.strip(), strict=False)


#: (IP version, first address, last address) of a network, the addresses as integers.
Span = tuple[int, int, int]

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
#: The dotted quad (decimal, no leading zeros) with an optional prefix length: the
#: spelling of nearly every list entry, and one whose meaning ``ipaddress`` shares
#: exactly. Anything else (netmasks, odd spellings) is left to ``ipaddress``.
_PLAIN_V4 = re.compile(rf"({_OCTET}(?:\.{_OCTET}){{3}})(?:/([0-9]{{1,2}}))?", re.ASCII)
#: Hex groups and colons only (no embedded IPv4, no zone): RFC 4291 text that
#: ``inet_pton`` and ``ipaddress`` read alike; whatever inet_pton refuses goes to
#: ``ipaddress`` (which then accepts or says why not).
_PLAIN_V6 = re.compile(r"([0-9A-Fa-f:]{2,39})(?:/([0-9]{1,3}))?", re.ASCII)
_V6_GROUPS = re.compile(r"[0-9A-Fa-f:]{2,39}", re.ASCII)
_U32 = struct.Struct("!I")
_U64_PAIR = struct.Struct("!QQ")


def network_span(text: str) -> Span:
    """What ``parse_network(text)`` covers, as integers, without building an
    ``ipaddress`` object for the plain spellings (several times faster: 100,000 list
    entries are parsed at every rule start). The same answer, or the same
    ValueError, as ``parse_network`` for every input."""
    text = text.strip()
    found = _plain_span(text)
    if found is not None:
        return found
    network = parse_network(text)
    return network.version, int(network.network_address), int(network.broadcast_address)


def _plain_span(text: str) -> Span | None:
    """The fast path of ``network_span``; None when the text is not plainly spelled
    (or its prefix is too long for its version: ``ipaddress`` words that error)."""
    match = _PLAIN_V4.fullmatch(text)
    if match is not None:
        address, bits = _U32.unpack(socket.inet_aton(match[1]))[0], 32
        version = 4
    else:
        match = _PLAIN_V6.fullmatch(text)
        if match is None:
            return None
        try:
            high, low = _U64_PAIR.unpack(socket.inet_pton(socket.AF_INET6, match[1]))
        except OSError:
            return None
        address, bits = high << 64 | low, 128
        version = 6
    prefix = bits if match[2] is None else int(match[2])
    if prefix > bits:
        return None
    host_mask = (1 << (bits - prefix)) - 1
    first = address & ~host_mask
    return version, first, first | host_mask


@dataclass(frozen=True, slots=True)
class Intervals:
    """Disjoint, sorted, non-adjacent closed intervals of integers: ``covers`` is one
    bisect, O(log n) in the number of intervals, whatever the list it came from."""

    starts: Sequence[int]
    ends: Sequence[int]

    @classmethod
    def merged(cls, spans: Iterable[tuple[int, int]], typecode: str | None = None) -> Intervals:
        """Overlapping, nested and adjacent spans merged into one; with ``typecode``
        the bounds are kept in an ``array`` (4 bytes a bound for IPv4 instead of a
        list's 40), else in tuples (IPv6 bounds do not fit a machine integer)."""
        starts: list[int] = []
        ends: list[int] = []
        for start, end in sorted(spans, key=itemgetter(0)):  # ints compare faster than tuples
            if ends and start <= ends[-1] + 1:
                if end > ends[-1]:
                    ends[-1] = end
                continue
            starts.append(start)
            ends.append(end)
        if typecode is not None:
            return cls(array(typecode, starts), array(typecode, ends))
        return cls(tuple(starts), tuple(ends))

    def covers(self, value: int) -> bool:
        i = bisect_right(self.starts, value) - 1
        return i >= 0 and value <= self.ends[i]

    def __len__(self) -> int:
        return len(self.starts)


#: An ``array`` typecode of at least 32 bits for IPv4 bounds ('I' is 32 bits on
#: every platform CPython supports, 'L' the fallback the C standard guarantees).
_V4_TYPECODE = "I" if array("I").itemsize >= 4 else "L"


@dataclass(frozen=True, slots=True)
class NetworkSet:
    """One allow or deny list, parsed once: per IP version, the networks as merged
    intervals of addresses. ``entries`` counts the list as written (an allow list
    with entries admits only what it covers, even when nothing of one family)."""

    v4: Intervals
    v6: Intervals
    entries: int

    @classmethod
    def parse(cls, texts: Iterable[str]) -> NetworkSet:
        """ValueError for an entry that is not an IP or CIDR (the config check refuses
        those first, so a running rule never sees one)."""
        spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        entries = 0
        for text in texts:
            version, first, last = network_span(text)
            spans[version].append((first, last))
            entries += 1
        return cls(Intervals.merged(spans[4], _V4_TYPECODE), Intervals.merged(spans[6]), entries)

    def covers(self, version: int, value: int) -> bool:
        return (self.v4 if version == 4 else self.v6).covers(value)

    def __bool__(self) -> bool:
        return self.entries > 0


def client_ip(address: object) -> IPAddress | None:
    """The client's IP from a socket address; v4-mapped v6 (``::ffff:1.2.3.4``, what a
    dual-stack ``::`` listener reports for IPv4 clients) is read as the IPv4 address."""
    host = address[0] if isinstance(address, tuple) else address
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_key(address: object) -> tuple[int, int] | None:
    """``client_ip`` as (version, integer), the form a ``NetworkSet`` looks up, read
    without an ``ipaddress`` object for what sockets report: a dotted quad, the
    same behind ``::ffff:`` (a dual-stack listener's IPv4 client), or plain hex
    groups. ``inet_pton`` accepts exactly the dotted quads ``ipaddress`` does and
    reads plain hex groups alike; any other spelling goes through ``client_ip``."""
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str):
        try:
            return 4, _U32.unpack(socket.inet_pton(socket.AF_INET, host.removeprefix("::ffff:")))[0]
        except (OSError, ValueError):  # not a dotted quad; ValueError: a NUL in it
            pass
        if _V6_GROUPS.fullmatch(host) is not None:
            try:
                high, low = _U64_PAIR.unpack(socket.inet_pton(socket.AF_INET6, host))
            except OSError:
                pass
            else:
                if high == 0 and low >> 32 == 0xFFFF:  # v4-mapped in hex: ::ffff:102:304
                    return 4, low & 0xFFFFFFFF
                return 6, high << 64 | low
    ip = client_ip(address)
    return None if ip is None else (ip.version, int(ip))


class Admission:
    """``allow``/``deny`` of a rule: empty allow admits everyone; deny wins.

    Both lists are merged into intervals per IP version when the rule server is
    built, so a check costs two bisects, the same for 10 entries or 100,000: a flood
    of clients against a long deny list never stalls the hub."""

    __slots__ = ("allow", "deny", "open")

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow = NetworkSet.parse(allow)
        self.deny = NetworkSet.parse(deny)
        self.open = not self.allow and not self.deny  # the common case costs nothing

    def admits(self, address: object) -> bool:
        if self.open:
            return True
        key = client_key(address)
        if key is None:
            return False
        if self.deny.covers(*key):
            return False
        return not self.allow or self.allow.covers(*key)


@dataclass(frozen=True)
class TargetAllow:
    """One ``settings.allowTargets`` entry: a network and an inclusive port range."""

    network: IPNetwork
    low: int = 1
    high: int = 65535

    def covers(self, ip: IPAddress, port: int) -> bool:
        return ip.version == self.network.version and ip in self.network and self.low <= port <= self.high


def parse_target_allow(text: str) -> TargetAllow:
    """``CIDR``, ``CIDR:PORT``, ``CIDR:LOW-HIGH``; IPv6 with ports in brackets:
    ``[2001:db8::/32]:443``. ValueError says what is wrong."""
    text = text.strip()
    ports = ""
    if text.startswith("["):
        network, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: write IPv6 with ports as [NETWORK]:PORT-PORT")
        ports = rest[1:]
    elif text.count(":") == 1:
        network, _, ports = text.partition(":")
    else:
        network = text
    try:
        net = parse_network(network)
    except ValueError:
        raise ValueError(f"{text!r}: {network!r} is not an IP network") from None
    if not ports:
        return TargetAllow(net)
    low_text, _, high_text = ports.partition("-")
    high_text = high_text or low_text
    if not (low_text.isdigit() and high_text.isdigit()):
        raise ValueError(f"{text!r}: ports must be PORT or LOW-HIGH")
    low, high = int(low_text), int(high_text)
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{text!r}: ports must be within 1-65535, low before high")
    return TargetAllow(net, low, high)


def server_context(cert_file: str, key_file: str, client_ca_file: str | None) -> ssl.SSLContext:
    """TLS 1.2+ with the ssl module's defaults; with a client CA, certificates are demanded."""
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        context.load_verify_locations(cafile=client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    """For target TLS: the system store (or ``caFile``) and host name checking,
    unless ``verify`` is off."""
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file:
        context.load_verify_locations(cafile=ca_file)
    else:
        context.load_default_certs()
    return context
