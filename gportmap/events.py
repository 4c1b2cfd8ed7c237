"""Every log record gportmap writes, one frozen dataclass per kind of event.

A record on stderr is ``event`` (its name: ``connection_closed``), a level, a
message and fields (SPEC §6, docs/monitoring.md). Here each kind is declared once:
its name and default level as class attributes, its fields typed (reasons are the
enums of ``gportmap.reasons``), and its message built from its fields in one
place, not at each of the call sites. A call site makes the event and hands it to
``gportmap.log.emit``; a typo in a field is a TypeError, not a new key in the logs.

What the formatters see is what they saw when records were made with free strings:
the same field names, values and order (the dataclass's field order), so that
text and JSON lines stay exactly as they were. Four kinds of field:

- plain: always in the record;
- ``optional()``: left out when None (a field only some call sites have);
- ``if_set()``: left out when false (``suppressed`` when 0, ``error`` when empty);
- ``text()``: only for the message (an exception's text, a sentence that says
  which case this is), never a field of the record.

Hot path: ``connection_closed`` (and ``session_closed``) are made once per
connection. A call site there asks ``logger.isEnabledFor(Event.level_for(...))``
first and builds nothing when the level is off; ``define`` writes each class's
``__init__`` and ``fields`` out as code (as ``dataclasses`` does), so that making
and reading an event costs no more than the keyword dict it replaced (a micro
benchmark of ``connection_closed`` against the free-string call: the same time
when the record is formatted, a third less when its level is off).

A module may declare events of its own next to their use (``@define`` on an
``Event`` subclass); ``all_events`` finds them once it is imported.

The base layer: nothing here imports anything of gportmap but ``reasons``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

from gportmap.reasons import CloseReason, DropReason, RejectReason

__all__ = ["Event", "all_events", "from_values"]


class Shown(enum.Enum):
    """When a dataclass field is one of the record's fields."""

    ALWAYS = "always"
    IF_GIVEN = "if_given"  # not None
    IF_SET = "if_set"  # true (non-zero, non-empty)
    NEVER = "never"  # message only


_SHOWN = "gportmap.shown"


def optional(default: Any = None) -> Any:
    """A field left out of the record when it is None."""
    return dataclasses.field(default=default, metadata={_SHOWN: Shown.IF_GIVEN})


def if_set(default: Any = None) -> Any:
    """A field left out of the record when it is false (0, "", None)."""
    return dataclasses.field(default=default, metadata={_SHOWN: Shown.IF_SET})


def text(default: Any = "") -> Any:
    """A field the message is made of, never one of the record's fields."""
    return dataclasses.field(default=default, metadata={_SHOWN: Shown.NEVER})


class Event:
    """One log record. Subclasses are made with ``@define(name, level)``."""

    __slots__ = ()

    #: The record's ``event`` field: what operators grep and alert on.
    event: ClassVar[str]
    #: The level the record is logged at unless ``record_level`` says otherwise.
    level: ClassVar[int] = logging.INFO
    #: (field, when it is shown) for the record, in the record's order (``define``).
    layout: ClassVar[tuple[tuple[str, Shown], ...]] = ()

    def message(self) -> str:
        """The record's human sentence, from the fields."""
        raise NotImplementedError

    # Frozen, and compared and shown by value, written once here rather than by
    # ``dataclasses`` for each of the ~75 classes: its generated methods were two
    # thirds of this module's import (six ``exec`` per class, ~45 ms of every
    # start). ``define``'s ``__init__`` sets the slots through their descriptors,
    # so this ``__setattr__`` refuses only assignment after construction.

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return f"{type(self).__qualname__}({shown})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def record_level(self) -> int:
        """The level of this record (some kinds depend on a field: a failed connect
        closes at WARNING)."""
        return self.level

    def fields(self) -> dict[str, Any]:
        """The record's fields (``extra``), in order, without the ``event`` key.
        (``define`` replaces this with code made for the class: see ``_fields_code``.)"""
        out: dict[str, Any] = {}
        for name, shown in self.layout:
            value = getattr(self, name)
            if shown is Shown.ALWAYS or (value if shown is Shown.IF_SET else value is not None):
                out[name] = value
        return out


