"""Load and validate the rules file (SPEC §3).

The pipeline is: bytes -> JSON (strict: no NaN/Infinity, no duplicate keys) -> JSON
Schema (``gportmap/schema/rules.schema.json``, Draft 2020-12) -> the checks a schema
cannot express (host syntax, unique names, overlapping listen addresses) -> frozen
dataclasses. Nothing downstream ever reads the raw JSON.

Every problem is collected and raised together in one ``ConfigError``, each as
``<file>: <json path>: <problem>`` and in document order, so that a user fixes the
whole file in one pass instead of one error per restart.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import ipaddress
import json
import math
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import jsonschema

from gportmap.errors import ConfigError, PluginError
from gportmap.plugins import PluginSpec
from gportmap.plugins import resolve as resolve_plugin
from gportmap.protocols import BUILTIN as BUILTIN_PROTOCOLS
from gportmap.protocols import registered as registered_protocols
from gportmap.security import client_context, parse_network, parse_target_allow, server_context

JsonPath = tuple[str | int, ...]
Problem = tuple[JsonPath, str]

TOP_LEVEL_PROBLEM = 'the file must be a list of rules or an object with "rules"'
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The words that name a value in "... is not a supported <noun>" messages.
_ENUM_NOUNS = {"protocol": "protocol", "logFormat": "log format", "proxyProtocol": "PROXY protocol version"}
_PATTERN_HINTS = {
    "name": "1 to 64 letters, digits, '_', '.' or '-'",
    "path": "a URL path: '/' then printable ASCII, no spaces, no '?' or '#'",
    "targetPath": "a URL path: '/' then printable ASCII, no spaces",
}
# The schema's pattern ends in "$", which Python's re (unlike ECMA-262) also matches
# before a trailing newline: names are checked again with fullmatch.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_URL_PATH = re.compile(r"/[\x21-\x7e]{0,1023}")  # goes into a request line: no CR/LF, no spaces
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class AdminSettings:
    """``settings.admin``: where the admin HTTP endpoint listens, and its bearer token."""

    host: str = "127.0.0.1"
    port: int = 9900
    token: str | None = None

    @property
    def listen(self) -> str:
        return format_address(self.host, self.port)


@dataclass(frozen=True)
class TlsListen:
    """``tls`` of a rule: absolute file paths, and a digest of their content so that a
    renewed certificate makes the rule differ (and reload) even with the same paths."""

    cert_file: str
    key_file: str
    client_ca_file: str | None
    digest: str


@dataclass(frozen=True)
class TlsTarget:
    """``targetTls`` of a rule; ``server_name`` None means the target host."""

    ca_file: str | None
    server_name: str | None
    verify: bool
    digest: str


@dataclass(frozen=True)
class Settings:
    """The file's ``settings`` object; every key is optional."""

    max_connections: int = 10000
    drain_timeout: float = 30.0
    log_format: str = "text"
    log_level: str = "INFO"
    watch: bool = True
    admin: AdminSettings | None = AdminSettings()  # None: the admin endpoint is off
    stats_interval: float = 60.0  # 0: no periodic stats records
    allow_targets: tuple[str, ...] = ()  # empty: any target
    workers: int | str = 1  # processes sharing the ports; "auto": one per core


@dataclass(frozen=True)
class Rule:
    """One forwarding rule with every default filled in.

    ``index`` (the rule's position in the file) only serves messages: it is left out
    of ``==`` so that a hot reload sees a rule that merely moved as unchanged.
    """

    name: str
    protocol: str
    listen_host: str
    listen_port: int
    target_host: str
    target_port: int
    enabled: bool = True
    max_connections: int = 1000
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    session_timeout: float = 60.0
    max_sessions: int = 1000
    handshake_timeout: float = 10.0
    path: str = "/"  # websocket: the listener's path
    origins: tuple[str, ...] = ()  # websocket: allowed Origin values; empty = any
    max_message_size: int = 1048576  # websocket, and tcp tunnels: largest message
    target_protocol: str = "tcp"  # tcp: "websocket" tunnels each connection over a WebSocket
    target_path: str = "/"  # tcp tunnels: the path asked of the target
    proxy_protocol: str | None = None  # tcp: "v1"/"v2", a PROXY protocol header to the target first
    allow: tuple[str, ...] = ()  # client networks admitted; empty = everyone
    deny: tuple[str, ...] = ()  # client networks refused; wins over allow
    tls: TlsListen | None = None
    target_tls: TlsTarget | None = None
    plugins: tuple[PluginSpec, ...] = ()
    index: int = field(default=0, compare=False)

    @property
    def transport(self) -> str:
        """The socket type the listener binds: websocket rules share TCP ports."""
        return "udp" if self.protocol == "udp" else "tcp"

    @property
    def key(self) -> tuple[str, str, int]:
        """What identifies a rule across reloads (SPEC §4)."""
        return (self.transport, self.listen_host, self.listen_port)

    @property
    def listen(self) -> str:
        return format_address(self.listen_host, self.listen_port)

    @property
    def target(self) -> str:
        return format_address(self.target_host, self.target_port)


