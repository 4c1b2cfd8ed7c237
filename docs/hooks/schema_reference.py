"""MkDocs hook: the rules-file reference, generated from the JSON Schema at build time.

The page ``docs/reference.md`` holds the marker ``<!-- rules-schema-reference -->``;
this hook replaces it with one table per object of
``gportmap/config/schema/rules.schema.json`` (every key: its type, whether it is
required, its default, its limits and its description). Because the tables are
written from the schema gportmap validates with, the reference cannot drift from
what gportmap accepts.

Defaults come from the schema's ``default`` keyword where it has one, else from the
field of the same name (camelCase read as snake_case) of the frozen dataclass that
holds the loaded value (``gportmap.config.model.Rule`` / ``Settings``): the values
gportmap actually fills in.

The walk understands what the schema uses and what JSON Schema offers besides:
local ``$ref`` (with sibling keywords, as 2020-12 allows), ``oneOf``/``anyOf``/
``allOf``, ``enum``/``const``, ``items``/``prefixItems``, ``additionalProperties``
schemas, numeric, length, item-count and pattern limits; any other keyword is
shown verbatim under the limits, so a new construct is visible, never dropped.
"""

from __future__ import annotations

import dataclasses
import enum
import html
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "<!-- rules-schema-reference -->"
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "gportmap" / "config" / "schema" / "rules.schema.json"

#: Keywords the tables render in their own words; anything else lands in "other".
_RENDERED = frozenset(
    {
        "$schema", "$id", "$defs", "definitions", "$ref", "$comment", "title", "description",
        "type", "enum", "const", "default", "examples", "properties", "required",
        "additionalProperties", "items", "prefixItems", "oneOf", "anyOf", "allOf",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
        "minLength", "maxLength", "pattern", "format", "minItems", "maxItems", "uniqueItems",
        "minProperties", "maxProperties", "patternProperties", "propertyNames",
        "dependentRequired", "dependentSchemas", "not", "if", "then", "else",
    }
)


@dataclass(frozen=True)
class Row:
    """One key of one object, as the table shows it."""

    key: str
    anchor: str
    type: str
    required: bool
    default: str
    limits: str
    description: str


@dataclass(frozen=True)
class Section:
    """One object of the schema (the top level, ``settings``, ``rules[]``, ...)."""

    path: str
    anchor: str
    description: str
    rows: tuple[Row, ...]
    closed: bool  # additionalProperties: false, so an unknown key is an error
    constraints: tuple[str, ...] = ()  # what ties keys together (oneOf of required, ...)


