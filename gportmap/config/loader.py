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
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import jsonschema

from gportmap.config.model import AdminSettings, Config, Rule, Settings, TlsListen, TlsTarget
from gportmap.errors import ConfigError, PluginError
from gportmap.plugins import resolve as resolve_plugin
from gportmap.plugins.registry import BUILTIN as BUILTIN_PROTOCOLS
from gportmap.plugins.registry import registered_protocols
from gportmap.security import client_context, network_span, parse_target_allow, server_context

JsonPath = tuple[str | int, ...]
Problem = tuple[JsonPath, "str | _UnknownKey"]

#: The largest rules file read, in bytes. A rule with most of its keys set is 250 to
#: 330 bytes pretty-printed, so 10,000 rules are 2.5-3.3 MB: 16 MiB leaves room for
#: about 50,000. A larger file is refused unread, so a runaway one (a symlink to
#: /dev/zero, a log written to the wrong path) costs neither memory (a full 16 MiB
#: file holds about 7 times its size while parsed) nor minutes of checking (the
#: checks run at about 1 MB/s, so a full 16 MiB file already takes some 15 s).
MAX_RULES_FILE_BYTES = 16 * 1024 * 1024
#: The largest certificate, key or CA file read for ``tls``/``targetTls``, in bytes:
#: a full CA bundle is well under 1 MiB.
MAX_TLS_FILE_BYTES = 4 * 1024 * 1024
#: At most this many errors are listed; a last line says how many more were found.
MAX_ERRORS = 100
#: Checking stops after finding this many problems, and the last line says "at
#: least": a file this broken is not worth more time (a 1 MB array of numbers has
#: 400,000 problems, and the schema check spends 50-150 microseconds on each).
MAX_PROBLEMS = 1_000
#: The longest error line, in characters; longer ones are cut ("...").
MAX_ERROR_CHARS = 1000
#: The longest object key shown in a JSON path, in characters.
MAX_KEY_CHARS = 64

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


def load(path: str | os.PathLike[str]) -> Config:
    """Read (``read_rules_file``) and validate the rules file at ``path``."""
    return parse(read_rules_file(path), path)


# --- reading files ----------------------------------------------------------------

#: Never wait: opening a FIFO without O_NONBLOCK blocks until a writer comes, and
#: O_NOCTTY keeps a terminal device from becoming the process's controlling terminal.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
_READ_CHUNK = 1024 * 1024
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class _Unreadable(Exception):
    """Why a file was not read, worded to follow "cannot read ...: "."""