def _init_code(cls: type[Event]) -> Callable[..., None]:
    """The dataclass's ``__init__``, setting each slot through its own descriptor.

    A frozen dataclass's own ``__init__`` sets every field with
    ``object.__setattr__(self, name, value)``: a lookup by name per field, twice
    the cost of the slot's ``__set__``; an event of eight fields then costs more
    to make than the rest of its record. This one takes the same keyword-only
    arguments and defaults; assignment after it still raises
    ``FrozenInstanceError`` (``Event.__setattr__``)."""
    fields = dataclasses.fields(cls)
    namespace: dict[str, Any] = {}
    params = []
    for f in fields:
        assert f.default_factory is dataclasses.MISSING, f"{cls.__name__}.{f.name}: no default_factory in events"
        if f.default is dataclasses.MISSING:
            params.append(f.name)
        else:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        namespace[f"_set_{f.name}"] = vars(cls)[f.name].__set__
    body = [f"    _set_{f.name}(self, {f.name})" for f in fields] or ["    pass"]
    signature = f"self, *, {', '.join(params)}" if params else "self"
    exec(f"def __init__({signature}) -> None:\n" + "\n".join(body), namespace)  # noqa: S102 - field names only
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


@functools.cache  # bounded by the event classes; made on first use, not at import
def from_values(cls: type[Event]) -> Callable[[tuple[Any, ...]], Event]:
    """A constructor of ``cls`` from a tuple of every field's value in the
    dataclass's order, made as ``_init_code`` makes ``__init__`` (the slots set
    through their descriptors): what the log writer thread calls for each
    ``connection_closed`` record queued as a tuple (``gportmap.log.emit_fields``),
    without the keyword dict that ``cls(**dict(zip(names, values)))`` builds
    (2.1 against 0.6 us). A tuple of the wrong length is a ValueError."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    for name in names:
        namespace[f"_set_{name}"] = vars(cls)[name].__set__
    lines = ["def from_values(values):", f"    ({', '.join(names)},) = values" if names else "    () = values",
             "    self = _new(_cls)"]  # fmt: skip
    lines += [f"    _set_{name}(self, {name})" for name in names]
    lines.append("    return self")
    exec("\n".join(lines), namespace)  # noqa: S102 - field names only
    return namespace["from_values"]


def _fields_code(layout: tuple[tuple[str, Shown], ...]) -> Callable[[Event], dict[str, Any]]:
    """``Event.fields`` written out for one layout, as ``dataclasses`` writes
    ``__init__``: a dict display and one ``if`` per optional field, no loop and no
    ``getattr`` by name. ``connection_closed`` is made once per connection, and
    this is most of what a record costs before it is formatted."""
    leading = 0  # the fields before the first optional one go in the display
    while leading < len(layout) and layout[leading][1] is Shown.ALWAYS:
        leading += 1
    display = ", ".join(f"{name!r}: self.{name}" for name, _ in layout[:leading])
    lines = ["def fields(self):", f"    out = {{{display}}}"]
    for name, shown in layout[leading:]:
        if shown is Shown.ALWAYS:
            lines.append(f"    out[{name!r}] = self.{name}")
        elif shown is Shown.IF_GIVEN:
            lines.append(f"    if self.{name} is not None: out[{name!r}] = self.{name}")
        elif shown is Shown.IF_SET:
            lines.append(f"    if self.{name}: out[{name!r}] = self.{name}")
    lines.append("    return out")
    namespace: dict[str, Any] = {}
    exec("\n".join(lines), namespace)  # noqa: S102 - code made here from field names only
    return namespace["fields"]


E = TypeVar("E", bound=type[Event])


def define(name: str, level: int = logging.INFO) -> Callable[[E], E]:
    """Make an ``Event`` subclass a slotted, keyword-only dataclass named ``name``
    (its ``event``) with default ``level``; frozen, compared and shown by ``Event``'s
    methods."""

    def make(cls: E) -> E:
        made = dataclasses.dataclass(slots=True, kw_only=True, init=False, repr=False, eq=False)(cls)  # the rest: Event
        made.event = name
        made.level = level
        made.layout = tuple(
            (f.name, f.metadata.get(_SHOWN, Shown.ALWAYS))
            for f in dataclasses.fields(made)
            if f.metadata.get(_SHOWN) is not Shown.NEVER
        )
        made.fields = _fields_code(made.layout)  # type: ignore[method-assign]
        made.__init__ = _init_code(made)  # type: ignore[misc]
        return made

    return make


def all_events() -> Iterator[type[Event]]:
    """Every event class defined (here, or in a module that subclasses ``Event``)."""
    pending = list(Event.__subclasses__())
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if "event" in vars(cls):
            yield cls


# -- connections, sessions, datagrams (per connection: keep them cheap) ---------------


@define("connection_closed")
class ConnectionClosed(Event):
    """A TCP, TLS or WebSocket connection ended (once per connection)."""

    rule: str
    client: str
    target: str
    bytes_received: int
    bytes_sent: int
    duration: float
    reason: CloseReason | str
    error: str | None = if_set()

    #: Reasons logged at WARNING: connections gportmap could not serve. (Members
    #: held here: looking one up on its enum costs ~90 ns on Python 3.11, and this
    #: runs once per connection.)
    warning_reasons: ClassVar[tuple[CloseReason, ...]] = (CloseReason.CONNECT_FAILED, CloseReason.INTERNAL_ERROR)

    @classmethod
    def level_for(cls, reason: CloseReason | str) -> int:
        """WARNING for a connection gportmap could not serve, INFO otherwise."""
        return logging.WARNING if reason in cls.warning_reasons else logging.INFO

    def record_level(self) -> int:
        return logging.WARNING if self.reason in self.warning_reasons else logging.INFO

    def message(self) -> str:
        if self.reason is self.warning_reasons[0] or self.reason == self.warning_reasons[0]:
            return f"cannot reach target: {self.error}"
        return "connection closed"


@define("connection_rejected", logging.WARNING)
class ConnectionRejected(Event):
    """A connection refused before it was relayed (rate-limited per rule and reason)."""

    rule: str
    client: str
    target: str
    reason: RejectReason | str
    suppressed: int = if_set(0)
    error: str | None = if_set()

    def message(self) -> str:
        return "connection rejected"


@define("session_closed")
class SessionClosed(Event):
    """A UDP session ended."""

    rule: str
    client: str
    target: str
    packets_received: int
    packets_sent: int
    bytes_received: int
    bytes_sent: int
    duration: float
    reason: CloseReason | str
    error: str | None = if_set()

    #: Reasons logged at WARNING (held here, as ``ConnectionClosed.warning_reasons``).
    warning_reasons: ClassVar[tuple[CloseReason, ...]] = (CloseReason.ERROR, CloseReason.INTERNAL_ERROR)

    @classmethod
    def level_for(cls, reason: CloseReason | str) -> int:
        return logging.WARNING if reason in cls.warning_reasons else logging.INFO

    def record_level(self) -> int:
        return logging.WARNING if self.reason in self.warning_reasons else logging.INFO

    def message(self) -> str:
        return f"session closed ({self.reason})"


@define("datagram_dropped", logging.WARNING)
class DatagramDropped(Event):
    """A UDP datagram dropped (rate-limited per rule and reason)."""

    rule: str
    client: str
    target: str
    reason: DropReason | str
    suppressed: int = if_set(0)
    why: str = text()

    def message(self) -> str:
        return f"dropped: {self.why}"


@define("udp_icmp_error", logging.DEBUG)
class UdpIcmpError(Event):
    """An ICMP error reported on a UDP listening socket (a client that left)."""

    rule: str
    listen: str
    suppressed: int = if_set(0)
    error: str = text()

    def message(self) -> str:
        return f"the listening socket reported: {self.error}"


@define("listener_error", logging.WARNING)
class ListenerError(Event):
    """A UDP listening socket cannot be read; ``fatal``: it is not watched any more."""

    rule: str
    listen: str
    suppressed: int = if_set(0)
    error: str = text()
    fatal: bool = text(False)

    def record_level(self) -> int:
        return logging.ERROR if self.fatal else logging.WARNING

    def message(self) -> str:
        return f"cannot read the listening socket: {self.error}"


@define("target_unresolved", logging.WARNING)
class TargetUnresolved(Event):
    """A UDP rule's target host name did not resolve (rate-limited)."""

    rule: str
    target: str
    suppressed: int = if_set(0)
    host: str = text()
    error: str = text()

    def message(self) -> str:
        return f"cannot resolve target {self.host}: {self.error}"


