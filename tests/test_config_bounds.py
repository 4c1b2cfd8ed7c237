"""Bounded input for the rules file (issue 15).

- Only a regular file of at most ``MAX_RULES_FILE_BYTES`` is read: a FIFO, a device
  (``rules.json -> /dev/zero``), a directory or an oversized file make ``--check`` and
  start-up exit 2 at once, where they used to hang (FIFO), run out of memory and exit 1
  (/dev/zero) or read the whole file. Certificate files get the same treatment.
- Error output is bounded: each line clipped, at most ``MAX_ERRORS`` listed then a line
  counting the rest, and the checking itself stops after ``MAX_PROBLEMS``, so the
  hostile files of the issue (a 50 MB key, a 1 MB array of numbers, 40,000 unknown
  keys in one object) are rejected in well under a second instead of 20-30 s.
- A rule whose target is its own listening address is a config error.

Subprocesses run with a timeout, so that a hang fails the test instead of the run; no
assertion is about time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gportmap.config import (
    MAX_ERROR_CHARS,
    MAX_ERRORS,
    MAX_PROBLEMS,
    MAX_RULES_FILE_BYTES,
    parse,
    read_rules_file,
)
from gportmap.config import reading as config_reading
from gportmap.errors import ConfigError

#: Seconds a subprocess gets: generous for a loaded machine, finite for a hang.
SUBPROCESS_TIMEOUT = 60


def rule(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"protocol": "tcp", "listenPort": 8080, "targetHost": "127.0.0.1", "targetPort": 80}
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def gportmap(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gportmap", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=SUBPROCESS_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def errors_of(document: Any) -> ConfigError:
    text = document if isinstance(document, str) else json.dumps(document)
    with pytest.raises(ConfigError) as info:
        parse(text, "rules.json")
    return info.value


# --- what is read -----------------------------------------------------------------


def make_fifo(path: Path) -> str:
    os.mkfifo(path)
    return "it is a FIFO (named pipe), not a regular file"


def make_dev_zero_link(path: Path) -> str:
    path.symlink_to("/dev/zero")
    return "it leads to /dev/zero, a character device, not a regular file"


def make_directory(path: Path) -> str:
    path.mkdir()
    return "it is a directory, not a regular file"


def make_oversized(path: Path) -> str:
    """A valid rules file, padded with whitespace to one byte over the limit: the size
    alone refuses it (the old code accepted it, after reading all of it)."""
    text = json.dumps([rule(listenPort=18080)])
    path.write_text(text + " " * (MAX_RULES_FILE_BYTES + 1 - len(text)))
    size = MAX_RULES_FILE_BYTES + 1
    return f"the file is {size:,} bytes, larger than the limit of {MAX_RULES_FILE_BYTES:,} bytes (16 MiB)"


NOT_READ = {
    "fifo": make_fifo,
    "dev_zero_symlink": make_dev_zero_link,
    "directory": make_directory,
    "oversized": make_oversized,
}


@pytest.mark.parametrize("kind", sorted(NOT_READ))
def test_check_refuses_what_is_not_a_bounded_regular_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "rules.json"
    reason = NOT_READ[kind](path)
    result = gportmap("--check", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"{path}: cannot read: {reason}"]
    assert result.stdout == ""


@pytest.mark.parametrize("kind", sorted(NOT_READ))
def test_start_up_refuses_what_is_not_a_bounded_regular_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "rules.json"
    reason = NOT_READ[kind](path)
    result = gportmap(str(path), "--log-format", "json", "--admin", "off", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (record,) = [json.loads(line) for line in result.stderr.splitlines()]
    assert record["event"] == "config_invalid"
    assert record["errors"] == [f"{path}: cannot read: {reason}"]


def test_a_fifo_as_certificate_file_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "cert.pem")
    (tmp_path / "key.pem").write_text("not read: the certificate fails first\n")
    path = tmp_path / "rules.json"
    path.write_text(json.dumps([rule(tls={"certFile": "cert.pem", "keyFile": "key.pem"})]))
    result = gportmap("--check", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"{path}: rules[0].tls.certFile: cannot read {tmp_path / 'cert.pem'}: it is a FIFO (named pipe), not a regular file"
    ]


def test_read_rules_file_reads_up_to_the_limit_and_no_further(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_reading, "MAX_RULES_FILE_BYTES", 10)
    path = tmp_path / "rules.json"
    path.write_bytes(b"[        ]")
    assert read_rules_file(path) == b"[        ]"
    path.write_bytes(b"[         ]")
    with pytest.raises(ConfigError) as info:
        read_rules_file(path)
    assert info.value.errors == [f"{path}: cannot read: the file is 11 bytes, larger than the limit of 10 bytes"]


def test_a_file_whose_size_is_not_its_length_is_still_cut_at_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc files say 0 bytes and have more: the read itself stops at the limit."""
    monkeypatch.setattr(config_reading, "MAX_RULES_FILE_BYTES", 10)
    link = tmp_path / "rules.json"
    link.symlink_to("/proc/self/status")
    with pytest.raises(ConfigError) as info:
        read_rules_file(link)
    assert info.value.errors == [f"{link}: cannot read: the file is larger than the limit of 10 bytes"]


