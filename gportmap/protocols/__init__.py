"""Protocol servers and the registry that maps a rule's ``protocol`` to one.

Every protocol server has the same small surface, which is all the supervisor
uses: ``start(listener=None)``, ``release_listener()`` (stop accepting and hand the
still-open socket to a successor), ``close()``, ``active``, ``join(timeout)`` and
``kill()``. Later protocols (udp, websocket and
plugins' own) register here the same way tcp does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gportmap.log import RateLimiter
from gportmap.relay import BufferPool
from gportmap.stats import StatsRegistry

if TYPE_CHECKING:
    from gportmap.config import Rule


@dataclass(frozen=True)
class ServerContext:
    """What every protocol server shares with the others: counters, buffers, log limits."""

    stats: StatsRegistry
    buffers: BufferPool
    rejections: RateLimiter


def server_class(protocol: str) -> type:
    """The server class for a protocol name (validated by the config already)."""
    from gportmap.protocols.tcp import TcpServer
    from gportmap.protocols.udp import UdpServer
    from gportmap.protocols.websocket import WebSocketServer

    registry = {"tcp": TcpServer, "udp": UdpServer, "websocket": WebSocketServer}
    return registry[protocol]


def create_server(rule: Rule, context: ServerContext):  # -> a protocol server
    return server_class(rule.protocol)(rule, context)