@define("target_up")
class TargetUp(Event):
    """A target of a rule's pool is up again."""

    rule: str
    target: str
    address: str

    def message(self) -> str:
        return f"rule {self.rule}: target {self.target} is up"


@define("target_down", logging.WARNING)
class TargetDown(Event):
    """A target of a rule's pool went down."""

    rule: str
    target: str
    address: str
    reason: str | None

    def message(self) -> str:
        return f"rule {self.rule}: target {self.target} is down: {self.reason}"


@define("tls_verify_off", logging.WARNING)
class TlsVerifyOff(Event):
    """A rule started with ``targetTls.verify: false``."""

    rule: str
    target: str

    def message(self) -> str:
        return f"rule {self.rule}: targetTls.verify is false, the targets' certificates are not checked"


@define("plugin_error", logging.WARNING)
class PluginFailed(Event):
    """A plugin's hook raised; its connection is being closed."""

    plugin: str
    hook: str
    rule: str
    client: str
    error: str = text()

    def message(self) -> str:
        return self.error


@define("internal_error", logging.ERROR)
class InternalError(Event):
    """A bug, logged with its traceback: in a connection, the applier, the watcher's
    callback, the hub, a worker's link. Each site gives the fields it knows."""

    context: str | None = optional()
    rule: str | None = optional()
    protocol: str | None = optional()
    client: str | None = optional()
    target: str | None = optional()
    path: str | None = optional()
    source: str | None = optional()
    request: str | None = optional()
    error: str | None = optional()
    suppressed: int = if_set(0)
    what: str = text()

    def message(self) -> str:
        return self.what


