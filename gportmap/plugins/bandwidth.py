"""``bandwidth``: rate limits per connection and per rule, each direction apart.

Token buckets that may go into debt: a chunk larger than the bucket still passes,
and the time it "borrowed" is waited off before the next one, so the long-run
rate is exact whatever the chunk sizes. TCP and WebSocket connections wait
cooperatively (``gevent.sleep``: other connections go on, and the kernel's
buffers push back on the sender); a UDP datagram over the limit is dropped,
because the event loop that forwards datagrams must never wait.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import gevent

from gportmap.plugins import DOWNSTREAM, UPSTREAM, ConnView, Plugin


class TokenBucket:
    """``rate`` bytes per second with ``burst`` bytes of credit."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, time.monotonic()

    def take(self, n: int) -> float:
        """Spend ``n`` bytes; return the seconds to wait before the next spend is fair."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def can_take(self, n: int) -> bool:
        now = time.monotonic()
        return min(self.burst, self.tokens + (now - self.stamp) * self.rate) >= n


class BandwidthLimiter(Plugin):
    """Options: ``rate`` (bytes/s per connection and direction), ``ruleRate``
    (bytes/s for all connections of the rule together, per direction), ``burst``
    (bytes of credit, default one second's worth). At least one rate is needed."""

    #: ``on_data`` sleeps to pace a connection: it needs the greenlet relay.
    may_block: ClassVar[bool] = True

    options_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "rate": {"type": "integer", "minimum": 1},
            "ruleRate": {"type": "integer", "minimum": 1},
            "burst": {"type": "integer", "minimum": 1},
        },
        "anyOf": [{"required": ["rate"]}, {"required": ["ruleRate"]}],
    }

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self.rate = options.get("rate")
        rule_rate = options.get("ruleRate")
        self.burst = options.get("burst")
        self.rule_buckets = (
            {d: TokenBucket(rule_rate, self.burst or rule_rate) for d in (UPSTREAM, DOWNSTREAM)} if rule_rate else None
        )

    def _buckets(self, conn: ConnView, direction: str) -> list[TokenBucket]:
        buckets = []
        if self.rate:
            key = f"bandwidth.{direction}"
            bucket = conn.state.get(key)
            if bucket is None:
                bucket = conn.state[key] = TokenBucket(self.rate, self.burst or self.rate)
            buckets.append(bucket)
        if self.rule_buckets is not None:
            buckets.append(self.rule_buckets[direction])
        return buckets

    def on_data(self, conn: ConnView, direction: str, data: bytes) -> bytes:
        buckets = self._buckets(conn, direction)
        if conn.protocol == "udp":
            if not all(bucket.can_take(len(data)) for bucket in buckets):
                return b""  # policed: a datagram over the limit is dropped
            for bucket in buckets:
                bucket.take(len(data))
            return data
        wait = max(bucket.take(len(data)) for bucket in buckets)
        if wait:
            gevent.sleep(wait)
        return data
