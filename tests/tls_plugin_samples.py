"""Plugins that tests/test_tls_relay.py names by dotted path (tests/ is put on the
subprocess's PYTHONPATH)."""

from __future__ import annotations

import json
from typing import Any

import gevent

from gportmap.plugins import ConnView, Plugin


class WaitsOnClose(Plugin):
    """``on_close`` waits cooperatively, as SPEC §7 allows hooks to, then appends
    the summary to ``options["path"]``: on a connection relayed in hub callbacks it
    must still run in a greenlet (the hub cannot wait)."""

    def on_close(self, conn: ConnView, summary: dict[str, Any]) -> None:
        gevent.sleep(0.01)
        with open(self.options["path"], "a") as out:
            out.write(json.dumps(summary) + "\n")
