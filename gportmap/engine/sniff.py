"""What a client's first bytes say, for ``routes`` (SPEC §13): sans-IO, no socket.

Every function here takes the bytes seen so far and answers with what it can tell
from them, or ``MORE`` when it needs more bytes to tell: the caller (
``gportmap.engine.routes.Sniffer``) asks again when more arrive, and treats
``MORE`` as "no" once it has the last it will get (the client's end of stream,
``SNIFF_CAP`` bytes, or ``sniffTimeout``). Nothing is decrypted or answered: the
TLS ClientHello is read, never terminated.

Bounded by construction: the input is at most ``SNIFF_CAP`` bytes (the caller's
cap), every length field is checked against what is there, and no loop runs
longer than its input.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from gportmap.config.model import RouteMatch, RuleRoute, SniffProtocol

#: The most bytes looked at before deciding: a ClientHello (possibly split over
#: several TLS records and TCP segments) or an HTTP request head larger than this
#: matches no ``sni``/``alpn``/``host`` route. 16 KiB holds the largest
#: ClientHello browsers send today (post-quantum key shares: ~1.8 KiB) many times.
SNIFF_CAP = 16384

#: HTTP/1.x request methods (RFC 9110, 5789) and the HTTP/2 preface's "PRI".
HTTP_METHODS = (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"PRI")


class Verdict(enum.Enum):
    """Whether a route's match holds for the bytes seen."""

    YES = "yes"
    NO = "no"
    MORE = "more"  #: cannot tell yet


@dataclass(frozen=True)
class ClientHello:
    """What routing needs of a TLS ClientHello."""

    sni: str | None
    alpn: tuple[str, ...]


class _More(Exception):
    """The bytes end before the structure does."""


class _Bad(Exception):
    """The bytes are not what they should be: no match."""


