"""A target's addresses, resolved at most once per TTL and never on the hub.

An IP literal is parsed once and never looked up. A host name is resolved by
``resolve`` in a greenlet (gevent resolves in its thread pool): per connection
that cost ~40% of the new-connection rate in the prototypes, so the answer is
kept for ``TargetAddresses.ttl`` seconds. Code on the hub reads ``cached`` only.
"""

from __future__ import annotations

import ipaddress
import socket
import time

import gevent.socket
from gevent.event import AsyncResult

#: (family, sockaddr) as ``socket.connect`` takes them.
Address = tuple[int, tuple]


class TargetAddresses:
    """The addresses of one ``host:port``: a literal's, or a name's cached answer."""

    __slots__ = ("host", "port", "literal", "addresses", "resolved_until", "error", "failed_until", "pending")

    #: Seconds a resolved host name is reused before it is resolved again.
    ttl: float = 30.0
    #: Seconds a name that did not resolve is not asked again (every connection
    #: would otherwise wait for the same failing lookup).
    negative_ttl: float = 5.0

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        literal = literal_address(host, port)
        self.literal = literal is not None
        self.addresses: tuple[Address, ...] = (literal,) if literal is not None else ()
        self.resolved_until = 0.0
        self.error: OSError | None = None  # the last lookup's failure, kept until failed_until
        self.failed_until = 0.0
        #: The lookup under way: greenlets that need the name meanwhile wait for it
        #: instead of asking again (a TTL running out under load asks once).
        self.pending: AsyncResult | None = None

    @property
    def cached(self) -> tuple[Address, ...] | None:
        """The addresses if known and fresh (always for a literal), else None: what
        code on the hub may use without a lookup."""
        if self.literal or (self.addresses and time.monotonic() < self.resolved_until):
            return self.addresses
        return None

    def resolve(self) -> tuple[Address, ...]:
        """The addresses, looked up now if stale. Greenlets only (it waits for the
        lookup); OSError (``socket.gaierror``) when the name does not resolve."""
        cached = self.cached
        if cached is not None:
            return cached
        if self.error is not None and time.monotonic() < self.failed_until:
            raise self.error
        if self.pending is not None:
            return self.pending.get()
        self.pending = pending = AsyncResult()
        try:
            infos = gevent.socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)
        except OSError as exc:
            self.error, self.failed_until = exc, time.monotonic() + self.negative_ttl
            pending.set_exception(exc)
            raise
        except BaseException:  # killed while waiting: whoever waits is not left hanging
            pending.set_exception(OSError(f"the lookup of {self.host} was cut off"))
            raise
        finally:
            self.pending = None
        self.error = None
        self.addresses = tuple((family, sockaddr) for family, _, _, _, sockaddr in infos)
        self.resolved_until = time.monotonic() + self.ttl
        pending.set(self.addresses)
        return self.addresses


def literal_address(host: str, port: int) -> Address | None:
    """(family, sockaddr) when ``host`` is an IP literal, else None."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)