@define("traceback", logging.DEBUG)
class Traceback(Event):
    """The traceback of an error gevent's hub reported (DEBUG)."""

    def message(self) -> str:
        return "traceback"


@define("bad_request", logging.WARNING)
class MalformedRequest(Event):
    """A malformed HTTP request answered with 400 (rate-limited per server)."""

    client: str
    error: str
    suppressed: int = if_set(0)

    def message(self) -> str:
        return "malformed HTTP request answered with 400"


@define("log_records_dropped", logging.WARNING)
class LogRecordsDropped(Event):
    """Records dropped because stderr was not read fast enough. Written by the
    stderr writer thread itself (``gportmap.log.StderrQueue``), from a template."""

    dropped: int
    dropped_total: int

    def message(self) -> str:
        return f"{self.dropped} log record(s) dropped: stderr was not read fast enough"


# -- the process ------------------------------------------------------------------


@define("started")
class Started(Event):
    version: str
    config: str
    pid: int
    rules: int
    workers: int
    features: list[str]

    def message(self) -> str:
        return f"gportmap {self.version} started with {self.rules} enabled rule(s)" + (
            f" in {self.workers} workers" if self.workers > 1 else ""
        )


@define("stopping")
class Stopping(Event):
    """gportmap stops: listeners closed, draining; or a second signal: at once."""

    drain_timeout: float | None = optional()
    active: int | None = optional()
    signal: int | None = optional()

    def record_level(self) -> int:
        return logging.WARNING if self.signal is not None else logging.INFO

    def message(self) -> str:
        if self.signal is not None:
            return "second signal: stopping now"
        return f"stopping: listeners closed, draining {self.active} connection(s) for up to {self.drain_timeout:g}s"


@define("stopped")
class Stopped(Event):
    def message(self) -> str:
        return "stopped"


@define("fatal", logging.CRITICAL)
class Fatal(Event):
    """gportmap cannot run at all (the exception's text)."""

    error: str = text()

    def message(self) -> str:
        return self.error


@define("usage_error", logging.ERROR)
class UsageError(Event):
    """Workers asked for where they cannot run: with socket activation
    (``sockets`` given), or without SO_REUSEPORT."""

    workers: int
    sockets: int | None = optional()

    def message(self) -> str:
        if self.sockets is not None:
            return (
                f"{self.workers} workers cannot share the {self.sockets} socket(s) passed by the service manager: "
                "socket activation serves one process; run without --workers (and settings.workers), "
                "or without the .socket unit"
            )
        return (
            f"{self.workers} workers need SO_REUSEPORT load balancing (Linux), which this platform "
            "does not offer (or GPORTMAP_PORTABLE is set): run one worker"
        )


@define("fd_limit_capped")
class FdLimitCapped(Event):
    open_files: int
    wanted: int

    def message(self) -> str:
        return f"open-file limit raised to {self.open_files}: the kernel refused {self.wanted}"


@define("connections_capped", logging.WARNING)
class ConnectionsCapped(Event):
    """The open-file limit holds connections under maxConnections. A WARNING when it
    takes a real share of them away; INFO when the cap is within ``slight`` of it (a
    20,000 hard limit leaves 9,967 of the default 10,000: nothing to act on)."""

    open_files: int
    limit: int
    max_connections: int

    #: The share of maxConnections the cap may take away and still be only INFO.
    slight = 0.05

    def record_level(self) -> int:
        return logging.INFO if self.limit >= self.max_connections * (1 - self.slight) else logging.WARNING

    def message(self) -> str:
        return (
            f"the open-file limit ({self.open_files}) leaves room for {self.limit} connections, fewer than "
            f"maxConnections ({self.max_connections}): connections past {self.limit} are refused; raise the limit "
            "(ulimit -n, LimitNOFILE=, docker --ulimit nofile=) to lift it"
        )


