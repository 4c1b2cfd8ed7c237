"""Unexpected exceptions while serving one connection: bugs, told apart from the
network's own events.

A peer's reset, a broken pipe or a timeout is the network: the relays turn those
into ``client_error``, ``target_error`` or ``idle_timeout``. Anything else a
connection's code raises (an AttributeError in a relay callback, a bug in a
protocol a plugin package adds) is gportmap's fault, and it must not pass for a
clean close. Every place that runs a connection's code catches it, ends that one
connection (or UDP session) with the close reason ``internal_error`` and calls
``report_internal_error`` once: the rule's ``errors["internal_error"]`` counter goes
up (``/stats``, ``gportmap_connection_errors_total``) and one ERROR record
``internal_error`` carries the rule, client, target and the traceback. The listener,
the rule and every other connection go on. (Exceptions in a *plugin hook* are
``plugin_error``, SPEC §7, reported by ``gportmap.plugins``.)
"""

from __future__ import annotations

import logging

from gportmap.events import InternalError
from gportmap.log import emit, get_logger
from gportmap.reasons import CloseReason
from gportmap.stats import RuleStats

logger = get_logger("connections")

#: The close reason of a connection ended by an unexpected exception (kept under
#: this name for protocols of plugin packages that import it).
INTERNAL_ERROR = CloseReason.INTERNAL_ERROR
#: Longest error text put in the records (an exception's text is not ours to bound).
MAX_ERROR_TEXT = 200


def error_text(exc: BaseException) -> str:
    """``Type: message``, clipped: what the close record's ``error`` field says."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


def report_internal_error(stats: RuleStats, client: str, target: str, exc: BaseException) -> str:
    """Count ``exc`` against its rule and log it once with its traceback (at a
    bounded rate: ``RuleStats.failure_log``, per exception type); return the
    short text for the connection's close record."""
    stats.errors[CloseReason.INTERNAL_ERROR] += 1
    text = error_text(exc)
    if not logger.isEnabledFor(logging.ERROR):
        return text
    allowed, suppressed = stats.failure_log.allow(type(exc))
    if allowed:
        event = InternalError(
            rule=stats.name,
            protocol=stats.protocol,
            client=client,
            target=target,
            error=text,
            suppressed=suppressed,
            what=f"unexpected error in a connection, closed: {text}",
        )
        emit(logger, event, exc_info=(type(exc), exc, exc.__traceback__))
    return text
