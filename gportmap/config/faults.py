"""A rule's ``faults`` (SPEC §12): Toxiproxy's toxics as frozen dataclasses.

One ``Fault`` per entry of the list: its ``type`` and ``stream`` as enums, its
``toxicity`` (the share of connections it affects) and its attributes as typed
fields, named as Toxiproxy names them, so that the rules file, the Toxiproxy API
(``gportmap.admin.toxiproxy``) and the engine (``gportmap.engine.faults``) share
one model. ``build`` turns a validated JSON entry into a ``Fault``; ``problems``
says what the schema cannot (which attributes a type takes, which types a
protocol takes), naming the rule's path and the attribute.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: A JSON path, as the loader's messages take it.
JsonPath = tuple[Any, ...]


class FaultType(enum.Enum):
    """Toxiproxy's toxic types, plus ``loss`` and ``duplicate`` for udp rules."""

    LATENCY = "latency"
    BANDWIDTH = "bandwidth"
    SLOW_CLOSE = "slow_close"
    TIMEOUT = "timeout"
    RESET_PEER = "reset_peer"
    SLICER = "slicer"
    LIMIT_DATA = "limit_data"
    LOSS = "loss"
    DUPLICATE = "duplicate"


class Stream(enum.Enum):
    """Which way a fault acts: ``upstream`` client -> target, ``downstream``
    target -> client (Toxiproxy's words)."""

    UPSTREAM = "upstream"
    DOWNSTREAM = "downstream"


class RuleSource(enum.Enum):
    """Where a rule comes from (``/stats``' ``source``)."""

    FILE = "file"  #: the rules file
    TOXIPROXY = "toxiproxy"  #: a proxy made through the Toxiproxy API, held in memory


@dataclass(frozen=True)
class ToxiproxySettings:
    """``settings.toxiproxy``: where Toxiproxy's HTTP API listens (SPEC §12)."""

    host: str = "127.0.0.1"
    port: int = 8474


#: Each type's attributes, as Toxiproxy names them, with their defaults (Toxiproxy's
#: zero values). Integers, except the probabilities of loss and duplicate.
ATTRIBUTES: dict[FaultType, dict[str, int | float]] = {
    FaultType.LATENCY: {"latency": 0, "jitter": 0},
    FaultType.BANDWIDTH: {"rate": 0},
    FaultType.SLOW_CLOSE: {"delay": 0},
    FaultType.TIMEOUT: {"timeout": 0},
    FaultType.RESET_PEER: {"timeout": 0},
    FaultType.SLICER: {"average_size": 0, "size_variation": 0, "delay": 0},
    FaultType.LIMIT_DATA: {"bytes": 0},
    FaultType.LOSS: {"probability": 0.0},
    FaultType.DUPLICATE: {"probability": 0.0},
}

#: The types each builtin protocol takes (SPEC §12).
STREAM_TYPES = frozenset(
    {
        FaultType.LATENCY,
        FaultType.BANDWIDTH,
        FaultType.SLOW_CLOSE,
        FaultType.TIMEOUT,
        FaultType.RESET_PEER,
        FaultType.SLICER,
        FaultType.LIMIT_DATA,
    }
)
UDP_TYPES = frozenset({FaultType.LATENCY, FaultType.BANDWIDTH, FaultType.LOSS, FaultType.DUPLICATE})

#: Largest value of an integer attribute: a day in ms, or a terabyte (limit_data).
MAX_ATTRIBUTE = 86_400_000
MAX_BYTES = 1 << 40


@dataclass(frozen=True)
class Fault:
    """One fault of a rule. ``name`` is Toxiproxy's toxic name (default
    ``<type>_<stream>``, as Toxiproxy's); only the attributes of ``type`` matter."""

    type: FaultType
    stream: Stream = Stream.DOWNSTREAM
    toxicity: float = 1.0
    name: str = ""
    latency: int = 0  # ms
    jitter: int = 0  # ms
    rate: int = 0  # KB/s (1000 bytes)
    delay: int = 0  # ms (slow_close), µs (slicer)
    timeout: int = 0  # ms
    average_size: int = 0  # bytes
    size_variation: int = 0  # bytes
    bytes: int = 0
    probability: float = 0.0

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", f"{self.type.value}_{self.stream.value}")

    @property
    def attributes(self) -> dict[str, int | float]:
        """The type's attributes as Toxiproxy shows them."""
        return {key: getattr(self, key) for key in ATTRIBUTES[self.type]}

    def describe(self) -> dict[str, Any]:
        """The fault as ``/stats`` and Toxiproxy's API show it."""
        return {
            "name": self.name,
            "type": self.type.value,
            "stream": self.stream.value,
            "toxicity": self.toxicity,
            "attributes": self.attributes,
        }


