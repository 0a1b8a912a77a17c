"""Token buckets and the per-client limiter, in process with a fake clock."""

from __future__ import annotations

import pytest

from counter_server.server.ratelimit import MIN_SWEEP, RateLimiter, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_full_bucket_lets_the_burst_through_and_no_more(clock):
    b = TokenBucket(rate=10, burst=5, clock=clock)
    assert b.take(3) == (3, 2.0)
    assert b.take(7) == (2, 0.0)  # only what is left: the balance never dips below zero
    assert b.take(1) == (0, 0.0)


def test_looking_takes_nothing(clock):
    b = TokenBucket(rate=10, burst=5, clock=clock)
    assert b.take(0) == (0, 5.0)
    assert b.take(0) == (0, 5.0)


def test_tokens_refill_with_time_up_to_the_burst(clock):
    b = TokenBucket(rate=10, burst=5, clock=clock)
    b.take(5)
    clock.now += 0.35
    assert b.take(10) == (3, pytest.approx(0.5))
    clock.now += 60
    assert b.take(0) == (0, 5.0)
    assert b.full()


def test_many_takers_together_get_the_burst_plus_the_rate(clock):
    """Forty connections of one client each asking for 100 frames at once,
    over and over: all together they get burst + rate x t, not 40 bursts."""
    b = TokenBucket(rate=8, burst=100, clock=clock)
    granted = 0
    for _ in range(16):  # 1.875 s in steps of 1/8 s (exact in binary)
        granted += sum(b.take(100)[0] for _ in range(40))
        clock.now += 0.125
    assert granted == 100 + 8 * 1.875


def test_waits_are_counted_for_the_limiter(clock):
    limiter = RateLimiter(rate=10, burst=5, clock=clock)
    bucket = limiter.acquire("192.0.2.1")
    bucket.waited(0.25)
    bucket.waited(0.5)
    assert limiter.throttled_seconds == pytest.approx(0.75)


def test_connections_of_one_client_share_a_bucket(clock):
    limiter = RateLimiter(rate=10, burst=5, clock=clock)
    first = limiter.acquire("192.0.2.1")
    assert limiter.acquire("192.0.2.1") is first
    assert limiter.acquire("192.0.2.2") is not first


def test_a_full_bucket_goes_with_the_last_connection(clock):
    limiter = RateLimiter(rate=10, burst=5, clock=clock)
    first = limiter.acquire("192.0.2.1")
    limiter.release("192.0.2.1")
    assert len(limiter) == 0
    assert limiter.acquire("192.0.2.1") is not first


def test_a_debt_outlives_the_connections_until_it_is_paid(clock):
    """Closing every connection and reconnecting must not refill the bucket."""
    limiter = RateLimiter(rate=8, burst=5, clock=clock)
    limiter.acquire("192.0.2.1").take(5)
    limiter.release("192.0.2.1")
    clock.now += 0.25
    again = limiter.acquire("192.0.2.1")
    assert again.take(5) == (2, 0.0)  # 0.25 s at 8/s, not a new burst
    limiter.release("192.0.2.1")
    clock.now += 1.0  # full again: gone at the next sweep
    for n in range(MIN_SWEEP):
        limiter.acquire(f"10.0.0.{n}")
    assert len(limiter) == MIN_SWEEP  # the rested one was swept for the new ones


def test_rested_buckets_are_swept_as_the_table_grows(clock):
    limiter = RateLimiter(rate=10, burst=5, clock=clock)
    for n in range(10 * MIN_SWEEP):
        limiter.acquire(f"10.0.{n // 250}.{n % 250}").take(1)  # each leaves a debt
        limiter.release(f"10.0.{n // 250}.{n % 250}")
        clock.now += 0.01  # each debt is paid 0.1 s later
    assert len(limiter) <= MIN_SWEEP  # only the recent debts are kept
