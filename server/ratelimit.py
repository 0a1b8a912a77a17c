"""Per-client-IP rate limiting with token buckets.

An over-limit client is slowed, not refused: its connection stops reading
until tokens refill, so TCP backpressure holds the client back and nothing it
sent is lost. All connections from one IP share one bucket.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import gevent
from counter_server.protocol import FRAME_SIZE


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; one token per frame."""

    __slots__ = (
        "_clock", "_sleep", "burst", "rate", "throttled_seconds", "tokens", "updated", "users"
    )  # fmt: skip

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = gevent.sleep,
    ) -> None:
        """``clock`` and ``sleep`` are injectable so tests need not wait."""
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self._clock = clock
        self._sleep = sleep
        self.updated = clock()
        self.throttled_seconds = 0.0
        self.users = 0  # connections sharing this bucket

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def read_budget(self, pending_bytes: int) -> int:
        """Bytes a connection may read now: waits (yielding to other greenlets)
        until at least one frame's worth of tokens is there."""
        self._refill()
        if self.tokens < 1:
            wait = (1 - self.tokens) / self.rate
            self.throttled_seconds += wait
            self._sleep(wait)
            self._refill()
        return max(1, int(self.tokens)) * FRAME_SIZE - pending_bytes

    def spend(self, frames: int) -> None:
        """Take one token per frame applied (the balance may dip below zero
        when connections of one IP read at once; they then wait longer)."""
        self.tokens -= frames


class RateLimiter:
    """One bucket per client IP, created on its first connection and dropped
    with its last, so memory follows the connections."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}
        self.throttled_seconds_closed = 0.0  # from buckets already dropped

    def acquire(self, ip: str) -> TokenBucket:
        bucket = self._buckets.get(ip)
        if bucket is None:
            bucket = self._buckets[ip] = TokenBucket(self.rate, self.burst)
        bucket.users += 1
        return bucket

    def release(self, ip: str) -> None:
        bucket = self._buckets[ip]
        bucket.users -= 1
        if not bucket.users:
            del self._buckets[ip]
            self.throttled_seconds_closed += bucket.throttled_seconds

    @property
    def throttled_seconds(self) -> float:
        """Time connections spent waiting for tokens, all clients together."""
        live = sum(b.throttled_seconds for b in self._buckets.values())
        return self.throttled_seconds_closed + live
