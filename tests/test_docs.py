"""The documentation site: it builds with warnings as errors, reads offline, and its
rules-file reference names every key of the schema gportmap validates with.

The site is built once per module with the real ``mkdocs.yml`` into a temporary
folder (``mkdocs build --strict``: a broken link, a missing anchor, a page left out
of the nav or a nav entry without its page fails the build). The reference checks
walk the schema on their own, independently of the hook that writes the page.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import ROOT

SCHEMA = ROOT / "gportmap" / "config" / "schema" / "rules.schema.json"
HOOK = ROOT / "docs" / "hooks" / "schema_reference.py"


def _require_mkdocs() -> None:
    """mkdocs and its theme come with the test extras; missing, the docs tests skip
    locally and fail under GPORTMAP_REQUIRE_TOOLS=1 (CI)."""
    missing = [name for name in ("mkdocs", "material") if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if os.environ.get("GPORTMAP_REQUIRE_TOOLS", "") not in ("", "0"):
        pytest.fail(f"{', '.join(missing)} required (GPORTMAP_REQUIRE_TOOLS=1) but not installed")
    pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_mkdocs()
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    return out


def _load_hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("schema_reference", HOOK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# -- an independent walk of the schema ------------------------------------------------


def schema_paths(schema: dict, node: Any, path: str = "", refs: frozenset[str] = frozenset()) -> set[str]:
    """Every property of the schema as ``settings.admin.listen`` / ``rules[].tls.certFile``;
    a ``$ref`` already being followed on the way down is not followed again."""
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        if ref in refs:
            return set()
        refs = refs | {ref}
        target: Any = schema
        for part in ref.lstrip("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    if not isinstance(node, dict):
        return set()
    found: set[str] = set()
    for key, sub in node.get("properties", {}).items():
        child = f"{path}.{key}" if path else key
        found.add(child)
        found |= schema_paths(schema, sub, child, refs)
    for keyword in ("oneOf", "anyOf", "allOf"):
        for alt in node.get(keyword, []):
            found |= schema_paths(schema, alt, path, refs)
    if isinstance(node.get("items"), dict):
        found |= schema_paths(schema, node["items"], f"{path}[]", refs)
    if isinstance(node.get("additionalProperties"), dict):
        found |= schema_paths(schema, node["additionalProperties"], f"{path}.*", refs)
    return found


def row_id(path: str) -> str:
    """The id the reference gives a key's row (``ref-`` and the path in lower case, every
    run of other characters one dash): a stable address to link to."""
    return "ref-" + re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")


class _Rows(HTMLParser):
    """The ids of the reference's rows, each with the text of its first table cell."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, str] = {}
        self._current: str | None = None
        self._cell_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        ident = dict(attrs).get("id") or ""
        if tag == "span" and ident.startswith("ref-"):
            self._current, self._cell_text = ident, []

    def handle_data(self, data: str) -> None:
        if self._current:
            self._cell_text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._current:
            self.rows[self._current] = "".join(self._cell_text).strip()
            self._current = None


# -- the tests -----------------------------------------------------------------------


def test_site_builds_strict_with_every_page(site: Path) -> None:
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    built = {p.stem for p in site.glob("*.html")}
    assert pages <= built, pages - built
    for needed in ("index", "quickstart", "reference", "tcp", "udp", "websocket", "troubleshooting", "benchmarks"):
        assert needed in built


def test_reference_names_every_property_of_the_schema(site: Path) -> None:
    schema = json.loads(SCHEMA.read_text())
    paths = schema_paths(schema, schema)
    assert {"rules", "settings", "rules[].listenPort", "settings.admin.token", "rules[].tls.certFile"} <= paths
    parser = _Rows()
    parser.feed((site / "reference.html").read_text(encoding="utf-8"))
    missing = sorted(p for p in paths if row_id(p) not in parser.rows)
    assert not missing, f"keys of the schema without a row in the reference: {missing}"
    for path in paths:
        key = re.split(r"\.|\[\]", path)[-1] or path
        assert parser.rows[row_id(path)] == key, (path, parser.rows[row_id(path)])


def test_reference_shows_the_defaults_gportmap_fills_in(site: Path) -> None:
    """Defaults come from the model's dataclasses: the page and the code agree."""
    from gportmap.config.model import Rule, Settings

    text = (site / "reference.html").read_text(encoding="utf-8")

    def row(ident: str) -> str:
        start = text.index(f'id="{ident}"')
        return text[start : text.index("</tr>", start)]

    assert f"<code>{Rule.__dataclass_fields__['connect_timeout'].default:g}</code>" in row("ref-rules-connecttimeout")
    assert f"<code>{Settings.__dataclass_fields__['max_connections'].default}</code>" in row(
        "ref-settings-maxconnections"
    )


