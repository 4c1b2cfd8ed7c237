"""The checks a JSON Schema cannot express: host syntax, unique names, overlapping
and self-looping listen addresses, keys that do not apply to a rule's protocol,
networks, settings and the target allowlist. Each returns problems as (JSON path,
message) pairs; the loader sorts, clips and raises them together."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Any

from gportmap.config import faults
from gportmap.config.messages import Problem, choices, show
from gportmap.config.model import LOG_LEVELS, CheckType, PortRange, Rule
from gportmap.config.overlap import collision_problem, collisions
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
    toxiproxy = settings.get("toxiproxy")
    if toxiproxy is True:
        problems.append(
            (("settings", "toxiproxy"), 'true is not allowed: give {"listen": "HOST:PORT"}, or false for off')
        )
    if isinstance(toxiproxy, dict) and isinstance(toxiproxy.get("listen"), str):
        try:
            parse_listen(toxiproxy["listen"])
        except ValueError as exc:
            problems.append((("settings", "toxiproxy", "listen"), str(exc)))
    return problems


def target_form(item: Any) -> str | None:
    """How a rule names its target: ``"targets"`` (a pool) or ``"targetHost"``
    (with ``targetPort``); None when it gives both forms, neither or half of one."""
    if not isinstance(item, dict):
        return None
    pool = "targets" in item
    host, port = "targetHost" in item, "targetPort" in item
    if "routes" in item:  # SPEC §13: the routes name the targets, each route its own
        if pool or host or port or not isinstance(item["routes"], list):
            return None
        return "routes" if all(_route_target_form(route) for route in item["routes"]) else None
    if pool and not (host or port):
        return "targets"
    if host and port and not pool:
        return "targetHost"
    return None


def _route_target_form(route: Any) -> bool:
    """A route names its targets one way: ``targets``, or ``targetHost`` and ``targetPort``."""
    if not isinstance(route, dict):
        return False
    pool, host, port = "targets" in route, "targetHost" in route, "targetPort" in route
    return (pool and not host and not port) or (host and port and not pool)


def _route_form_problems(index: int, item: dict[str, Any]) -> list[Problem]:
    """Why a rule with ``routes`` is not built: a target of its own too, or a
    route without exactly one way of naming its targets."""
    own = [key for key in ("targets", "targetHost", "targetPort") if key in item]
    if own:
        keys = " and ".join(repr(key) for key in own)
        return [(("rules", index), f"give either 'routes' or {keys}, not both (each route names its own targets)")]
    problems: list[Problem] = []
    for j, route in enumerate(item["routes"] if isinstance(item["routes"], list) else ()):
        if isinstance(route, dict) and not _route_target_form(route):
            if "targets" in route:
                problem = "give either 'targets' or 'targetHost' and 'targetPort', not both"
            elif "targetHost" in route or "targetPort" in route:
                problem = f"missing required key {'targetPort' if 'targetHost' in route else 'targetHost'!r}"
            else:
                problem = "a route needs a target: 'targetHost' and 'targetPort', or 'targets'"
            problems.append((("rules", index, "routes", j), problem))
    return problems


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
        if "routes" in item:
            problems += _route_form_problems(index, item)
            continue
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
    as the file wrote it (``targets[i]``, ``targetHost``, or a route's)."""
    if isinstance(item, dict) and isinstance(item.get("routes"), list) and rule.routes:
        paths = []
        for j, (route, entry) in enumerate(zip(rule.routes, item["routes"], strict=True)):
            base = ("rules", rule.index, "routes", j)
            if "targets" in entry:
                paths += [(t, (*base, "targets", i, "host"), (*base, "targets", i)) for i, t in enumerate(route.targets)]
            else:
                paths += [(route.targets[0], (*base, "targetHost"), base)]
        return paths
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
        paths = target_paths(rule, item)
        for i, (target, host_path, entry_path) in enumerate(paths):
            if (problem := host_problem(target.host)) is not None:
                problems.append((host_path, problem))
            earlier = seen.setdefault(target.key, i)
            if earlier != i:
                where = f"targets[{earlier}]"
                if rule.routes:  # a route's pool is its own: a target belongs to one route
                    where = f"a target of routes[{paths[earlier][2][3]}]"
                problems.append((entry_path, f"target {target.address} is already {where}"))
                continue
            earlier = names.setdefault(target.label, i)
            if earlier != i:
                problems.append(
                    ((*entry_path, "name"), f"{show(target.label)} is already the name of targets[{earlier}]")
                )
        if rule.targets and all(target.backup for target in rule.targets):
            problems.append((("rules", rule.index, "targets"), "every target is a backup: at least one must not be"))
        problems += _check_health(rule, item)
        problems += _check_routes(rule, item)
    return problems


