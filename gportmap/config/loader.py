"""Load and validate the rules file (SPEC §3).

The pipeline is: bytes -> JSON (strict: no NaN/Infinity, no duplicate keys) -> JSON
Schema (``gportmap/config/schema/rules.schema.json``, Draft 2020-12) -> the checks a schema
cannot express (host syntax, unique names, overlapping listen addresses) -> frozen
dataclasses. Nothing downstream ever reads the raw JSON.

Every problem is collected and raised together in one ``ConfigError``, each as
``<file>: <json path>: <problem>`` and in document order, so that a user fixes the
whole file in one pass instead of one error per restart.

Everything here is bounded by the input's size, never worse (issue 15): the file is
read only if it is a regular file of at most ``MAX_RULES_FILE_BYTES``, at most
``MAX_ERRORS`` errors are listed (then one line says how many more), checking stops
after ``MAX_PROBLEMS`` problems, and every message is clipped to ``MAX_ERROR_CHARS``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import ssl
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import jsonschema

from gportmap.config import faults
from gportmap.config.checks import (
    PATTERN_HINTS,
    check_rules,
    check_settings,
    check_target_forms,
    check_targets,
    host_problem,
    parse_listen,
    target_form,
)
from gportmap.config.messages import (
    MAX_ERRORS,
    MAX_PROBLEMS,
    BadNumber,
    JsonPath,
    Positions,
    Problem,
    UnknownKey,
    choices,
    clip,
    kind,
    message,
    show,
)
from gportmap.config.model import (
    AcceptProxy,
    AdminSettings,
    Balance,
    CheckType,
    Config,
    HealthCheck,
    KeepAlive,
    PerClient,
    PortRange,
    RouteMatch,
    Rule,
    RuleRoute,
    Settings,
    SniffProtocol,
    Target,
    TlsListen,
    TlsTarget,
)
from gportmap.config.reading import (
    MAX_TLS_FILE_BYTES,
    MAX_TOKEN_FILE_BYTES,
    Unreadable,
    read_regular_file,
    read_rules_file,
)
from gportmap.errors import ConfigError, PluginError
from gportmap.plugins import resolve as resolve_plugin
from gportmap.plugins.registry import registered_protocols
from gportmap.security import client_context, server_context

TOP_LEVEL_PROBLEM = 'the file must be a list of rules or an object with "rules"'
# The words that name a value in "... is not a supported <noun>" messages.
_ENUM_NOUNS = {
    "protocol": "protocol",
    "logFormat": "log format",
    "proxyProtocol": "PROXY protocol version",
    "balance": "balance method",
    "type": "health check type",
}


def load(path: str | os.PathLike[str]) -> Config:
    """Read (``read_rules_file``) and validate the rules file at ``path``."""
    return parse(read_rules_file(path), path)


# --- reading files ----------------------------------------------------------------


def parse(data: bytes | str, path: str | os.PathLike[str]) -> Config:
    """Validate the content of a rules file; ``path`` names it in messages and in ``Config.path``."""
    shown = os.fsdecode(path)
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    document = _read_json(data, shown)
    if isinstance(document, list):
        document = {"rules": document}  # the classic form: paths read the same in both
    elif not isinstance(document, dict):
        raise ConfigError([f"{shown}: {TOP_LEVEL_PROBLEM} (found {kind(document)})"])

    found = _Found(MAX_PROBLEMS)
    base = os.path.dirname(os.path.abspath(shown))
    rules = _check(document, base, found)
    token = _admin_token_file(document.get("settings"), base, found) if not found.full else None
    if found.problems:
        raise _config_error(shown, document, found)
    settings = _build_settings(document.get("settings", {}))
    if token is not None and settings.admin is not None:
        settings = replace(settings, admin=replace(settings.admin, token=token[1], token_file=token[0]))
    return Config(
        path=os.path.abspath(shown),
        rules=tuple(rules),
        settings=settings,
        digest=hashlib.sha256(raw).hexdigest(),
        raw=raw,
    )


def _check(document: dict[str, Any], base: str, found: _Found) -> list[Rule]:
    """Every check, in turn, into ``found``; the rules built from what passed the schema.

    The scan and the schema check stop when ``found`` is full; the checks after them
    need every schema error known, so they are skipped then (the file is hopeless anyway).
    """
    found.extend(_scan(document))
    invalid_rules: set[int] = set()
    found.extend(_schema_problems(document, invalid_rules))
    found.extend(check_target_forms(document.get("rules"), invalid_rules))
    if found.full:
        return []
    items = document.get("rules", [])
    rules = _build_rules(document, invalid_rules)
    found.extend(check_rules(rules, items))
    found.extend(check_settings(document.get("settings")))
    rules, tls_problems = _attach_tls(rules, items, base)
    found.extend(tls_problems)
    rules, plugin_problems = _attach_plugins(rules, items)
    found.extend(plugin_problems)
    found.extend(check_targets(rules, document.get("settings"), items))
    return rules


@dataclass
class _Found:
    """The problems found so far, up to ``limit``: past it a check's problems are not
    even generated (the checks are generators where a file can make them many)."""

    limit: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return len(self.problems) >= self.limit

    def extend(self, problems: Iterable[Problem]) -> None:
        if self.full:
            return
        for problem in problems:
            self.problems.append(problem)
            if self.full:
                return


def _config_error(shown: str, document: dict[str, Any], found: _Found) -> ConfigError:
    """The first ``MAX_ERRORS`` problems in document order, then a line counting the rest."""
    problems = sorted(found.problems, key=Positions(document).of)
    listed = [message(shown, where, str(what)) for where, what in problems[:MAX_ERRORS]]
    more = len(problems) - len(listed)
    if more:
        at_least = "at least " if found.full else ""
        stopped = f"checking stopped after {len(problems):,}; " if found.full else ""
        listed.append(
            f"{shown}: ... and {at_least}{more:,} more error{'s' if more != 1 else ''} "
            f"({stopped}only the first {len(listed)} are listed)"
        )
    return ConfigError(listed, found=len(problems), complete=not found.full)


# --- JSON -------------------------------------------------------------------------


class _Object(dict):  # type: ignore[type-arg]
    """A JSON object that remembers the keys it saw more than once (json keeps the last)."""

    duplicates: tuple[str, ...] = ()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    if len(obj) != len(pairs):
        counts: dict[str, int] = {}
        for key, _ in pairs:
            counts[key] = counts.get(key, 0) + 1
        obj.duplicates = tuple(key for key, count in counts.items() if count > 1)
    return obj


def _float(text: str) -> float | BadNumber:
    value = float(text)
    return value if math.isfinite(value) else BadNumber(text)


def _int(text: str) -> int | BadNumber:
    try:
        return int(text)
    except ValueError:  # more digits than sys.get_int_max_str_digits() allows
        return BadNumber(text)


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
            parse_constant=BadNumber,
        )
    except json.JSONDecodeError as exc:
        raise ConfigError(
            [f"{shown}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"]
        ) from None
    except RecursionError:
        raise ConfigError([f"{shown}: invalid JSON: nested too deeply"]) from None


_SCANNED = (dict, list, BadNumber)


def _scan(document: Any) -> Iterator[Problem]:
    """Duplicate keys and bad numbers, which the JSON parser meets before it knows their
    path, in document order. Only containers and bad numbers get a path built: a file
    of a million plain numbers costs one isinstance each."""
    stack: list[tuple[JsonPath, Any]] = [((), document)]
    while stack:  # no recursion: json.loads accepts nesting deeper than Python's stack
        path, value = stack.pop()
        if isinstance(value, BadNumber):
            yield path, value.problem
        elif isinstance(value, dict):
            for key in getattr(value, "duplicates", ()):
                yield (*path, key), "duplicate key (a key may appear only once in an object)"
            stack.extend(((*path, key), item) for key, item in reversed(value.items()) if isinstance(item, _SCANNED))
        elif isinstance(value, list):
            stack.extend(
                ((*path, index), value[index])
                for index in range(len(value) - 1, -1, -1)
                if isinstance(value[index], _SCANNED)
            )


# --- schema -----------------------------------------------------------------------


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    """The validator for the schema shipped in the package (built once: it never changes)."""
    text = resources.files("gportmap.config").joinpath("schema", "rules.schema.json").read_text("utf-8")
    schema = json.loads(text)
    # Protocols are whatever is registered: the built-ins and any plugin package's.
    schema["$defs"]["rule"]["properties"]["protocol"]["enum"] = list(registered_protocols())
    validator_class = jsonschema.validators.extend(
        jsonschema.Draft202012Validator, validators={"uniqueItems": _unique_items}
    )
    # Not validator_class.check_schema(schema): checking the shipped schema against
    # the metaschema took a tenth of every start; tests/test_config.py checks it.
    return validator_class(schema)


def _unique_items(validator: Any, unique: bool, instance: Any, schema: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    """``uniqueItems`` in linear time: jsonschema's own falls back to comparing every
    pair when the items do not sort (strings and one object), minutes for a long list."""
    if not unique or not validator.is_type(instance, "array"):
        return
    try:
        keys = [_json_key(item) for item in instance]
    except RecursionError:
        return  # items nested this deep fail their own type check
    if len(set(keys)) != len(keys):
        yield jsonschema.ValidationError("has non-unique elements")  # worded by _describe


def _json_key(value: Any) -> Any:
    """A hashable stand-in equal for equal JSON values (1 == 1.0, but true != 1)."""
    if isinstance(value, bool):
        return ("boolean", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    if isinstance(value, list):
        return ("array", tuple(_json_key(item) for item in value))
    if isinstance(value, dict):
        return ("object", frozenset((key, _json_key(item)) for key, item in value.items()))
    return (type(value).__name__, value)  # str, None, BadNumber: hashable as they are


def _schema_problems(document: dict[str, Any], invalid_rules: set[int]) -> Iterator[Problem]:
    """Schema errors in readable words, one at a time (the caller stops when it has
    enough); the index of every rule with an error is added to ``invalid_rules``."""
    missing_seen: set[tuple[JsonPath, str]] = set()
    for error in _validator().iter_errors(document):
        path: JsonPath = tuple(error.absolute_path)
        if len(path) >= 2 and path[0] == "rules":
            invalid_rules.add(int(path[1]))
        if isinstance(error.instance, BadNumber):
            continue  # _scan reported it
        if error.validator == "additionalProperties":
            allowed = tuple(error.schema.get("properties", {}))
            known = frozenset(allowed)
            yield from (((*path, key), UnknownKey(key, allowed)) for key in error.instance if key not in known)
        elif error.validator == "required":
            # jsonschema yields one error per missing key without naming it separately.
            for key in error.validator_value:
                if key not in error.instance and (path, key) not in missing_seen:
                    missing_seen.add((path, key))
                    yield path, TOP_LEVEL_PROBLEM if not path else f"missing required key {key!r}"
        else:
            yield path, _describe(error, path)


#: Keys that take a port or a range of ports ("A-B", SPEC §9).
_PORT_KEYS = frozenset({"listenPort", "targetPort", "port"})


def _describe(error: jsonschema.ValidationError, path: JsonPath) -> str:
    """jsonschema's wording, except where a user deserves better."""
    value, shown = error.instance, show(error.instance)
    limit: Any = error.validator_value
    key = path[-1] if path else ""
    match error.validator:
        case "type" if key in _PORT_KEYS and limit == ["integer", "string"]:  # a port or a range (SPEC §9)
            return f"{shown} is not a valid {key} ({PATTERN_HINTS[str(key)]})"
        case "type":
            expected = ", ".join(repr(name) for name in ([limit] if isinstance(limit, str) else limit))
            return f"{shown} is not of type {expected}"
        case "enum":
            noun = _ENUM_NOUNS.get(str(key), "value")
            return f"{shown} is not a supported {noun}{choices(value, limit)}"
        case "minimum":
            return f"{shown} is less than the minimum of {limit}"
        case "maximum":
            return f"{shown} is greater than the maximum of {limit}"
        case "exclusiveMinimum":
            return f"{shown} must be greater than {limit}"
        case "pattern" if key in PATTERN_HINTS:
            return f"{shown} is not a valid {key} ({PATTERN_HINTS[str(key)]})"
        # jsonschema's own words for these quote the whole value, however long.
        case "pattern":
            return f"{shown} does not match {clip(repr(limit))}"
        case "maxLength":
            return f"{shown} is too long (at most {limit} characters)"
        case "maxItems":
            return f"{shown} is too long (at most {limit} items)"
        case "uniqueItems":
            return f"{shown} has non-unique elements"
        case "oneOf":
            return f"{shown} is not valid under any of the given schemas"
    return str(error.message)  # clipped with the rest of the line by message


