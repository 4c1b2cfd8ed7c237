"""``gportmap ctl``: the command-line client of a running gportmap (SPEC §10).

It speaks to the admin endpoint over HTTP with the standard library alone (no
proxy is ever used: the endpoint is local by design), prints tables for people and
the raw answers with ``--json``, and exits with codes a script can rely on:
0 done, 2 refused (an invalid rule, 409, 412, or a usage error), 1 anything else
(unreachable, 401/403, an unknown rule name, a server error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from gportmap.config import format_address, parse_listen, read_rules_file
from gportmap.config.reading import MAX_TOKEN_FILE_BYTES, Unreadable, read_regular_file
from gportmap.errors import ConfigError

EXIT_DONE, EXIT_OTHER, EXIT_REFUSED = 0, 1, 2
DEFAULT_ADMIN = "127.0.0.1:9900"
DEFAULT_RULES = os.path.join("rules", "rules.json")
#: HTTP answers that mean "the server refused this change" (exit 2).
REFUSED = {400, 409, 412, 413}

_WRITES = ("add", "set", "patch", "enable", "disable", "rm")


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, headers and body (JSON when it parses)."""

    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def data(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class Unreachable(Exception):
    """The admin endpoint did not answer."""


class Client:
    """HTTP requests to one admin endpoint, never through a proxy."""

    def __init__(self, address: tuple[str, int], token: str | None, timeout: float) -> None:
        host, port = address
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        self.base = f"http://{format_address(host, port)}"
        self.token = token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(
        self, method: str, path: str, body: Any = None, dry_run: bool = False, if_match: str | None = None
    ) -> Answer:
        if dry_run:
            path += "?dry_run=1"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if if_match:
            request.add_header(
                "If-Match", if_match if if_match.startswith(('"', "W/", "*")) else f'"{if_match}"'
            )
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return Answer(response.status, response.read(), dict(response.headers))
        except urllib.error.HTTPError as error:
            with error:
                return Answer(error.code, error.read(), dict(error.headers))
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach gportmap at {self.base}: {reason}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gportmap ctl",
        description="Talk to a running gportmap through its admin endpoint.",
        epilog="Exit status: 0 done, 2 refused (invalid, 409, 412), 1 anything else "
        "(unreachable, 401/403, unknown rule).",
    )
    _options(parser, defaults=True)
    # The same options after the command too ("ctl status --token T"); SUPPRESS keeps
    # a sub-command from resetting what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    _options(common, defaults=False)
    dry = argparse.ArgumentParser(add_help=False, parents=[common])
    dry.add_argument(
        "--dry-run",
        action="store_true",
        default=argparse.SUPPRESS,
        help="say what would change; change nothing",
    )
    writes = argparse.ArgumentParser(add_help=False, parents=[dry])
    writes.add_argument(
        "--if-match",
        metavar="ETAG",
        default=argparse.SUPPRESS,
        help="write only if the rules file is still at this version (the etag `rules` prints): else exit 2",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="say what a write would change; change nothing"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("status", parents=[common], help="the rules' states and counters")
    commands.add_parser("rules", parents=[common], help="the rules as written in the file that runs")
    commands.add_parser("get", parents=[common], help="one rule as written").add_argument("name")
    add = commands.add_parser("add", parents=[writes], help="add a rule from a JSON file (- for stdin)")
    add.add_argument("file")
    put = commands.add_parser("set", parents=[writes], help="replace (or create) rule NAME from a JSON file")
    put.add_argument("name")
    put.add_argument("file")
    patch = commands.add_parser("patch", parents=[writes], help="merge-patch rule NAME (RFC 7396)")
    patch.add_argument("name")
    patch.add_argument("patch", metavar="JSON")
    commands.add_parser("enable", parents=[writes], help="enable rule NAME").add_argument("name")
    commands.add_parser("disable", parents=[writes], help="disable rule NAME").add_argument("name")
    commands.add_parser("rm", parents=[writes], help="delete rule NAME").add_argument("name")
    commands.add_parser("reload", parents=[dry], help="reload the rules file now")
    commands.add_parser("connections", parents=[common], help="the open connections")
    commands.add_parser(
        "restart-worker", parents=[common], help="restart worker N in place, carrying its connections (--workers)"
    ).add_argument("worker", type=int)
    return parser


def _options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options of every command; without ``defaults`` an option left out sets nothing."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--admin",
        metavar="HOST:PORT",
        default=default(None),
        help="the admin endpoint (default: settings.admin.listen of the rules file, else 127.0.0.1:9900)",
    )
    parser.add_argument("--token", default=default(None), help="the admin token (default: $GPORTMAP_TOKEN)")
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=default(None),
        help="read the admin token from FILE, as settings.admin.tokenFile does (default: $GPORTMAP_TOKEN_FILE)",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="RULES",
        default=default(None),
        help="the rules file to read the admin address from (default: $CONFIG_PATH, else rules/rules.json)",
    )
    parser.add_argument(
        "--timeout", type=float, default=default(60.0), help="seconds to wait for an answer (default 60)"
    )
    parser.add_argument("--json", action="store_true", default=default(False), help="print the raw answer")


