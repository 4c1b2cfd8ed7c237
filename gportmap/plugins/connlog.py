"""``connlog``: one JSON line per closed connection, for billing and audit.

Appends to ``path`` and rotates by size with the standard library's
RotatingFileHandler (``maxBytes``, ``backups``), so the file never grows without
bound. The line holds what ``connection_closed`` logs, without any payload.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from typing import Any, ClassVar

from gportmap.plugins import ConnView, Plugin


class ConnectionLog(Plugin):
    options_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["path"],
        "properties": {
            "path": {"type": "string", "minLength": 1},
            "maxBytes": {"type": "integer", "minimum": 1024},
            "backups": {"type": "integer", "minimum": 0, "maximum": 1000},
        },
    }

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self.path = os.path.abspath(os.path.expanduser(options["path"]))
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"cannot write in {folder}")
        self.max_bytes = options.get("maxBytes", 10 * 1024 * 1024)
        self.backups = options.get("backups", 5)
        self._handler: logging.handlers.RotatingFileHandler | None = None

    def _writer(self) -> logging.handlers.RotatingFileHandler:
        if self._handler is None:  # opened at the first line, not when the rules load
            self._handler = logging.handlers.RotatingFileHandler(
                self.path, maxBytes=self.max_bytes, backupCount=self.backups, encoding="utf-8"
            )
            self._handler.setFormatter(logging.Formatter("%(message)s"))
        return self._handler

    def on_close(self, conn: ConnView, summary: dict[str, Any]) -> None:
        line = json.dumps(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "id": conn.id,
                "rule": conn.rule,
                "protocol": conn.protocol,
                "client": conn.client,
                "target": conn.target,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(conn.started)),
                **summary,
            },
            sort_keys=True,
        )
        self._writer().emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