def _check_routes(rule: Rule, item: Any) -> list[Problem]:
    """``routes`` (SPEC §13): names once, one default at most, a match on every
    other route, valid names to match, and what cannot go with peeking."""
    if not rule.routes:
        if "sniffTimeout" in item:
            return [(("rules", rule.index, "sniffTimeout"), "applies only to rules with 'routes'")]
        return []
    problems: list[Problem] = []
    base = ("rules", rule.index)
    for key, why in (
        ("tls", "routes peek at the client's own TLS handshake, so it cannot end here"),
        ("targetTls", "the routes pass each client's bytes on as they came"),
        ("targetProtocol", "a tunnel is not routed"),
    ):
        if key in item and (key != "targetProtocol" or rule.target_protocol != "tcp"):
            problems.append(((*base, key), f"cannot go with 'routes': {why}"))
    names: dict[str, int] = {}
    default: int | None = None
    for j, route in enumerate(rule.routes):
        where = (*base, "routes", j)
        earlier = names.setdefault(route.name, j)
        if earlier != j:
            problems.append(((*where, "name"), f"{show(route.name)} is already the name of routes[{earlier}]"))
        if route.default:
            if default is not None:
                problems.append(((*where, "default"), f"routes[{default}] is the default already: keep one"))
            default = j if default is None else default
            for key in ROUTE_MATCH_KEYS:
                if key in item["routes"][j]:
                    problems.append(((*where, key), "a default route takes every client: it matches on nothing"))
        elif route.match.empty:
            keys = ", ".join(repr(key) for key in ROUTE_MATCH_KEYS)
            problems.append((where, f"a route needs something to match: {keys} (or \"default\": true)"))
        for key, patterns in (("sni", route.match.sni), ("http_host", route.match.host)):
            for k, pattern in enumerate(patterns):
                if (problem := name_pattern_problem(pattern)) is not None:
                    problems.append(((*where, key, k), problem))
    return problems


#: A route's match keys (SPEC §13).
ROUTE_MATCH_KEYS = ("sni", "alpn", "http_host", "protocol")