def build(entry: Mapping[str, Any]) -> Fault:
    """A ``Fault`` from a JSON entry that passed the schema and ``problems``."""
    kind = FaultType(entry["type"])
    values: dict[str, Any] = {
        "type": kind,
        "stream": Stream(entry.get("stream", "downstream")),
        "toxicity": float(entry.get("toxicity", 1.0)),
        "name": entry.get("name", ""),
    }
    attributes = entry.get("attributes") or {}
    for key, default in ATTRIBUTES[kind].items():
        if key in attributes:
            values[key] = float(attributes[key]) if isinstance(default, float) else int(attributes[key])
    return Fault(**values)


def build_all(entries: Any) -> tuple[Fault, ...]:
    return tuple(build(entry) for entry in entries)


def problems(entries: Any, protocol: str, where: JsonPath) -> list[tuple[JsonPath, str]]:
    """What the schema cannot say about a rule's ``faults`` (at ``where``): the
    attributes each type takes and their ranges, the types the rule's protocol
    takes, and names unique in the list."""
    found: list[tuple[JsonPath, str]] = []
    if not isinstance(entries, list):
        return found
    allowed = UDP_TYPES if protocol == "udp" else STREAM_TYPES
    names: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            continue
        at = (*where, i)
        try:
            kind = FaultType(entry["type"])
        except ValueError:
            continue  # the schema's enum says so
        if kind not in allowed:
            takes = ", ".join(sorted(t.value for t in allowed))
            found.append(((*at, "type"), f"{kind.value!r} does not apply to {protocol} rules (they take {takes})"))
            continue
        found += attribute_problems(kind, entry.get("attributes") or {}, (*at, "attributes"))
        stream = entry.get("stream", "downstream")
        name = entry.get("name") or f"{kind.value}_{stream}"
        if name in names:
            found.append(((*at, "name"), f"{name!r} is already the name of another fault of this rule"))
        names.add(name)
    return found


def attribute_problems(kind: FaultType, attributes: Any, where: JsonPath) -> list[tuple[JsonPath, str]]:
    """Unknown attributes of ``kind`` and values out of range, each at its path."""
    found: list[tuple[JsonPath, str]] = []
    if not isinstance(attributes, dict):
        return [(where, "must be an object")]
    known = ATTRIBUTES[kind]
    for key, value in attributes.items():
        at = (*where, key)
        if key not in known:
            takes = ", ".join(known) or "none"
            found.append((at, f"{kind.value} takes no attribute {key!r} (it takes {takes})"))
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            found.append((at, f"{value!r} is not a number"))
        elif isinstance(known[key], float):
            if not 0.0 <= value <= 1.0:
                found.append((at, f"{value!r} is not a probability between 0 and 1"))
        elif isinstance(value, float) and not value.is_integer():
            found.append((at, f"{value!r} is not a whole number"))
        elif value < 0:
            found.append((at, f"{value!r} is negative"))
        elif value > (MAX_BYTES if key == "bytes" else MAX_ATTRIBUTE):
            found.append((at, f"{value!r} is greater than the maximum of {MAX_BYTES if key == 'bytes' else MAX_ATTRIBUTE}"))
    if kind is FaultType.SLICER and attributes.get("average_size", 0) == 0 and "average_size" in attributes:
        found.append(((*where, "average_size"), "must be at least 1 (the size of the slices)"))
    return found


def toxiproxy_settings(value: Any) -> ToxiproxySettings | None:
    """``settings.toxiproxy`` (checked): false or absent is off."""
    if not isinstance(value, dict):
        return None
    listen = value.get("listen", "127.0.0.1:8474")
    host, _, port = listen.rpartition(":")
    return ToxiproxySettings(host.strip("[]") or "0.0.0.0", int(port))
