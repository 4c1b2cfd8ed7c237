"""``python -m gportmap`` and the ``gportmap`` console script.

gevent's monkeypatching must happen before anything imports ``socket``, so it is
the first thing done here and ``gportmap/__init__.py`` imports nothing.
"""

from gevent import monkey

monkey.patch_all()

from gportmap.cli import main  # noqa: E402


def run() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    run()