def read_rules_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the rules file at ``path``, or ConfigError with one message naming it.

    Only a regular file of at most ``MAX_RULES_FILE_BYTES`` is read: a FIFO, a device
    (``rules.json -> /dev/zero``), a directory or an oversized file is refused at once,
    without blocking and without reading it. Thread-safe and free of gevent: the
    reload path runs it in a thread pool.
    """
    shown = os.fsdecode(path)
    try:
        return _read_regular_file(path, MAX_RULES_FILE_BYTES)
    except _Unreadable as exc:
        raise ConfigError([f"{shown}: cannot read: {exc}"]) from None


def _read_regular_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file at ``path``, else _Unreadable.

    The path is stat()ed before it is opened, because opening some devices acts (a
    tape rewinds, a modem line hangs up), and the descriptor is fstat()ed after, since
    a rename in between may have put something else there.
    """
    try:
        mode = os.stat(path).st_mode
        if _file_kind(mode) is not None:
            raise _Unreadable(_not_regular(path, mode))
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _Unreadable(exc.strerror or str(exc)) from None
    except ValueError as exc:  # a NUL byte in the name
        raise _Unreadable(str(exc)) from None
    try:
        info = os.fstat(fd)
        if _file_kind(info.st_mode) is not None:
            raise _Unreadable(_not_regular(path, info.st_mode))
        if info.st_size > limit:
            raise _Unreadable(_too_large(info.st_size, limit))
        data = _read_up_to(fd, limit + 1)
    except OSError as exc:
        raise _Unreadable(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew since the fstat, or st_size is not its size (/proc)
        raise _Unreadable(_too_large(None, limit))
    return data


def _read_up_to(fd: int, count: int) -> bytes:
    """Read until end of file or ``count`` bytes, whichever comes first."""
    chunks = []
    left = count
    while left > 0:
        chunk = os.read(fd, min(left, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is ("a FIFO (named pipe)"), or None."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def _not_regular(path: str | os.PathLike[str], mode: int) -> str:
    """``it is a FIFO (named pipe), not a regular file``, naming where a symlink leads."""
    kind = _file_kind(mode)
    real = os.path.realpath(path)
    if os.path.normcase(real) != os.path.normcase(os.path.abspath(path)):
        return f"it leads to {_clip(real, 200)}, {kind}, not a regular file"
    return f"it is {kind}, not a regular file"


def _too_large(size: int | None, limit: int) -> str:
    limit_text = f"{limit:,} bytes" + (f" ({limit / 1048576:g} MiB)" if limit >= 1048576 else "")
    if size is None:
        return f"the file is larger than the limit of {limit_text}"
    return f"the file is {size:,} bytes, larger than the limit of {limit_text}"


def parse(data: bytes | str, path: str | os.PathLike[str]) -> Config:
    """Validate the content of a rules file; ``path`` names it in messages and in ``Config.path``."""
    shown = os.fsdecode(path)
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    document = _read_json(data, shown)
    if isinstance(document, list):
        document = {"rules": document}  # the classic form: paths read the same in both
    elif not isinstance(document, dict):
        raise ConfigError([f"{shown}: {TOP_LEVEL_PROBLEM} (found {_kind(document)})"])

    found = _Found(MAX_PROBLEMS)
    rules = _check(document, os.path.dirname(os.path.abspath(shown)), found)
    if found.problems:
        raise _config_error(shown, document, found)
    return Config(
        path=os.path.abspath(shown),
        rules=tuple(rules),
        settings=_build_settings(document.get("settings", {})),
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
    if found.full:
        return []
    items = document.get("rules", [])
    rules = _build_rules(document, invalid_rules)
    found.extend(_check_rules(rules, items))
    found.extend(_check_settings(document.get("settings")))
    rules, tls_problems = _attach_tls(rules, items, base)
    found.extend(tls_problems)
    rules, plugin_problems = _attach_plugins(rules, items)
    found.extend(plugin_problems)
    found.extend(_check_targets(rules, document.get("settings")))
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
    problems = sorted(found.problems, key=_Positions(document).of)
    listed = [_message(shown, where, str(what)) for where, what in problems[:MAX_ERRORS]]
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


_SCANNED = (dict, list, _BadNumber)


def _scan(document: Any) -> Iterator[Problem]:
    """Duplicate keys and bad numbers, which the JSON parser meets before it knows their
    path, in document order. Only containers and bad numbers get a path built: a file
    of a million plain numbers costs one isinstance each."""
    stack: list[tuple[JsonPath, Any]] = [((), document)]
    while stack:  # no recursion: json.loads accepts nesting deeper than Python's stack
        path, value = stack.pop()
        if isinstance(value, _BadNumber):
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
    validator_class.check_schema(schema)
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
    return (type(value).__name__, value)  # str, None, _BadNumber: hashable as they are


def _schema_problems(document: dict[str, Any], invalid_rules: set[int]) -> Iterator[Problem]:
    """Schema errors in readable words, one at a time (the caller stops when it has
    enough); the index of every rule with an error is added to ``invalid_rules``."""
    missing_seen: set[tuple[JsonPath, str]] = set()
    for error in _validator().iter_errors(document):
        path: JsonPath = tuple(error.absolute_path)
        if len(path) >= 2 and path[0] == "rules":
            invalid_rules.add(int(path[1]))
        if isinstance(error.instance, _BadNumber):
            continue  # _scan reported it
        if error.validator == "additionalProperties":
            allowed = tuple(error.schema.get("properties", {}))
            known = frozenset(allowed)
            yield from (((*path, key), _UnknownKey(key, allowed)) for key in error.instance if key not in known)
        elif error.validator == "required":
            # jsonschema yields one error per missing key without naming it separately.
            for key in error.validator_value:
                if key not in error.instance and (path, key) not in missing_seen:
                    missing_seen.add((path, key))
                    yield path, TOP_LEVEL_PROBLEM if not path else f"missing required key {key!r}"
        else:
            yield path, _describe(error, path)


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
        # jsonschema's own words for these quote the whole value, however long.
        case "pattern":
            return f"{shown} does not match {_clip(repr(limit))}"
        case "maxLength":
            return f"{shown} is too long (at most {limit} characters)"
        case "maxItems":
            return f"{shown} is too long (at most {limit} items)"
        case "uniqueItems":
            return f"{shown} has non-unique elements"
        case "oneOf":
            return f"{shown} is not valid under any of the given schemas"
    return str(error.message)  # clipped with the rest of the line by _message


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
    problems += _check_self_loops(rules)
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
                    network_span(text)  # parse_network's answer, faster for the plain spellings
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
        return full, _read_regular_file(full, MAX_TLS_FILE_BYTES)
    except _Unreadable as exc:
        shown = full if full.isprintable() else _show(full)  # one printable line per error
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
        if host_problem(rule.target_host) is not None:
            continue  # reported already; getaddrinfo would raise UnicodeError on some ("a..b")
        try:
            addresses = {
                info[4][0].split("%", 1)[0]
                for info in socket.getaddrinfo(rule.target_host, rule.target_port, proto=socket.IPPROTO_TCP)
            }
        except OSError as exc:
            problems.append(
                (("rules", rule.index, "targetHost"), f"cannot resolve {_show(rule.target_host)} to check allowTargets: {exc}")
            )
            continue
        outside = sorted(a for a in addresses if not any(e.covers(ipaddress.ip_address(a), rule.target_port) for e in allowed))
        if outside:
            problems.append(
                (
                    ("rules", rule.index),
                    f"rule {_show(rule.name)}: target {rule.target} ({', '.join(outside)}) is outside settings.allowTargets",
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
                    f"{_show(rule.name)} is already used by rules[{earlier.index}]{whose}",
                )
            )
        else:
            problems.append(
                (
                    ("rules", rule.index),
                    f"the default name {_show(rule.name)} is already used by rules[{earlier.index}]{whose}; "
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
        other = f"rules[{earlier.index}] ({_show(earlier.name)})"
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


def _check_self_loops(rules: list[Rule]) -> list[Problem]:
    """A rule whose target is its own listening address: each connection it makes to
    the target arrives at its own listener and makes another, until maxConnections (or
    maxSessions, or the open-file limit) is used up. Only literal hosts and the name
    "localhost" are compared: no name is looked up. Plugin protocols are left alone
    (what their target means is theirs to say)."""
    problems: list[Problem] = []
    for rule in rules:
        if (
            rule.protocol not in BUILTIN_PROTOCOLS
            or rule.target_port != rule.listen_port
            or _target_transport(rule) != rule.transport
            or host_problem(rule.listen_host) is not None  # reported already
            or host_problem(rule.target_host) is not None
            or not _reaches(rule.target_host, rule.listen_host)
        ):
            continue
        what = (
            "every datagram would loop back into it, a new session each time, until maxSessions is used up"
            if rule.transport == "udp"
            else "every connection would loop back into it until maxConnections or the open-file limit is used up"
        )
        problems.append(
            (
                ("rules", rule.index),
                f"forwards to its own listening address (target {rule.target}, listening on {rule.listen}): {what}",
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
    return f"{_show(host)} is not an IP address or host name{hint}"


# --- messages ---------------------------------------------------------------------


def _message(shown: str, path: JsonPath, problem: str) -> str:
    """One error line, clipped to ``MAX_ERROR_CHARS`` whatever the file put in it."""
    text = f"{shown}: {format_path(path)}: {problem}" if path else f"{shown}: {problem}"
    return _clip(text, MAX_ERROR_CHARS)


def format_path(path: JsonPath) -> str:
    """``rules[2].listenPort``; a key that is no identifier is written ``["a b"]``, and
    one longer than ``MAX_KEY_CHARS`` is cut (``["aaaa..."]``)."""
    text = ""
    for step in path:
        if isinstance(step, int):
            text += f"[{step}]"
        elif len(step) <= MAX_KEY_CHARS and _IDENTIFIER.fullmatch(step):
            text += f".{step}" if text else step
        else:
            text += f"[{json.dumps(_clip(step, MAX_KEY_CHARS))}]"
    return text


class _Positions:
    """Sort keys that put problems in document order: top-level problems, then
    settings, then rule by rule. Each object's key order is worked out once, not per
    problem (``list(node).index(key)`` per problem made 40,000 unknown keys quadratic)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document  # keeps every node alive, so their id()s stay theirs
        self._orders: dict[int, dict[Any, int]] = {}

    def of(self, problem: Problem) -> tuple[float, ...]:
        path = problem[0]
        position: list[float] = [{"settings": 1, "rules": 2}.get(str(path[0]), 0) if path else -1]
        node: Any = self.document
        for step in path:
            if isinstance(node, dict) and step in node:
                position.append(self._order(node)[step])
            elif isinstance(node, list) and isinstance(step, int) and step < len(node):
                position.append(step)
            else:
                position.append(math.inf)
                break
            node = node[step]
        return tuple(position)

    def _order(self, node: dict[str, Any]) -> dict[Any, int]:
        order = self._orders.get(id(node))
        if order is None:
            order = self._orders[id(node)] = {key: index for index, key in enumerate(node)}
        return order


@dataclass(frozen=True)
class _UnknownKey:
    """An unknown key's problem, worded only if it is listed: the "did you mean" costs
    difflib about 100 µs a key, and a hostile object has tens of thousands of keys."""

    key: str
    allowed: tuple[str, ...]

    def __str__(self) -> str:
        return _unknown_key(self.key, self.allowed)


def _unknown_key(key: str, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    match = _close_match(key.lower(), [name.lower() for name in allowed])
    if match is None:
        return "unknown key"
    suggestion = next(name for name in allowed if name.lower() == match)
    return f"unknown key (did you mean {suggestion!r}?)"


def _close_match(word: str, options: list[str]) -> str | None:
    """difflib's closest option, skipping words too long to match any: a ratio of 0.6
    needs the word under 7/3 of the option's length, and difflib indexes every
    character of the word first (seconds and gigabytes for a 50 MB key)."""
    if len(word) * 3 > 7 * max((len(option) for option in options), default=0):
        return None
    matches = difflib.get_close_matches(word, options, n=1)
    return matches[0] if matches else None


def _choices(value: Any, options: Any) -> str:
    listed = ", ".join(repr(option) for option in options)
    match = _close_match(value, [str(o) for o in options]) if isinstance(value, str) else None
    return (
        f" (expected one of: {listed}; did you mean {match!r}?)"
        if match is not None
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