# --- bounded errors ---------------------------------------------------------------


def test_a_50_mb_key_gives_one_clipped_line() -> None:
    key = "k" * (50 * 1024 * 1024)
    error = errors_of([{**rule(), key: 1}])
    (line,) = error.errors
    assert line == f'rules.json: rules[0][{json.dumps("k" * 61 + "...")}]: unknown key'


def test_a_1_mb_array_of_numbers_lists_the_first_errors_and_counts_the_rest() -> None:
    text = json.dumps({"rules": [1] * 400_000}, separators=(",", ":"))
    assert len(text) > 750_000
    error = errors_of(text)
    assert len(error.errors) == MAX_ERRORS + 1
    assert error.errors[:MAX_ERRORS] == [f"rules.json: rules[{i}]: 1 is not of type 'object'" for i in range(MAX_ERRORS)]
    more = MAX_PROBLEMS - MAX_ERRORS
    assert error.errors[-1] == (
        f"rules.json: ... and at least {more:,} more errors "
        f"(checking stopped after {MAX_PROBLEMS:,}; only the first {MAX_ERRORS} are listed)"
    )
    assert (error.found, error.complete, error.count) == (MAX_PROBLEMS, False, f"at least {MAX_PROBLEMS:,} errors")


def test_40000_unknown_keys_in_one_object_list_the_first_in_document_order() -> None:
    item = {**rule(), **{f"unknownKey{i}": 1 for i in range(40_000)}}
    error = errors_of([item])
    assert len(error.errors) == MAX_ERRORS + 1
    assert error.errors[:MAX_ERRORS] == [f"rules.json: rules[0].unknownKey{i}: unknown key" for i in range(MAX_ERRORS)]
    assert error.errors[-1].startswith(f"rules.json: ... and at least {MAX_PROBLEMS - MAX_ERRORS:,} more errors")


def test_unknown_keys_listed_still_get_their_suggestion() -> None:
    """The "did you mean" is worded lazily, for listed problems only: it must still come."""
    item = {**rule(), "listenPrt": 1, **{f"zz{i}": 1 for i in range(MAX_PROBLEMS)}}
    error = errors_of([item])
    assert error.errors[0] == "rules.json: rules[0].listenPrt: unknown key (did you mean 'listenPort'?)"


def test_errors_past_the_listed_ones_are_counted_exactly_below_the_checking_limit() -> None:
    error = errors_of({"rules": [1] * (MAX_ERRORS + 50)})
    assert len(error.errors) == MAX_ERRORS + 1
    assert error.errors[-1] == f"rules.json: ... and 50 more errors (only the first {MAX_ERRORS} are listed)"
    assert (error.found, error.complete, error.count) == (MAX_ERRORS + 50, True, f"{MAX_ERRORS + 50} error(s)")


def test_exactly_max_errors_are_all_listed_without_a_count_line() -> None:
    error = errors_of({"rules": [1] * MAX_ERRORS})
    assert len(error.errors) == MAX_ERRORS and error.errors[-1].endswith("rules[99]: 1 is not of type 'object'")


def nested(depth: int, inner: str) -> str:
    return '{"a": ' * depth + inner + "}" * depth


