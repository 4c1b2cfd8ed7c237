"""Tests of gportmap.config: the rules file's validation and its error messages (SPEC §3)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gportmap.config import Config, Rule, Settings, load, loader, parse
from gportmap.errors import ConfigError
from gportmap.plugins.registry import registered_protocols

#: Every registered protocol as messages list them: the built-ins and installed plugins'.
PROTOCOLS = ", ".join(repr(name) for name in registered_protocols())

#: Every key a rule accepts today; the schema must close each rule object on exactly these.
RULE_KEYS = (
    "protocol",
    "listenPort",
    "targetHost",
    "targetPort",
    "enabled",
    "name",
    "listenHost",
    "maxConnections",
    "connectTimeout",
    "idleTimeout",
    "sessionTimeout",
    "maxSessions",
    "handshakeTimeout",
    "path",
    "origins",
    "maxMessageSize",
    "targetProtocol",
    "targetPath",
    "proxyProtocol",
    "allow",
    "deny",
    "tls",
    "targetTls",
    "plugins",
    "targets",
    "balance",
    "retries",
    "maxFails",
    "failTimeout",
    "healthCheck",
    "faults",
    "routes",
    "sniffTimeout",
    "acceptProxy",
    "perClient",
    "keepAlive",
)


def rule(**overrides: Any) -> dict[str, Any]:
    """A minimal valid rule, with keys changed or (value None) removed."""
    base: dict[str, Any] = {
        "protocol": "tcp",
        "listenPort": 8080,
        "targetHost": "127.0.0.1",
        "targetPort": 80,
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def errors_of(data: bytes | str | list[Any] | dict[str, Any], path: str = "rules.json") -> list[str]:
    if isinstance(data, (list, dict)):
        data = json.dumps(data)
    with pytest.raises(ConfigError) as info:
        parse(data, path)
    return info.value.errors


def clipped(text: str) -> str:
    """How a message quotes a string: repr, cut to 60 characters."""
    return repr(text) if len(repr(text)) <= 60 else repr(text)[:57] + "..."


def single_error(data: bytes | str | list[Any] | dict[str, Any]) -> str:
    errors = errors_of(data)
    assert len(errors) == 1, errors
    return errors[0]


# --- valid files ------------------------------------------------------------------


def test_array_form_fills_defaults() -> None:
    config = parse(json.dumps([rule()]), "rules.json")
    assert config.rules == (
        Rule(
            name="tcp-8080",
            protocol="tcp",
            listen_host="0.0.0.0",
            listen_port=8080,
            target_host="127.0.0.1",
            target_port=80,
            enabled=True,
            max_connections=1000,
            connect_timeout=5.0,
            idle_timeout=300.0,
            max_fails=0,  # a sole target: passive health off unless maxFails is set
        ),
    )
    assert config.settings == Settings(
        max_connections=10000, drain_timeout=30.0, log_format="text", log_level="INFO"
    )


def test_object_form_gives_the_same_rules_as_the_array_form() -> None:
    rules = [rule(name="web"), rule(listenPort=9090, enabled=False)]
    from_array = parse(json.dumps(rules), "rules.json")
    from_object = parse(json.dumps({"rules": rules}), "rules.json")
    assert from_array.rules == from_object.rules
    assert from_object.settings == Settings()


def test_every_key_is_read() -> None:
    data = {
        "settings": {
            "maxConnections": 50,
            "drainTimeout": 0,
            "logFormat": "json",
            "logLevel": "debug",
            "watch": False,
        },
        "rules": [
            rule(
                name="db.primary_1",
                listenHost="::1",
                listenPort=5432,
                targetHost="DB.example.com.",
                targetPort=5432,
                enabled=False,
                maxConnections=7,
                connectTimeout=0.5,
                idleTimeout=0,
            )
        ],
    }
    config = parse(json.dumps(data), "rules.json")
    assert config.settings == Settings(
        max_connections=50, drain_timeout=0.0, log_format="json", log_level="DEBUG", watch=False
    )
    (only,) = config.rules
    assert only == Rule("db.primary_1", "tcp", "::1", 5432, "DB.example.com.", 5432, False, 7, 0.5, 0.0, max_fails=0)
    assert isinstance(only.connect_timeout, float) and isinstance(only.idle_timeout, float)
    assert config.enabled_rules == ()


def test_integral_float_port_becomes_int() -> None:
    (only,) = parse(
        '[{"protocol": "tcp", "listenPort": 80.0, "targetHost": "x", "targetPort": 81}]', "r"
    ).rules
    assert only.listen_port == 80 and type(only.listen_port) is int
    assert only.name == "tcp-80"


def test_rule_properties() -> None:
    v4 = Rule("a", "tcp", "127.0.0.1", 8080, "10.0.0.1", 80)
    v6 = Rule("b", "tcp", "::1", 8080, "2001:db8::1", 443)
    assert v4.listen == "127.0.0.1:8080" and v4.target == "10.0.0.1:80"
    assert v6.listen == "[::1]:8080" and v6.target == "[2001:db8::1]:443"
    assert v4.transport == "tcp" and v4.key == ("tcp", "127.0.0.1", 8080)
    assert Rule("c", "udp", "::", 53, "x", 53).key == ("udp", "::", 53)
    assert Rule("d", "websocket", "::", 80, "x", 80).transport == "tcp"


def test_rule_equality_ignores_index() -> None:
    first = Rule("a", "tcp", "0.0.0.0", 1, "x", 2, index=0)
    moved = dataclasses.replace(first, index=5)
    assert first == moved and hash(first) == hash(moved)
    assert first != dataclasses.replace(first, idle_timeout=1.0)
    config = parse(json.dumps([rule(listenPort=1), rule(listenPort=2)]), "r")
    assert [r.index for r in config.rules] == [0, 1]


def test_dataclasses_are_frozen() -> None:
    config = parse(json.dumps([rule()]), "r")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rules[0].listen_port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.settings.log_level = "DEBUG"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.path = "x"  # type: ignore[misc]


def test_config_path_and_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = json.dumps([rule()]).encode()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rules.json").write_bytes(raw)
    config = load("rules.json")
    assert isinstance(config, Config)
    assert config.path == str(tmp_path / "rules.json")
    assert config.digest == hashlib.sha256(raw).hexdigest()
    assert parse(raw.decode(), "rules.json").digest == config.digest


def test_log_level_in_any_case_and_bom() -> None:
    config = parse('\ufeff{"settings": {"logLevel": "Warning"}, "rules": []}', "r")
    assert config.settings.log_level == "WARNING" and config.rules == ()
    assert parse(b"\xef\xbb\xbf[]", "r").rules == ()


def test_wildcards_of_other_families_and_other_ports_do_not_conflict() -> None:
    parse(
        json.dumps(
            [
                rule(name="a", listenHost="0.0.0.0"),
                rule(name="b", listenHost="::1"),  # IPv6: not covered by 0.0.0.0
                rule(name="c", listenHost="127.0.0.2", listenPort=8081),
                rule(name="d", listenHost="127.0.0.1", listenPort=8081),
                rule(name="e", listenHost="127.0.0.1", enabled=False),  # disabled rules bind nothing
                rule(name="f", listenHost="localhost", listenPort=8082),
                rule(name="g", listenHost="127.0.0.1", listenPort=8082),  # a name is not resolved
            ]
        ),
        "r",
    )


def test_schema_is_valid_and_closes_every_object() -> None:
    schema = json.loads(resources.files("gportmap.config").joinpath("schema", "rules.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    # The loader skips this check at run time (it cost a tenth of a start): the schema
    # it builds (with the registered protocols) is checked here instead.
    jsonschema.Draft202012Validator.check_schema(loader._validator().schema)
    defs = schema["$defs"]
    objects = [schema, defs["rule"], defs["settings"], defs["target"], defs["healthCheck"]]
    assert all(obj["additionalProperties"] is False for obj in objects)
    assert set(schema["$defs"]["rule"]["properties"]) == set(RULE_KEYS)
    assert set(schema["$defs"]["settings"]["properties"]) == {
        "maxConnections",
        "drainTimeout",
        "logFormat",
        "logLevel",
        "watch",
        "admin",
        "statsInterval",
        "allowTargets",
        "workers",
        "toxiproxy",
    }


# --- the file cannot be read as JSON ----------------------------------------------


def test_invalid_json_names_line_and_column() -> None:
    text = '[\n  {"protocol": "tcp",\n    "listenPort": 80\n    "targetHost": "x"}\n]'
    assert single_error(text) == "rules.json: invalid JSON at line 4, column 5: Expecting ',' delimiter"


@pytest.mark.parametrize("data", ["", b"", "  \n\t\r\n", b"\xef\xbb\xbf\n"])
def test_empty_file(data: str | bytes) -> None:
    assert single_error(data) == "rules.json: the file is empty"


def test_not_utf8() -> None:
    assert single_error(b'[\n {"name": "caf\xe9"}]') == (
        "rules.json: not UTF-8 text: byte 0xe9 at line 2, column 15 cannot be decoded (save the file as UTF-8)"
    )


@pytest.mark.parametrize(
    ("text", "found"), [("42", "a number"), ('"rules"', "a string"), ("true", "a boolean"), ("null", "null")]
)
def test_wrong_top_level(text: str, found: str) -> None:
    assert (
        single_error(text)
        == f'rules.json: the file must be a list of rules or an object with "rules" (found {found})'
    )


def test_object_without_rules() -> None:
    assert errors_of({"rule": []}) == [
        'rules.json: the file must be a list of rules or an object with "rules"',
        "rules.json: rule: unknown key (did you mean 'rules'?)",
    ]


@pytest.mark.parametrize(
    ("literal", "problem"),
    [
        ("NaN", "NaN is not allowed (JSON has no NaN or Infinity)"),
        ("Infinity", "Infinity is not allowed (JSON has no NaN or Infinity)"),
        ("-Infinity", "-Infinity is not allowed (JSON has no NaN or Infinity)"),
        ("1e999", "1e999 is out of range"),
    ],
)
def test_nan_and_infinity_are_rejected(literal: str, problem: str) -> None:
    text = '{"settings": {"drainTimeout": ' + literal + '}, "rules": []}'
    assert single_error(text) == f"rules.json: settings.drainTimeout: {problem}"


def test_duplicate_json_key_is_named_with_its_path() -> None:
    text = '[{"protocol": "tcp", "listenPort": 80, "targetHost": "x", "targetPort": 1, "listenPort": 81}]'
    assert single_error(text) == (
        "rules.json: rules[0].listenPort: duplicate key (a key may appear only once in an object)"
    )


# --- schema errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("80", "'80' is not a valid targetPort (a port from 1 to 65535, or a range \"C-D\")"),
        (80.5, "80.5 is not a valid targetPort (a port from 1 to 65535, or a range \"C-D\")"),
        (True, "true is not a valid targetPort (a port from 1 to 65535, or a range \"C-D\")"),
        (None, "null is not a valid targetPort (a port from 1 to 65535, or a range \"C-D\")"),
        ("80-79", "'80-79' is not a range (the first port must not be above the last)"),
        (70000, "70000 is greater than the maximum of 65535"),
        (0, "0 is less than the minimum of 1"),
    ],
)
def test_bad_target_port(value: Any, problem: str) -> None:
    data = [rule(), rule(listenPort=1), rule(listenPort=2)]
    data[2]["targetPort"] = value
    assert single_error(data) == f"rules.json: rules[2].targetPort: {problem}"


def test_timeouts_are_numbers_not_booleans() -> None:
    assert errors_of([rule(connectTimeout=True, idleTimeout="5")]) == [
        "rules.json: rules[0].connectTimeout: true is not of type 'number'",
        "rules.json: rules[0].idleTimeout: '5' is not of type 'number'",
    ]
    assert (
        single_error([rule(connectTimeout=0)])
        == "rules.json: rules[0].connectTimeout: 0 must be greater than 0"
    )
    assert single_error({"settings": {"drainTimeout": -1}, "rules": []}) == (
        "rules.json: settings.drainTimeout: -1 is less than the minimum of 0"
    )


def test_unknown_key_with_and_without_suggestion() -> None:
    data = [rule(listenPort=None, listenPrt=8080), rule(listenPort=9090, colour="red", targethost="x")]
    assert errors_of(data) == [
        "rules.json: rules[0]: missing required key 'listenPort'",
        "rules.json: rules[0].listenPrt: unknown key (did you mean 'listenPort'?)",
        "rules.json: rules[1].colour: unknown key",
        "rules.json: rules[1].targethost: unknown key (did you mean 'targetHost'?)",
    ]


def test_unknown_settings_key() -> None:
    assert single_error({"settings": {"drainTimout": 5}, "rules": []}) == (
        "rules.json: settings.drainTimout: unknown key (did you mean 'drainTimeout'?)"
    )


def test_misspelt_proxy_protocol_key_gets_a_suggestion() -> None:
    assert (
        single_error([rule(proxyProtocl="v2")])
        == "rules.json: rules[0].proxyProtocl: unknown key (did you mean 'proxyProtocol'?)"
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_is_read(version: str) -> None:
    with_header, without = parse(json.dumps([rule(proxyProtocol=version), rule(listenPort=8081)]), "r").rules
    assert with_header.proxy_protocol == version and without.proxy_protocol is None
    # A reload that adds, changes or drops the key changes the rule.
    assert dataclasses.replace(with_header, proxy_protocol=None) != with_header


@pytest.mark.parametrize(
    ("value", "shown", "hint"),
    [
        ("v3", "'v3'", ""),
        ("V1", "'V1'", ""),
        ("1", "'1'", "; did you mean 'v1'?"),
        (1, "1", ""),
        (True, "true", ""),
        (None, "null", ""),
        (["v1"], '["v1"]', ""),
    ],
)
def test_bad_proxy_protocol_version(value: Any, shown: str, hint: str) -> None:
    assert single_error([{**rule(), "proxyProtocol": value}]) == (
        f"rules.json: rules[0].proxyProtocol: {shown} is not a supported PROXY protocol version "
        f"(expected one of: 'v1', 'v2'{hint})"
    )


def test_proxy_protocol_applies_to_tcp_rules_only() -> None:
    assert errors_of(
        [
            rule(protocol="udp", listenPort=53, proxyProtocol="v1"),
            rule(protocol="websocket", listenPort=8081, proxyProtocol="v2"),
            rule(targetProtocol="websocket", proxyProtocol="v2"),  # a tunnel entry is a tcp rule: accepted
        ]
    ) == [
        "rules.json: rules[0].proxyProtocol: applies only to tcp rules",
        "rules.json: rules[1].proxyProtocol: applies only to tcp rules",
    ]


def test_odd_key_is_quoted_in_the_path() -> None:
    assert single_error([rule(**{"a b": 1})]) == 'rules.json: rules[0]["a b"]: unknown key'


def test_missing_keys() -> None:
    """A rule names its target by targetHost and targetPort, or by ``targets``
    (SPEC §8): neither is one error that names both ways."""
    assert errors_of([rule(targetHost=None, targetPort=None), rule(listenPort=1, targetPort=None)]) == [
        "rules.json: rules[0]: missing required key 'targetHost' (or a pool: 'targets')",
        "rules.json: rules[1]: missing required key 'targetPort'",
    ]


def test_rule_that_is_not_an_object() -> None:
    assert single_error({"rules": [rule(), 5]}) == "rules.json: rules[1]: 5 is not of type 'object'"


@pytest.mark.parametrize(
    ("protocol", "problem"),
    [
        ("tpc", f"'tpc' is not a supported protocol (expected one of: {PROTOCOLS}; did you mean 'tcp'?)"),
        ("smtp", f"'smtp' is not a supported protocol (expected one of: {PROTOCOLS})"),
    ],
)
def test_bad_protocol(protocol: str, problem: str) -> None:
    assert single_error([rule(protocol=protocol)]) == f"rules.json: rules[0].protocol: {problem}"


def test_udp_rule_keys_and_defaults() -> None:
    udp = {"protocol": "udp", "listenPort": 53, "targetHost": "10.0.0.1", "targetPort": 53}
    default, tuned = parse(
        json.dumps([udp, {**udp, "listenPort": 54, "sessionTimeout": 0.5, "maxSessions": 10}]), "r"
    ).rules
    assert (default.name, default.session_timeout, default.max_sessions) == ("udp-53", 60.0, 1000)
    assert (tuned.session_timeout, tuned.max_sessions) == (0.5, 10)
    assert isinstance(tuned.session_timeout, float) and default.key == ("udp", "0.0.0.0", 53)


def test_tcp_and_udp_rules_may_share_a_port() -> None:
    udp = rule(protocol="udp", name="dns-udp", listenPort=53)
    parse(json.dumps([rule(name="dns-tcp", listenPort=53), udp]), "r")
    assert single_error([udp, {**udp, "name": "again"}]) == (
        "rules.json: rules[1]: listen address 0.0.0.0:53 is already used by rules[0] ('dns-udp'); "
        "two enabled udp rules cannot listen on the same address and port"
    )


def test_keys_that_do_not_apply_to_the_protocol_are_errors() -> None:
    assert errors_of(
        [
            rule(sessionTimeout=5, maxSessions=10),
            rule(protocol="udp", listenPort=53, maxConnections=5, connectTimeout=1, idleTimeout=30),
        ]
    ) == [
        "rules.json: rules[0].sessionTimeout: applies only to udp rules (for tcp rules use 'idleTimeout')",
        "rules.json: rules[0].maxSessions: applies only to udp rules (for tcp rules use 'maxConnections')",
        "rules.json: rules[1].maxConnections: applies only to tcp and websocket rules (for udp rules use 'maxSessions')",
        'rules.json: rules[1].connectTimeout: applies to udp rules only with "targetProtocol": "websocket"',
        "rules.json: rules[1].idleTimeout: applies only to tcp and websocket rules (for udp rules use 'sessionTimeout')",
    ]


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("sessionTimeout", 0, "0 must be greater than 0"),
        ("sessionTimeout", "60", "'60' is not of type 'number'"),
        ("maxSessions", 0, "0 is less than the minimum of 1"),
        ("maxSessions", 1.5, "1.5 is not of type 'integer'"),
    ],
)
def test_bad_udp_values(key: str, value: Any, problem: str) -> None:
    udp = rule(protocol="udp", **{key: value})
    assert single_error([udp]) == f"rules.json: rules[0].{key}: {problem}"


def test_bad_settings_values() -> None:
    data = {"settings": {"logFormat": "xml", "logLevel": "warn", "maxConnections": 0}, "rules": []}
    assert errors_of(data) == [
        "rules.json: settings.logFormat: 'xml' is not a supported log format (expected one of: 'text', 'json')",
        "rules.json: settings.logLevel: 'warn' is not a supported log level "
        "(expected one of: 'DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'; did you mean 'WARNING'?)",
        "rules.json: settings.maxConnections: 0 is less than the minimum of 1",
    ]


@pytest.mark.parametrize("name", ["a b", "", "x" * 65, "web\n", "caf\u00e9"])
def test_bad_name(name: str) -> None:
    assert single_error([rule(name=name)]) == (
        f"rules.json: rules[0].name: {clipped(name)} is not a valid name (1 to 64 letters, digits, '_', '.' or '-')"
    )


# --- semantic errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "hint"),
    [
        ("http://x", " (give a host, not a URL)"),
        ("a b", ""),
        ("-x", ""),
        ("x-", ""),
        ("", ""),
        ("a..b", ""),
        ("999.1.1.1", ""),
        ("x" * 64, ""),
        ("[::1]", " (write an IPv6 address without brackets)"),
    ],
)
def test_bad_host(host: str, hint: str) -> None:
    assert errors_of([rule(targetHost=host, listenHost=host)]) == [
        f"rules.json: rules[0].targetHost: {clipped(host)} is not an IP address or host name{hint}",
        f"rules.json: rules[0].listenHost: {clipped(host)} is not an IP address or host name{hint}",
    ]


@pytest.mark.parametrize(
    "host", ["example.com", "example.com.", "a-b.c0", "x" * 63, "::1", "fe80::1", "10.0.0.1"]
)
def test_good_host(host: str) -> None:
    assert parse(json.dumps([rule(targetHost=host)]), "r").rules[0].target_host == host


def test_long_host_name() -> None:
    name = ".".join(["a" * 63] * 4)  # 255 characters
    assert single_error([rule(targetHost=name)]).endswith("is not an IP address or host name")


def test_duplicate_listen_address() -> None:
    data = [rule(name="web", listenHost="127.0.0.1"), rule(name="api", listenHost="127.0.0.1")]
    assert single_error(data) == (
        "rules.json: rules[1]: listen address 127.0.0.1:8080 is already used by rules[0] ('web'); "
        "two enabled tcp rules cannot listen on the same address and port"
    )


def test_duplicate_listen_address_compares_normalized_hosts() -> None:
    assert len(errors_of([rule(name="a", listenHost="::1"), rule(name="b", listenHost="0:0::0:1")])) == 1
    assert (
        len(errors_of([rule(name="a", listenHost="LocalHost"), rule(name="b", listenHost="localhost.")])) == 1
    )


def test_wildcard_overlap() -> None:
    data = [
        rule(name="all", listenHost="0.0.0.0"),
        rule(name="local", listenHost="127.0.0.1"),
        rule(name="other", listenHost="10.1.2.3", listenPort=9000),
        rule(name="dual", listenHost="::", listenPort=9000),
    ]
    assert errors_of(data) == [
        "rules.json: rules[1]: listen address 127.0.0.1:8080 overlaps 0.0.0.0:8080 of rules[0] ('all'): "
        "'0.0.0.0' listens on every IPv4 address",
        "rules.json: rules[3]: listen address [::]:9000 overlaps 10.1.2.3:9000 of rules[2] ('other'): "
        "'::' listens on every address, IPv4 included",
    ]


def test_duplicate_names() -> None:
    data = [
        rule(name="web", listenPort=1),
        rule(listenPort=2, listenHost="127.0.0.1"),
        rule(name="web", listenPort=3, enabled=False),  # disabled rules count
        rule(listenPort=2, listenHost="10.0.0.1"),  # default name "tcp-2" again
        rule(name="tcp-2", listenPort=4),
    ]
    assert errors_of(data) == [
        "rules.json: rules[2].name: 'web' is already used by rules[0]",
        "rules.json: rules[3]: the default name 'tcp-2' is already used by rules[1] (as its default name); "
        'set "name" to tell the rules apart',
        "rules.json: rules[4].name: 'tcp-2' is already used by rules[1] (as its default name)",
    ]


# --- all at once ------------------------------------------------------------------


def test_every_error_is_reported_at_once_in_document_order() -> None:
    text = json.dumps(
        {
            "rules": [
                {"protocol": "tcp", "listenPort": 70000, "targetHost": "a b", "targetPort": 1, "nmae": "x"},
                rule(name="web"),
                rule(name="web", listenPort=8081, targetHost="http://x"),
                rule(protocol="tpc"),
            ],
            "settings": {"logLevel": "LOUD", "drainTimeout": "1"},
        }
    )
    assert errors_of(text) == [
        "rules.json: settings.logLevel: 'LOUD' is not a supported log level "
        "(expected one of: 'DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')",
        "rules.json: settings.drainTimeout: '1' is not of type 'number'",
        "rules.json: rules[0].listenPort: 70000 is greater than the maximum of 65535",
        "rules.json: rules[0].nmae: unknown key (did you mean 'name'?)",
        "rules.json: rules[2].targetHost: 'http://x' is not an IP address or host name (give a host, not a URL)",
        "rules.json: rules[2].name: 'web' is already used by rules[1]",
        "rules.json: rules[3].protocol: 'tpc' is not a supported protocol "
        f"(expected one of: {PROTOCOLS}; did you mean 'tcp'?)",
    ]


def test_file_is_named_as_given(tmp_path: Path) -> None:
    assert errors_of("[1]", path="conf/my rules.json") == [
        "conf/my rules.json: rules[0]: 1 is not of type 'object'"
    ]
    with pytest.raises(ConfigError) as info:
        parse("[1]", Path("conf") / "r.json")
    assert info.value.errors == [f"{Path('conf') / 'r.json'}: rules[0]: 1 is not of type 'object'"]


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as info:
        load(missing)
    assert info.value.errors == [f"{missing}: cannot read: No such file or directory"]
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert info.value.errors == [f"{tmp_path}: cannot read: it is a directory, not a regular file"]


def test_load_reports_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text("[{]")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.errors == [
        f"{path}: invalid JSON at line 1, column 3: Expecting property name enclosed in double quotes"
    ]


# --- robustness -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=30,
)
# Random plugin names would import arbitrary modules: plugins are tested on their own.
rule_keys = st.sampled_from([key for key in RULE_KEYS if key != "plugins"] + ["bogus"])
rule_values = (
    st.sampled_from(
        [
            "tcp",
            "udp",
            "websocket",
            "/",
            "/ws",
            "::",
            "0.0.0.0",
            "127.0.0.1",
            "x",
            "web",
            80,
            80.0,
            0,
            70000,
            True,
        ]
    )
    | json_values
)
plausible_rules = st.lists(st.dictionaries(rule_keys, rule_values, max_size=11), max_size=5)
documents = st.one_of(
    json_values.map(json.dumps),
    plausible_rules.map(json.dumps),
    st.builds(
        lambda rules, settings: json.dumps({"rules": rules, "settings": settings}),
        plausible_rules,
        json_values,
    ),
    st.binary(),
    st.text(),
)


@pytest.mark.slow  # hypothesis: 200 generated documents
@settings(max_examples=200, deadline=None)
@given(documents)
def test_parse_returns_config_or_raises_config_error(data: bytes | str) -> None:
    try:
        config = parse(data, "fuzz.json")
    except ConfigError as error:
        assert error.errors
        for line in error.errors:
            assert line.startswith("fuzz.json: ") and "\n" not in line
            line.encode("utf-8")  # printable: no lone surrogate from the input leaks into a message
    else:
        assert isinstance(config, Config) and config.path == os.path.abspath("fuzz.json")


@pytest.mark.parametrize("value", [1, 4, "auto"])
def test_settings_workers_accepts_a_count_or_auto(value) -> None:
    config = parse(json.dumps({"settings": {"workers": value}, "rules": [rule()]}), "w.json")
    assert config.settings.workers == value


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (0, "w.json: settings.workers"),
        ("many", "w.json: settings.workers"),
        (1.5, "w.json: settings.workers"),
        (257, "w.json: settings.workers"),
    ],
)
def test_settings_workers_rejects_other_values(value, problem) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(json.dumps({"settings": {"workers": value}, "rules": [rule()]}), "w.json")
    assert any(error.startswith(problem) for error in caught.value.errors), caught.value.errors


# --- target pools (SPEC §8) ---------------------------------------------------------


def pool_rule(*targets: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A rule with ``targets`` instead of targetHost/targetPort."""
    return rule(targetHost=None, targetPort=None, targets=list(targets), **extra)