def _token(args: argparse.Namespace) -> str | None:
    """The admin token: --token, else $GPORTMAP_TOKEN, else the first line of
    --token-file / $GPORTMAP_TOKEN_FILE (a mounted secret), read as gportmap reads
    settings.admin.tokenFile (bounded, a trailing newline stripped)."""
    token = args.token or os.environ.get("GPORTMAP_TOKEN")
    if token:
        return token
    path = args.token_file or os.environ.get("GPORTMAP_TOKEN_FILE")
    if not path:
        return None
    try:
        raw = read_regular_file(path, MAX_TOKEN_FILE_BYTES)
    except Unreadable as exc:
        raise ValueError(f"cannot read the token file {path}: {exc}") from None
    token = raw.decode("utf-8", "replace").rstrip("\r\n")
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        address = admin_address(args)
        request = _request(args)
    except ValueError as exc:
        print(f"gportmap ctl: {exc}", file=err)
        return EXIT_REFUSED
    try:
        token = _token(args)
    except ValueError as exc:
        print(f"gportmap ctl: {exc}", file=err)
        return EXIT_REFUSED
    client = Client(address, token, args.timeout)
    try:
        answer = client.request(*request, if_match=getattr(args, "if_match", None))
    except Unreachable as exc:
        print(f"gportmap ctl: {exc}", file=err)
        return EXIT_OTHER
    if args.json:
        out.write(answer.body.decode("utf-8", "replace"))
    elif answer.status < 300:
        _show(args, answer, out)
    else:
        _show_error(answer, err)
    return exit_code(answer.status)


def exit_code(status: int) -> int:
    if status < 300:
        return EXIT_DONE
    return EXIT_REFUSED if status in REFUSED else EXIT_OTHER


def admin_address(args: argparse.Namespace, environ: os._Environ | dict = os.environ) -> tuple[str, int]:
    """``--admin``, else ``settings.admin.listen`` of the rules file found as the
    server finds it (-c, $CONFIG_PATH, rules/rules.json), else 127.0.0.1:9900."""
    if args.admin:
        return parse_listen(args.admin)
    path = args.config or environ.get("CONFIG_PATH") or DEFAULT_RULES
    try:
        document = json.loads(read_rules_file(path))
    except (ConfigError, ValueError):
        return parse_listen(DEFAULT_ADMIN)
    settings = document.get("settings") if isinstance(document, dict) else None
    admin = settings.get("admin") if isinstance(settings, dict) else None
    listen = admin.get("listen") if isinstance(admin, dict) else None
    try:
        return parse_listen(listen) if isinstance(listen, str) else parse_listen(DEFAULT_ADMIN)
    except ValueError:
        return parse_listen(DEFAULT_ADMIN)


