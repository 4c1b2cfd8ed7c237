"""The rules file (SPEC §3): ``model`` is what the rest of gportmap reads (frozen
dataclasses), ``loader`` reads and validates a file into it (bounded, every error at
once), ``schema/`` is the JSON Schema shipped with the package.

The names below are the package's interface; everything else in ``loader`` is its own.
"""

from gportmap.config.loader import (
    MAX_ERROR_CHARS,
    MAX_ERRORS,
    MAX_PROBLEMS,
    MAX_RULES_FILE_BYTES,
    MAX_TLS_FILE_BYTES,
    format_path,
    host_problem,
    load,
    parse,
    parse_listen,
    read_rules_file,
)
from gportmap.config.model import AdminSettings, Config, Rule, Settings, TlsListen, TlsTarget, format_address

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