HUGE = "x" * 1_000_000
LONG_LINES = {
    # a duplicate key deep down: the path alone was thousands of characters
    "deep_path": '{"rules": [], "settings": ' + nested(900, '{"b": 1, "b": 2}') + "}",
    # a long key, twice in one object: the duplicate and the unknown key named it whole
    "duplicate_long_key": f'{{"rules": [], "settings": {{"{HUGE}": 1, "{HUGE}": 2}}}}',
    # jsonschema's own words ("... is too long") quote the whole value
    "long_list": [rule(protocol="websocket", origins=[f"http://o{i}" for i in range(20_000)])],
    "long_string": [rule(tls={"certFile": HUGE, "keyFile": "key.pem"})],
    # clipped before too; here for the "did you mean" that skips words too long to match
    "long_enum_value": [rule(protocol=HUGE)],
}


@pytest.mark.parametrize("document", LONG_LINES.values(), ids=list(LONG_LINES))
def test_every_line_is_clipped(document: Any) -> None:
    error = errors_of(document)
    assert error.errors
    for line in error.errors:
        assert line.startswith("rules.json: ") and len(line) <= MAX_ERROR_CHARS, line[:200]


def test_a_long_list_that_does_not_sort_is_checked_for_duplicates_in_linear_time() -> None:
    """jsonschema compares every pair when the items do not sort (strings and one object):
    minutes for this list before. Duplicates are still found, as before."""
    origins: list[Any] = [f"http://o{i}" for i in range(20_000)] + [{}]
    error = errors_of([rule(protocol="websocket", origins=origins)])
    assert [line.split(": ", 2)[1:] for line in error.errors] == [
        ["rules[0].origins", f'{json.dumps(origins)[:57]}... is too long (at most 1000 items)'],
        ["rules[0].origins[20000]", "{} is not of type 'string'"],
    ]
    duplicates = errors_of([rule(protocol="websocket", origins=["http://a", "http://b", "http://a"])])
    assert duplicates.errors == ['rules.json: rules[0].origins: ["http://a", "http://b", "http://a"] has non-unique elements']


def test_many_rules_on_one_port_are_checked_for_collisions_against_the_first_they_meet() -> None:
    """One index per port, not every earlier rule per rule (quadratic before: 3,000 rules
    on one port took seconds); the earliest colliding rule is still the one named."""
    rules = [rule(name=f"r{i}", listenHost=f"10.{i // 250}.{i % 250}.1", listenPort=80, targetPort=8000) for i in range(3000)]
    rules += [
        rule(name="v6", listenHost="::1", listenPort=80, targetPort=8000),
        rule(name="any4", listenHost="0.0.0.0", listenPort=80, targetPort=8000),
        rule(name="any6", listenHost="::", listenPort=80, targetPort=8000),
        rule(name="again", listenHost="10.0.7.1", listenPort=80, targetPort=8000),
    ]
    error = errors_of(rules)
    assert error.errors == [
        "rules.json: rules[3001]: listen address 0.0.0.0:80 overlaps 10.0.0.1:80 of rules[0] ('r0'): "
        "'0.0.0.0' listens on every IPv4 address",
        "rules.json: rules[3002]: listen address [::]:80 overlaps 10.0.0.1:80 of rules[0] ('r0'): "
        "'::' listens on every address, IPv4 included",
        "rules.json: rules[3003]: listen address 10.0.7.1:80 is already used by rules[7] ('r7'); "
        "two enabled tcp rules cannot listen on the same address and port",
    ]


def test_allow_targets_skips_targets_that_are_not_host_names() -> None:
    """getaddrinfo raised UnicodeError (a crash) on "a..b" before."""
    document = {"settings": {"allowTargets": ["127.0.0.0/8"]}, "rules": [rule(targetHost="a..b")]}
    assert errors_of(document).errors == ["rules.json: rules[0].targetHost: 'a..b' is not an IP address or host name"]


# --- a rule that forwards to itself ------------------------------------------------

TCP_LOOP = "every connection would loop back into it until maxConnections or the open-file limit is used up"
UDP_LOOP = "every datagram would loop back into it, a new session each time, until maxSessions is used up"

