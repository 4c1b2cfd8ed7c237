"""`pip install gportmap` works where the README says it does: the declared
dependencies resolve to wheels, and only wheels, for Windows, macOS (arm64 and
x86_64) and Linux (x86_64 and aarch64), and no dependency is platform-specific
(the rules-file watcher reads inotify through ctypes, not pyinotify, whose setup
refused to build outside Linux and which shipped no wheel).

Nothing is installed. The project's declared requirements are read from the
metadata pip builds for it; their markers are evaluated here for each target
platform (pip evaluates markers for the interpreter it runs on, even with
``--platform``), and pip resolves what is left against the package index for that
platform with ``--only-binary=:all:``. Only Linux x86_64 runs the suite, so this is
how the other platforms' installs are checked. It needs the package index: without it the
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

#: Resolving against the package index takes half a minute or more: the slow tier.
pytestmark = [pytest.mark.packaging, pytest.mark.slow]

#: Seconds one pip resolution may take (it downloads metadata, not packages).
PIP_TIMEOUT = 100
#: What every install gets, whatever the platform (transitive ones included).
CORE = {"gevent", "greenlet", "gevent-websocket", "jsonschema", "prometheus-client", "python-json-logger"}
#: Once declared for Linux only (the old inotify watcher and its asyncore shim):
#: pyinotify has no wheel and its setup refuses to build on macOS and Windows.
DROPPED = {"pyinotify", "pyasyncore"}


@dataclass(frozen=True)
class Target:
    """A platform a user installs on: pip's ``--platform`` tags (every tag an
    interpreter there accepts, the most specific first) and the values its
    interpreter gives the PEP 508 markers."""

    tags: tuple[str, ...]
    sys_platform: str
    platform_system: str
    os_name: str
    machine: str

    @property
    def tag(self) -> str:
        return self.tags[0]

    def platform_options(self) -> list[str]:
        return [option for tag in self.tags for option in ("--platform", tag)]

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


def manylinux(arch: str, glibc_minor: int = 28) -> tuple[str, ...]:
    """The manylinux tags pip accepts on a glibc 2.``glibc_minor`` system. pip's
    ``--platform`` expands a macOS tag to the older releases but takes a
    ``manylinux_2_X`` tag alone, so they are all given; ``manylinux2014`` (pip
    expands that one) brings the legacy ``manylinux2010``/``manylinux1`` names."""
    return (*(f"manylinux_2_{minor}_{arch}" for minor in range(glibc_minor, 16, -1)), f"manylinux2014_{arch}")


WINDOWS = Target(("win_amd64",), "win32", "Windows", "nt", "AMD64")
# macOS 11 is the oldest release current gevent and greenlet publish wheels for
# (universal2); pip's --platform takes a tag and accepts every older one below it.
MACOS_ARM = Target(("macosx_11_0_arm64",), "darwin", "Darwin", "posix", "arm64")
MACOS_INTEL = Target(("macosx_11_0_x86_64",), "darwin", "Darwin", "posix", "x86_64")
# glibc 2.28 (Debian 10, RHEL 8, Ubuntu 20.04): current gevent and greenlet publish
# manylinux_2_28 wheels; with only manylinux2014 pip falls back to an older gevent.
LINUX = Target(manylinux("x86_64"), "linux", "Linux", "posix", "x86_64")
LINUX_ARM = Target(manylinux("aarch64"), "linux", "Linux", "posix", "aarch64")
ALL_TARGETS = [WINDOWS, MACOS_ARM, MACOS_INTEL, LINUX, LINUX_ARM]


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
    [
        (WINDOWS, "3.11"),
        (WINDOWS, "3.13"),
        (MACOS_ARM, "3.11"),
        (MACOS_ARM, "3.13"),
        (MACOS_INTEL, "3.11"),
        (LINUX, "3.11"),
        (LINUX, "3.13"),
        (LINUX_ARM, "3.13"),
    ],
    ids=lambda value: value.tag if isinstance(value, Target) else f"py{value}",
)
def test_dependencies_resolve_to_wheels_only(declared, tmp_path, target, python):
    """Linux included: before, pyinotify (an sdist only) came on Linux, so an
    install there needed a build step, and ``--only-binary=:all:`` failed."""
    wanted = required_on(declared, target.environment(python))
    resolved = resolve(
        wanted,
        tmp_path / "report.json",
        "--only-binary=:all:",
        *target.platform_options(),
        "--python-version", python,
        "--implementation", "cp",
        "--target", str(tmp_path / "nowhere"),
    )
    assert CORE <= set(resolved), resolved
    assert DROPPED.isdisjoint(resolved), resolved
    assert all(name.endswith(".whl") for name in resolved.values()), resolved


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resolves for the running Linux interpreter")
def test_this_interpreter_resolves_to_wheels_only(declared, tmp_path):
    """The install pip would really do here, with no ``--platform``: pip evaluates
    every marker, the transitive ones included, for the interpreter it runs on."""
    wanted = required_on(declared, {**default_environment(), "extra": ""})
    resolved = resolve(wanted, tmp_path / "report.json", "--only-binary=:all:")
    assert CORE <= set(resolved) and DROPPED.isdisjoint(resolved), resolved
    assert all(name.endswith(".whl") for name in resolved.values()), resolved


def test_no_dependency_is_platform_specific(declared):
    """For each Python, every platform gets the same dependencies. pyinotify and
    its asyncore shim, once declared for Linux only, are gone (nothing imports
    them)."""
    assert DROPPED.isdisjoint(canonicalize_name(req.name) for req in declared), declared
    for python in ("3.11", "3.12", "3.13"):
        installs = {
            target.tag: sorted(str(req) for req in required_on(declared, target.environment(python)))
            for target in ALL_TARGETS
        }
        assert len({tuple(names) for names in installs.values()}) == 1, (python, installs)