# --- semantic checks and building -------------------------------------------------

_RULE_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "name": ("name", str),
    "protocol": ("protocol", str),
    "listenHost": ("listen_host", lambda value: _first_host(value)),
    "listenPort": ("listen_port", lambda value: _first_port(value)),  # int(80.0): the schema accepts integral floats
    "targetHost": ("target_host", str),
    "targetPort": ("target_port", lambda value: _first_port(value)),
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
    "targets": ("targets", lambda items: tuple(_target(item) for item in items)),
    "balance": ("balance", Balance),
    "retries": ("retries", int),
    "maxFails": ("max_fails", int),
    "failTimeout": ("fail_timeout", float),
    "healthCheck": ("health_check", lambda value: _health_check(value)),
    "keepAlive": ("keep_alive", lambda value: KeepAlive(**value)),
    "faults": ("faults", faults.build_all),
    "routes": ("routes", lambda items: tuple(_route(i, item) for i, item in enumerate(items))),
    "sniffTimeout": ("sniff_timeout", float),
    "acceptProxy": ("accept_proxy", lambda value: _accept_proxy(value)),
    "perClient": ("per_client", lambda value: _per_client(value)),
}
_TARGET_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "host": ("host", str),
    "port": ("port", lambda value: _first_port(value)),
    "weight": ("weight", int),
    "backup": ("backup", bool),
    "name": ("name", str),
}
_CHECK_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "type": ("type", CheckType),
    "interval": ("interval", float),
    "timeout": ("timeout", float),
    "rise": ("rise", int),
    "fall": ("fall", int),
    "path": ("path", str),
    "expectStatus": ("expect_status", lambda items: tuple(_status_range(item) for item in items)),
    "send": ("send", str),
    "expect": ("expect", str),
}
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
    "toxiproxy": ("toxiproxy", lambda value: faults.toxiproxy_settings(value)),
}


