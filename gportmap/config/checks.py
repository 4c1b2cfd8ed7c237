"""The checks a JSON Schema cannot express: host syntax, unique names, overlapping
and self-looping listen addresses, keys that do not apply to a rule's protocol,
networks, settings and the target allowlist. Each returns problems as (JSON path,
message) pairs; the loader sorts, clips and raises them together."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gportmap.config.messages import Problem, choices, show
from gportmap.config.model import LOG_LEVELS, CheckType, Rule
from gportmap.plugins.registry import BUILTIN as BUILTIN_PROTOCOLS
from gportmap.security import network_span, parse_target_allow

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def check_settings(settings: Any) -> list[Problem]:
    """What the schema cannot say: logLevel in any case, ``admin`` as false or an
    object (never true), and the admin listen address."""
    if not isinstance(settings, dict):
        return []
    problems: list[Problem] = []
    level = settings.get("logLevel")
    if isinstance(level, str) and level.upper() not in LOG_LEVELS:
        problem = f"{show(level)} is not a supported log level{choices(level.upper(), LOG_LEVELS)}"
        problems.append((("settings", "logLevel"), problem))
    admin = settings.get("admin")
    if admin is True:
        problems.append(
            (("settings", "admin"), 'true is not allowed: give {"listen": "HOST:PORT"} or false to turn it off')
        )
    elif isinstance(admin, dict) and isinstance(admin.get("listen"), str):
        try:
            parse_listen(admin["listen"])
        except ValueError as exc:
            problems.append((("settings", "admin", "listen"), str(exc)))
    if isinstance(admin, dict) and "token" in admin and "tokenFile" in admin:
        problems.append((("settings", "admin"), "token and tokenFile are both given: keep one of them"))
    return problems


def target_form(item: Any) -> str | None:
    """How a rule names its target: ``"targets"`` (a pool) or ``"targetHost"``
    (with ``targetPort``); None when it gives both forms, neither or half of one."""
    if not isinstance(item, dict):
        return None
    pool = "targets" in item
    host, port = "targetHost" in item, "targetPort" in item
    if pool and not (host or port):
        return "targets"
    if host and port and not pool:
        return "targetHost"
    return None


def check_target_forms(items: Any, invalid: set[int]) -> list[Problem]:
    """SPEC §8: a rule has ``targets`` or ``targetHost``/``targetPort``, never
    both and never neither (the schema cannot say it in words a user reads).
    Every such rule is added to ``invalid``: it is not built."""
    if not isinstance(items, list):
        return []
    problems: list[Problem] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or target_form(item) is not None:
            continue
        invalid.add(index)
        single = [key for key in ("targetHost", "targetPort") if key in item]
        if "targets" in item:
            problems.append(
                (("rules", index), f"give either 'targets' or {' and '.join(repr(k) for k in single)}, not both")
            )
        elif single:
            missing = "targetPort" if single == ["targetHost"] else "targetHost"
            problems.append((("rules", index), f"missing required key {missing!r}"))
        else:
            problems.append((("rules", index), "missing required key 'targetHost' (or a pool: 'targets')"))
    return problems


def target_paths(rule: Rule, item: Any) -> list[tuple[Any, tuple[Any, ...], tuple[Any, ...]]]:
    """(target, path of its host, path of its entry) of every target of ``rule``,
    as the file wrote it (``targets[i]`` or ``targetHost``)."""
    if isinstance(item, dict) and "targets" in item:
        return [
            (target, ("rules", rule.index, "targets", i, "host"), ("rules", rule.index, "targets", i))
            for i, target in enumerate(rule.targets)
        ]
    return [(rule.targets[0], ("rules", rule.index, "targetHost"), ("rules", rule.index))]


def _check_pools(rules: list[Rule], items: list[Any]) -> list[Problem]:
    """Targets of one rule: valid hosts, each (host, port) and name once; the
    health check's keys that fit its type and the rule's protocol."""
    problems: list[Problem] = []
    for rule in rules:
        item = items[rule.index]
        seen: dict[tuple[str, int], int] = {}
        names: dict[str, int] = {}
        for i, (target, host_path, entry_path) in enumerate(target_paths(rule, item)):
            if (problem := host_problem(target.host)) is not None:
                problems.append((host_path, problem))
            earlier = seen.setdefault(target.key, i)
            if earlier != i:
                problems.append((entry_path, f"target {target.address} is already targets[{earlier}]"))
                continue
            earlier = names.setdefault(target.label, i)
            if earlier != i:
                problems.append(
                    ((*entry_path, "name"), f"{show(target.label)} is already the name of targets[{earlier}]")
                )
        if rule.targets and all(target.backup for target in rule.targets):
            problems.append((("rules", rule.index, "targets"), "every target is a backup: at least one must not be"))
        problems += _check_health(rule, item)
    return problems


def _check_health(rule: Rule, item: Any) -> list[Problem]:
    check = rule.health_check
    if check is None:
        return []
    spec = item.get("healthCheck", {})
    where = ("rules", rule.index, "healthCheck")
    problems: list[Problem] = []
    udp = rule.protocol == "udp"
    if udp and check.type in (CheckType.TLS, CheckType.HTTP):
        problems.append(((*where, "type"), f"{check.type.value!r} checks apply only to tcp and websocket rules"))
    if check.type is CheckType.TLS and rule.target_tls is None and item.get("targetTls") in (None, False):
        problems.append(((*where, "type"), "a 'tls' check needs the rule's 'targetTls'"))
    for key, types in (("path", (CheckType.HTTP,)), ("expectStatus", (CheckType.HTTP,)),
                       ("send", (CheckType.SEND_EXPECT,)), ("expect", (CheckType.SEND_EXPECT,))):
        if key in spec and check.type not in types:
            problems.append(((*where, key), f"applies only to {types[0].value!r} checks"))
    if check.type is CheckType.SEND_EXPECT and "expect" not in spec:
        problems.append((where, "a 'send-expect' check needs 'expect' (what the reply must contain)"))
    for i, (low, high) in enumerate(check.expect_status):
        if low > high:
            problems.append(((*where, "expectStatus", i), f"{low}-{high} is not a range (low before high)"))
    if "timeout" in spec and check.timeout > check.interval:
        problems.append(((*where, "timeout"), f"{check.timeout:g} is longer than the interval ({check.interval:g})"))
    return problems


def check_rules(rules: list[Rule], items: list[Any]) -> list[Problem]:
    """What the schema cannot say about rules that passed it."""
    problems: list[Problem] = []
    for rule in rules:
        if not NAME.fullmatch(rule.name):
            problems.append(
                (
                    ("rules", rule.index, "name"),
                    f"{show(rule.name)} is not a valid name ({PATTERN_HINTS['name']})",
                )
            )
        if (problem := host_problem(rule.listen_host)) is not None:
            problems.append((("rules", rule.index, "listenHost"), problem))
        for key, path in (("path", rule.path), ("targetPath", rule.target_path)):
            if not URL_PATH.fullmatch(path) or (key == "path" and ("?" in path or "#" in path)):
                problems.append((("rules", rule.index, key), f"{show(path)} is not {PATTERN_HINTS[key]}"))
    problems += _check_protocol_keys(rules, items)
    problems += _check_pools(rules, items)
    problems += _check_networks(rules)
    problems += _check_names(rules, items)
    problems += _check_listen(
        rule for rule in rules if rule.enabled and host_problem(rule.listen_host) is None
    )
    problems += _check_self_loops(rules, items)
    return problems


def _check_protocol_keys(rules: list[Rule], items: list[Any]) -> list[Problem]:
    """A key set on a rule whose protocol ignores it, e.g. idleTimeout on a udp rule."""
    problems: list[Problem] = []
    for rule in rules:
        for key in items[rule.index]:
            if key not in PROTOCOL_KEYS:
                continue
            protocols, instead = PROTOCOL_KEYS[key]
            # A plugin's protocol serves on a TCP listener and takes tcp rules' keys.
            protocol = rule.protocol if rule.protocol in BUILTIN_PROTOCOLS else "tcp"
            if protocol in protocols:
                if protocol == "tcp" and key in TUNNEL_KEYS and rule.target_protocol != "websocket":
                    if key == "handshakeTimeout" and "tls" in items[rule.index]:
                        continue  # the TLS handshake's deadline
                    needs = '"tls" or "targetProtocol": "websocket"' if key == "handshakeTimeout" else '"targetProtocol": "websocket"'
                    problems.append((("rules", rule.index, key), f"applies to tcp rules only with {needs}"))
                continue
            hint = f" (for {rule.protocol} rules use {instead!r})" if instead else ""
            problems.append(
                (("rules", rule.index, key), f"applies only to {' and '.join(protocols)} rules{hint}")
            )
    return problems


def _check_networks(rules: list[Rule]) -> list[Problem]:
    problems: list[Problem] = []
    for rule in rules:
        for key, networks in (("allow", rule.allow), ("deny", rule.deny)):
            for i, text in enumerate(networks):
                try:
                    network_span(text)  # parse_network's answer, faster for the plain spellings
                except ValueError:
                    problems.append((("rules", rule.index, key, i), f"{show(text)} is not an IP address or CIDR network"))
    return problems


def check_targets(rules: list[Rule], settings: Any, items: list[Any] | None = None) -> list[Problem]:
    """``settings.allowTargets``: every target of every rule, resolved, must be inside
    (``items``, the rules as written, name the path of each)."""
    entries = settings.get("allowTargets") if isinstance(settings, dict) else None
    if not entries or not isinstance(entries, list):
        return []
    problems: list[Problem] = []
    allowed = []
    for i, text in enumerate(entries):
        try:
            allowed.append(parse_target_allow(str(text)))
        except ValueError as exc:
            problems.append((("settings", "allowTargets", i), str(exc)))
    if problems:
        return problems
    for rule in rules:
        for target, host_path, entry_path in target_paths(rule, items[rule.index] if items and rule.index < len(items) else None):
            if host_problem(target.host) is not None:
                continue  # reported already; getaddrinfo would raise UnicodeError on some ("a..b")
            try:
                addresses = {
                    info[4][0].split("%", 1)[0]
                    for info in socket.getaddrinfo(target.host, target.port, proto=socket.IPPROTO_TCP)
                }
            except OSError as exc:
                problems.append((host_path, f"cannot resolve {show(target.host)} to check allowTargets: {exc}"))
                continue
            outside = sorted(
                a for a in addresses if not any(e.covers(ipaddress.ip_address(a), target.port) for e in allowed)
            )
            if outside:
                problems.append(
                    (
                        entry_path,
                        f"rule {show(rule.name)}: target {target.address} ({', '.join(outside)}) is outside settings.allowTargets",
                    )
                )
    return problems


def _check_names(rules: list[Rule], items: list[Any]) -> list[Problem]:
    """Names label stats and logs, so they must be unique, disabled rules and default names included."""
    problems: list[Problem] = []
    first: dict[str, Rule] = {}
    for rule in rules:
        earlier = first.setdefault(rule.name, rule)
        if earlier is rule:
            continue
        whose = "" if "name" in items[earlier.index] else " (as its default name)"
        if "name" in items[rule.index]:
            problems.append(
                (
                    ("rules", rule.index, "name"),
                    f"{show(rule.name)} is already used by rules[{earlier.index}]{whose}",
                )
            )
        else:
            problems.append(
                (
                    ("rules", rule.index),
                    f"the default name {show(rule.name)} is already used by rules[{earlier.index}]{whose}; "
                    'set "name" to tell the rules apart',
                )
            )
    return problems


def _check_listen(enabled: Iterable[Rule]) -> list[Problem]:
    """Two enabled rules whose listening sockets would collide at bind time; each rule
    is reported against the first earlier one it collides with."""
    problems: list[Problem] = []
    by_port: dict[tuple[str, int], _PortListeners] = {}
    for rule in enabled:
        listeners = by_port.setdefault((rule.transport, rule.listen_port), _PortListeners())
        host = _normal_host(rule.listen_host)
        earlier = listeners.first_collision(host)
        listeners.add(rule, host)
        if earlier is None:
            continue
        why = _overlap(earlier.listen_host, rule.listen_host)
        other = f"rules[{earlier.index}] ({show(earlier.name)})"
        if why:
            problem = f"listen address {rule.listen} overlaps {earlier.listen} of {other}: {why}"
        else:
            problem = (
                f"listen address {rule.listen} is already used by {other}; "
                f"two enabled {rule.transport} rules cannot listen on the same address and port"
            )
        problems.append((("rules", rule.index), problem))
    return problems


@dataclass
class _PortListeners:
    """The enabled rules seen so far on one transport and port, indexed by what a later
    host collides with (as ``_overlap`` decides), so that checking a rule costs the same
    however many rules share its port."""

    by_host: dict[Any, Rule] = field(default_factory=dict)  # the first rule per normal host
    first: Rule | None = None  # collides with a later '::'
    first_ipv4: Rule | None = None  # the first on an IPv4 address: collides with a later '0.0.0.0'
    ipv4_wildcard: Rule | None = None  # the first on '0.0.0.0': collides with later IPv4 addresses
    ipv6_wildcard: Rule | None = None  # the first on '::': collides with everything later

    def first_collision(self, host: Any) -> Rule | None:
        """The earliest rule so far that a rule listening on ``host`` collides with."""
        candidates = [self.by_host.get(host), self.ipv6_wildcard]
        if isinstance(host, ipaddress.IPv4Address):
            candidates.append(self.ipv4_wildcard)
            if host.is_unspecified:
                candidates.append(self.first_ipv4)
        elif isinstance(host, ipaddress.IPv6Address) and host.is_unspecified:
            candidates.append(self.first)
        return min((rule for rule in candidates if rule is not None), key=lambda rule: rule.index, default=None)

    def add(self, rule: Rule, host: Any) -> None:
        self.by_host.setdefault(host, rule)
        self.first = self.first or rule
        if isinstance(host, ipaddress.IPv4Address):
            self.first_ipv4 = self.first_ipv4 or rule
            if host.is_unspecified:
                self.ipv4_wildcard = self.ipv4_wildcard or rule
        elif isinstance(host, ipaddress.IPv6Address) and host.is_unspecified:
            self.ipv6_wildcard = self.ipv6_wildcard or rule


def _check_self_loops(rules: list[Rule], items: list[Any]) -> list[Problem]:
    """A rule whose target is its own listening address: each connection it makes to
    the target arrives at its own listener and makes another, until maxConnections (or
    maxSessions, or the open-file limit) is used up. Only literal hosts and the name
    "localhost" are compared: no name is looked up. Plugin protocols are left alone
    (what their target means is theirs to say)."""
    problems: list[Problem] = []
    for rule in rules:
        for target, _, entry_path in target_paths(rule, items[rule.index]):
            if (
                rule.protocol not in BUILTIN_PROTOCOLS
                or target.port != rule.listen_port
                or _target_transport(rule) != rule.transport
                or host_problem(rule.listen_host) is not None  # reported already
                or host_problem(target.host) is not None
                or not _reaches(target.host, rule.listen_host)
            ):
                continue
            what = (
                "every datagram would loop back into it, a new session each time, until maxSessions is used up"
                if rule.transport == "udp"
                else "every connection would loop back into it until maxConnections or the open-file limit is used up"
            )
            problems.append(
                (
                    entry_path,
                    f"forwards to its own listening address (target {target.address}, listening on {rule.listen}): {what}",
                )
            )
    return problems


def _target_transport(rule: Rule) -> str:
    """How a rule reaches its target: a tunnel (``targetProtocol: "websocket"``) over
    TCP, any other rule over its listener's transport."""
    return "tcp" if rule.target_protocol == "websocket" else rule.transport


