"""A plugin whose construction fails once a budget file runs out: the stand-in for a
plugin that needs a resource at build time (a licence server, a lock) that was there
when the rules were validated and is gone when the rule's server is built."""

from __future__ import annotations

from typing import Any

from gportmap.plugins import Plugin


class BuildBudget(Plugin):
    """``options.budget``: a file holding how many more builds succeed."""

    options_schema = {"type": "object", "properties": {"budget": {"type": "string"}}, "required": ["budget"]}

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        with open(options["budget"], "r+") as file:
            left = int(file.read() or 0)
            if left <= 0:
                raise RuntimeError("the licence server is unreachable")
            file.seek(0)
            file.truncate()
            file.write(str(left - 1))
