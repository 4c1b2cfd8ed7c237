"""Protocol servers and the registry that maps a rule's ``protocol`` to one.

Every protocol server has the same small surface, which is all the supervisor
uses: ``start(listener=None)``, ``release_listener()`` (stop accepting and hand the
still-open socket to a successor), ``close()``, ``active``, ``join(timeout)`` and
``kill()``.

Protocols are found by entry point (group ``gportmap.protocols``): the built-in
tcp, udp and websocket are registered that way in setup.py, exactly as a plugin
package registers its own. When gportmap runs from a source tree without
installed metadata, the built-ins are still found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gportmap.engine.faults import FaultBoard
from gportmap.engine.relay import BufferPool
from gportmap.log import RateLimiter
from gportmap.plugins import find_class
from gportmap.plugins.registry import registered_protocols
from gportmap.stats import StatsRegistry

if TYPE_CHECKING:
    from gportmap.config import Rule


@dataclass(frozen=True)
class ServerContext:
    """What every protocol server shares with the others: counters, buffers, log limits."""

    stats: StatsRegistry
    buffers: BufferPool
    rejections: RateLimiter
    #: The relay may use splice(2) (Linux, not forced off).
    splice: bool = False
    #: Listeners are bound with SO_REUSEPORT: this process is one of several workers.
    reuse_port: bool = False
    #: The faults in force per rule (SPEC §12), published by the service after each apply.
    faults: FaultBoard = field(default_factory=FaultBoard)


def server_class(protocol: str) -> type:
    """The server class for a protocol name (validated by the config already)."""
    return find_class(registered_protocols()[protocol])


def create_server(rule: Rule, context: ServerContext):  # -> a protocol server
    if rule.protocol == "udp" and rule.listener_count > 1:  # SPEC §9: a session table per socket
        from gportmap.protocols.udprange import UdpRangeServer  # imports this package: not at the top

        return UdpRangeServer(rule, context)
    return server_class(rule.protocol)(rule, context)
