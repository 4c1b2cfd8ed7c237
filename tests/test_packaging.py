"""`pip install gportmap` works where the README says it does: the declared
dependencies resolve to wheels for Windows and macOS (arm64 and x86_64), and
Linux gets pyinotify (a pure-Python sdist) on top.

Nothing is installed. The project's declared requirements are read from the
metadata pip builds for it; their markers are evaluated here for each target
platform (pip evaluates markers for the interpreter it runs on, even with
``--platform``), and pip resolves what is left against the package index for that
platform with ``--only-binary=:all:``. Only Linux runs the suite, so this is how the
other platforms' installs are checked. It needs the package index: without it the
test fails, it is never skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.packaging

#: Seconds one pip resolution may take (it downloads metadata, not packages).
PIP_TIMEOUT = 100
#: Distributions that are Linux-only: the inotify watcher and its asyncore shim.
LINUX_ONLY = {"pyinotify", "pyasyncore"}


@dataclass(frozen=True)
class Target:
    """A platform a user installs on: pip's ``--platform`` tag and the values its
    interpreter gives the PEP 508 markers."""

    tag: str
    sys_platform: str
    platform_system: str
    os_name: str
    machine: str

    def environment(self, python: str) -> dict[str, str]:
        env = dict(default_environment())
        env.update(
            sys_platform=self.sys_platform,
            platform_system=self.platform_system,
            os_name=self.os_name,
            platform_machine=self.machine,
            python_version=python,
            python_full_version=f"{python}.0",
            implementation_name="cpython",
            platform_python_implementation="CPython",
            extra="",
        )
        return env


WINDOWS = Target("win_amd64", "win32", "Windows", "nt", "AMD64")
# macOS 11 is the oldest release current gevent and greenlet publish wheels for
# (universal2); pip's --platform takes a tag and accepts every older one below it.
MACOS_ARM = Target("macosx_11_0_arm64", "darwin", "Darwin", "posix", "arm64")
MACOS_INTEL = Target("macosx_11_0_x86_64", "darwin", "Darwin", "posix", "x86_64")
LINUX = Target("manylinux_2_17_x86_64", "linux", "Linux", "posix", "x86_64")


@pytest.fixture(scope="module")
def declared(tmp_path_factory) -> list[Requirement]:
    """The install requirements of the project as pip sees them: the metadata pip
    builds from setup.py (on a copy of the sources, so the tree is not written)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "gportmap", source / "gportmap", ignore=shutil.ignore_patterns("__pycache__"))
    report = source / "report.json"
    pip("install", "--dry-run", "--ignore-installed", "--no-deps", "--report", str(report), str(source))
    (item,) = json.loads(report.read_text())["install"]
    return [Requirement(text) for text in item["metadata"]["requires_dist"]]


def pip(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
    )
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def required_on(requirements: list[Requirement], env: dict[str, str]) -> list[Requirement]:
    """The requirements an install on ``env`` gets (no extras asked for)."""
    return [req for req in requirements if req.marker is None or req.marker.evaluate(env)]


def without_marker(req: Requirement) -> str:
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


def resolve(requirements: list[Requirement], report: Path, *options: str) -> dict[str, str]:
    """pip's resolution of ``requirements`` with ``options``: name -> file it would fetch."""
    pip("install", "--dry-run", "--ignore-installed", "--report", str(report), *options,
        *(without_marker(req) for req in requirements))
    return {
        canonicalize_name(item["metadata"]["name"]): item["download_info"]["url"].rsplit("/", 1)[-1]
        for item in json.loads(report.read_text())["install"]
    }


@pytest.mark.parametrize(
    "target, python",
    [(WINDOWS, "3.11"), (WINDOWS, "3.13"), (MACOS_ARM, "3.11"), (MACOS_ARM, "3.13"), (MACOS_INTEL, "3.11")],
    ids=lambda value: value.tag if isinstance(value, Target) else f"py{value}",
)
def test_dependencies_resolve_to_wheels_without_linux_only_packages(declared, tmp_path, target, python):
    wanted = required_on(declared, target.environment(python))
    assert LINUX_ONLY.isdisjoint(canonicalize_name(req.name) for req in wanted)
    resolved = resolve(
        wanted,
        tmp_path / "report.json",
        "--only-binary=:all:",
        "--platform", target.tag,
        "--python-version", python,
        "--implementation", "cp",
        "--target", str(tmp_path / "nowhere"),
    )
    assert {"gevent", "greenlet", "gevent-websocket", "jsonschema", "prometheus-client"} <= set(resolved)
    assert LINUX_ONLY.isdisjoint(resolved), resolved
    assert all(name.endswith(".whl") for name in resolved.values()), resolved


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resolves for the running Linux interpreter")
def test_linux_gets_pyinotify_and_wheels_for_the_rest(declared, tmp_path):
    """On Linux pyinotify comes too; it publishes only a pure-Python sdist, every
    other dependency is a wheel."""
    wanted = required_on(declared, {**default_environment(), "extra": ""})
    assert "pyinotify" in {canonicalize_name(req.name) for req in wanted}
    resolved = resolve(wanted, tmp_path / "report.json", "--only-binary=:all:", "--no-binary=pyinotify")
    assert resolved["pyinotify"].endswith(".tar.gz")
    assert ("pyasyncore" in resolved) == (sys.version_info >= (3, 12)), resolved
    assert all(name.endswith(".whl") for dist, name in resolved.items() if dist != "pyinotify"), resolved


@pytest.mark.parametrize("python", ["3.11", "3.12", "3.13"])
@pytest.mark.parametrize("target", [WINDOWS, MACOS_ARM, MACOS_INTEL, LINUX], ids=lambda target: target.tag)
def test_linux_only_markers(declared, target, python):
    """pyinotify on Linux only; its asyncore shim on Linux from Python 3.12 (which
    removed asyncore) only."""
    wanted = {canonicalize_name(req.name) for req in required_on(declared, target.environment(python))}
    linux = target.sys_platform == "linux"
    assert ("pyinotify" in wanted) == linux
    assert ("pyasyncore" in wanted) == (linux and python != "3.11")