@dataclass(frozen=True)
class Config:
    """A validated rules file; ``digest`` lets a watcher skip unchanged content."""

    path: str
    rules: tuple[Rule, ...]
    settings: Settings
    digest: str
    #: The file's bytes as validated: worker processes apply exactly this version.
    raw: bytes = field(default=b"", compare=False, repr=False)

    @property
    def enabled_rules(self) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.enabled)


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets as URLs and logs expect."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate the rules file at ``path``."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError([f"{os.fsdecode(path)}: cannot read: {exc.strerror or exc}"]) from exc
    return parse(data, path)


def parse(data: bytes | str, path: str | os.PathLike[str]) -> Config:
    """Validate the content of a rules file; ``path`` names it in messages and in ``Config.path``."""
    shown = os.fsdecode(path)
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    document = _read_json(data, shown)
    if isinstance(document, list):
        document = {"rules": document}  # the classic form: paths read the same in both
    elif not isinstance(document, dict):
        raise ConfigError([f"{shown}: {TOP_LEVEL_PROBLEM} (found {_kind(document)})"])

    problems = _scan(document)
    schema_problems, invalid_rules = _schema_problems(document)
    problems += schema_problems
    rules = _build_rules(document, invalid_rules)
    problems += _check_rules(rules, document.get("rules", []))
    problems += _check_settings(document.get("settings"))
    rules, tls_problems = _attach_tls(rules, document.get("rules", []), os.path.dirname(os.path.abspath(shown)))
    problems += tls_problems
    rules, plugin_problems = _attach_plugins(rules, document.get("rules", []))
    problems += plugin_problems
    problems += _check_targets(rules, document.get("settings"))
    if problems:
        problems.sort(key=lambda problem: _position(document, problem[0]))
        raise ConfigError([_message(shown, where, what) for where, what in problems])
    return Config(
        path=os.path.abspath(shown),
        rules=tuple(rules),
        settings=_build_settings(document.get("settings", {})),
        digest=hashlib.sha256(raw).hexdigest(),
        raw=raw,
    )


# --- JSON -------------------------------------------------------------------------


class _Object(dict):  # type: ignore[type-arg]
    """A JSON object that remembers the keys it saw more than once (json keeps the last)."""

    duplicates: tuple[str, ...] = ()


@dataclass(frozen=True)
class _BadNumber:
    """Stands in for NaN, Infinity or an out-of-range number so the error can name its path."""

    text: str

    @property
    def problem(self) -> str:
        if self.text in ("NaN", "Infinity", "-Infinity"):
            return f"{self.text} is not allowed (JSON has no NaN or Infinity)"
        return f"{_clip(self.text)} is out of range"


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        counts: dict[str, int] = {}
        for key, _ in pairs:
            counts[key] = counts.get(key, 0) + 1
        obj.duplicates = tuple(key for key, count in counts.items() if count > 1)
    return obj


def _float(text: str) -> float | _BadNumber:
    value = float(text)
    return value if math.isfinite(value) else _BadNumber(text)


def _int(text: str) -> int | _BadNumber:
    try:
        return int(text)
    except ValueError:  # more digits than sys.get_int_max_str_digits() allows
        return _BadNumber(text)


def _read_json(data: bytes | str, shown: str) -> Any:
    """Decode and parse, turning every way a file can be unreadable into a ConfigError."""
    if isinstance(data, str):
        text = data
    else:
        data = bytes(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            column = exc.start - data.rfind(b"\n", 0, exc.start)
            raise ConfigError(
                [
                    f"{shown}: not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, "
                    f"column {column} cannot be decoded (save the file as UTF-8)"
                ]
            ) from None
    text = text.removeprefix("\ufeff")  # a BOM some editors write: harmless, so allowed
    if not text.strip(" \t\r\n"):
        raise ConfigError([f"{shown}: the file is empty"])
    try:
        return json.loads(
            text,
            object_pairs_hook=_object,
            parse_float=_float,
            parse_int=_int,
            parse_constant=_BadNumber,
        )
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [f"{shown}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"]
        ) from None
    except RecursionError:
        raise ConfigError([f"{shown}: invalid JSON: nested too deeply"]) from None


