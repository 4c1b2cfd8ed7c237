"""Which protocols exist: the built-in tcp, udp and websocket and any a plugin
package registers, found by entry point (group ``gportmap.protocols``) exactly as
plugins are. The config reads the names (the schema's ``protocol`` enum); the
supervisor builds servers from the classes (``gportmap.protocols.create_server``).
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

BUILTIN = {
    "tcp": "gportmap.protocols.tcp:TcpServer",
    "udp": "gportmap.protocols.udp:UdpServer",
    "websocket": "gportmap.protocols.websocket:WebSocketServer",
}
PROTOCOL_GROUP = "gportmap.protocols"


@functools.cache
def registered_protocols() -> dict[str, str]:
    """Protocol name -> ``module:Class``, from entry points (read once: they do not
    change while the process runs)."""
    found = dict(BUILTIN)
    for ep in entry_points(group=PROTOCOL_GROUP):
        found[ep.name] = ep.value
    return found


