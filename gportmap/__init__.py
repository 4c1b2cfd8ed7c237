"""gportmap: a multi-protocol port mapper on gevent.

Kept free of imports on purpose: ``gportmap.__main__`` must monkeypatch before
anything below it imports ``socket``.
"""

__version__ = "0.1.0"