def _scan(document: Any) -> list[Problem]:
    """Report duplicate keys and bad numbers, which the JSON parser meets before it knows their path."""
    problems: list[Problem] = []
    stack: list[tuple[JsonPath, Any]] = [((), document)]
    while stack:  # no recursion: json.loads accepts nesting deeper than Python's stack
        path, value = stack.pop()
        if isinstance(value, _BadNumber):
            problems.append((path, value.problem))
        elif isinstance(value, dict):
            for key in getattr(value, "duplicates", ()):
                problems.append(((*path, key), "duplicate key (a key may appear only once in an object)"))
            stack.extend(((*path, key), item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, index), item) for index, item in enumerate(value))
    return problems


# --- schema -----------------------------------------------------------------------


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    """The validator for the schema shipped in the package (built once: it never changes)."""
    text = resources.files("gportmap").joinpath("schema", "rules.schema.json").read_text("utf-8")
    schema = json.loads(text)
    # Protocols are whatever is registered: the built-ins and any plugin package's.
    schema["$defs"]["rule"]["properties"]["protocol"]["enum"] = list(registered_protocols())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _schema_problems(document: dict[str, Any]) -> tuple[list[Problem], set[int]]:
    """Schema errors in readable words, and the indices of the rules that have any."""
    problems: list[Problem] = []
    invalid_rules: set[int] = set()
    missing_seen: set[tuple[JsonPath, str]] = set()
    for error in _validator().iter_errors(document):
        path: JsonPath = tuple(error.absolute_path)
        if len(path) >= 2 and path[0] == "rules":
            invalid_rules.add(int(path[1]))
        if isinstance(error.instance, _BadNumber):
            continue  # _scan reported it
        if error.validator == "additionalProperties":
            allowed = list(error.schema.get("properties", {}))
            problems += [
                ((*path, key), _unknown_key(key, allowed)) for key in error.instance if key not in allowed
            ]
        elif error.validator == "required":
            # jsonschema yields one error per missing key without naming it separately.
            for key in error.validator_value:
                if key not in error.instance and (path, key) not in missing_seen:
                    missing_seen.add((path, key))
                    problems.append(
                        (path, TOP_LEVEL_PROBLEM if not path else f"missing required key {key!r}")
                    )
        else:
            problems.append((path, _describe(error, path)))
    return problems, invalid_rules


def _describe(error: jsonschema.ValidationError, path: JsonPath) -> str:
    """jsonschema's wording, except where a user deserves better."""
    value, shown = error.instance, _show(error.instance)
    limit: Any = error.validator_value
    key = path[-1] if path else ""
    match error.validator:
        case "type":
            expected = ", ".join(repr(name) for name in ([limit] if isinstance(limit, str) else limit))
            return f"{shown} is not of type {expected}"
        case "enum":
            noun = _ENUM_NOUNS.get(str(key), "value")
            return f"{shown} is not a supported {noun}{_choices(value, limit)}"
        case "minimum":
            return f"{shown} is less than the minimum of {limit}"
        case "maximum":
            return f"{shown} is greater than the maximum of {limit}"
        case "exclusiveMinimum":
            return f"{shown} must be greater than {limit}"
        case "pattern" if key in _PATTERN_HINTS:
            return f"{shown} is not a valid {key} ({_PATTERN_HINTS[str(key)]})"
    return str(error.message)


# --- semantic checks and building -------------------------------------------------