def _request(args: argparse.Namespace) -> tuple[str, str, Any, bool]:
    """(method, path, body, dry run) of a command; ValueError for a bad argument."""
    command = args.command
    dry_run = bool(getattr(args, "dry_run", False))
    name = urllib.parse.quote(getattr(args, "name", ""), safe="")
    reads = {
        "status": ("GET", "/stats"),
        "rules": ("GET", "/rules"),
        "get": ("GET", f"/rules/{name}"),
        "connections": ("GET", "/connections"),
    }
    if command in reads:
        return (*reads[command], None, False)
    if command == "reload":
        return ("POST", "/reload", None, dry_run)
    if command == "restart-worker":
        return ("POST", f"/workers/restart?worker={args.worker}", None, False)
    if command == "add":
        return ("POST", "/rules", _read_rule(args.file), dry_run)
    if command == "set":
        return ("PUT", f"/rules/{name}", _read_rule(args.file), dry_run)
    if command == "patch":
        return ("PATCH", f"/rules/{name}", _json_argument(args.patch), dry_run)
    if command in ("enable", "disable"):
        return ("PATCH", f"/rules/{name}", {"enabled": command == "enable"}, dry_run)
    return ("DELETE", f"/rules/{name}", None, dry_run)


def _read_rule(source: str) -> Any:
    try:
        text = sys.stdin.read() if source == "-" else open(source, encoding="utf-8").read()
    except OSError as exc:
        raise ValueError(f"cannot read {source}: {exc.strerror or exc}") from None
    return _json_argument(text, source if source != "-" else "standard input")


def _json_argument(text: str, where: str = "the JSON argument") -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from None


# -- output --------------------------------------------------------------------------


