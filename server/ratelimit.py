"""Per-client rate limiting with token buckets.

A client is an IP (an IPv6 client is its prefix, server.admission.peer_key).
All its connections share one bucket, and a frame is applied only after its
token has been taken, so a client gets at most ``burst + rate x t`` frames
over any interval of t seconds, however many connections it opens. An
over-limit client is slowed, not refused: its connection stops reading until
tokens refill (TCP backpressure holds the client back, nothing it sent is
lost). The waiting itself is the connection's (server.timeouts.Watched), so
that shutdown and a peer that left can end it.

A bucket outlives the client's connections until it would be full again:
closing every connection and reconnecting does not forget a debt.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Drop rested buckets (no connection, full again) when the table has grown to
# twice what the last sweep left, and never below this: amortised O(1) per
# connection, memory proportional to the clients of the last burst/rate seconds.
MIN_SWEEP = 64


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; one token per
    frame applied. The balance never goes below zero: tokens are taken
    before the frames they pay for are applied."""

    __slots__ = ("_clock", "burst", "limiter", "rate", "tokens", "updated", "users")

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        limiter: RateLimiter | None = None,
    ) -> None:
        """``clock`` is injectable so tests need not wait."""
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self._clock = clock
        self.updated = clock()
        self.limiter = limiter
        self.users = 0  # connections sharing this bucket

    def take(self, frames: int) -> tuple[int, float]:
        """Take up to ``frames`` whole tokens (0: only look); returns how many
        were taken and the tokens left."""
        now = self._clock()
        tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        taken = min(frames, int(tokens))
        self.tokens, self.updated = tokens - taken, now
        return taken, self.tokens

    def waited(self, seconds: float) -> None:
        """A connection of this client waited ``seconds`` for tokens."""
        if self.limiter is not None:
            self.limiter.throttled_seconds += seconds

    def full(self) -> bool:
        """Whether the bucket has refilled to its burst (forgetting it then
        loses nothing)."""
        return self.tokens + (self._clock() - self.updated) * self.rate >= self.burst


class RateLimiter:
    """One bucket per client, created on its first connection and dropped
    once it has no connection and is full again."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._sweep_at = MIN_SWEEP
        self.throttled_seconds = 0.0  # time connections waited for tokens, all clients

    def acquire(self, key: str) -> TokenBucket:
        """The bucket of client ``key`` for one more connection."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep()
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self._clock, self)
        bucket.users += 1
        return bucket

    def release(self, key: str) -> None:
        """A connection of client ``key`` closed; its bucket stays while in debt."""
        bucket = self._buckets[key]
        bucket.users -= 1
        if not bucket.users and bucket.full():
            del self._buckets[key]

    def _sweep(self) -> None:
        rested = [key for key, b in self._buckets.items() if not b.users and b.full()]
        for key in rested:
            del self._buckets[key]
        self._sweep_at = max(MIN_SWEEP, 2 * len(self._buckets))

    def __len__(self) -> int:
        """Clients with a bucket (connected, or in debt)."""
        return len(self._buckets)