class SchemaReference:
    """Walks a JSON Schema into sections of rows. ``defaults`` maps an object's path
    (``"settings"``, ``"rules[]"``) to a dataclass type whose field defaults apply."""

    def __init__(self, schema: dict[str, Any], defaults: dict[str, type] | None = None) -> None:
        self.schema = schema
        self.defaults = defaults or {}

    # -- $ref and combinators -------------------------------------------------

    def resolve(self, node: Any, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        """``node`` with a local ``$ref`` replaced by its target, siblings on top."""
        if not isinstance(node, dict):
            return {} if node is True else {"not": {}} if node is False else {}
        ref = node.get("$ref")
        if not isinstance(ref, str):
            return node
        if ref in seen:  # a recursive schema: show the reference, do not loop
            return {k: v for k, v in node.items() if k != "$ref"} | {"$comment": f"recursive: {ref}"}
        target = self.pointer(ref)
        merged = dict(self.resolve(target, (*seen, ref)))
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        if "description" in merged and "description" in siblings:
            merged.pop("description")
        merged.update(siblings)
        return merged

    def pointer(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise ValueError(f"only local $ref is supported, not {ref!r}")
        node: Any = self.schema
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    def alternatives(self, node: dict[str, Any]) -> list[dict[str, Any]]:
        """The ``oneOf``/``anyOf`` branches of a node, each resolved."""
        return [self.resolve(alt) for key in ("oneOf", "anyOf") for alt in node.get(key, [])]

    def flatten(self, node: dict[str, Any]) -> dict[str, Any]:
        """``allOf`` folded into one node (properties and required lists united)."""
        node = self.resolve(node)
        if "allOf" not in node:
            return node
        merged = {k: v for k, v in node.items() if k != "allOf"}
        for part in node["allOf"]:
            part = self.flatten(part)
            for key, value in part.items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **value}
                elif key == "required":
                    merged["required"] = [*merged.get("required", []), *value]
                else:
                    merged.setdefault(key, value)
        return merged

    # -- walking ---------------------------------------------------------------

    def sections(self) -> list[Section]:
        out: list[Section] = []
        self._walk(self.schema, "", out, frozenset())
        return out

    def _objects_in(
        self, node: Any, path: str, refs: frozenset[str]
    ) -> Iterator[tuple[str, dict[str, Any], frozenset[str]]]:
        """Every object schema with properties reachable from ``node`` without passing
        through another object's properties: itself, its array items, its branches.
        ``refs`` are the ``$ref`` targets already being expanded above: a recursive
        schema is shown once, not followed forever."""
        ref = node.get("$ref") if isinstance(node, dict) else None
        if ref is not None:
            if ref in refs:
                return
            refs = refs | {ref}
        node = self.flatten(node)
        if "properties" in node or "patternProperties" in node:
            yield path, node, refs
        for key in ("oneOf", "anyOf"):
            for alt in node.get(key, []):
                yield from self._objects_in(alt, path, refs)
        items = node.get("items")
        if isinstance(items, dict):
            yield from self._objects_in(items, f"{path}[]", refs)
        for index, item in enumerate(node.get("prefixItems", [])):
            yield from self._objects_in(item, f"{path}[{index}]", refs)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            yield from self._objects_in(extra, f"{path}.*" if path else "*", refs)

    def _walk(self, node: Any, path: str, out: list[Section], refs: frozenset[str]) -> None:
        for obj_path, obj, obj_refs in self._objects_in(node, path, refs):
            if any(s.path == (obj_path or "(top level)") for s in out):
                continue
            required = set(obj.get("required", []))
            rows = []
            for key, sub in obj.get("properties", {}).items():
                child_path = f"{obj_path}.{key}" if obj_path else key
                rows.append(self._row(key, child_path, sub, key in required, obj_path))
            for pattern, sub in obj.get("patternProperties", {}).items():
                child_path = f"{obj_path}.<{pattern}>" if obj_path else f"<{pattern}>"
                rows.append(self._row(f"keys matching {pattern}", child_path, sub, False, obj_path))
            out.append(
                Section(
                    path=obj_path or "(top level)",
                    anchor=section_anchor(obj_path),
                    description=str(obj.get("description", "")),
                    rows=tuple(rows),
                    closed=obj.get("additionalProperties") is False,
                    constraints=self.constraints_of(obj),
                )
            )
            for key, sub in obj.get("properties", {}).items():
                self._walk(sub, f"{obj_path}.{key}" if obj_path else key, out, obj_refs)
            for pattern, sub in obj.get("patternProperties", {}).items():
                self._walk(sub, f"{obj_path}.<{pattern}>" if obj_path else f"<{pattern}>", out, obj_refs)

    def _row(self, key: str, path: str, node: Any, required: bool, parent: str) -> Row:
        resolved = self.flatten(node)
        return Row(
            key=key,
            anchor=anchor_for(path),
            type=self.type_of(resolved, path),
            required=required,
            default="—" if required else self.default_of(resolved, key, parent),
            limits=self.limits_of(resolved),
            description=self.description_of(resolved),
        )

    def constraints_of(self, obj: dict[str, Any]) -> tuple[str, ...]:
        """Object-level rules between keys, in words where the form is common
        (alternatives that only require keys), verbatim JSON otherwise."""
        out = []
        for keyword, words in (("oneOf", "exactly one of"), ("anyOf", "at least one of")):
            alts = [self.resolve(alt) for alt in obj.get(keyword, [])]
            if not alts:
                continue
            if all(set(alt) <= {"required", "description"} for alt in alts):
                choices = [" + ".join(code(k) for k in alt.get("required", [])) or "none" for alt in alts]
                out.append(f"{words}: " + ", ".join(choices))
            elif not all("properties" in alt for alt in alts):
                out.append(f"{keyword}: {code(json.dumps(obj[keyword], sort_keys=True))}")
        for key, needs in obj.get("dependentRequired", {}).items():
            out.append(f"{code(key)} requires " + ", ".join(code(n) for n in needs))
        for keyword in ("not", "if", "then", "else", "dependentSchemas"):
            if keyword in obj:
                out.append(f"{keyword}: {code(json.dumps(obj[keyword], sort_keys=True))}")
        return tuple(out)

    # -- cells -----------------------------------------------------------------

    def type_of(self, node: dict[str, Any], path: str) -> str:
        node = self.flatten(node)
        if "const" in node:
            return code(json.dumps(node["const"]))
        if "enum" in node:
            return " or ".join(code(json.dumps(v)) for v in node["enum"])
        alts = self.alternatives(node)
        if alts:
            return " or ".join(dict.fromkeys(self.type_of(alt, path) for alt in alts))
        types = node.get("type")
        names = types if isinstance(types, list) else [types] if types else []
        if not names:
            if "properties" in node:
                names = ["object"]
            elif "items" in node:
                names = ["array"]
        parts = []
        for name in names:
            if name == "object" and ("properties" in node or "patternProperties" in node):
                parts.append(f"[object](#{section_anchor(path)})")
            elif name == "array" and isinstance(node.get("items"), dict):
                parts.append(f"array of {self.type_of(node['items'], path + '[]')}")
            else:
                parts.append(str(name))
        return " or ".join(parts) or "any"

    def default_of(self, node: dict[str, Any], key: str, parent: str) -> str:
        if "default" in node:
            return code(json.dumps(node["default"]))
        holder = self.defaults.get(parent)
        if holder is None:
            return "—"
        for fld in dataclasses.fields(holder):
            if fld.name != snake_case(key):
                continue
            if fld.default is not dataclasses.MISSING:
                return show_default(fld.default)
            if fld.default_factory is not dataclasses.MISSING:
                return show_default(fld.default_factory())
        return "—"

    def limits_of(self, node: dict[str, Any]) -> str:
        node = self.flatten(node)
        parts: list[str] = []
        low = node.get("minimum")
        xlow = node.get("exclusiveMinimum")
        high = node.get("maximum")
        xhigh = node.get("exclusiveMaximum")
        lower = f"{number(low)} ≤ " if low is not None else f"{number(xlow)} < " if xlow is not None else ""
        upper = f" ≤ {number(high)}" if high is not None else f" < {number(xhigh)}" if xhigh is not None else ""
        if lower or upper:
            parts.append(f"{lower}value{upper}")
        if "multipleOf" in node:
            parts.append(f"a multiple of {number(node['multipleOf'])}")
        if "minLength" in node or "maxLength" in node:
            parts.append(f"length {span(node.get('minLength'), node.get('maxLength'))}")
        if "pattern" in node:
            parts.append(f"matches {code(node['pattern'])}")
        if "format" in node:
            parts.append(f"format {code(node['format'])}")
        if "minItems" in node or "maxItems" in node:
            parts.append(f"{span(node.get('minItems'), node.get('maxItems'))} items")
        if node.get("uniqueItems"):
            parts.append("no duplicates")
        if "minProperties" in node or "maxProperties" in node:
            parts.append(f"{span(node.get('minProperties'), node.get('maxProperties'))} keys")
        if "propertyNames" in node:
            parts.append(f"keys: {self.limits_of(node['propertyNames']) or 'any'}")
        items = node.get("items")
        if isinstance(items, dict):
            inner = self.limits_of(items)
            if inner:
                parts.append(f"each: {inner}")
        for alt in self.alternatives(node):
            inner = self.limits_of(alt)
            if inner:
                parts.append(f"{self.type_of(alt, '')}: {inner}")
        for keyword, value in node.items():
            if keyword not in _RENDERED:
                parts.append(f"{keyword}: {code(json.dumps(value, sort_keys=True))}")
        return "; ".join(parts)

    def description_of(self, node: dict[str, Any]) -> str:
        text = str(node.get("description", ""))
        if not text:
            texts = [str(alt["description"]) for alt in self.alternatives(node) if alt.get("description")]
            text = " ".join(texts)
        return text


# -- formatting helpers ------------------------------------------------------------


def anchor_for(path: str) -> str:
    """The HTML id of a key's row: ``rules[].tls.certFile`` -> ``ref-rules-tls-certfile``."""
    slug = re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")
    return f"ref-{slug}" if slug else "ref"


def section_anchor(path: str) -> str:
    """The HTML id of an object's table: ``rules[].tls`` -> ``obj-rules-tls``."""
    slug = re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")
    return f"obj-{slug}" if slug else "obj-top"


def snake_case(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def show_default(value: Any) -> str:
    """A model default as the rules file would spell it. Values the model keeps in
    another form than the file's (``""`` for "computed from other keys", nested
    tuples) are left to the schema's description: "—" rather than a wrong spelling."""
    if dataclasses.is_dataclass(value):
        return "see the object's table"
    if value is None:
        return "none"
    if value == "" or (isinstance(value, tuple) and any(isinstance(v, tuple | list) for v in value)):
        return "—"
    return code(json.dumps(plain(value)))


def plain(value: Any) -> Any:
    """``value`` with enums, tuples and whole floats turned into what JSON writes."""
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, tuple | list | frozenset | set):
        return [plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and abs(value) >= 10000 else str(value)


def span(low: Any, high: Any) -> str:
    if low is not None and high is not None:
        return f"{number(low)}–{number(high)}"
    return f"≥ {number(low)}" if low is not None else f"≤ {number(high)}"


def code(text: str) -> str:
    """A Markdown code span that survives backticks in ``text`` (the tables extension
    leaves pipes inside code spans alone)."""
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def cell(text: str) -> str:
    return text.replace("\n", " ").strip() or "—"


def prose(text: str) -> str:
    """Schema text as Markdown table content: ``<token>`` stays visible (not an HTML
    tag), and neither a pipe nor an asterisk breaks the table or starts emphasis."""
    return html.escape(text, quote=False).replace("|", "\\|").replace("*", "\\*")


def render(sections: list[Section]) -> str:
    """The Markdown for the sections: one heading and one table each."""
    lines: list[str] = []
    anchors = {section.anchor for section in sections}

    def link_known(text: str) -> str:  # a recursive $ref has no table of its own path
        return re.sub(
            r"\[object\]\(#(obj-[a-z0-9-]*)\)",
            lambda m: m.group(0) if m.group(1) in anchors else "object (recursive)",
            text,
        )

    for section in sections:
        title = "The top level" if section.path == "(top level)" else f"`{section.path}`"
        lines.append(f"### {title} {{ #{section.anchor} }}")
        lines.append("")
        if section.description:
            lines.append(prose(section.description))
            lines.append("")
        if section.closed:
            lines.append("Any other key is an error.")
            lines.append("")
        for constraint in section.constraints:
            lines.append(f"- {constraint}")
        if section.constraints:
            lines.append("")
        if not section.rows:
            lines.append("No keys.")
            lines.append("")
            continue
        lines.append("| key | type | required | default | limits | description |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for row in section.rows:
            key = f'<span id="{row.anchor}"></span>{code(row.key)}'
            lines.append(
                f"| {key} | {cell(link_known(row.type))} | {'yes' if row.required else 'no'} | {cell(row.default)} "
                f"| {cell(row.limits)} | {cell(prose(row.description))} |"
            )
        lines.append("")
    return "\n".join(lines)


#: Object paths of the schema and the dataclass of ``gportmap.config.model`` that
#: holds each loaded (a name the model does not have yet is skipped).
MODEL_CLASSES = {
    "settings": "Settings",
    "rules[]": "Rule",
    "rules[].targets[]": "Target",
    "rules[].healthCheck": "HealthCheck",
}


def model_defaults() -> dict[str, type]:
    """The dataclasses whose field defaults gportmap fills in, by object path."""
    from gportmap.config import model

    found = {path: getattr(model, name, None) for path, name in MODEL_CLASSES.items()}
    return {path: cls for path, cls in found.items() if dataclasses.is_dataclass(cls)}


def reference_markdown(schema_path: Path = SCHEMA_PATH) -> str:
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    return render(SchemaReference(schema, model_defaults()).sections())


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: fill the marker of whichever page holds it."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference_markdown())