def test_a_pool_is_read_with_every_default() -> None:
    from gportmap.config.model import Balance, CheckType, HealthCheck, Target

    (only,) = parse(
        json.dumps(
            [
                pool_rule(
                    {"host": "127.0.0.1", "port": 8001, "weight": 2},
                    {"host": "db.example.com", "port": 8002, "name": "second"},
                    {"host": "::1", "port": 8003, "backup": True},
                    balance="leastconn",
                    retries=1,
                    maxFails=0,
                    failTimeout=2.5,
                    healthCheck={"type": "http", "interval": 2, "timeout": 1, "expectStatus": [204, "300-302"]},
                )
            ]
        ),
        "rules.json",
    ).rules
    assert only.targets == (
        Target("127.0.0.1", 8001, 2),
        Target("db.example.com", 8002, name="second"),
        Target("::1", 8003, backup=True),
    )
    assert (only.target_host, only.target_port) == ("127.0.0.1", 8001)  # the first stands for the pool
    assert only.target == "127.0.0.1:8001,db.example.com:8002,[::1]:8003"
    assert [t.label for t in only.targets] == ["127.0.0.1:8001", "second", "[::1]:8003"]
    assert (only.balance, only.retries, only.max_fails, only.fail_timeout) == (Balance.LEASTCONN, 1, 0, 2.5)
    assert only.health_check == HealthCheck(
        CheckType.HTTP, 2.0, 1.0, expect_status=((204, 204), (300, 302))
    )


