"""``python -m gportmap`` and the ``gportmap`` console script.

gevent's monkeypatching must happen before anything imports ``socket``, so it is
the first thing done here and ``gportmap/__init__.py`` imports nothing.
"""

from __future__ import annotations

from importlib import metadata

from gevent import monkey


def _patch_all() -> None:
    """``monkey.patch_all()``, scanning the installed packages' entry points once.

    gevent announces each step of ``patch_all`` to plugins found through entry points
    (``gevent.plugins.monkey.*``), looking them up some 25 times: each lookup reads
    the metadata of every installed distribution, which made ``patch_all`` the
    largest single cost of a start (about 0.15 s of 0.2 s). The distributions cannot
    change while it runs, so the lookups are answered from one scan here; plugins
    are still found and called as before. (importlib.metadata imports ``socket``
    through ``email``: gevent's own first lookup did so too, before patching it, and
    patching replaces the module's attributes in place.)
    """
    real = metadata.entry_points
    every = real()
    if not hasattr(every, "select"):  # Python before 3.10: a plain dict, no selection
        monkey.patch_all()
        return

    def entry_points(**params: str) -> metadata.EntryPoints:
        return every.select(**params)

    metadata.entry_points = entry_points  # type: ignore[assignment]
    try:
        monkey.patch_all()
    finally:
        metadata.entry_points = real


_patch_all()

from gportmap.cli import main  # noqa: E402


def run() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    run()