@define("stats")
class StatsRecord(Event):
    """The periodic (or SIGUSR1) figures of every rule."""

    source: str
    active: int
    rules: list[dict[str, Any]]

    def message(self) -> str:
        return f"{len(self.rules)} rule(s), {self.active} open connection(s)"


@define("admin_started")
class AdminStarted(Event):
    listen: str
    token: bool

    def message(self) -> str:
        return f"admin endpoint on http://{self.listen}/"


@define("admin_failed", logging.ERROR)
class AdminFailed(Event):
    listen: str
    error: str
    retry_in: float

    def message(self) -> str:
        return f"admin endpoint cannot start: {self.error}; forwarding goes on"


@define("toxiproxy_started")
class ToxiproxyStarted(Event):
    """The Toxiproxy-compatible API listens."""

    listen: str

    def message(self) -> str:
        return f"toxiproxy API on http://{self.listen}/"


@define("toxiproxy_failed", logging.ERROR)
class ToxiproxyFailed(Event):
    """The Toxiproxy-compatible API cannot listen; forwarding goes on."""

    error: str

    def message(self) -> str:
        return f"toxiproxy API cannot start: {self.error}"


@define("toxiproxy_shadowed", logging.WARNING)
class ToxiproxyShadowed(Event):
    """A proxy made through the Toxiproxy API does not run (a rule holds its port)."""

    proxy: str
    error: str

    def message(self) -> str:
        return f"toxiproxy proxy {self.proxy} does not run: {self.error}"


# -- rules -----------------------------------------------------------------------


@define("rule_started")
class RuleStarted(Event):
    """A rule serves. One listener: ``handover`` (took over a running one) and
    ``adopted`` (passed by the service manager or an upgrade) are true or false; a
    range of ports: ``listeners`` and how many of them were handed over or adopted."""

    rule: str
    protocol: str
    listen: str
    target: str
    listeners: int | None = optional()
    handover: bool | int
    adopted: bool | int
    transport: str = text()
    #: Where the listeners came from, for the message (" (adopted fd 3 ...)").
    origin: str = text()

    def message(self) -> str:
        return (
            f"rule {self.rule} listening on {self.listen}/{self.transport}{self.origin}, forwarding to {self.target}"
        )


@define("listeners_changed")
class ListenersChanged(Event):
    """A reload changed a rule's listening ports (ranges named compactly)."""

    rule: str
    opened: list[str]
    closed: list[str]
    kept: list[str]

    def message(self) -> str:
        return (
            f"rule {self.rule}: listening on {', '.join(self.opened) or 'nothing'} more, "
            f"{', '.join(self.closed) or 'nothing'} less; {', '.join(self.kept)} handed over"
        )


@define("rule_failed", logging.ERROR)
class RuleFailed(Event):
    rule: str
    listen: str
    error: str
    retry_in: float

    def message(self) -> str:
        return f"rule {self.rule} cannot start: {self.error}"


@define("accept_failed", logging.WARNING)
class AcceptFailed(Event):
    """Accepting on one of a rule's ports failed (EMFILE...): that port pauses."""

    rule: str
    listen: str
    error: str
    suppressed: int
    delay: float = text(0.0)

    def message(self) -> str:
        return f"rule {self.rule}: cannot accept on {self.listen}: {self.error}; pausing that port {self.delay:g}s"


@define("rule_stopped")
class RuleStopped(Event):
    rule: str
    listen: str
    cut_connections: int

    def message(self) -> str:
        return f"rule {self.rule} stopped on {self.listen}"


@define("rule_server_retired")
class RuleServerRetired(Event):
    """A changed rule's previous server, whose listeners a reload handed to the new
    one, finished its connections (what was left at drainTimeout was cut). The rule
    served throughout: ``rule_stopped`` here read like an outage."""

    rule: str
    cut_connections: int

    def record_level(self) -> int:
        return logging.WARNING if self.cut_connections else logging.INFO

    def message(self) -> str:
        if self.cut_connections:
            return (
                f"rule {self.rule}: {self.cut_connections} connection(s) still open on the server it ran "
                "before the reload were cut at drainTimeout"
            )
        return f"rule {self.rule}: the server it ran before the reload finished its connections"


# -- the rules file: loads, reloads, edits, the watcher -----------------------------