def test_a_single_target_is_a_pool_of_one_with_the_defaults() -> None:
    from gportmap.config.model import Balance, Target

    (only,) = parse(json.dumps([rule()]), "rules.json").rules
    assert only.targets == (Target("127.0.0.1", 80),)
    assert (only.balance, only.retries, only.max_fails, only.fail_timeout, only.health_check) == (
        Balance.ROUNDROBIN, 2, 0, 10.0, None  # maxFails 0: a sole target has nowhere else to go
    )
    two = [rule(targetHost=None, targetPort=None, targets=[{"host": "127.0.0.1", "port": p} for p in (1, 2)])]
    (pool,) = parse(json.dumps([{k: v for k, v in two[0].items() if v is not None}]), "rules.json").rules
    assert pool.max_fails == 3
    (explicit,) = parse(json.dumps([rule(maxFails=5)]), "rules.json").rules
    assert explicit.max_fails == 5


def test_both_forms_of_target_is_an_error() -> None:
    assert single_error([rule(targets=[{"host": "127.0.0.1", "port": 1}])]) == (
        "rules.json: rules[0]: give either 'targets' or 'targetHost' and 'targetPort', not both"
    )


def test_pool_problems_name_the_target_and_the_problem() -> None:
    assert errors_of(
        [
            pool_rule(
                {"host": "a..b", "port": 1},
                {"host": "127.0.0.1", "port": 2, "name": "x"},
                {"host": "127.0.0.1", "port": 2},
                {"host": "127.0.0.2", "port": 2, "name": "x"},
            ),
            pool_rule({"host": "127.0.0.1", "port": 1, "backup": True}, listenPort=2),
            pool_rule(listenPort=3),
            pool_rule(
                {"host": "127.0.0.1", "port": 1, "weight": 0, "colour": "red"},
                {"host": "127.0.0.3", "port": 70000},
                listenPort=4,
                balance="rr",
            ),
        ]
    ) == [
        "rules.json: rules[0].targets[0].host: 'a..b' is not an IP address or host name",
        "rules.json: rules[0].targets[2]: target 127.0.0.1:2 is already targets[1]",
        "rules.json: rules[0].targets[3].name: 'x' is already the name of targets[1]",
        "rules.json: rules[1].targets: every target is a backup: at least one must not be",
        "rules.json: rules[2].targets: [] should be non-empty",
        "rules.json: rules[3].targets[0].weight: 0 is less than the minimum of 1",
        "rules.json: rules[3].targets[0].colour: unknown key",
        "rules.json: rules[3].targets[1].port: 70000 is greater than the maximum of 65535",
        "rules.json: rules[3].balance: 'rr' is not a supported balance method "
        "(expected one of: 'roundrobin', 'leastconn', 'source', 'first', 'random')",
    ]