def _target(item: dict[str, Any]) -> Target:
    target = Target(**{name: convert(item[key]) for key, (name, convert) in _TARGET_KEYS.items() if key in item})
    if isinstance(item.get("port"), str):  # "C-D" (SPEC §9)
        target = replace(target, ports=PortRange.of(item["port"]))
    return target


def _first_port(value: int | str) -> int:
    """A port, or the first of "A-B" (SPEC §9: the rule's first listener, the range's base)."""
    return PortRange.of(value).first if isinstance(value, str) else int(value)


def _first_host(value: str | list[str]) -> str:
    """``listenHost``, or the first of its list (SPEC §9)."""
    return value[0] if isinstance(value, list) else str(value)


def _listen_values(item: dict[str, Any]) -> dict[str, Any]:
    """SPEC §9's keys of a rule: its listen ports, listen addresses and target range."""
    values: dict[str, Any] = {}
    if "listenPort" in item:
        values["listen_ports"] = PortRange.of(item["listenPort"])
    if isinstance(item.get("listenHost"), list):
        values["listen_hosts"] = tuple(str(host) for host in item["listenHost"])
    if isinstance(item.get("targetPort"), str):
        values["target_ports"] = PortRange.of(item["targetPort"])
    return values


def _route(index: int, item: dict[str, Any]) -> RuleRoute:
    """One entry of ``routes`` (SPEC §13); its targets know their route's name.
    Names and patterns are matched in lower case (DNS names are case-insensitive)."""
    name = item.get("name", f"route-{index}")
    if "targets" in item:
        targets = tuple(replace(_target(entry), route=name) for entry in item["targets"])
    elif "targetHost" in item and "targetPort" in item:
        targets = (Target(item["targetHost"], int(item["targetPort"]), route=name),)
    else:
        targets = ()  # reported by check_target_forms; the rule is not built
    return RuleRoute(
        name=name,
        match=RouteMatch(
            sni=tuple(pattern.lower().rstrip(".") for pattern in item.get("sni", ())),
            alpn=tuple(item.get("alpn", ())),
            host=tuple(pattern.lower().rstrip(".") for pattern in item.get("http_host", ())),
            protocol=SniffProtocol(item["protocol"]) if "protocol" in item else None,
        ),
        targets=targets,
        default=bool(item.get("default", False)),
    )


