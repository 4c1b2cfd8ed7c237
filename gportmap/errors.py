"""The project's exception hierarchy.

Callers catch ``GportmapError`` at the edges (command line, reload) and let
anything else propagate: a bare ``except Exception`` would hide real bugs.
"""

from __future__ import annotations


class GportmapError(Exception):
    """Base class of every error gportmap raises on purpose."""


class ConfigError(GportmapError):
    """The rules file is unusable; ``errors`` holds every problem found, one per line.

    Each entry already names the file and the JSON path, e.g.
    ``rules.json: rules[2].listenPort: 70000 is greater than the maximum of 65535``.
    """

    def __init__(self, errors: list[str], found: int | None = None, complete: bool = True) -> None:
        self.errors = list(errors)
        #: How many problems were found: more than ``len(errors)`` when the list was
        #: cut at ``config.MAX_ERRORS`` (its last line then says how many more).
        self.found = len(self.errors) if found is None else found
        #: False when checking stopped early (``config.MAX_PROBLEMS``): ``found`` is
        #: then a lower bound.
        self.complete = complete
        super().__init__("\n".join(self.errors))

    @property
    def count(self) -> str:
        """The number of errors for a summary line: "3 error(s)", "at least 10,000 errors"."""
        return f"{self.found:,} error(s)" if self.complete else f"at least {self.found:,} errors"


class BindError(GportmapError):
    """A rule's listening socket could not be created; the message says what to do."""


class WatcherError(GportmapError):
    """The rules file cannot be watched this way; the caller falls back to polling."""


class PluginError(GportmapError):
    """A plugin cannot be found, imported, validated or built: a config error."""