_RULE_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "name": ("name", str),
    "protocol": ("protocol", str),
    "listenHost": ("listen_host", str),
    "listenPort": ("listen_port", int),  # int(80.0): the schema accepts integral floats
    "targetHost": ("target_host", str),
    "targetPort": ("target_port", int),
    "enabled": ("enabled", bool),
    "maxConnections": ("max_connections", int),
    "connectTimeout": ("connect_timeout", float),
    "idleTimeout": ("idle_timeout", float),
    "sessionTimeout": ("session_timeout", float),
    "maxSessions": ("max_sessions", int),
    "handshakeTimeout": ("handshake_timeout", float),
    "path": ("path", str),
    "origins": ("origins", tuple),
    "maxMessageSize": ("max_message_size", int),
    "targetProtocol": ("target_protocol", str),
    "targetPath": ("target_path", str),
    "proxyProtocol": ("proxy_protocol", str),
    "allow": ("allow", tuple),
    "deny": ("deny", tuple),
}
#: Rule keys that mean something for some protocols only: (those protocols, the
#: key that does the job elsewhere). Anywhere else such a key would silently do
#: nothing, so it is an error.
_PROTOCOL_KEYS: dict[str, tuple[tuple[str, ...], str | None]] = {
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
}
#: On a tcp rule these mean something only for a tunnel (targetProtocol websocket).
_TUNNEL_KEYS = frozenset({"handshakeTimeout", "maxMessageSize", "targetPath"})
_SETTINGS_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "maxConnections": ("max_connections", int),
    "drainTimeout": ("drain_timeout", float),
    "logFormat": ("log_format", str),
    "logLevel": ("log_level", str.upper),
    "watch": ("watch", bool),
    "admin": ("admin", lambda value: _admin_settings(value)),
    "statsInterval": ("stats_interval", float),
    "allowTargets": ("allow_targets", tuple),
    "workers": ("workers", lambda value: value),
}


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


def _admin_settings(value: Any) -> AdminSettings | None:
    if value is False:
        return None
    host, port = parse_listen(value.get("listen", AdminSettings().listen))
    return AdminSettings(host=host, port=port, token=value.get("token"))


def _build_rules(document: dict[str, Any], invalid: set[int]) -> list[Rule]:
    """Rules that passed the schema, so that their semantic errors are reported too."""
    items = document.get("rules")
    if not isinstance(items, list):
        return []
    rules = []
    for index, item in enumerate(items):
        if index in invalid:
            continue
        values = {name: convert(item[key]) for key, (name, convert) in _RULE_KEYS.items() if key in item}
        values.setdefault("listen_host", "0.0.0.0")
        values.setdefault("name", f"{values['protocol']}-{values['listen_port']}")
        rules.append(Rule(index=index, **values))
    return rules


def _build_settings(settings: dict[str, Any]) -> Settings:
    return Settings(
        **{name: convert(settings[key]) for key, (name, convert) in _SETTINGS_KEYS.items() if key in settings}
    )


def _check_settings(settings: Any) -> list[Problem]:
    """What the schema cannot say: logLevel in any case, ``admin`` as false or an
    object (never true), and the admin listen address."""
    if not isinstance(settings, dict):
        return []
    problems: list[Problem] = []
    level = settings.get("logLevel")
    if isinstance(level, str) and level.upper() not in LOG_LEVELS:
        problem = f"{_show(level)} is not a supported log level{_choices(level.upper(), LOG_LEVELS)}"
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
    return problems


def _check_rules(rules: list[Rule], items: list[Any]) -> list[Problem]:
    """What the schema cannot say about rules that passed it."""
    problems: list[Problem] = []
    for rule in rules:
        if not _NAME.fullmatch(rule.name):
            problems.append(
                (
                    ("rules", rule.index, "name"),
                    f"{_show(rule.name)} is not a valid name ({_PATTERN_HINTS['name']})",
                )
            )
        for key, host in (("listenHost", rule.listen_host), ("targetHost", rule.target_host)):
            if (problem := host_problem(host)) is not None:
                problems.append((("rules", rule.index, key), problem))
        for key, path in (("path", rule.path), ("targetPath", rule.target_path)):
            if not _URL_PATH.fullmatch(path) or (key == "path" and ("?" in path or "#" in path)):
                problems.append((("rules", rule.index, key), f"{_show(path)} is not {_PATTERN_HINTS[key]}"))
    problems += _check_protocol_keys(rules, items)
    problems += _check_networks(rules)
    problems += _check_names(rules, items)
    problems += _check_listen(
        rule for rule in rules if rule.enabled and host_problem(rule.listen_host) is None
    )
    return problems