@define("config_invalid", logging.ERROR)
class ConfigInvalid(Event):
    """The rules file (or a new version of it) does not load; ``outcome`` says
    what gportmap does instead (the message's tail)."""

    path: str
    source: str | None = optional()
    errors: list[str]
    outcome: str = text()

    def message(self) -> str:
        return f"{self.path}: {self.outcome}"


@define("config_reloaded")
class ConfigReloaded(Event):
    """Rules reloaded (a worker logs it at DEBUG: its master logged it once)."""

    source: str
    settings_changed: list[str] | bool
    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: list[str]
    in_worker: bool = text(False)

    def record_level(self) -> int:
        return logging.DEBUG if self.in_worker else logging.INFO

    def message(self) -> str:
        return (
            f"rules reloaded ({self.source}): {len(self.added)} added, {len(self.changed)} changed, "
            f"{len(self.removed)} removed, {len(self.unchanged)} unchanged"
        )


@define("rules_changed")
class RulesChanged(Event):
    """A write through the rule API (``changes``: added, changed, removed)."""

    client: str
    method: str
    rule: str | None
    changes: dict[str, list[str]]
    etag: str

    def message(self) -> str:
        changes = self.changes
        return (
            f"{self.method} of rule {self.rule} by {self.client}: {len(changes['added'])} added, "
            f"{len(changes['changed'])} changed, {len(changes['removed'])} removed"
        )


@define("reload_refused", logging.WARNING)
class ReloadRefused(Event):
    source: str
    requests: int

    def message(self) -> str:
        return "gportmap is stopping: the reload is refused, no listener opens again"


@define("reload_ignored", logging.WARNING)
class ReloadIgnored(Event):
    signal: int

    def message(self) -> str:
        return "SIGHUP to a worker is ignored: its master owns the rules file (send SIGHUP to the master)"


@define("reload_abandoned", logging.WARNING)
class ReloadAbandoned(Event):
    timeout: float = text(0.0)

    def message(self) -> str:
        return f"a reload still in progress after {self.timeout:g}s is left unfinished: nothing more of it starts"


@define("restart_needed", logging.WARNING)
class RestartNeeded(Event):
    """A change that only a restart applies: ``settings.workers`` (``running``
    given: an upgrade in place kept the running workers)."""

    workers: int
    running: int | None = optional()

    def message(self) -> str:
        if self.running is not None:
            return (
                f"{self.workers} worker(s) asked for, {self.running} running: an upgrade in place keeps them; "
                "restart gportmap to change it"
            )
        return "settings.workers changed: the number of workers is read at start-up, restart gportmap to apply it"


@define("watching")
class Watching(Event):
    path: str
    mode: str

    def message(self) -> str:
        return f"watching {self.path} for changes ({self.mode})"


@define("watcher_fallback", logging.WARNING)
class WatcherFallback(Event):
    """The watcher polls instead of what was asked (``why``: the sentence)."""

    why: str = text()

    def message(self) -> str:
        return self.why


@define("watcher_rearmed")
class WatcherRearmed(Event):
    path: str
    why: str
    folder: str
    waiting_for: str | None = optional()
    errors: list[str] | None = if_set()

    def message(self) -> str:
        if self.waiting_for is not None:
            detail = f"{self.waiting_for} does not exist: waiting for it to appear"
        else:
            detail = f"following {self.path} in {self.folder}"
        return f"re-armed the watch ({self.why}): {detail}"


@define("watcher_restarted", logging.ERROR)
class WatcherRestarted(Event):
    path: str
    error: str
    retry_in: float
    restarts: int

    def message(self) -> str:
        return f"watching {self.path} failed: {self.error}; starting the watch again in {self.retry_in:g}s"


# -- systemd ---------------------------------------------------------------------


@define("notify_failed", logging.WARNING)
class NotifyFailed(Event):
    address: str | None
    error: str

    def message(self) -> str:
        return f"cannot notify the service manager: {self.error}; later failures are not logged"


@define("listen_fds")
class ListenFds(Event):
    """``sockets``: fd, name, listen, transport of each usable one."""

    passed: int
    sockets: list[dict[str, Any]]

    def message(self) -> str:
        return f"{self.passed} socket(s) passed by the service manager, {len(self.sockets)} usable: " + ", ".join(
            f"{s['listen']}/{s['transport']} (fd {s['fd']}, {s['name']})" for s in self.sockets
        )


@define("socket_unusable", logging.WARNING)
class SocketUnusable(Event):
    fd: int
    name: str
    problem: str

    def message(self) -> str:
        return f"descriptor {self.fd} ({self.name}) passed by the service manager is {self.problem}: closed"


