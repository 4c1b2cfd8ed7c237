"""Why a connection ended, why one was refused, why a datagram was dropped: the
words that ``connection_closed``, ``session_closed``, ``connection_rejected`` and
``datagram_dropped`` records carry as ``reason``, the keys of ``/stats``'
``*_by_reason`` tables and the ``reason`` label of the metrics (SPEC §5, §6).

They are ``StrEnum`` members so that every one of those outputs keeps exactly the
same strings (a member *is* its string: it compares, hashes, formats and encodes
to JSON as that string), while the code names a reason once, here, and a typo is
an AttributeError rather than a new counter key. A protocol a plugin package adds
may still pass a plain ``str`` where a reason goes (``finish``, ``reject``): the
members are strings, and the code compares reasons by value, never by identity.

The base layer: nothing here imports anything of gportmap.
"""

from __future__ import annotations

import enum


class CloseReason(enum.StrEnum):
    """Why a connection (a UDP rule: a session) ended: ``reason`` of its
    ``connection_closed`` (``session_closed``) record and of the ``summary`` that
    plugins' ``on_close`` gets. The last three are the relays' own bookkeeping and
    never reach a record."""

    #: Both sides finished (each sent its end and it was passed on), or the
    #: WebSocket peers closed cleanly.
    CLOSED = "closed"
    #: No byte moved either way for the rule's ``idleTimeout`` while the process
    #: could have moved one (``gportmap.engine.idle``).
    IDLE_TIMEOUT = "idle_timeout"
    #: The client's side failed: a reset, a broken pipe, a bad TLS record or
    #: WebSocket frame from it, or it left before its address could be read.
    CLIENT_ERROR = "client_error"
    #: The target's side failed, as ``CLIENT_ERROR`` for the client.
    TARGET_ERROR = "target_error"
    #: No target of the rule's pool could be connected and readied (refused, timed
    #: out, the PROXY header or the TLS handshake with it failed, none up).
    CONNECT_FAILED = "connect_failed"
    #: gportmap ended it: the rule was stopped (shutdown, reload, drain cut-off).
    STOPPED = "stopped"
    #: An unexpected exception in the connection's own code (a bug), counted in
    #: ``errors`` and logged once with its traceback (``gportmap.failures``).
    INTERNAL_ERROR = "internal_error"
    #: A plugin hook (``on_connect``, ``on_data``) failed or refused mid-connection.
    PLUGIN_ERROR = "plugin_error"
    #: A network fault of the rule ended it on purpose (SPEC §12: limit_data,
    #: timeout, reset_peer).
    FAULT = "fault"
    #: UDP: the session saw no datagram either way for ``sessionTimeout``.
    EXPIRED = "expired"
    #: UDP: the session's socket to the target failed for good (not a transient
    #: ICMP error, which only drops a datagram).
    ERROR = "error"
    #: Bookkeeping, never recorded: the client's TLS handshake failed before the
    #: connection opened; the attempt is a refusal (``RejectReason.TLS``).
    TLS = "tls"
    #: Bookkeeping, never recorded: a greenlet handed its connection to a hub
    #: relay, which reports the real end.
    DETACHED = "detached"
    #: Bookkeeping, never recorded: another process owns the connection now (an
    #: upgrade in place carried it over).
    CARRIED = "carried"

    @classmethod
    def side_error(cls, side: str) -> CloseReason:
        """``CLIENT_ERROR`` or ``TARGET_ERROR`` for a relay's side (``"client"``,
        ``"target"``, as ``SideError.side`` and ``WsStage.peer_side`` name them)."""
        return cls(f"{side}_error")


class RejectReason(enum.StrEnum):
    """Why a connection was refused before it was relayed: ``reason`` of its
    ``connection_rejected`` record, the keys of ``rejected_by_reason`` and of
    ``gportmap_connections_rejected_total``. A refused connection is counted only
    here, never in ``total``."""

    #: The client's address is not admitted (allow/deny), or a WebSocket
    #: upgrade's ``Origin`` is not among the rule's ``origins``.
    ACL = "acl"
    #: The rule's (or the process's) ``maxConnections`` is reached.
    LIMIT = "limit"
    #: The client's TLS handshake failed or did not finish within handshakeTimeout.
    TLS = "tls"
    #: A plugin's ``on_accept`` refused the connection (``Reject``) or failed.
    PLUGIN = "plugin"
    #: A WebSocket client's upgrade failed: none within handshakeTimeout, not an
    #: upgrade, a wrong path, version or key, a malformed request, or the client left.
    HANDSHAKE = "handshake"
    #: A rule with ``routes`` (SPEC §13): the client's first bytes matched no route,
    #: and there is no default route.
    NO_ROUTE = "no_route"
    #: ``acceptProxy``: a connection from a trusted proxy did not start with a valid
    #: PROXY protocol header within the timeout (none, malformed, too long, EOF).
    PROXY_HEADER = "proxy_header"
    #: ``perClient``: the client (its address, after ``acceptProxy``) is at its
    #: ``maxConnections`` or out of ``connectionRate`` tokens.
    CLIENT_LIMIT = "client_limit"


class DropReason(enum.StrEnum):
    """Why a UDP datagram was dropped: ``reason`` of its ``datagram_dropped``
    record, the keys of ``dropped_by_reason`` and of
    ``gportmap_udp_packets_dropped_total``."""

    #: The session table is full (``maxSessions``): no session for a new client.
    SESSIONS = "sessions"
    #: The client's address is not admitted (allow/deny).
    ACL = "acl"
    #: A plugin's ``on_accept`` refused the new session, or ``on_data`` dropped it.
    PLUGIN = "plugin"
    #: The datagram could not be passed on: no target up or resolved, no socket,
    #: a send that failed, or a transient ICMP error from the target.
    ERROR = "error"
    #: The kernel dropped it on a full socket receive buffer before gportmap read
    #: it; read from the sockets when the figures are read, never per datagram.
    KERNEL = "kernel"
    #: ``perClient.packetRate``: the client's address is out of datagram tokens.
    CLIENT_LIMIT = "client_limit"