def _health_check(value: dict[str, Any]) -> HealthCheck:
    values = {name: convert(value[key]) for key, (name, convert) in _CHECK_KEYS.items() if key in value}
    if "timeout" not in values:  # the default, but never past a shorter interval
        values["timeout"] = min(HealthCheck.timeout, values.get("interval", HealthCheck.interval))
    return HealthCheck(**values)


def _accept_proxy(value: dict[str, Any]) -> AcceptProxy:
    """``acceptProxy`` (SPEC §13); the CIDRs are checked in ``checks``."""
    return AcceptProxy(trusted=tuple(value["trusted"]), timeout=float(value.get("timeout", AcceptProxy.timeout)))


def _per_client(value: dict[str, Any]) -> PerClient:
    """``perClient`` (SPEC §13); which keys apply to which protocol is ``checks``'."""
    return PerClient(
        max_connections=int(value["maxConnections"]) if "maxConnections" in value else None,
        connection_rate=float(value["connectionRate"]) if "connectionRate" in value else None,
        packet_rate=float(value["packetRate"]) if "packetRate" in value else None,
        burst=int(value["burst"]) if "burst" in value else None,
    )


def _status_range(item: int | str) -> tuple[int, int]:
    """``expectStatus`` entry: 200 -> (200, 200); "200-399" -> (200, 399)."""
    if isinstance(item, str):
        low, _, high = item.partition("-")
        return int(low), int(high)
    return int(item), int(item)


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
        if target_form(item) is None:
            continue  # both forms, neither or half of one: reported by check_target_forms
        values = {name: convert(item[key]) for key, (name, convert) in _RULE_KEYS.items() if key in item}
        if "routes" in values:  # SPEC §13: the rule's pool holds every route's targets
            values["targets"] = tuple(target for route in values["routes"] for target in route.targets)
        if "targets" in values:  # the first target stands for the pool where one address is asked for
            values["target_host"], values["target_port"] = values["targets"][0].key
        if "max_fails" not in values and len(values.get("targets", ())) <= 1:
            # A sole target is never taken out by failed connects unless asked (as
            # nginx's upstream of one server): there is nowhere else to send the
            # client, and closing everyone for failTimeout after the target is back
            # would only add an outage to the one it had.
            values["max_fails"] = 0
        values.setdefault("listen_host", "0.0.0.0")
        values.setdefault("name", f"{values['protocol']}-{PortRange.of(item['listenPort']).text}")
        values.update(_listen_values(item))
        rules.append(Rule(index=index, **values))
    return rules