@define("socket_unmatched", logging.WARNING)
class SocketUnmatched(Event):
    fd: int
    fd_name: str
    listen: str
    transport: str

    def message(self) -> str:
        return (
            f"no enabled rule listens on {self.listen}/{self.transport} (fd {self.fd}, {self.fd_name}), passed by "
            "the service manager: nothing accepts there until a reload adds a rule with that transport, "
            "address and port"
        )


# -- upgrades in place -------------------------------------------------------------


@define("upgrade_started")
class UpgradeStarted(Event):
    path: str
    pid: int
    what: str = text()

    def message(self) -> str:
        return f"upgrade in place: {self.what}"


class UpgradeFailure(enum.StrEnum):
    """The ``reason`` of an ``upgrade_failed`` record that is not an error's text."""

    IN_PROGRESS = "in progress"
    STOPPING = "stopping"


@define("upgrade_failed", logging.ERROR)
class UpgradeFailed(Event):
    """An upgrade in place did not happen (the running gportmap serves on), or its
    state could not be read by the new program (``unreadable``)."""

    reason: UpgradeFailure | str
    unreadable: bool = text(False)

    def record_level(self) -> int:
        return logging.WARNING if isinstance(self.reason, UpgradeFailure) else logging.ERROR

    def message(self) -> str:
        if self.reason == UpgradeFailure.IN_PROGRESS:
            return "an upgrade is already in progress"
        if self.reason == UpgradeFailure.STOPPING:
            return "gportmap is stopping: no upgrade"
        if self.unreadable:
            return f"the upgrade's state cannot be read ({self.reason}): starting afresh, connections are lost"
        return f"upgrade in place failed, the running gportmap serves on: {self.reason}"


@define("upgrade_unsupported", logging.WARNING)
class UpgradeUnsupported(Event):
    """``reason``: ``worker`` (SIGUSR2 sent to a worker) or why this platform cannot."""

    reason: str

    def message(self) -> str:
        if self.reason == "worker":
            return "SIGUSR2 to a worker is ignored: send it to the master, which upgrades its workers"
        return f"cannot upgrade in place: {self.reason}"


@define("upgrade_draining")
class UpgradeDraining(Event):
    drainer: int
    draining: int
    drain_timeout: float

    def message(self) -> str:
        return (
            f"drainer {self.drainer}: finishing {self.draining} connection(s) that could not be carried, "
            f"for up to {self.drain_timeout:g}s"
        )


@define("upgrade_drained")
class UpgradeDrained(Event):
    drainer: int

    def message(self) -> str:
        return f"drainer {self.drainer}: done"


@define("upgrade_drainer_failed", logging.ERROR)
class UpgradeDrainerFailed(Event):
    def message(self) -> str:
        return "the drainer failed"


@define("upgraded")
class Upgraded(Event):
    carried: int
    draining: int
    lost: int
    listeners: int
    workers: int
    tail_bytes: int
    duration: float
    pause: float
    per_connection_us: float
    pid: int
    #: Of ``carried``, the UDP sessions (``carried`` counts them too, as ``/stats``
    #: counts a udp rule's sessions as its connections).
    sessions: int = 0

    def message(self) -> str:
        return (
            f"upgraded in place in {self.duration:.3f}s: {self.carried} connection(s) carried "
            f"(paused {self.pause * 1000:.1f} ms), {self.draining} finishing in the old code"
        )


# -- workers -----------------------------------------------------------------------


@define("worker_started")
class WorkerStarted(Event):
    worker: int
    pid: int
    restarts: int
    generation: int

    def message(self) -> str:
        return f"worker {self.worker} started (pid {self.pid})"


@define("worker_failed", logging.ERROR)
class WorkerFailed(Event):
    """A worker did not start (the master's view: ``worker``, ``pid``; or the
    worker's own, with only ``errors``)."""

    worker: int | None = optional()
    pid: int | None = optional()
    errors: list[str] | None = optional()
    what: str = text()

    def message(self) -> str:
        return self.what


@define("worker_exited", logging.ERROR)
class WorkerExited(Event):
    worker: int
    pid: int
    code: int
    restart_in: float

    def message(self) -> str:
        how = f"killed by signal {-self.code}" if self.code < 0 else f"exit code {self.code}"
        return (
            f"worker {self.worker} (pid {self.pid}) exited unexpectedly ({how}); restarting in {self.restart_in:g}s"
        )


@define("worker_stopped")
class WorkerStopped(Event):
    worker: int
    code: int

    def message(self) -> str:
        return f"worker {self.worker} stopped"