def _check_protocol_keys(rules: list[Rule], items: list[Any]) -> list[Problem]:
    """A key set on a rule whose protocol ignores it, e.g. idleTimeout on a udp rule."""
    problems: list[Problem] = []
    for rule in rules:
        for key in items[rule.index]:
            if key not in _PROTOCOL_KEYS:
                continue
            protocols, instead = _PROTOCOL_KEYS[key]
            # A plugin's protocol serves on a TCP listener and takes tcp rules' keys.
            protocol = rule.protocol if rule.protocol in BUILTIN_PROTOCOLS else "tcp"
            if protocol in protocols:
                if protocol == "tcp" and key in _TUNNEL_KEYS and rule.target_protocol != "websocket":
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
                    parse_network(text)
                except ValueError:
                    problems.append((("rules", rule.index, key, i), f"{_show(text)} is not an IP address or CIDR network"))
    return problems


def _attach_plugins(rules: list[Rule], items: list[Any]) -> tuple[list[Rule], list[Problem]]:
    """Find, validate and try-build every plugin a rule names (SPEC §7)."""
    problems: list[Problem] = []
    result = []
    for rule in rules:
        specs = []
        for i, entry in enumerate(items[rule.index].get("plugins", [])):
            try:
                specs.append(resolve_plugin(entry["name"], entry.get("options", {})))
            except PluginError as exc:
                problems.append((("rules", rule.index, "plugins", i), str(exc)))
        result.append(replace(rule, plugins=tuple(specs)) if specs else rule)
    return result, problems


def _read_file(base: str, path: str, where: JsonPath, problems: list[Problem]) -> tuple[str, bytes] | None:
    """(absolute path, content) of a file named relative to the rules file's folder."""
    full = os.path.normpath(os.path.join(base, os.path.expanduser(path)))
    try:
        with open(full, "rb") as file:
            return full, file.read()
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        shown = full if full.isprintable() else _show(full)  # one printable line per error
        problems.append((where, f"cannot read {shown}: {getattr(exc, 'strerror', None) or exc}"))
        return None


def _attach_tls(rules: list[Rule], items: list[Any], base: str) -> tuple[list[Rule], list[Problem]]:
    """Read the certificate files of ``tls``/``targetTls`` and check that they load: a
    missing file or a key that does not match its certificate is a config error, not a
    crash at the first connection."""
    problems: list[Problem] = []
    result = []
    for rule in rules:
        item = items[rule.index]
        changes: dict[str, Any] = {}
        if isinstance(item.get("tls"), dict):
            changes["tls"] = _tls_listen(item["tls"], base, ("rules", rule.index, "tls"), problems)
        if item.get("targetTls") is not None and item.get("targetTls") is not False:
            changes["target_tls"] = _tls_target(item["targetTls"], base, ("rules", rule.index, "targetTls"), problems)
        result.append(replace(rule, **changes) if changes else rule)
    return result, problems


def _tls_listen(spec: dict[str, Any], base: str, where: JsonPath, problems: list[Problem]) -> TlsListen | None:
    before = len(problems)
    files = {
        key: _read_file(base, spec[key], (*where, key), problems)
        for key in ("certFile", "keyFile", "clientCaFile")
        if key in spec
    }
    if len(problems) > before:
        return None
    cert, key = files["certFile"], files["keyFile"]
    client_ca = files.get("clientCaFile")
    assert cert is not None and key is not None
    try:
        server_context(cert[0], key[0], client_ca[0] if client_ca else None)
    except (ssl.SSLError, OSError) as exc:
        problems.append((where, f"cannot load the certificate, key or client CA: {_ssl_reason(exc)}"))
        return None
    digest = hashlib.sha256(b"".join(read[1] for read in files.values() if read is not None)).hexdigest()
    return TlsListen(cert[0], key[0], client_ca[0] if client_ca else None, digest)


def _tls_target(spec: Any, base: str, where: JsonPath, problems: list[Problem]) -> TlsTarget | None:
    spec = {} if spec is True else spec
    ca_file, content = None, b""
    if "caFile" in spec:
        read = _read_file(base, spec["caFile"], (*where, "caFile"), problems)
        if read is None:
            return None
        ca_file, content = read
    verify = spec.get("verify", True)
    server_name = spec.get("serverName")
    if server_name is not None and (problem := host_problem(server_name)) is not None:
        # ssl would refuse it at every connection (ValueError in the connection's greenlet)
        problems.append(((*where, "serverName"), problem))
        return None
    try:
        client_context(ca_file, verify)
    except (ssl.SSLError, OSError) as exc:
        problems.append(((*where, "caFile"), f"cannot load the CA file: {_ssl_reason(exc)}"))
        return None
    return TlsTarget(ca_file, server_name, verify, hashlib.sha256(content).hexdigest())


