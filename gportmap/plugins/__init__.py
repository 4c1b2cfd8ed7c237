"""Plugins: extend gportmap in Python without forking it (SPEC §7).

A plugin subclasses ``Plugin`` and overrides the hooks it needs; every hook is an
optional no-op here. It is named in a rule's ``plugins`` list by entry point name
(group ``gportmap.plugins``) or by dotted path (``"package.module:Class"``), its
``options`` are checked against its ``options_schema`` when the rules load, and it
is built once per rule server as ``Class(options)``. A plugin that cannot be
found, imported, validated or built is a config error: the rules do not load (on
reload the old ones keep serving).

The contract, per connection (for UDP, per session):

- ``on_accept(conn)`` before anything is read or any upstream connection is made;
  raise ``Reject`` to refuse (counted as rejected ``plugin``, or for UDP a dropped
  datagram);
- ``on_connect(conn)`` once the target is reached;
- ``on_data(conn, direction, data)`` for every chunk (UDP: datagram) moving
  ``"upstream"`` (client to target) or ``"downstream"`` (target to client); return
  the bytes to pass on (changed, or ``b""`` to pass nothing). A rule with such a
  plugin uses the copying relay instead of the zero-copy one;
- ``on_close(conn, summary)`` when it ends; ``summary`` has ``bytes_received``,
  ``bytes_sent``, ``duration`` and ``reason``.

``on_accept``, ``on_connect`` and ``on_close`` run in a greenlet of the connection
(TCP, WebSocket) and may wait cooperatively (``gevent.sleep``). ``on_data`` runs
inside the event loop's callbacks, as a stage of the relay
(``gportmap.engine.stage``), so the rule's connections hold no greenlet while they
are relayed; it must return at once. A plugin whose ``on_data`` needs to wait
says so with the class attribute ``may_block = True``: the rule's connections then
keep a greenlet relay. An ``on_data`` that waits without saying so fails (gevent
refuses the switch) and closes its connection like any exception. UDP
hooks run in the event loop and must never block. An
exception from a hook closes that one connection and is logged with the plugin's
name; the rule keeps serving. Keep per-connection state in ``conn.state`` (a dict
shared by the rule's plugins: use keys of your own), never on the plugin object,
which all connections of the rule share.

A plugin package may also add a protocol (entry point group ``gportmap.protocols``,
``gportmap.plugins.registry``): its public base is
``gportmap.protocols.plugin.StreamProtocol`` (one method, ``handle(connection)``),
which lives with the protocol servers it derives from, above this layer.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

from gportmap.errors import GportmapError, PluginError

PLUGIN_GROUP = "gportmap.plugins"
PROTOCOL_GROUP = "gportmap.protocols"
UPSTREAM, DOWNSTREAM = "upstream", "downstream"


class Reject(GportmapError):  # noqa: N818 - the name SPEC §7 gives it
    """Raised by ``on_accept`` to refuse a connection (or a UDP session)."""


@dataclass
class ConnView:
    """What a plugin sees of one connection; ``state`` is the plugins' own."""

    id: int
    rule: str
    protocol: str
    client: str
    target: str
    started: float
    state: dict[str, Any] = field(default_factory=dict)


class Plugin:
    """Base class of plugins: every hook is a no-op, ``on_data`` passes data on."""

    #: A JSON Schema for ``options``; None accepts any object.
    options_schema: ClassVar[dict[str, Any] | None] = None
    #: False (the default): ``on_data`` returns at once, never waiting; it runs in
    #: the event loop's callbacks as a stage of the relay and the connections hold
    #: no greenlet. True: ``on_data`` may wait (I/O, sleeps, locks); the rule's TCP
    #: and WebSocket connections then keep a greenlet relay, at a greenlet's
    #: memory each (``BandwidthLimiter`` sleeps to pace, and says so).
    may_block: ClassVar[bool] = False

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    def on_accept(self, conn: ConnView) -> None:
        """Raise ``Reject`` to refuse the connection."""

    def on_connect(self, conn: ConnView) -> None:
        """The target has been reached."""

    def on_data(self, conn: ConnView, direction: str, data: bytes) -> bytes:
        """Return what to pass on in ``direction``."""
        return data

    def on_close(self, conn: ConnView, summary: dict[str, Any]) -> None:
        """The connection has ended."""


