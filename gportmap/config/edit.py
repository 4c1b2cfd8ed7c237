"""Editing the rules file the way its author wrote it (SPEC §10): one rule added,
replaced, merge-patched (RFC 7396) or deleted, and the file written back atomically.

The new file is made by splicing the original text: only the edited rule's span
changes (written in the style of its neighbours: one line or indented, the same
indent unit and separators), so the form (a bare array or an object with
``settings``), every untouched rule's keys, their order and their formatting stay
byte for byte. The splice is checked: the new text must read back as exactly the
document intended, or the whole file is written afresh by ``json.dumps`` in the
file's detected indentation (2 spaces when none is seen).

Writing (``write_atomically``) goes through a temporary file in the same folder,
fsync, rename, keeping the mode (and the owner where permitted), and refuses,
without touching anything, a file it must not replace: a Kubernetes ConfigMap
(``..data`` symlinks), a file without any write permission bit, a read-only mount.

Nothing here knows gevent: the runtime runs the file work in its thread pool.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from typing import Any

from gportmap.config.loader import parse
from gportmap.errors import ConfigError

_WHITESPACE = " \t\n\r"
_DEFAULT_UNIT = "  "


class Form(enum.Enum):
    """The two shapes of a rules file (SPEC §3); an edit never turns one into the other."""

    ARRAY = "array"  #: ``[rule, ...]``, the classic form
    OBJECT = "object"  #: ``{"settings": {...}, "rules": [...]}``


class EditOp(enum.Enum):
    """What a write of the rule API does to the file."""

    ADD = "add"  #: POST /rules: append one rule; its name must be new
    PUT = "put"  #: PUT /rules/NAME: replace the rule NAME, or append it
    PATCH = "patch"  #: PATCH /rules/NAME: RFC 7396 merge patch of the rule NAME
    DELETE = "delete"  #: DELETE /rules/NAME


class EditProblem(enum.Enum):
    """Why an edit cannot be made (the admin endpoint's 400, 404, 409)."""

    INVALID = "invalid"  #: the body, or the file as it is now, is not what the edit needs
    NOT_FOUND = "not_found"  #: no rule has that name
    EXISTS = "exists"  #: POST of a name the file already has


class EditError(Exception):
    """An edit refused; ``errors`` are the lines to show (for INVALID: the messages
    of ``--check`` when the file itself is the problem)."""

    def __init__(self, problem: EditProblem, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.problem = problem
        self.errors = list(errors)


class NotWritable(Exception):
    """The rules file cannot or must not be replaced; the message says why."""


@dataclass(frozen=True)
class RuleEdit:
    """One write of the rule API: ``op`` on the rule ``name`` (None for ADD) with
    ``body`` (a rule, or a merge patch; None for DELETE)."""

    op: EditOp
    name: str | None = None
    body: Any = None


@dataclass(frozen=True)
class EditResult:
    """The new file's bytes and what the edit did."""

    raw: bytes
    #: The edited rule's name after the edit (a patch may rename it).
    name: str
    #: The rule as now written (None after DELETE).
    rule: dict[str, Any] | None
    #: True when the rule did not exist before (ADD, or PUT of a new name).
    created: bool


# -- reading -----------------------------------------------------------------------


class _Duplicate(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique (json keeps the last silently; an edit
    must not drop the other one quietly)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(f"duplicate key {key!r}")
            seen.add(key)
    return result


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant)


def read_json(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, no key twice in one object; ValueError otherwise."""
    value, end = _DECODER.raw_decode(text, _skip(text, 0))
    if _skip(text, end) != len(text):
        raise ValueError(f"extra data after the JSON value at character {end}")
    return value


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index


@dataclass(frozen=True)
class RulesText:
    """A rules file read for editing: its text, and where each rule is in it."""

    text: str
    bom: bool
    form: Form
    #: The top-level object (OBJECT form) or None.
    top: dict[str, Any] | None
    rules: list[Any]
    #: [start, end) of each rule's JSON text.
    spans: list[tuple[int, int]]
    #: The positions of the rules array's ``[`` and ``]``.
    array_open: int
    array_close: int

    @property
    def settings(self) -> dict[str, Any]:
        settings = (self.top or {}).get("settings")
        return settings if isinstance(settings, dict) else {}

    def document(self, rules: list[Any]) -> Any:
        """The whole file's value with ``rules`` as its rules."""
        if self.form is Form.ARRAY:
            return rules
        return {key: (rules if key == "rules" else value) for key, value in (self.top or {}).items()}

    def index_of(self, name: str) -> int | None:
        return next((i for i, item in enumerate(self.rules) if rule_name(item) == name), None)


def read_rules_text(raw: bytes) -> RulesText:
    """Scan a rules file for editing; ValueError when it is not a JSON rules file."""
    text = raw.decode("utf-8")
    bom = text.startswith("\ufeff")
    text = text.removeprefix("\ufeff")
    start = _skip(text, 0)
    if text[start : start + 1] == "[":
        rules, spans, close = _scan_array(text, start)
        end, form, top, array_open = close + 1, Form.ARRAY, None, start
    elif text[start : start + 1] == "{":
        end, top, spans, array_open, close = _scan_object(text, start)
        rules, form = top["rules"], Form.OBJECT
    else:
        raise ValueError('the file must be a list of rules or an object with "rules"')
    if _skip(text, end) != len(text):
        raise ValueError(f"extra data after the JSON value at character {end}")
    return RulesText(text, bom, form, top, rules, spans, array_open, close)


def _scan_array(text: str, open_index: int) -> tuple[list[Any], list[tuple[int, int]], int]:
    """The items of the array opening at ``open_index``, their spans, and where it closes."""
    items: list[Any] = []
    spans: list[tuple[int, int]] = []
    index = _skip(text, open_index + 1)
    if text[index : index + 1] == "]":
        return items, spans, index
    while True:
        item, end = _DECODER.raw_decode(text, index)
        items.append(item)
        spans.append((index, end))
        index = _skip(text, end)
        char = text[index : index + 1]
        if char == "]":
            return items, spans, index
        if char != ",":
            raise ValueError(f"expected ',' or ']' at character {index}")
        index = _skip(text, index + 1)


def _scan_object(text: str, open_index: int) -> tuple[int, dict[str, Any], list[tuple[int, int]], int, int]:
    """The top-level object: its end, its members, the rules' spans, and where the
    rules array opens and closes."""
    members: dict[str, Any] = {}
    spans: list[tuple[int, int]] = []
    array_open = array_close = -1
    index = _skip(text, open_index + 1)
    if text[index : index + 1] == "}":
        raise ValueError('the file must be a list of rules or an object with "rules"')
    while True:
        if text[index : index + 1] != '"':
            raise ValueError(f"expected a key at character {index}")
        key, index = _DECODER.raw_decode(text, index)
        if key in members:
            raise _Duplicate(f"duplicate key {key!r}")
        index = _skip(text, index)
        if text[index : index + 1] != ":":
            raise ValueError(f"expected ':' at character {index}")
        index = _skip(text, index + 1)
        if key == "rules" and text[index : index + 1] == "[":
            array_open = index
            value, spans, array_close = _scan_array(text, index)
            index = array_close + 1
        else:
            value, index = _DECODER.raw_decode(text, index)
        members[key] = value
        index = _skip(text, index)
        char = text[index : index + 1]
        if char == "}":
            break
        if char != ",":
            raise ValueError(f"expected ',' or '}}' at character {index}")
        index = _skip(text, index + 1)
    if array_open < 0:
        raise ValueError('the file must be a list of rules or an object with "rules" (a list)')
    return index + 1, members, spans, array_open, array_close


def rule_name(item: Any) -> str | None:
    """The name a rule has in the file: ``name``, else ``<protocol>-<listenPort>`` as
    the loader defaults it; None for an item that is not a rule."""
    if not isinstance(item, dict):
        return None
    name = item.get("name")
    if isinstance(name, str):
        return name
    protocol, port = item.get("protocol"), item.get("listenPort")
    if isinstance(protocol, str) and isinstance(port, (int, float)) and not isinstance(port, bool):
        if float(port).is_integer():
            return f"{protocol}-{int(port)}"
    return None


def current_errors(raw: bytes, path: str) -> list[str]:
    """What ``--check`` says about the file as it is (it cannot be edited)."""
    try:
        parse(raw, path)
    except ConfigError as exc:
        return exc.errors
    return [
        f"{path}: the file cannot be edited: it is not a JSON list of rules or an object with a list of rules"
    ]


# -- editing -----------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: objects merge key by key, ``null`` removes a key, anything else
    replaces. Keys keep their order; new keys come last."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def edit_rules(raw: bytes, edit: RuleEdit, path: str) -> EditResult:
    """The file ``raw`` with ``edit`` made, or EditError. The result is not validated
    here: the caller parses it as the whole new file, as ``--check`` would."""
    try:
        current = read_rules_text(raw)
    except (ValueError, UnicodeDecodeError):
        raise EditError(
            EditProblem.INVALID, ["the rules file as it is now cannot be edited:", *current_errors(raw, path)]
        ) from None
    return _OPERATIONS[edit.op](current, edit)


def _add(current: RulesText, edit: RuleEdit) -> EditResult:
    rule = _rule_body(edit.body)
    name = rule_name(rule)
    if name is not None and current.index_of(name) is not None:
        raise EditError(
            EditProblem.EXISTS, [f"a rule named {name!r} exists already (PUT /rules/{name} replaces it)"]
        )
    return _result(current, [*current.rules, rule], len(current.rules), rule, created=True)


def _put(current: RulesText, edit: RuleEdit) -> EditResult:
    rule = _named(_rule_body(edit.body), _name(edit))
    index = current.index_of(_name(edit))
    if index is None:
        return _result(current, [*current.rules, rule], len(current.rules), rule, created=True)
    return _replace(current, index, rule)


def _patch(current: RulesText, edit: RuleEdit) -> EditResult:
    index = _existing(current, edit)
    if not isinstance(edit.body, dict):
        raise EditError(
            EditProblem.INVALID, ['a merge patch of a rule must be a JSON object, e.g. {"enabled": false}']
        )
    return _replace(current, index, merge_patch(current.rules[index], edit.body))


def _delete(current: RulesText, edit: RuleEdit) -> EditResult:
    index = _existing(current, edit)
    rules = current.rules[:index] + current.rules[index + 1 :]
    return _result(current, rules, index, None, created=False, name=_name(edit))


_OPERATIONS = {EditOp.ADD: _add, EditOp.PUT: _put, EditOp.PATCH: _patch, EditOp.DELETE: _delete}


def _name(edit: RuleEdit) -> str:
    if edit.name is None:
        raise EditError(EditProblem.INVALID, [f"{edit.op.value} needs a rule name"])
    return edit.name


def _existing(current: RulesText, edit: RuleEdit) -> int:
    """The index of the rule the edit names, or EditError NOT_FOUND."""
    index = current.index_of(_name(edit))
    if index is None:
        raise EditError(EditProblem.NOT_FOUND, [f"no rule named {edit.name!r}"])
    return index


def _replace(current: RulesText, index: int, rule: dict[str, Any]) -> EditResult:
    rules = list(current.rules)
    rules[index] = rule
    return _result(current, rules, index, rule, created=False)


def _rule_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise EditError(EditProblem.INVALID, [f"a rule must be a JSON object, not {_kind(body)}"])
    return body


def _named(rule: dict[str, Any], name: str) -> dict[str, Any]:
    """A PUT body as the rule NAME: a name in it must be NAME; without one, NAME is
    written in unless the loader's default name already is NAME."""
    if "name" in rule:
        if rule["name"] != name:
            raise EditError(
                EditProblem.INVALID,
                [
                    f"the rule's name {rule['name']!r} is not {name!r}, the name in the URL (rename with PATCH)"
                ],
            )
        return rule
    if rule_name(rule) == name:
        return rule
    return {"name": name, **rule}


def _kind(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (dict, "an object"), (list, "an array"), (str, "a string")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else "a number"


def _result(
    current: RulesText,
    rules: list[Any],
    index: int,
    rule: dict[str, Any] | None,
    created: bool,
    name: str | None = None,
) -> EditResult:
    text = _splice(current, rules, index, rule)
    prefix = "\ufeff" if current.bom else ""
    return EditResult(
        raw=(prefix + text).encode("utf-8"),
        name=name if name is not None else (rule_name(rule) or ""),
        rule=rule,
        created=created,
    )


# -- writing the text in the file's own style ----------------------------------------


@dataclass(frozen=True)
class ItemStyle:
    """How one rule is written: on one line, or indented by ``unit`` below ``base``."""

    multiline: bool
    unit: str = _DEFAULT_UNIT
    base: str = ""
    item_sep: str = ", "
    key_sep: str = ": "

    def render(self, value: Any) -> str:
        if not self.multiline:
            return json.dumps(value, ensure_ascii=False, separators=(self.item_sep, self.key_sep))
        text = json.dumps(value, ensure_ascii=False, indent=self.unit, separators=(",", self.key_sep))
        return text.replace("\n", "\n" + self.base)


_KEY_SEP = re.compile(r'"\s*:( ?)')
_ITEM_SEP = re.compile(r',( ?)"')


def _line_indent(text: str, index: int) -> str:
    """The whitespace between the start of ``index``'s line and ``index`` ("" when
    something else comes first on that line)."""
    start = text.rfind("\n", 0, index) + 1
    prefix = text[start:index]
    return prefix if prefix.strip(" \t") == "" else ""


def _leading(text: str, index: int) -> str:
    """The indentation of the line ``index`` is on."""
    start = text.rfind("\n", 0, index) + 1
    return re.match(r"[ \t]*", text[start:index]).group(0)  # type: ignore[union-attr]


def detect_indent(text: str) -> str:
    """The indent unit of a pretty-printed file: the leading whitespace of its first
    indented line (a first-level member); two spaces when none is indented."""
    match = re.search(r"\n([ \t]+)\S", text)
    return match.group(1) if match else _DEFAULT_UNIT


def _style_of(text: str, span: tuple[int, int]) -> ItemStyle:
    start, end = span
    item = text[start:end]
    key = _KEY_SEP.search(item)
    key_sep = ":" + (key.group(1) if key else " ")
    base = _line_indent(text, start)
    if "\n" not in item:
        sep = _ITEM_SEP.search(item)
        return ItemStyle(False, item_sep="," + (sep.group(1) if sep else " "), key_sep=key_sep)
    inner = re.search(r"\n([ \t]*)\S", item)
    unit = _DEFAULT_UNIT
    if inner and inner.group(1).startswith(base) and len(inner.group(1)) > len(base):
        unit = inner.group(1)[len(base) :]
    return ItemStyle(True, unit=unit, base=base, key_sep=key_sep)


def _new_item_style(current: RulesText) -> ItemStyle:
    """The style of a rule added to an empty list: the file's own indentation."""
    if "\n" not in current.text.strip(_WHITESPACE):
        return ItemStyle(False)
    unit = detect_indent(current.text)
    return ItemStyle(True, unit=unit, base=_leading(current.text, current.array_open) + unit)


def _splice(current: RulesText, rules: list[Any], index: int, rule: dict[str, Any] | None) -> str:
    """The new text, changed only where the edited rule is; the whole file afresh
    when the splice would not read back as the intended document."""
    text, spans = current.text, current.spans
    try:
        if rule is None:
            new = _spliced_delete(current, index)
        elif index < len(spans):
            new = (
                text[: spans[index][0]] + _style_of(text, spans[index]).render(rule) + text[spans[index][1] :]
            )
        else:
            new = _spliced_append(current, rule)
        if read_json(new) == current.document(rules):
            return new
    except ValueError:
        pass
    return _whole(current, rules)


def _spliced_delete(current: RulesText, index: int) -> str:
    text, spans = current.text, current.spans
    if len(spans) == 1:
        return text[: current.array_open + 1] + text[current.array_close :]
    if index > 0:  # from the end of the rule before: its comma and this rule go
        return text[: spans[index - 1][1]] + text[spans[index][1] :]
    return text[: spans[0][0]] + text[spans[1][0] :]


def _spliced_append(current: RulesText, rule: dict[str, Any]) -> str:
    text, spans = current.text, current.spans
    if not spans:
        style = _new_item_style(current)
        if not style.multiline:
            inside = style.render(rule)
        else:
            closing = _leading(text, current.array_open)
            inside = "\n" + style.base + style.render(rule) + "\n" + closing
        return text[: current.array_open + 1] + inside + text[current.array_close :]
    last_start, last_end = spans[-1]
    if len(spans) >= 2:
        gap = text[text.index(",", spans[-2][1]) + 1 : last_start]
    else:
        gap = text[current.array_open + 1 : last_start]
        gap = gap if gap else ("" if "\n" not in text[last_start:last_end] else "\n")
    return text[:last_end] + "," + gap + _style_of(text, spans[-1]).render(rule) + text[last_end:]


def _whole(current: RulesText, rules: list[Any]) -> str:
    """The file written afresh in its indentation (one line if it was one line)."""
    multiline = "\n" in current.text.strip(_WHITESPACE)
    indent = detect_indent(current.text) if multiline else None
    text = json.dumps(current.document(rules), ensure_ascii=False, indent=indent)
    return text + ("\n" if current.text.endswith("\n") else "")


# -- the file ------------------------------------------------------------------------


def write_atomically(path: str, data: bytes) -> None:
    """Replace the file at ``path`` (a symlink: the file it leads to) by ``data``: a
    temporary file in the same folder, fsync, rename, the folder fsynced, the mode
    and (where permitted) the owner kept. NotWritable, with nothing changed, when
    the file must not or cannot be replaced. Blocking: run it in a thread."""
    real = os.path.realpath(path)
    _refuse_managed(path, real)
    try:
        info = os.stat(real)
    except OSError as exc:
        raise NotWritable(f"cannot read {real}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise NotWritable(f"{real} is not a regular file")
    if not info.st_mode & 0o222:
        raise NotWritable(
            f"{real} is read-only (mode {stat.S_IMODE(info.st_mode):04o}): gportmap does not replace a file "
            "nobody may write; make it writable to allow changes through the API"
        )
    folder = os.path.dirname(real)
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(real)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise NotWritable(_reason(folder, exc, "cannot create a file in")) from None
    try:
        try:
            _fill(fd, data, info)
        finally:
            os.close(fd)
        os.replace(temporary, real)
    except OSError as exc:
        _remove(temporary)
        raise NotWritable(_reason(real, exc, "cannot replace")) from None
    _sync_folder(folder)


def _refuse_managed(path: str, real: str) -> None:
    """A Kubernetes ConfigMap or Secret volume: the kubelet owns the files (``rules.json
    -> ..data/rules.json``, ``..data -> ..2024_01_01_...``) and would undo a change."""
    where = os.path.abspath(path)
    chain = [where, real]
    if os.path.islink(where):
        chain.append(os.readlink(where))
    if any(_KUBELET_NAMES.search(part) for part in chain):
        raise NotWritable(
            f"{where} is in a Kubernetes ConfigMap or Secret volume (it leads to {real}): the kubelet "
            "owns it; change the ConfigMap instead"
        )


#: ``..data`` and the timestamped folders (``..2024_01_15_10_20_30.123``) of a kubelet volume.
_KUBELET_NAMES = re.compile(r"(^|/)\.\.(data|\d{4}_\d\d_\d\d_[^/]*)(/|$)")


def _fill(fd: int, data: bytes, info: os.stat_result) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    if hasattr(os, "fchmod"):  # POSIX; elsewhere the temporary file's mode stands
        os.fchmod(fd, stat.S_IMODE(info.st_mode))
    if hasattr(os, "fchown") and (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
        try:
            os.fchown(fd, info.st_uid, info.st_gid)
        except OSError:
            pass  # not permitted: the file becomes ours, its mode is kept
    os.fsync(fd)


def _sync_folder(folder: str) -> None:
    """Make the rename durable (POSIX); some platforms cannot open a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _reason(where: str, exc: OSError, doing: str) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EROFS:
        return f"{doing} {where}: {reason} (a read-only mount, such as a ConfigMap or a read-only volume)"
    if exc.errno in (errno.EPERM, errno.EACCES):
        return f"{doing} {where}: {reason} (file or folder permissions, or an immutable file)"
    return f"{doing} {where}: {reason}"