def name_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot match a server name: a DNS name, or ``*.`` then one."""
    name = pattern[2:] if pattern.startswith("*.") else pattern
    labels = name.split(".")
    if "*" in name or not all(_LABEL.fullmatch(label) for label in labels) or len(name) > 253:
        return (
            f"{show(pattern)} is not a server name pattern "
            "(a DNS name such as 'a.example.com', or '*.example.com' for any name under it)"
        )
    return None


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
        for host, host_path in _listen_host_paths(rule, items[rule.index]):
            if (problem := host_problem(host)) is not None:
                problems.append((host_path, problem))
        for key, path in (("path", rule.path), ("targetPath", rule.target_path)):
            if not URL_PATH.fullmatch(path) or (key == "path" and ("?" in path or "#" in path)):
                problems.append((("rules", rule.index, key), f"{show(path)} is not {PATTERN_HINTS[key]}"))
    problems += _check_protocol_keys(rules, items)
    problems += _check_pools(rules, items)
    problems += _check_networks(rules)
    problems += _check_edge(rules)
    problems += _check_names(rules, items)
    bad_ports = _check_port_ranges(rules, items, problems)
    problems += _check_listen(
        rule
        for rule in rules
        if rule.enabled
        and rule.index not in bad_ports
        and all(host_problem(host) is None for host in rule.listen_hosts)
    )
    problems += _check_self_loops(rules, items)
    problems += _check_udp_tunnels(rules, items)
    for rule in rules:  # SPEC §12
        problems += faults.problems(items[rule.index].get("faults"), rule.protocol, ("rules", rule.index, "faults"))
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


def _check_edge(rules: list[Rule]) -> list[Problem]:
    """``acceptProxy``'s networks, and the ``perClient`` keys of the rule's protocol
    (SPEC §13): a key another protocol uses would silently do nothing here."""
    problems: list[Problem] = []
    for rule in rules:
        if rule.accept_proxy is not None:
            for i, text in enumerate(rule.accept_proxy.trusted):
                try:
                    network_span(text)
                except ValueError:
                    where = ("rules", rule.index, "acceptProxy", "trusted", i)
                    problems.append((where, f"{show(text)} is not an IP address or CIDR network"))
        limits = rule.per_client
        if limits is None:
            continue
        where = ("rules", rule.index, "perClient")
        if rule.protocol == "udp":
            wrong = {"maxConnections": limits.max_connections, "connectionRate": limits.connection_rate}
            rate, rate_key, instead = limits.packet_rate, "packetRate", "packetRate"
        else:
            wrong = {"packetRate": limits.packet_rate}
            rate, rate_key, instead = limits.connection_rate, "connectionRate", "connectionRate or maxConnections"
        others = "tcp and websocket" if rule.protocol == "udp" else "udp"
        for key, value in wrong.items():
            if value is not None:
                problems.append(((*where, key), f"applies to {others} rules only (use {instead})"))
        if limits.burst is not None and rate is None:
            problems.append(((*where, "burst"), f"is the bucket of {rate_key}: set {rate_key} too"))
        if rule.protocol == "udp" and rate is None and all(value is None for value in wrong.values()):
            problems.append((where, "a udp rule's perClient needs packetRate"))
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


def _listen_host_paths(rule: Rule, item: Any) -> list[tuple[str, tuple[Any, ...]]]:
    """(host, its JSON path) of every listen address of ``rule`` (SPEC §9: a list or one)."""
    if isinstance(item, dict) and isinstance(item.get("listenHost"), list):
        return [(host, ("rules", rule.index, "listenHost", i)) for i, host in enumerate(rule.listen_hosts)]
    return [(rule.listen_host, ("rules", rule.index, "listenHost"))]


def _check_port_ranges(rules: list[Rule], items: list[Any], problems: list[Problem]) -> set[int]:
    """SPEC §9: "A-B" with A <= B, both 1-65535; a "C-D" target range as long as the
    listen range. The index of every rule with such a problem is returned (its
    listeners are not compared with others')."""
    bad: set[int] = set()
    for rule in rules:
        item = items[rule.index]
        ranges: list[tuple[tuple[Any, ...], PortRange]] = []
        if isinstance(item.get("listenPort"), str):
            ranges.append((("rules", rule.index, "listenPort"), PortRange.of(item["listenPort"])))
        for target, _, entry_path in target_paths(rule, item):
            if target.ports is not None and rule.routes:  # a route's connection is not told its listen port
                problems.append(((*entry_path, "port"), f"{show(target.ports.text)}: a route's target takes one port, not a range"))
                bad.add(rule.index)
            elif target.ports is not None:
                port_path = (*entry_path, "port") if "targets" in item else ("rules", rule.index, "targetPort")
                ranges.append((port_path, target.ports))
        for path, ports in ranges:
            for port in (ports.first, ports.last):
                if not 1 <= port <= 65535:
                    problems.append((path, f"{show(ports.text)}: port {port} is not from 1 to 65535"))
                    bad.add(rule.index)
                    break
            else:
                if ports.first > ports.last:
                    problems.append((path, f"{show(ports.text)} is not a range (the first port must not be above the last)"))
                    bad.add(rule.index)
        listen = rule.listen_ports
        assert listen is not None
        for path, ports in ranges[1 if isinstance(item.get("listenPort"), str) else 0:]:
            if rule.index not in bad and len(ports) != len(listen):
                problems.append(
                    (
                        path,
                        f"{show(ports.text)} is {len(ports):,} port{'s' if len(ports) != 1 else ''} but listenPort "
                        f"{listen.text} is {len(listen):,}: a target range must be as long as the listen range "
                        "(or give one port, which every listen port forwards to)",
                    )
                )
                bad.add(rule.index)
    return bad


def _check_listen(enabled: Iterable[Rule]) -> list[Problem]:
    """Two enabled rules whose listening sockets would collide at bind time, on
    intervals (``gportmap.config.overlap``); each rule is reported against the first
    earlier one it collides with, at their first common address."""
    problems: list[Problem] = []
    for collision in collisions(enabled, _normal_host):
        why = _overlap(collision.earlier.host, collision.later.host)
        problems.append(collision_problem(collision, why))
    return problems


#: ``targetProtocol`` values by rule protocol (SPEC §13: UDP rides the tunnel too).
TARGET_PROTOCOLS = {"tcp": ("tcp", "websocket"), "udp": ("udp", "websocket"), "websocket": ("tcp", "udp")}
#: Keys of a udp rule that mean something only on a tunnel entry.
UDP_TUNNEL_KEYS = ("targetPath", "targetTls", "handshakeTimeout", "connectTimeout", "maxMessageSize")


def _check_udp_tunnels(rules: list[Rule], items: list[Any]) -> list[Problem]:
    """``targetProtocol`` fits the rule's protocol; a udp rule's tunnel keys need
    ``"targetProtocol": "websocket"``."""
    problems: list[Problem] = []
    for rule in rules:
        item = items[rule.index]
        allowed = TARGET_PROTOCOLS.get(rule.protocol)
        if allowed is None or not isinstance(item, dict):
            continue
        where = ("rules", rule.index)
        if "targetProtocol" in item and rule.target_protocol not in allowed:
            text = " or ".join(repr(value) for value in allowed)
            problem = f"a {rule.protocol} rule carries {text}, not {rule.target_protocol!r}"
            problems.append(((*where, "targetProtocol"), problem))
            continue
        if rule.protocol == "udp" and rule.target_protocol != "websocket":
            problems += [((*where, key), 'applies to udp rules only with "targetProtocol": "websocket"')
                         for key in UDP_TUNNEL_KEYS if key in item]
    return problems


def _check_self_loops(rules: list[Rule], items: list[Any]) -> list[Problem]:
    """A rule whose target is its own listening address: each connection it makes to
    the target arrives at its own listener and makes another, until maxConnections (or
    maxSessions, or the open-file limit) is used up. Only literal hosts and the name
    "localhost" are compared: no name is looked up. Plugin protocols are left alone
    (what their target means is theirs to say)."""
    problems: list[Problem] = []
    for rule in rules:
        for target, _, entry_path in target_paths(rule, items[rule.index]):
            listen_host = next((host for host in rule.listen_hosts if _reaches(target.host, host)), None)
            if (
                rule.protocol not in BUILTIN_PROTOCOLS
                or not _loops_on_port(rule, target)
                or _target_transport(rule) != rule.transport
                or any(host_problem(host) is not None for host in rule.listen_hosts)  # reported already
                or host_problem(target.host) is not None
                or listen_host is None
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


def _loops_on_port(rule: Rule, target: Any) -> bool:
    """Whether some listen port of ``rule`` forwards to that same port of ``target``:
    a "C-D" target does when C is the first listen port, a single port when it is
    one of the listen ports."""
    ports = rule.listen_ports
    assert ports is not None
    if target.ports is not None:
        return target.port == ports.first
    return target.port in ports


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
    "listenPort": 'a port from 1 to 65535, or a range "A-B"',
    "targetPort": 'a port from 1 to 65535, or a range "C-D"',
    "port": 'a port from 1 to 65535, or a range "C-D"',
    "path": "a URL path: '/' then printable ASCII, no spaces, no '?' or '#'",
    "targetPath": "a URL path: '/' then printable ASCII, no spaces",
}


#: Rule keys that mean something for some protocols only: (those protocols, the
#: key that does the job elsewhere). Anywhere else such a key would silently do
#: nothing, so it is an error.
PROTOCOL_KEYS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "maxConnections": (("tcp", "websocket"), "maxSessions"),
    "connectTimeout": (("tcp", "websocket", "udp"), None),
    "idleTimeout": (("tcp", "websocket"), "sessionTimeout"),
    "sessionTimeout": (("udp",), "idleTimeout"),
    "maxSessions": (("udp",), "maxConnections"),
    "handshakeTimeout": (("websocket", "tcp", "udp"), None),
    "path": (("websocket",), None),
    "origins": (("websocket",), None),
    "maxMessageSize": (("websocket", "tcp", "udp"), None),
    "targetProtocol": (("tcp", "udp", "websocket"), None),
    "targetPath": (("tcp", "udp"), None),
    "proxyProtocol": (("tcp",), None),
    "tls": (("tcp", "websocket"), None),
    "targetTls": (("tcp", "websocket", "udp"), None),
    "retries": (("tcp", "websocket"), None),
    "routes": (("tcp",), None),
    "acceptProxy": (("tcp", "websocket"), None),
    "keepAlive": (("tcp", "websocket"), None),
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