class _Reader:
    """Reads big-endian fields off a bytes object, raising ``_More`` at its end."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise _More
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def sub(self, n: int) -> _Reader:
        """A reader of the next ``n`` bytes; a length past the end is malformed
        only once the enclosing structure is known whole (``_Bad`` then)."""
        if self.pos + n > self.end:
            raise _More
        reader = _Reader(self.data, self.pos, self.pos + n)
        self.pos += n
        return reader


def handshake_bytes(data: bytes) -> bytes:
    """The handshake layer's bytes carried by the TLS records at the start of
    ``data`` (a ClientHello may be split over several records), up to the first
    incomplete record or the end of the first handshake message. ``_Bad`` when a
    record before that is not a handshake record."""
    out = bytearray()
    pos = 0
    while pos + 5 <= len(data):
        if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[1:4], "big"):
            break  # the first handshake message is whole: what follows is not its business
        kind, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5], "big")
        if kind != 0x16 or major != 3 or length == 0 or length > 16384 + 2048:
            raise _Bad
        if pos + 5 + length > len(data):
            out += data[pos + 5:]  # what has arrived of it: enough to read the header early
            return bytes(out)
        out += data[pos + 5:pos + 5 + length]
        pos += 5 + length
    return bytes(out)


def parse_client_hello(data: bytes) -> ClientHello | Verdict:
    """The ClientHello at the start of ``data``: ``ClientHello``, ``Verdict.MORE``
    (incomplete), or ``Verdict.NO`` (not TLS, not a ClientHello, malformed)."""
    if not data:
        return Verdict.MORE
    if data[0] != 0x16 or (len(data) > 1 and data[1] != 3):
        return Verdict.NO
    try:
        handshake = _Reader(handshake_bytes(data))
        if handshake.number(1) != 1:  # client_hello
            return Verdict.NO
        length = handshake.number(3)
        if length > SNIFF_CAP:
            return Verdict.NO
        hello = handshake.sub(length)
    except _More:
        return Verdict.MORE
    except _Bad:
        return Verdict.NO
    try:  # the whole message is here: a field past its end is malformed
        return _hello_fields(hello)
    except (_More, _Bad, UnicodeDecodeError):
        return Verdict.NO


def _hello_fields(hello: _Reader) -> ClientHello:
    hello.take(2 + 32)  # legacy_version, random
    hello.take(hello.number(1))  # session id
    hello.take(hello.number(2))  # cipher suites
    hello.take(hello.number(1))  # compression methods
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    if hello.pos == hello.end:
        return ClientHello(None, ())  # no extensions at all
    extensions = hello.sub(hello.number(2))
    while extensions.pos < extensions.end:
        kind = extensions.number(2)
        body = extensions.sub(extensions.number(2))
        if kind == 0:  # server_name
            names = body.sub(body.number(2))
            while names.pos < names.end:
                name_type = names.number(1)
                name = names.take(names.number(2))
                if name_type == 0 and sni is None:
                    sni = name.decode("ascii").lower().rstrip(".")
        elif kind == 16:  # application_layer_protocol_negotiation
            protocols = body.sub(body.number(2))
            found = []
            while protocols.pos < protocols.end:
                found.append(protocols.take(protocols.number(1)).decode("ascii", "replace"))
            alpn = tuple(found)
    return ClientHello(sni, alpn)


def http_host(data: bytes) -> str | Verdict:
    """The Host header of the HTTP/1.x request at the start of ``data``, lower
    case and without its port; ``Verdict.MORE`` until it (or the end of the
    head) has arrived; ``Verdict.NO`` for no HTTP request, or a head without one."""
    protocol = sniff_protocol(SniffProtocol.HTTP, data)
    if protocol is not Verdict.YES:
        return protocol
    head_end = data.find(b"\r\n\r\n")
    head = data if head_end < 0 else data[:head_end + 2]
    lines = head.split(b"\r\n")
    complete = lines[:-1]  # the last piece is a line still arriving (b"" at a line's end)
    for line in complete[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"host":
            host = value.strip().lower()
            if host.startswith(b"["):
                host = host[1:host.find(b"]")] if b"]" in host else host
            else:
                host = host.rpartition(b":")[0] if b":" in host else host
            try:
                return host.decode("ascii").rstrip(".")
            except UnicodeDecodeError:
                return Verdict.NO
    return Verdict.NO if head_end >= 0 else Verdict.MORE


def sniff_protocol(protocol: SniffProtocol, data: bytes) -> Verdict:
    """Whether ``data`` starts as ``protocol`` does."""
    if protocol is SniffProtocol.SSH:
        return _prefix(data, b"SSH-")
    if protocol is SniffProtocol.TLS:
        if len(data) < 3:
            return _prefix(data, b"\x16\x03"[:len(data)]) if data else Verdict.MORE
        return Verdict.YES if data[0] == 0x16 and data[1] == 3 and data[2] <= 4 else Verdict.NO
    if protocol is SniffProtocol.HTTP:
        verdicts = [_prefix(data, method + b" ") for method in HTTP_METHODS]
        if Verdict.YES in verdicts:
            return Verdict.YES
        return Verdict.MORE if Verdict.MORE in verdicts else Verdict.NO
    # SOCKS5: version 5, then the number of methods offered (at least one)
    if not data:
        return Verdict.MORE
    if data[0] != 5:
        return Verdict.NO
    if len(data) < 2:
        return Verdict.MORE
    return Verdict.YES if data[1] >= 1 else Verdict.NO


def _prefix(data: bytes, prefix: bytes) -> Verdict:
    if data.startswith(prefix):
        return Verdict.YES
    if prefix.startswith(data):  # all of data so far agrees
        return Verdict.MORE
    return Verdict.NO


def name_matches(name: str, patterns: Sequence[str]) -> bool:
    """``name`` (lower case) is one of ``patterns``, where ``*.example.com``
    stands for any name ending in ``.example.com`` (not ``example.com`` itself)."""
    for pattern in patterns:
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                return True
        elif name == pattern:
            return True
    return False


class Peek:
    """The bytes seen so far, each parse done at most once per ``decide`` call."""

    __slots__ = ("data", "_hello", "_host")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._hello: ClientHello | Verdict | None = None
        self._host: str | Verdict | None = None

    @property
    def hello(self) -> ClientHello | Verdict:
        if self._hello is None:
            self._hello = parse_client_hello(self.data)
        return self._hello

    @property
    def host(self) -> str | Verdict:
        if self._host is None:
            self._host = http_host(self.data)
        return self._host


def match_verdict(match: RouteMatch, peek: Peek) -> Verdict:
    """Whether every key of ``match`` holds for the bytes seen (``MORE``: can't tell yet)."""
    verdicts = []
    if match.protocol is not None:
        verdicts.append(sniff_protocol(match.protocol, peek.data))
    if match.sni or match.alpn:
        hello = peek.hello
        if isinstance(hello, Verdict):
            verdicts.append(hello)
        else:
            if match.sni:
                verdicts.append(Verdict.YES if hello.sni and name_matches(hello.sni, match.sni) else Verdict.NO)
            if match.alpn:
                verdicts.append(Verdict.YES if set(hello.alpn) & set(match.alpn) else Verdict.NO)
    if match.host:
        host = peek.host
        if isinstance(host, Verdict):
            verdicts.append(host)
        else:
            verdicts.append(Verdict.YES if name_matches(host, match.host) else Verdict.NO)
    if Verdict.NO in verdicts:
        return Verdict.NO
    return Verdict.MORE if Verdict.MORE in verdicts else Verdict.YES


def decide(routes: Sequence[RuleRoute], data: bytes, final: bool, silent: bool = False) -> RuleRoute | Verdict:
    """The route for a client whose first bytes are ``data``: the first route
    (in file order, ``default`` aside) whose match holds while every route before
    it surely does not; ``Verdict.MORE`` while that cannot be told yet. ``final``:
    no more bytes will come (their end, the cap, the deadline), so what cannot be
    told is no match. ``silent``: the client sent nothing in ``sniffTimeout``:
    the first ``"protocol": "ssh"`` route (SSH servers speak first), else the
    default. ``Verdict.NO`` when no route is left (no default)."""
    default = next((route for route in routes if route.default), None)
    if silent and not data:
        ssh = next((r for r in routes if not r.default and r.match.protocol is SniffProtocol.SSH), None)
        return ssh or default or Verdict.NO
    peek = Peek(data)
    for route in routes:
        if route.default:
            continue
        verdict = match_verdict(route.match, peek)
        if verdict is Verdict.MORE and final:
            verdict = Verdict.NO
        if verdict is Verdict.YES:
            return route
        if verdict is Verdict.MORE:
            return Verdict.MORE
    return default or Verdict.NO