SELF_LOOPS = {
    "same_address": (rule(listenHost="127.0.0.1", listenPort=9000, targetPort=9000), "127.0.0.1:9000", "127.0.0.1:9000", TCP_LOOP),
    "wildcard_to_loopback": (rule(listenPort=9000, targetPort=9000), "127.0.0.1:9000", "0.0.0.0:9000", TCP_LOOP),
    "wildcard_to_other_loopback": (rule(listenPort=9000, targetHost="127.0.0.2", targetPort=9000), "127.0.0.2:9000", "0.0.0.0:9000", TCP_LOOP),
    "wildcard_to_localhost": (rule(listenPort=9000, targetHost="LocalHost.", targetPort=9000), "LocalHost.:9000", "0.0.0.0:9000", TCP_LOOP),
    "wildcard_to_wildcard": (rule(listenPort=9000, targetHost="0.0.0.0", targetPort=9000), "0.0.0.0:9000", "0.0.0.0:9000", TCP_LOOP),
    "ipv6_wildcard_to_ipv6_loopback": (rule(listenHost="::", listenPort=9000, targetHost="::1", targetPort=9000), "[::1]:9000", "[::]:9000", TCP_LOOP),
    "ipv6_wildcard_to_ipv4_loopback": (rule(listenHost="::", listenPort=9000, targetPort=9000), "127.0.0.1:9000", "[::]:9000", TCP_LOOP),
    "mapped_address": (rule(listenHost="127.0.0.1", listenPort=9000, targetHost="::ffff:127.0.0.1", targetPort=9000), "[::ffff:127.0.0.1]:9000", "127.0.0.1:9000", TCP_LOOP),
    "same_name": (rule(listenHost="gw.example", listenPort=9000, targetHost="GW.example.", targetPort=9000), "GW.example.:9000", "gw.example:9000", TCP_LOOP),
    "websocket": (rule(protocol="websocket", listenPort=9000, targetPort=9000), "127.0.0.1:9000", "0.0.0.0:9000", TCP_LOOP),
    "tcp_tunnel": (rule(listenPort=9000, targetPort=9000, targetProtocol="websocket"), "127.0.0.1:9000", "0.0.0.0:9000", TCP_LOOP),
    "udp": (rule(protocol="udp", listenPort=9000, targetPort=9000), "127.0.0.1:9000", "0.0.0.0:9000", UDP_LOOP),
    "disabled": (rule(listenPort=9000, targetPort=9000, enabled=False), "127.0.0.1:9000", "0.0.0.0:9000", TCP_LOOP),
}


@pytest.mark.parametrize("case", SELF_LOOPS.values(), ids=list(SELF_LOOPS))
def test_a_rule_forwarding_to_its_own_listening_address_is_an_error(case: tuple[dict, str, str, str]) -> None:
    item, target, listen, what = case
    assert errors_of([item]).errors == [
        f"rules.json: rules[0]: forwards to its own listening address (target {target}, listening on {listen}): {what}"
    ]


NEAR_MISSES = {
    "other_port": rule(listenPort=9000, targetPort=9001),
    "other_loopback_address": rule(listenHost="127.0.0.1", listenPort=9000, targetHost="127.0.0.2", targetPort=9000),
    "other_family": rule(listenHost="127.0.0.1", listenPort=9000, targetHost="::1", targetPort=9000),
    "ipv4_wildcard_to_ipv6_loopback": rule(listenPort=9000, targetHost="::1", targetPort=9000),
    "wildcard_to_remote_host": rule(listenPort=9000, targetHost="10.1.2.3", targetPort=9000),
    "wildcard_to_a_name": rule(listenPort=9000, targetHost="db.example", targetPort=9000),
    "udp_to_another_port": rule(protocol="udp", listenPort=9000, targetPort=9001),
}


@pytest.mark.parametrize("item", NEAR_MISSES.values(), ids=list(NEAR_MISSES))
def test_a_rule_forwarding_elsewhere_is_accepted(item: dict) -> None:
    assert len(parse(json.dumps([item]), "rules.json").rules) == 1


def test_check_rejects_a_self_loop_and_accepts_a_near_miss(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps([rule(name="loop", listenPort=9000, targetHost="localhost", targetPort=9000)]))
    rejected = gportmap("--check", str(path), cwd=tmp_path)
    assert rejected.returncode == 2
    assert rejected.stderr.splitlines() == [
        f"{path}: rules[0]: forwards to its own listening address (target localhost:9000, "
        f"listening on 0.0.0.0:9000): {TCP_LOOP}"
    ]
    path.write_text(json.dumps([rule(name="fine", listenPort=9000, targetHost="localhost", targetPort=9001)]))
    accepted = gportmap("--check", str(path), cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.splitlines()[-1] == f"{path}: 1 rule(s), valid"
