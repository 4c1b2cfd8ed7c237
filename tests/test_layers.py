"""The package's layering stays as built (issue 16): a newcomer reads the flow in
the folder names, and a lower layer never imports an upper one.

Layers, lowest first; a module may import its own layer and those below:

0. base      errors, events, log, platform, inotify, stats, failures, security, reasons,
             hubwork
1. plugins   the plugin base class, loading, the protocol registry
2. config    the rules file: model, loader, schema
3. engine    sockets, relays, TLS, WebSocket framing, PROXY headers
4. protocols the protocol servers (tcp, udp, websocket)
5. runtime   service, applier, supervisor, watcher, workers
6. admin     the admin endpoint, metrics, stats log, dashboard
7. cli       the command line, its ``ctl`` client (and ``__main__``)

Every import counts, including those inside functions and under TYPE_CHECKING: a
type that points upwards is a dependency that points upwards. Module-level imports
(the ones that run at import time) must also form no circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gportmap"
LAYERS = [
    {"errors", "log", "platform", "inotify", "stats", "failures", "security", "reasons", "events", "hubwork"},
    {"plugins"},
    {"config"},
    {"engine"},
    {"protocols"},
    {"runtime"},
    {"admin"},
    {"cli", "ctl", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of ``gportmap.X...`` by its first component under gportmap."""
    parts = module.split(".")
    if len(parts) == 1:  # gportmap/__init__.py: the version only
        return -1
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def imports(path: Path, top_level_only: bool = False, text: str | None = None) -> list[tuple[str, int]]:
    """(imported gportmap module, line) of every import in the file (or in ``text``
    as if it were that file)."""
    tree = ast.parse(path.read_text() if text is None else text, str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("gportmap")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("gportmap"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    PACKAGE.parent / candidate.replace(".", "/") / "__init__.py"
                ).exists()
                found.append((candidate if is_module else base, node.lineno))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_module_imports_an_upper_layer(path: Path):
    here = module_name(path)
    mine = layer_of(here)
    upward = [
        f"line {line}: {target} (layer {layer_of(target)} above {mine})"
        for target, line in imports(path)
        if layer_of(target) > mine
    ]
    assert not upward, f"{here} (layer {mine}) imports upwards:\n" + "\n".join(upward)


def test_module_level_imports_form_no_circle():
    graph = {module_name(path): {target for target, _ in imports(path, top_level_only=True)} for path in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            # importing a package runs its __init__: an edge to the package itself
            if target not in graph:
                continue
            if state.get(target) == 1 and target != module:
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_check_itself_sees_upward_and_relative_imports():
    """A check that cannot fail is no check: an engine module importing the runtime,
    absolutely or relatively, inside a function too, is found."""
    probe = PACKAGE / "engine" / "probe.py"
    text = "from ..runtime import service\ndef f():\n    import gportmap.admin.http\n"
    found = imports(probe, text=text)
    assert found == [("gportmap.runtime.service", 1), ("gportmap.admin.http", 3)]
    assert all(layer_of(target) > layer_of(module_name(probe)) for target, _ in found)


@pytest.mark.parametrize("cls_path", ["gportmap.runtime.supervisor:Supervisor", "gportmap.runtime.workers:WorkerPool"])
def test_both_backends_implement_the_declared_surface(cls_path: str):
    """``Supervisor`` and ``WorkerPool`` stand in for each other behind
    ``RulesBackend``: every method it declares exists with the same parameters."""
    import importlib
    import inspect

    from gportmap.runtime.backend import RulesBackend

    module, _, name = cls_path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    for member, declared in vars(RulesBackend).items():
        if member.startswith("_") or not callable(declared):
            continue
        implemented = getattr(cls, member, None)
        assert implemented is not None, f"{name} lacks {member}"
        assert list(inspect.signature(implemented).parameters) == list(inspect.signature(declared).parameters), member
    init = inspect.getsource(cls.__init__)
    for attribute in RulesBackend.__annotations__:
        assert f"self.{attribute}" in init, f"{name} does not set {attribute}"


#: Within the admin layer, the endpoint's one-job modules sit below its routes
#: (``http``): the guard and the renderings never import them, so a route cannot
#: reach around the limits and the limits hold for every route.
ADMIN_BELOW_ROUTES = ["gportmap/admin/guard.py", "gportmap/admin/render.py"]


@pytest.mark.parametrize("relative", ADMIN_BELOW_ROUTES)
def test_the_admin_guard_and_renderings_never_import_the_routes(relative: str):
    path = PACKAGE.parent / relative
    assert path.exists(), f"{relative} is gone: update ADMIN_BELOW_ROUTES"
    upward = [f"line {line}: {target}" for target, line in imports(path) if target == "gportmap.admin.http"]
    assert not upward, f"{relative} imports the routes:\n" + "\n".join(upward)
