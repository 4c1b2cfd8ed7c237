"""A write of the rule API, or a dry run, as one step of the applier (SPEC §10).

The step is: read the rules file as it is at that moment, check ``If-Match``
against its digest, make the edit (``gportmap.config.edit``), validate the whole
new file as ``--check`` does, and then either describe what it would do (a dry run)
or write it atomically and apply exactly those bytes. The applier serves such a
step alone, in its turn among the reloads, so no other reload or write can come
between the check and the apply: two writers never lose each other's change, and a
hand edit made before the step is read, never overwritten.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from gportmap.config.edit import EditProblem, RuleEdit
from gportmap.runtime.impact import Impact
from gportmap.runtime.supervisor import Changes


class TxStatus(enum.Enum):
    """How a transaction ended (the admin endpoint maps each to an HTTP status)."""

    DONE = "done"  #: written and applied (200)
    CREATED = "created"  #: written and applied, the rule is new (201)
    PLANNED = "planned"  #: a dry run: nothing changed (200)
    INVALID = "invalid"  #: the body or the new file is invalid (400)
    NOT_FOUND = "not_found"  #: no rule of that name (404)
    EXISTS = "exists"  #: POST of a name that exists (409)
    NOT_WRITABLE = "not_writable"  #: the rules file cannot or must not be written (409)
    STALE = "stale"  #: If-Match names another version than the file's (412)


#: What an edit problem becomes.
EDIT_STATUS = {
    EditProblem.INVALID: TxStatus.INVALID,
    EditProblem.NOT_FOUND: TxStatus.NOT_FOUND,
    EditProblem.EXISTS: TxStatus.EXISTS,
}


@dataclass(frozen=True)
class Transaction:
    """One request of the rule API (or ``POST /reload?dry_run=1`` when ``edit`` is None)."""

    edit: RuleEdit | None
    #: The entity tags of ``If-Match`` (``"*"`` matches any), or None without the header.
    if_match: tuple[str, ...] | None = None
    dry_run: bool = False
    #: Who asked (``host:port``) and how (``PATCH``): the ``rules_changed`` record's fields.
    client: str = ""
    method: str = ""


@dataclass(frozen=True)
class TxOutcome:
    """The answer to a transaction."""

    status: TxStatus
    #: The digest of the rules file: after the write, or the current one (412).
    etag: str | None = None
    changes: Changes | None = None
    impact: Impact | None = None
    errors: tuple[str, ...] = ()
    #: The edited rule's name, and the rule as written now (None after a delete).
    name: str | None = None
    rule: dict[str, Any] | None = field(default=None, hash=False)


def etag_matches(if_match: tuple[str, ...] | None, digest: str) -> bool:
    """RFC 9110 ``If-Match`` with the strong comparison it demands: ``*`` or the
    digest itself (a weak tag never matches); no header matches anything."""
    if if_match is None:
        return True
    return any(tag == "*" or tag == f'"{digest}"' or tag == digest for tag in if_match)


def parse_if_match(header: str | None) -> tuple[str, ...] | None:
    """The entity tags of an ``If-Match`` header, as written (quotes kept)."""
    if header is None:
        return None
    return tuple(tag.strip() for tag in header.split(",") if tag.strip())