@define("worker_upgraded")
class WorkerUpgraded(Event):
    worker: int
    pid: int

    def message(self) -> str:
        return f"worker {self.worker} (pid {self.pid}) upgraded in place"


@define("worker_unresponsive", logging.ERROR)
class WorkerUnresponsive(Event):
    worker: int
    pid: int
    silent_for: float

    def message(self) -> str:
        return f"worker {self.worker} (pid {self.pid}) sent nothing for {self.silent_for:.0f}s: killing it"


@define("worker_resync", logging.WARNING)
class WorkerResync(Event):
    worker: int
    had: int
    wanted: int

    def message(self) -> str:
        return f"worker {self.worker} runs generation {self.had}, not {self.wanted}: sending it the current rules"


@define("worker_config_invalid", logging.ERROR)
class WorkerConfigInvalid(Event):
    worker: int
    generation: int
    errors: list[str]

    def message(self) -> str:
        return (
            f"worker {self.worker} could not apply generation {self.generation}; it keeps its old rules "
            "and is sent them again later"
        )


@define("worker_request_late", logging.WARNING)
class WorkerRequestLate(Event):
    worker: int
    pid: int
    request: str
    timeout: float
    generation: int | None = optional()

    def message(self) -> str:
        return (
            f"worker {self.worker} (pid {self.pid}) did not answer {self.request!r} within {self.timeout:g}s: "
            "going on without it"
        )


@define("worker_answer_late", logging.DEBUG)
class WorkerAnswerLate(Event):
    worker: int
    request_id: int

    def message(self) -> str:
        return f"worker {self.worker} answered request {self.request_id} after its caller stopped waiting: dropped"


@define("worker_channel_error", logging.ERROR)
class WorkerChannelError(Event):
    """The master-worker channel broke: seen by a worker (no ``worker``) or by
    the master (``worker``, ``pid``: it kills that worker)."""

    worker: int | None = optional()
    pid: int | None = optional()
    error: str = text()

    def message(self) -> str:
        if self.worker is None:
            return f"channel to the master broke: {self.error}"
        return f"the channel to worker {self.worker} (pid {self.pid}) broke: {self.error}; killing it"


@define("worker_bad_message", logging.WARNING)
class WorkerBadMessage(Event):
    worker: int
    error: str = text()

    def message(self) -> str:
        return f"a message from worker {self.worker} was dropped: {self.error}"


@define("master_gone", logging.WARNING)
class MasterGone(Event):
    def message(self) -> str:
        return "the master process is gone: stopping"


@define("master_bad_message", logging.WARNING)
class MasterBadMessage(Event):
    """A worker refused (part of) a message from its master (``what``: which)."""

    what: str = text()

    def message(self) -> str:
        return self.what


@define("worker_restarting", logging.WARNING)
class WorkerRestarting(Event):
    """The master restarts a live worker on purpose, carrying its connections
    (``gportmap.runtime.workers``: a hand-over restart): ``reason`` says why."""

    worker: int
    pid: int
    reason: str
    generation: int
    wanted: int

    def message(self) -> str:
        if self.reason == "generation":
            why = f"it stays on rules generation {self.generation}, not {self.wanted}"
        else:
            why = f"asked for ({self.reason})"
        return f"restarting worker {self.worker} (pid {self.pid}) in place, carrying its connections: {why}"


@define("worker_restarted")
class WorkerRestarted(Event):
    worker: int
    pid: int
    reason: str

    def message(self) -> str:
        return f"worker {self.worker} (pid {self.pid}) restarted in place ({self.reason}): its connections carried"


@define("worker_restart_failed", logging.ERROR)
class WorkerRestartFailed(Event):
    """A restart on purpose did not happen; the worker serves on as it was."""

    worker: int
    pid: int | None = optional()
    reason: str = ""
    error: str = ""

    def message(self) -> str:
        return f"worker {self.worker} (pid {self.pid}) was not restarted in place ({self.reason}): {self.error}"


@define("workers_settled")
class WorkersSettled(Event):
    """Before an upgrade of the master hands its workers on: workers still
    starting (or waiting for their restart) were waited for, and those that did
    not come up in time were stopped, for the next master to start them."""

    waited: float
    stopped: list[int]

    def message(self) -> str:
        if self.stopped:
            return (
                f"worker(s) {', '.join(map(str, self.stopped))} still starting after {self.waited:g}s: "
                "stopped; the upgraded master starts them"
            )
        return f"every worker is running (waited {self.waited:g}s for those starting)"
