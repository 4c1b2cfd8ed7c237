"""How a rules-file problem is said: ``<file>: <json path>: <problem>``, clipped and
counted, with a "did you mean" where one is close. Every message about the rules
file is made here, so every one is bounded the same way."""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

JsonPath = tuple[str | int, ...]


Problem = tuple[JsonPath, "str | UnknownKey"]


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


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def message(shown: str, path: JsonPath, problem: str) -> str:
    """One error line, clipped to ``MAX_ERROR_CHARS`` whatever the file put in it."""
    text = f"{shown}: {format_path(path)}: {problem}" if path else f"{shown}: {problem}"
    return clip(text, MAX_ERROR_CHARS)


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
            text += f"[{json.dumps(clip(step, MAX_KEY_CHARS))}]"
    return text


class Positions:
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
class UnknownKey:
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


def choices(value: Any, options: Any) -> str:
    listed = ", ".join(repr(option) for option in options)
    match = _close_match(value, [str(o) for o in options]) if isinstance(value, str) else None
    return (
        f" (expected one of: {listed}; did you mean {match!r}?)"
        if match is not None
        else f" (expected one of: {listed})"
    )


def kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float, BadNumber)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "null"


def show(value: Any) -> str:
    """A value as a short, one-line fragment of a message (JSON spelling for literals)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        text = _json_start(value, 60)
    else:
        text = repr(value[:61] if isinstance(value, str) else value)
    return clip(text)


def _json_start(value: dict | list, limit: int) -> str:
    """The first ``limit``-odd characters of ``value`` in JSON, encoding no more of it
    than that: a 100,000-entry list is 1.9 MB of JSON, and only its start is shown."""
    chunks: list[str] = []
    size = 0
    try:
        for chunk in json.JSONEncoder(default=str).iterencode(value):  # lazy: stops early
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                break
    except (ValueError, RecursionError):
        return "{...}" if isinstance(value, dict) else "[...]"
    return "".join(chunks)


def clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class BadNumber:
    """Stands in for NaN, Infinity or an out-of-range number so the error can name its path."""

    text: str

    @property
    def problem(self) -> str:
        if self.text in ("NaN", "Infinity", "-Infinity"):
            return f"{self.text} is not allowed (JSON has no NaN or Infinity)"
        return f"{clip(self.text)} is out of range"