def table(rows: list[list[str]], out: TextIO) -> None:
    """Columns aligned by their widest cell; the first row is the heading."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")


def _show(args: argparse.Namespace, answer: Answer, out: TextIO) -> None:
    data = answer.data
    command = args.command
    if command == "status":
        _show_status(data, out)
    elif command == "rules":
        _show_rules(data, answer.headers.get("ETag", ""), out)
    elif command == "get":
        out.write(json.dumps(data, indent=2) + "\n")
    elif command == "connections":
        _show_connections(data, out)
    elif isinstance(data, dict) and data.get("dry_run"):
        _show_plan(data, out)
    elif command == "reload":
        out.write("reloaded: " + _summary(data) + "\n")
    elif command == "restart-worker":
        out.write(f"worker {data.get('worker')} restarted in place: its connections carried\n")
    else:
        verb = {
            "add": "added",
            "set": "saved",
            "patch": "patched",
            "enable": "enabled",
            "disable": "disabled",
        }
        what = "removed" if command == "rm" else verb[command]
        out.write(
            f"rule {data.get('name') or getattr(args, 'name', '')} {what}: {_summary(data.get('changes'))}\n"
        )
        out.write(f"etag: {data.get('etag')}\n")


def _summary(changes: Any) -> str:
    if not isinstance(changes, dict):
        return "-"
    parts = []
    for key in ("added", "changed", "removed"):
        names = changes.get(key) or []
        parts.append(f"{key} {', '.join(names) if names else '-'}")
    parts.append(f"unchanged {len(changes.get('unchanged') or [])}")
    return "; ".join(parts)


def _show_plan(data: dict[str, Any], out: TextIO) -> None:
    impact = data.get("impact") or {}
    out.write("dry run, nothing changed: " + _summary(data.get("changes")) + "\n")

    def listeners(key: str) -> str:
        found = impact.get(key) or []
        return ", ".join(f"{item['listen']}/{item['transport']} ({item['rule']})" for item in found) or "-"

    out.write(f"  listeners opened: {listeners('listeners_opened')}\n")
    out.write(f"  listeners closed: {listeners('listeners_closed')}\n")
    drain = impact.get("connections_to_drain") or {}
    out.write(
        "  connections to drain: "
        + (", ".join(f"{name} {count}" for name, count in drain.items()) or "-")
        + "\n"
    )
    problems = impact.get("problems") or []
    if not problems:
        out.write("  problems: none found\n")
    for problem in problems:
        out.write(
            f"  problem: rule {problem['rule']} on {problem['listen']}/{problem['transport']}: {problem['problem']}\n"
        )
    out.write(f"etag: {data.get('etag')}\n")


def _show_status(data: dict[str, Any], out: TextIO) -> None:
    config = data.get("config", {})
    reloads = config.get("reloads", {})
    out.write(
        f"gportmap {data.get('version')} pid {data.get('pid')}, up {data.get('uptime', 0):.0f}s; "
        f"{config.get('path')} generation {config.get('generation')} "
        f"({reloads.get('success', 0)} reloads, {reloads.get('failure', 0)} failed)\n"
    )
    rows = [["RULE", "STATE", "PROTOCOL", "LISTEN", "TARGET", "OPEN", "TOTAL", "REJECTED", "ERROR"]]
    for rule in data.get("rules", []):
        connections = rule.get("connections", {})
        rows.append(
            [
                rule.get("name", ""),
                rule.get("state", ""),
                rule.get("protocol", ""),
                rule.get("listen", ""),
                rule.get("target", ""),
                str(connections.get("active", 0)),
                str(connections.get("total", 0)),
                str(connections.get("rejected", 0)),
                rule.get("error") or "",
            ]
        )
    table(rows, out)
    if config.get("last_error"):
        out.write("the last reload was rejected:\n" + "".join(f"  {line}\n" for line in config["last_error"]))


def _target_text(rule: dict[str, Any]) -> str:
    """A rule's target column: ``host:port``, or a pool's addresses comma-separated
    (a backup marked with ``*``), as the file has them."""
    targets = rule.get("targets")
    if isinstance(targets, list):
        shown = []
        for target in targets:
            if isinstance(target, dict):
                address = format_address(str(target.get("host", "")), target.get("port", ""))
                shown.append(address + ("*" if target.get("backup") else ""))
        return ",".join(shown)
    return format_address(str(rule.get("targetHost", "")), rule.get("targetPort", ""))


def _show_rules(data: dict[str, Any], etag: str, out: TextIO) -> None:
    rows = [["NAME", "PROTOCOL", "LISTEN", "TARGET", "ENABLED"]]
    for rule in data.get("rules", []):
        if not isinstance(rule, dict):
            continue
        host, port = rule.get("listenHost", "0.0.0.0"), rule.get("listenPort", "")
        name = rule.get("name") or f"{rule.get('protocol')}-{port}"
        listen = format_address(str(host), port) if isinstance(host, str) else f"{host}:{port}"
        target = _target_text(rule)
        rows.append(
            [
                name,
                str(rule.get("protocol", "")),
                listen,
                target,
                "yes" if rule.get("enabled", True) else "no",
            ]
        )
    table(rows, out)
    out.write(f"etag: {etag.strip(chr(34))}\n")


def _show_connections(data: list[dict[str, Any]], out: TextIO) -> None:
    rows = [["ID", "RULE", "CLIENT", "TARGET", "STARTED", "RECEIVED", "SENT"]]
    for conn in data:
        sizes = conn.get("bytes", {})
        rows.append(
            [
                str(conn.get("id", "")),
                str(conn.get("rule", "")),
                str(conn.get("client", "")),
                str(conn.get("target", "")),
                str(conn.get("started", "")),
                str(sizes.get("received", 0)),
                str(sizes.get("sent", 0)),
            ]
        )
    table(rows, out)


def _show_error(answer: Answer, err: TextIO) -> None:
    data = answer.data
    if isinstance(data, dict) and data.get("errors"):
        err.write(f"refused ({answer.status}): the rules are invalid:\n")
        err.write("".join(f"  {line}\n" for line in data["errors"]))
    elif isinstance(data, dict) and data.get("error"):
        err.write(f"error {answer.status}: {data['error']}\n")
    else:
        err.write(f"error {answer.status}: {answer.body[:500].decode('utf-8', 'replace')}\n")
