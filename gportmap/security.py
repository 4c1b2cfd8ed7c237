"""Client admission by address, the target allowlist, and TLS contexts.

Everything here is decided from the validated config: networks are parsed once
per rule server, contexts are built once per server (so a renewed certificate
applies when the rule is reloaded), and no check reads from the client.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

import gevent.ssl

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_network(text: str) -> IPNetwork:
    """An IP or CIDR; ValueError says why not. Host bits are allowed (10.1.2.3/8)."""
    return ipaddress.ip_network(text.strip(), strict=False)


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


class Admission:
    """``allow``/``deny`` of a rule: empty allow admits everyone; deny wins."""

    __slots__ = ("allow", "deny", "open")

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow = tuple(parse_network(n) for n in allow)
        self.deny = tuple(parse_network(n) for n in deny)
        self.open = not self.allow and not self.deny  # the common case costs nothing

    def admits(self, address: object) -> bool:
        if self.open:
            return True
        ip = client_ip(address)
        if ip is None:
            return False
        if any(ip in net for net in self.deny if net.version == ip.version):
            return False
        return not self.allow or any(ip in net for net in self.allow if net.version == ip.version)


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