def test_health_check_keys_must_fit_its_type_and_the_protocol() -> None:
    assert errors_of(
        [
            rule(healthCheck={"type": "http", "send": "x", "timeout": 9}),
            rule(listenPort=2, healthCheck={"type": "send-expect", "path": "/x"}),
            rule(listenPort=3, healthCheck={"type": "tls"}),
            rule(protocol="udp", listenPort=4, healthCheck={"type": "http"}, retries=1),
            rule(listenPort=5, healthCheck={"type": "ping", "rise": 0}),
            rule(listenPort=6, healthCheck={"type": "http", "expectStatus": ["399-200"]}),
        ]
    ) == [
        "rules.json: rules[0].healthCheck.send: applies only to 'send-expect' checks",
        "rules.json: rules[0].healthCheck.timeout: 9 is longer than the interval (5)",
        "rules.json: rules[1].healthCheck: a 'send-expect' check needs 'expect' (what the reply must contain)",
        "rules.json: rules[1].healthCheck.path: applies only to 'http' checks",
        "rules.json: rules[2].healthCheck.type: a 'tls' check needs the rule's 'targetTls'",
        "rules.json: rules[3].healthCheck.type: 'http' checks apply only to tcp and websocket rules",
        "rules.json: rules[3].retries: applies only to tcp and websocket rules",
        "rules.json: rules[4].healthCheck.type: 'ping' is not a supported health check type "
        "(expected one of: 'tcp', 'tls', 'http', 'send-expect')",
        "rules.json: rules[4].healthCheck.rise: 0 is less than the minimum of 1",
        "rules.json: rules[5].healthCheck.expectStatus[0]: 399-200 is not a range (low before high)",
    ]


def test_every_target_of_a_pool_is_checked_for_self_loops_and_allow_targets() -> None:
    looping = pool_rule({"host": "127.0.0.1", "port": 9}, {"host": "127.0.0.1", "port": 8080})
    assert errors_of([looping]) == [
        "rules.json: rules[0].targets[1]: forwards to its own listening address (target 127.0.0.1:8080, "
        "listening on 0.0.0.0:8080): every connection would loop back into it until maxConnections or the "
        "open-file limit is used up"
    ]
    outside = pool_rule({"host": "127.0.0.1", "port": 9}, {"host": "10.0.0.1", "port": 9})
    assert errors_of({"settings": {"allowTargets": ["127.0.0.0/8"]}, "rules": [outside]}) == [
        "rules.json: rules[0].targets[1]: rule 'tcp-8080': target 10.0.0.1:9 (10.0.0.1) is outside settings.allowTargets"
    ]


def test_a_short_check_interval_shortens_the_default_timeout() -> None:
    (only,) = parse(json.dumps([rule(healthCheck={"type": "tcp", "interval": 0.5})]), "rules.json").rules
    assert only.health_check is not None
    assert (only.health_check.interval, only.health_check.timeout) == (0.5, 0.5)
