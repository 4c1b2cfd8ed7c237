"""The client half of a TCP-over-WebSocket tunnel: the opening handshake.

A tcp rule with ``targetProtocol: "websocket"`` connects to its target and asks,
per accepted connection, for ``ws://targetHost:targetPort/targetPath`` with the
``binary`` subprotocol. The handshake is short and fixed, so it is written here in
a few lines (a bounded read of the response head, the accept key checked) rather
than through a client library that would want to own the socket afterwards; from
then on the hub relay carries the bytes with the WebSocket stage in client role
(``gportmap.engine.wsstage``), or ``WsBridge`` for a rule with ``on_data`` plugins.
The socket may be a ``gportmap.engine.stage.StagedSocket`` (the request and the
answer then go through the ``targetTls`` stage).
"""

from __future__ import annotations

import base64
import os
import socket

import gevent

from gportmap.config import Rule, format_address
from gportmap.engine import wsframe
from gportmap.engine.stage import StagedSocket
from gportmap.errors import GportmapError

#: Upper bound of the response head we are willing to read.
MAX_RESPONSE_HEAD = 16384


class HandshakeError(GportmapError):
    """The target did not accept the WebSocket upgrade."""


def open_tunnel(sock: socket.socket | StagedSocket, rule: Rule, host: str | None = None) -> bytes:
    """Upgrade ``sock`` to a WebSocket within ``handshakeTimeout``; return the bytes
    that arrived after the response head (the first frames, if any). ``host``: the
    ``Host`` header, the target reached ("host:port", one of a pool's); by default
    the rule's first target."""
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    if host is None:
        host = format_address(rule.target_host, rule.target_port)
    request = (
        f"GET {rule.target_path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: binary\r\n"
        "User-Agent: gportmap\r\n"
        "\r\n"
    ).encode("ascii")
    received = bytearray()
    try:
        with gevent.Timeout(rule.handshake_timeout, HandshakeError(f"no WebSocket answer within {rule.handshake_timeout:g}s")):
            sock.sendall(request)
            while b"\r\n\r\n" not in received:
                if len(received) > MAX_RESPONSE_HEAD:
                    raise HandshakeError("the WebSocket answer's head is too long")
                chunk = sock.recv(4096)
                if not chunk:
                    raise HandshakeError("the target closed during the WebSocket handshake")
                received += chunk
    except OSError as exc:
        raise HandshakeError(f"WebSocket handshake failed: {exc.strerror or exc}") from None
    head, _, rest = bytes(received).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[1] != "101":
        raise HandshakeError(f"the target answered {lines[0]!r} instead of 101 Switching Protocols")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("sec-websocket-accept") != wsframe.accept_key(key):
        raise HandshakeError("the target's Sec-WebSocket-Accept does not match the key")
    return rest