@dataclass(frozen=True)
class PluginSpec:
    """A rule's ``plugins`` entry, resolved and validated at load. Rules compare by
    ``name`` and ``options``; the class is carried along for building."""

    name: str
    options_json: str
    cls: type[Plugin] = field(compare=False, repr=False)

    @property
    def options(self) -> dict[str, Any]:
        return json.loads(self.options_json)

    def build(self) -> Plugin:
        return self.cls(self.options)


def find_class(name: str, group: str = PLUGIN_GROUP) -> type:
    """The class an entry point ``name`` or a dotted path ``pkg.mod:Class`` names;
    PluginError says what went wrong."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any import failure is the user's to see
            raise PluginError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
        try:
            obj: Any = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{module_name!r} has no {attr!r}") from None
        return obj
    matches = [ep for ep in entry_points(group=group) if ep.name == name]
    if not matches:
        installed = ", ".join(sorted({ep.name for ep in entry_points(group=group)})) or "none"
        raise PluginError(f"no plugin named {name!r} (installed: {installed}; or give 'package.module:Class')")
    try:
        return matches[0].load()
    except Exception as exc:  # noqa: BLE001
        raise PluginError(f"cannot load plugin {name!r}: {type(exc).__name__}: {exc}") from None


def resolve(name: str, options: dict[str, Any]) -> PluginSpec:
    """Find, check and try-build a plugin, as the rules file names it."""
    import jsonschema

    cls = find_class(name)
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise PluginError(f"{name!r} is not a subclass of gportmap.plugins.Plugin")
    if cls.options_schema is not None:
        errors = sorted(jsonschema.Draft202012Validator(cls.options_schema).iter_errors(options), key=str)
        if errors:
            first = errors[0]
            where = ".".join(str(p) for p in first.absolute_path)
            raise PluginError(f"options{'.' + where if where else ''}: {first.message}")
    try:
        cls(options)  # a broken plugin fails here, at load, not at the first connection
    except Exception as exc:  # noqa: BLE001
        raise PluginError(f"cannot build {name!r}: {type(exc).__name__}: {exc}") from None
    return PluginSpec(name, json.dumps(options, sort_keys=True), cls)


class PluginChain:
    """The built plugins of one rule server, called in the file's order."""

    def __init__(self, specs: Iterable[PluginSpec]) -> None:
        self.plugins = [(spec.name, spec.build()) for spec in specs]
        self.active = bool(self.plugins)
        self.transforms = [
            (name, plugin) for name, plugin in self.plugins if type(plugin).on_data is not Plugin.on_data
        ]
        #: Some ``on_data`` may wait: the connections need a greenlet relay.
        self.may_block = any(type(plugin).may_block for _, plugin in self.transforms)

    def accept(self, conn: ConnView) -> None:
        for name, plugin in self.plugins:
            _call(name, "on_accept", plugin.on_accept, conn)

    def connect(self, conn: ConnView) -> None:
        for name, plugin in self.plugins:
            _call(name, "on_connect", plugin.on_connect, conn)

    def data(self, conn: ConnView, direction: str, data: bytes) -> bytes:
        for name, plugin in self.transforms:
            data = _call(name, "on_data", plugin.on_data, conn, direction, data)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise HookError(name, "on_data", TypeError(f"on_data returned {type(data).__name__}, not bytes"))
            if not data:
                break
        return bytes(data)

    def close(self, conn: ConnView, summary: dict[str, Any]) -> list[HookError]:
        """Every plugin hears of the end, even if one of them fails."""
        failures = []
        for name, plugin in self.plugins:
            try:
                _call(name, "on_close", plugin.on_close, conn, summary)
            except HookError as exc:
                failures.append(exc)
        return failures


class HookError(GportmapError):
    """A plugin's hook raised; ends that one connection."""

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        super().__init__(f"plugin {plugin!r} failed in {hook}: {type(error).__name__}: {error}")
        self.plugin, self.hook, self.error = plugin, hook, error


def log_hook_error(error: HookError, rule: str, client: str) -> None:
    """One ``plugin_error`` record naming the plugin; its connection is being closed."""
    from gportmap.events import PluginFailed
    from gportmap.log import emit, get_logger

    event = PluginFailed(plugin=error.plugin, hook=error.hook, rule=rule, client=client, error=str(error))
    emit(get_logger("plugins"), event)


def _call(name: str, hook: str, function, *args):
    try:
        return function(*args)
    except Reject:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's bug must not reach the server
        raise HookError(name, hook, exc) from exc