def test_site_needs_no_external_assets(site: Path) -> None:
    """Readable offline: no script, stylesheet, font or image from another host (links
    in the text to other sites are fine)."""

    class Assets(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.remote: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            values = dict(attrs)
            url = values.get("src") if tag in ("script", "img", "iframe") else None
            if tag == "link" and values.get("rel") not in ("canonical",):
                url = values.get("href")
            if url and re.match(r"(https?:)?//", url):
                self.remote.append(f"<{tag}> {url}")

    pages = sorted(site.rglob("*.html"))
    assert pages
    for page in pages:
        parser = Assets()
        parser.feed(page.read_text(encoding="utf-8"))
        assert not parser.remote, (page.name, parser.remote)
    for css in site.rglob("*.css"):
        assert not re.search(r"@import\s+url\(\s*['\"]?(https?:)?//|fonts\.googleapis", css.read_text()), css


def test_readme_links_to_pages_that_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((docs/[^)#\s]+)", readme)
    assert len(targets) >= 10, "the README should point to the docs pages"
    missing = sorted({t for t in targets if not (ROOT / t).is_file()})
    assert not missing, missing
    assert len(readme.splitlines()) <= 300, "the README is the first screen, the manual is docs/"


def test_reference_generator_handles_the_json_schema_constructs() -> None:
    """The schema grows ($defs, alternatives, patterns, enums, recursion): each is
    rendered, none is dropped, and the walk ends."""
    hook = _load_hook()
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["a"],
        "oneOf": [{"required": ["a"]}, {"required": ["b", "c"]}],
        "properties": {
            "a": {"$ref": "#/$defs/port", "description": "own words"},
            "b": {"anyOf": [{"type": "string", "pattern": "^x|y$"}, {"type": "array", "items": {"$ref": "#/$defs/obj"}}]},
            "c": {"allOf": [{"type": "integer"}, {"minimum": 3}], "default": 4},
            "d": {"enum": ["p", "q"]},
            "e": {"$ref": "#/$defs/rec"},
            "f": {"type": "string", "x-custom": 1},
        },
        "$defs": {
            "port": {"type": "integer", "minimum": 1, "maximum": 65535, "description": "generic words"},
            "obj": {"type": "object", "required": ["y"], "properties": {"y": {"const": "z"}}},
            "rec": {"type": "object", "properties": {"next": {"$ref": "#/$defs/rec"}}},
        },
    }
    text = hook.render(hook.SchemaReference(schema).sections())
    assert "exactly one of: `a`, `b` + `c`" in text
    rows = {line.split("</span>")[0].split('"')[1]: line for line in text.splitlines() if '<span id="' in line}
    assert set(rows) == {row_id(p) for p in schema_paths(schema, schema)}
    assert "1 ≤ value ≤ 65,535" in rows["ref-a"] and "own words" in rows["ref-a"] and "generic" not in rows["ref-a"]
    assert "string or array of [object](#obj-b)" in rows["ref-b"] and "`^x|y$`" in rows["ref-b"]
    assert "integer" in rows["ref-c"] and "3 ≤ value" in rows["ref-c"] and "`4`" in rows["ref-c"]
    assert '`"p"` or `"q"`' in rows["ref-d"]
    assert "| yes |" in rows["ref-b-y"] and '`"z"`' in rows["ref-b-y"]
    assert "object (recursive)" in rows["ref-e-next"]
    assert 'x-custom: `1`' in rows["ref-f"]


def test_the_development_page_names_every_module() -> None:
    """The layout by layer in docs/development.md went stale once (it left out
    hubrelay, workers, udp, websocket): every module of the package is named there."""
    text = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    modules = [p for p in (ROOT / "gportmap").rglob("*.py") if p.name != "__init__.py"]
    assert len(modules) > 30
    missing = sorted(str(p.relative_to(ROOT)) for p in modules if not re.search(rf"\b{re.escape(p.name)}\b", text))
    assert not missing, f"add them to the layout in docs/development.md: {missing}"


def test_every_test_and_file_the_docs_name_exists() -> None:
    """The docs cite tests (``tests/test_x.py::test_y``) as evidence and name files of
    the repository; a renamed test or a moved file must not leave a dead citation."""
    pages = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
    cited = 0
    dead = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for path, name in re.findall(r"(tests/test_\w+\.py)::(test_\w+)", text):
            cited += 1
            source = ROOT / path
            if not source.is_file() or not re.search(rf"^(async )?def {name}\(", source.read_text(), re.M):
                dead.append(f"{page.name}: {path}::{name}")
        pattern = r"`((?:tests|bench|gportmap|deploy|rules|examples)/[\w./-]+\.(?:py|json|yaml|yml|conf|service|socket))`"
        for path in re.findall(pattern, text):
            cited += 1
            if not (ROOT / path).exists():
                dead.append(f"{page.name}: {path}")
    assert cited > 20
    assert not dead, dead


def test_the_novnc_steps_agree_with_their_rule() -> None:
    """The noVNC page gives a URL to open: its host, port and path must be the rule's,
    and the page's origin must be the one the rule's ``origins`` lists, exactly."""
    from urllib.parse import parse_qs, urlsplit

    text = (ROOT / "docs" / "websocket.md").read_text(encoding="utf-8")
    (rule,) = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))
    url = urlsplit(re.search(r"http://\S+/vnc\.html\?\S+", text).group(0))
    query = {key: values[0] for key, values in parse_qs(url.query).items()}
    assert (query["host"], int(query["port"])) == (rule["listenHost"], rule["listenPort"])
    assert "/" + query["path"] == rule["path"]
    assert rule["origins"] == [f"{url.scheme}://{url.netloc}"]
    assert "exact origin" in text
