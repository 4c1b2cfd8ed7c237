"""Log records are frozen event dataclasses (``gportmap.events``, issue 16): one class
per event, its message built in one place, and the lines on stderr unchanged.

- every class is a frozen, slotted dataclass with a unique ``event`` name, and
  every one makes a message and fields from its own values;
- what ``emit`` writes is, byte for byte, what the free-string ``log_event`` wrote
  for the same record (text and JSON);
- an AST scan of the package: no record is made any more from a free string
  (``log_event``, ``extra={"event": ...}``), every ``emit`` gets an event object;
- docs/monitoring.md lists exactly the events the classes define, each with its
  fields.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import io
import json
import logging
import pkgutil
import re
import typing
from pathlib import Path

import pytest

import gportmap
from gportmap import events
from gportmap.events import ConnectionClosed, Event, all_events, from_values
from gportmap.log import EventJsonFormatter, TextFormatter, emit
from gportmap.reasons import CloseReason, RejectReason

PACKAGE = Path(gportmap.__file__).resolve().parent
ROOT = PACKAGE.parent
for _module in pkgutil.walk_packages(gportmap.__path__, "gportmap."):
    if _module.name != "gportmap.__main__":  # it monkeypatches the whole process (gevent) on import
        importlib.import_module(_module.name)  # event classes may live next to their use
EVENT_CLASSES = sorted(all_events(), key=lambda cls: cls.event)
CLASS_NAMES = {cls.__name__ for cls in EVENT_CLASSES}


def sample(cls: type[Event]) -> Event:
    """An instance of ``cls`` with a plausible value for every field."""
    hints = typing.get_type_hints(cls)
    values: dict[str, object] = {}
    for field in dataclasses.fields(cls):
        hint = str(hints[field.name])
        if "list[dict" in hint:
            value: object = [{"fd": 3, "name": "x", "listen": "127.0.0.1:1", "transport": "tcp"}]
        elif "dict" in hint:
            value = {"added": ["a"], "changed": [], "removed": []}
        elif "list" in hint:
            value = ["x"]
        elif "bool" in hint and "list" not in hint:
            value = True
        elif "float" in hint:
            value = 1.5
        elif "int" in hint:
            value = 3
        else:
            value = "x"
        values[field.name] = value
    return cls(**values)


def test_there_is_one_class_per_event_name() -> None:
    names = [cls.event for cls in EVENT_CLASSES]
    assert len(names) > 50
    assert len(set(names)) == len(names), sorted(n for n in names if names.count(n) > 1)
    assert all(re.fullmatch(r"[a-z][a-z_]*", name) for name in names)


@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.event)
def test_every_event_is_a_frozen_slotted_dataclass_with_its_message(cls: type[Event]) -> None:
    event = sample(cls)
    assert dataclasses.is_dataclass(event) and not hasattr(event, "__dict__")
    field = next(iter(dataclasses.fields(cls)), None)
    if field is not None:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(event, field.name, None)
    assert isinstance(event.message(), str) and event.message()
    assert event.record_level() in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
    record = event.fields()
    assert "event" not in record
    assert list(record) == [name for name, _ in cls.layout if name in record]  # the declared order


@pytest.mark.parametrize("cls", EVENT_CLASSES, ids=lambda cls: cls.event)
def test_from_values_makes_what_the_keywords_make(cls: type[Event]) -> None:
    """``from_values(cls)``, the positional constructor the log writer uses for a
    record queued as a tuple, makes the event the keyword constructor makes, as
    frozen, and refuses a tuple of the wrong length."""
    event = sample(cls)
    values = tuple(getattr(event, field.name) for field in dataclasses.fields(cls))
    made = from_values(cls)(values)
    assert type(made) is cls and made == event and made.fields() == event.fields()
    assert made.message() == event.message()
    if values:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(made, dataclasses.fields(cls)[0].name, None)
    with pytest.raises(ValueError):
        from_values(cls)((*values, "one too many"))
    assert from_values(cls) is from_values(cls)  # made once per class


def capture(fmt: logging.Formatter, log: typing.Callable[[logging.Logger], None]) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    logger = logging.getLogger("gportmap.test_events")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        log(logger)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def without_time(fmt_name: str, line: str) -> object:
    if fmt_name == "json":
        record = json.loads(line)
        record.pop("timestamp")
        return list(record.items())  # the order of the keys too
    return line.split(" ", 1)[1]


def free_string_record(logger: logging.Logger, level: int, event: str, message: str, **fields: object) -> None:
    """How records were made before the event classes (``log_event``), for comparison."""
    fields["event"] = event
    logger.log(level, message, extra=fields)


#: (event object, the same record as the free-string call wrote it before)
EQUIVALENT = [
    (
        ConnectionClosed(rule="web", client="127.0.0.1:5", target="127.0.0.1:6", bytes_received=79, bytes_sent=850,
                         duration=0.005, reason=CloseReason.CLOSED),
        (logging.INFO, "connection_closed", "connection closed",
         dict(rule="web", client="127.0.0.1:5", target="127.0.0.1:6", bytes_received=79, bytes_sent=850,
              duration=0.005, reason=CloseReason.CLOSED)),
    ),
    (
        ConnectionClosed(rule="web", client="c", target="t", bytes_received=0, bytes_sent=0, duration=1.0,
                         reason=CloseReason.CONNECT_FAILED, error="connection refused"),
        (logging.WARNING, "connection_closed", "cannot reach target: connection refused",
         dict(rule="web", client="c", target="t", bytes_received=0, bytes_sent=0, duration=1.0,
              reason=CloseReason.CONNECT_FAILED, error="connection refused")),
    ),
    (
        events.ConnectionRejected(rule="r", client="c", target="t", reason=RejectReason.LIMIT, suppressed=4),
        (logging.WARNING, "connection_rejected", "connection rejected",
         dict(rule="r", client="c", target="t", reason=RejectReason.LIMIT, suppressed=4)),
    ),
    (
        events.WatcherRearmed(path="/r.json", why="backstop", folder="/", waiting_for=None, errors=[]),
        (logging.INFO, "watcher_rearmed", "re-armed the watch (backstop): following /r.json in /",
         dict(path="/r.json", why="backstop", folder="/")),
    ),
    (
        events.StatsRecord(source="interval", active=1, rules=[{"rule": "web", "active": 1}]),
        (logging.INFO, "stats", "1 rule(s), 1 open connection(s)",
         dict(source="interval", active=1, rules=[{"rule": "web", "active": 1}])),
    ),
    (
        events.ConfigReloaded(source="watch", settings_changed=[], added=["a"], changed=[], removed=[], unchanged=[],
                              in_worker=True),
        (logging.DEBUG, "config_reloaded", "rules reloaded (watch): 1 added, 0 changed, 0 removed, 0 unchanged",
         dict(source="watch", settings_changed=[], added=["a"], changed=[], removed=[], unchanged=[])),
    ),
]


@pytest.mark.parametrize("fmt_name", ["text", "json"])
@pytest.mark.parametrize(("event", "old"), EQUIVALENT, ids=lambda v: getattr(v, "event", ""))
def test_emit_writes_what_the_free_string_call_wrote(fmt_name: str, event: Event, old: tuple) -> None:
    fmt = EventJsonFormatter() if fmt_name == "json" else TextFormatter()
    level, name, message, fields = old
    new_line = capture(fmt, lambda logger: emit(logger, event))
    old_line = capture(fmt, lambda logger: free_string_record(logger, level, name, message, **fields))
    assert new_line and old_line
    assert without_time(fmt_name, new_line) == without_time(fmt_name, old_line)
    assert event.record_level() == level


def test_a_disabled_level_formats_nothing() -> None:
    class Exploding(events.InternalError):
        __slots__ = ()

        def message(self) -> str:
            raise AssertionError("a message built for a disabled level")

    logger = logging.getLogger("gportmap.test_events.quiet")
    logger.setLevel(logging.CRITICAL)
    emit(logger, Exploding(what="x"))


# -- the package logs only event objects ----------------------------------------------


def _callee(node: ast.Call) -> str:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def free_string_records(path: Path, text: str | None = None) -> list[str]:
    """Where ``path`` (or ``text`` as if it were that file) makes a record without
    an event class: ``log_event(...)``, ``extra=`` on a logger call, ``emit`` of
    something not made from one."""
    tree = ast.parse(path.read_text(encoding="utf-8") if text is None else text, str(path))
    assigned: dict[str, ast.AST] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            assigned[node.targets[0].id] = node.value
    found = []
    rel = path.relative_to(ROOT)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _callee(node)
        if name == "log_event":
            event = node.args[2].value if len(node.args) > 2 and isinstance(node.args[2], ast.Constant) else "?"
            found.append(f"{rel}:{node.lineno}: log_event {event}")
        elif any(k.arg == "extra" for k in node.keywords) and path.name != "log.py":
            extra = next(k.value for k in node.keywords if k.arg == "extra")
            event = next((v.value for k, v in zip(getattr(extra, "keys", []), getattr(extra, "values", []), strict=True)
                          if isinstance(k, ast.Constant) and k.value == "event" and isinstance(v, ast.Constant)), "?")
            found.append(f"{rel}:{node.lineno}: {name}(extra=...) {event}")
        elif name == "emit" and len(node.args) >= 2:
            arg = node.args[1]
            if isinstance(arg, ast.Name):
                arg = assigned.get(arg.id, arg)
            if not (isinstance(arg, ast.Call) and _callee(arg) in CLASS_NAMES):
                found.append(f"{rel}:{node.lineno}: emit of {ast.unparse(node.args[1])}")
    return found


def test_the_package_logs_only_event_objects() -> None:
    scanned = sorted(PACKAGE.rglob("*.py"))
    assert len(scanned) > 50
    found = [hit for path in scanned for hit in free_string_records(path)]
    assert not found, "log a gportmap.events class through gportmap.log.emit:\n" + "\n".join(found)


def test_the_scan_sees_a_free_string_record() -> None:
    path = ROOT / "gportmap" / "scan_sample.py"
    text = (
        "log_event(logger, 20, 'x', 'x')\n"
        "logger.error('x', extra={'event': 'x'})\n"
        "emit(logger, something)\n"
        "event = ConnectionClosed(rule='r')\n"
        "emit(logger, event)\n"
        "emit(logger, Fatal(error='x'))\n"
    )
    hits = free_string_records(path, text)
    assert [hit.split(": ", 1)[1] for hit in hits] == ["log_event x", "error(extra=...) x", "emit of something"]


# -- the docs ------------------------------------------------------------------------


def documented_events() -> dict[str, str]:
    """event name -> its row in docs/monitoring.md's table of events."""
    text = (ROOT / "docs" / "monitoring.md").read_text(encoding="utf-8")
    table = text[text.index("| event | fields |"):]
    rows: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        first = line.split("|")[1]
        for name in re.findall(r"`([a-z_]+)`", first):
            rows[name] = line
    return rows


def test_the_docs_list_every_event_and_its_fields() -> None:
    rows = documented_events()
    defined = {cls.event: cls for cls in EVENT_CLASSES}
    assert sorted(set(defined) - set(rows)) == [], "events missing from docs/monitoring.md"
    assert sorted(set(rows) - set(defined)) == [], "docs/monitoring.md lists events that no class defines"
    missing = [
        f"{name}: {field}"
        for name, cls in defined.items()
        for field, _ in cls.layout
        if f"`{field}`" not in rows[name]
    ]
    assert not missing, "fields missing from their event's row in docs/monitoring.md:\n" + "\n".join(missing)