def _reaches(target_host: str, listen_host: str) -> bool:
    """Whether connecting to ``target_host`` reaches a listener on ``listen_host`` (same
    port and transport), judged from the literals: the same host, or a wildcard
    listener and a target that is this host by a loopback or "any" address or by the
    name "localhost" (``::`` takes IPv4 too, as ``_overlap`` assumes)."""
    target, listen = _unmapped(_normal_host(target_host)), _unmapped(_normal_host(listen_host))
    if target == listen:
        return True
    if not isinstance(listen, (ipaddress.IPv4Address, ipaddress.IPv6Address)) or not listen.is_unspecified:
        return False
    if target == "localhost":
        return True
    if not isinstance(target, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return False
    this_host = target.is_loopback or target.is_unspecified
    return this_host and (isinstance(listen, ipaddress.IPv6Address) or isinstance(target, ipaddress.IPv4Address))


def _unmapped(host: Any) -> Any:
    """``::ffff:127.0.0.1`` as ``127.0.0.1``: the same IPv4 address."""
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        return host.ipv4_mapped
    return host


def _overlap(a: str, b: str) -> str | None:
    """Why listening on hosts ``a`` and ``b`` (same transport and port) collides: "" when they
    are the same address, None when they do not collide."""
    host_a, host_b = _normal_host(a), _normal_host(b)
    if host_a == host_b:
        return ""
    for wildcard, other in ((host_a, host_b), (host_b, host_a)):
        if isinstance(wildcard, ipaddress.IPv6Address) and wildcard.is_unspecified:
            return "'::' listens on every address, IPv4 included"
        if (
            isinstance(wildcard, ipaddress.IPv4Address)
            and wildcard.is_unspecified
            and isinstance(other, ipaddress.IPv4Address)
        ):
            return "'0.0.0.0' listens on every IPv4 address"
    return None


def _normal_host(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return host.lower().removesuffix(".")


def host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IP address literal nor an RFC 1123 host name, or None."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    name = host.removesuffix(".")
    labels = name.split(".")
    # An all-numeric last label would be read as a (malformed) IPv4 address, not a name.
    if len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit():
        return None
    hint = ""
    if "://" in host:
        hint = " (give a host, not a URL)"
    elif host.startswith("[") and host.endswith("]"):
        hint = " (write an IPv6 address without brackets)"
    return f"{show(host)} is not an IP address or host name{hint}"


# The schema's pattern ends in "$", which Python's re (unlike ECMA-262) also matches
# before a trailing newline: names are checked again with fullmatch.
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


URL_PATH = re.compile(r"/[\x21-\x7e]{0,1023}")  # goes into a request line: no CR/LF, no spaces


PATTERN_HINTS = {
    "name": "1 to 64 letters, digits, '_', '.' or '-'",
    "path": "a URL path: '/' then printable ASCII, no spaces, no '?' or '#'",
    "targetPath": "a URL path: '/' then printable ASCII, no spaces",
}


#: Rule keys that mean something for some protocols only: (those protocols, the
#: key that does the job elsewhere). Anywhere else such a key would silently do
#: nothing, so it is an error.
PROTOCOL_KEYS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "maxConnections": (("tcp", "websocket"), "maxSessions"),
    "connectTimeout": (("tcp", "websocket"), None),
    "idleTimeout": (("tcp", "websocket"), "sessionTimeout"),
    "sessionTimeout": (("udp",), "idleTimeout"),
    "maxSessions": (("udp",), "maxConnections"),
    "handshakeTimeout": (("websocket", "tcp"), None),
    "path": (("websocket",), None),
    "origins": (("websocket",), None),
    "maxMessageSize": (("websocket", "tcp"), None),
    "targetProtocol": (("tcp",), None),
    "targetPath": (("tcp",), None),
    "proxyProtocol": (("tcp",), None),
    "tls": (("tcp", "websocket"), None),
    "targetTls": (("tcp", "websocket"), None),
    "retries": (("tcp", "websocket"), None),
}


#: On a tcp rule these mean something only for a tunnel (targetProtocol websocket).
TUNNEL_KEYS = frozenset({"handshakeTimeout", "maxMessageSize", "targetPath"})


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port); ValueError says what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9900)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9900")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    problem = host_problem(host)
    if problem is not None:
        raise ValueError(problem)
    return host, int(port_text)