def _admin_token_file(settings: Any, base: str, found: _Found) -> tuple[str, str] | None:
    """(absolute path, token) of ``settings.admin.tokenFile``, read now (at start and
    on every reload, so a rotated secret applies then), or None when none is named.

    The token is the file's text without its trailing newline (``echo`` and
    ``kubectl create secret --from-file`` leave one); an empty file, a token that is
    not one line of printable UTF-8, or an unreadable file is a problem naming it.
    """
    admin = settings.get("admin") if isinstance(settings, dict) else None
    path = admin.get("tokenFile") if isinstance(admin, dict) else None
    if not isinstance(path, str) or not path or "token" in admin:
        return None
    where: JsonPath = ("settings", "admin", "tokenFile")
    problems: list[Problem] = []
    read = _read_file(base, path, where, problems, MAX_TOKEN_FILE_BYTES)
    found.extend(problems)
    if read is None:
        return None
    full, data = read
    shown = full if full.isprintable() else show(full)
    try:
        token = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        found.extend([(where, f"{shown}: the token is not UTF-8 text")])
        return None
    if not token:
        found.extend([(where, f"{shown} is empty: it must hold the admin token")])
        return None
    if not token.isprintable() or token != token.strip():
        found.extend([(where, f"{shown}: the token must be one line of printable characters without surrounding spaces")])
        return None
    return full, token


def _build_settings(settings: dict[str, Any]) -> Settings:
    return Settings(
        **{name: convert(settings[key]) for key, (name, convert) in _SETTINGS_KEYS.items() if key in settings}
    )


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


def _read_file(
    base: str, path: str, where: JsonPath, problems: list[Problem], limit: int = MAX_TLS_FILE_BYTES
) -> tuple[str, bytes] | None:
    """(absolute path, content) of a file named relative to the rules file's folder."""
    full = os.path.normpath(os.path.join(base, os.path.expanduser(path)))
    try:
        return full, read_regular_file(full, limit)
    except Unreadable as exc:
        shown = full if full.isprintable() else show(full)  # one printable line per error
        problems.append((where, f"cannot read {shown}: {exc}"))
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


# --- messages ---------------------------------------------------------------------


