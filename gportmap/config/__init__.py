"""The rules file (SPEC §3): ``model`` is what the rest of gportmap reads (frozen
dataclasses); ``loader`` turns a file's bytes into it: ``reading`` (bounded, never
blocking) -> JSON -> ``schema/`` (the JSON Schema shipped with the package) ->
``checks`` (what a schema cannot say), every problem worded by ``messages``
(clipped, counted) and reported at once.

The names below are the package's interface; everything else in ``loader`` is its own.
"""

from gportmap.config.checks import host_problem, parse_listen
from gportmap.config.loader import load, parse
from gportmap.config.messages import MAX_ERROR_CHARS, MAX_ERRORS, MAX_PROBLEMS, format_path
from gportmap.config.model import AdminSettings, Config, Rule, Settings, TlsListen, TlsTarget, format_address
from gportmap.config.reading import MAX_RULES_FILE_BYTES, MAX_TLS_FILE_BYTES, read_rules_file

__all__ = [
    "MAX_ERRORS",
    "MAX_ERROR_CHARS",
    "MAX_PROBLEMS",
    "MAX_RULES_FILE_BYTES",
    "MAX_TLS_FILE_BYTES",
    "AdminSettings",
    "Config",
    "Rule",
    "Settings",
    "TlsListen",
    "TlsTarget",
    "format_address",
    "format_path",
    "host_problem",
    "load",
    "parse",
    "parse_listen",
    "read_rules_file",
]