def _ssl_reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)


def _check_targets(rules: list[Rule], settings: Any) -> list[Problem]:
    """``settings.allowTargets``: every rule's target, resolved, must be inside."""
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
        try:
            addresses = {
                info[4][0].split("%", 1)[0]
                for info in socket.getaddrinfo(rule.target_host, rule.target_port, proto=socket.IPPROTO_TCP)
            }
        except OSError as exc:
            problems.append(
                (("rules", rule.index, "targetHost"), f"cannot resolve {rule.target_host!r} to check allowTargets: {exc}")
            )
            continue
        outside = sorted(a for a in addresses if not any(e.covers(ipaddress.ip_address(a), rule.target_port) for e in allowed))
        if outside:
            problems.append(
                (
                    ("rules", rule.index),
                    f"rule {rule.name!r}: target {rule.target} ({', '.join(outside)}) is outside settings.allowTargets",
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
                    f"{rule.name!r} is already used by rules[{earlier.index}]{whose}",
                )
            )
        else:
            problems.append(
                (
                    ("rules", rule.index),
                    f"the default name {rule.name!r} is already used by rules[{earlier.index}]{whose}; "
                    'set "name" to tell the rules apart',
                )
            )
    return problems


def _check_listen(enabled: Iterable[Rule]) -> list[Problem]:
    """Two enabled rules whose listening sockets would collide at bind time."""
    problems: list[Problem] = []
    by_port: dict[tuple[str, int], list[Rule]] = {}
    for rule in enabled:
        group = by_port.setdefault((rule.transport, rule.listen_port), [])
        for earlier in group:
            why = _overlap(earlier.listen_host, rule.listen_host)
            if why is None:
                continue
            other = f"rules[{earlier.index}] ({earlier.name!r})"
            if why:
                problem = f"listen address {rule.listen} overlaps {earlier.listen} of {other}: {why}"
            else:
                problem = (
                    f"listen address {rule.listen} is already used by {other}; "
                    f"two enabled {rule.transport} rules cannot listen on the same address and port"
                )
            problems.append((("rules", rule.index), problem))
            break
        group.append(rule)
    return problems


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
    return f"{_show(host)} is not an IP address or host name{hint}"


# --- messages ---------------------------------------------------------------------


def _message(shown: str, path: JsonPath, problem: str) -> str:
    return f"{shown}: {format_path(path)}: {problem}" if path else f"{shown}: {problem}"


def format_path(path: JsonPath) -> str:
    """``rules[2].listenPort``; a key that is no identifier is written ``["a b"]``."""
    text = ""
    for step in path:
        if isinstance(step, int):
            text += f"[{step}]"
        elif _IDENTIFIER.fullmatch(step):
            text += f".{step}" if text else step
        else:
            text += f"[{json.dumps(step)}]"
    return text


def _position(document: dict[str, Any], path: JsonPath) -> tuple[float, ...]:
    """Sort key: top-level problems, then settings, then rule by rule, each in document order."""
    position: list[float] = [{"settings": 1, "rules": 2}.get(str(path[0]), 0) if path else -1]
    node: Any = document
    for step in path:
        if isinstance(node, dict) and step in node:
            position.append(list(node).index(step))
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            position.append(step)
        else:
            position.append(math.inf)
            break
        node = node[step]
    return tuple(position)


def _unknown_key(key: str, allowed: list[str]) -> str:
    match = difflib.get_close_matches(key.lower(), [name.lower() for name in allowed], n=1)
    if not match:
        return "unknown key"
    suggestion = next(name for name in allowed if name.lower() == match[0])
    return f"unknown key (did you mean {suggestion!r}?)"


def _choices(value: Any, options: Any) -> str:
    listed = ", ".join(repr(option) for option in options)
    match = difflib.get_close_matches(value, [str(o) for o in options], n=1) if isinstance(value, str) else []
    return (
        f" (expected one of: {listed}; did you mean {match[0]!r}?)"
        if match
        else f" (expected one of: {listed})"
    )


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float, _BadNumber)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "null"


def _show(value: Any) -> str:
    """A value as a short, one-line fragment of a message (JSON spelling for literals)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        try:
            text = json.dumps(value, default=str)  # ASCII: a lone surrogate would break printing
        except (ValueError, RecursionError):
            text = "{...}" if isinstance(value, dict) else "[...]"
    else:
        text = repr(value)
    return _clip(text)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
