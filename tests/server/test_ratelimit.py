"""Token buckets and the per-IP limiter, in process with a fake clock."""

from __future__ import annotations

import pytest
from counter_server.protocol import FRAME_SIZE
from counter_server.server.ratelimit import RateLimiter, TokenBucket


class FakeTime:
    """A clock that only moves when the bucket sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def time_() -> FakeTime:
    return FakeTime()


def bucket(time_: FakeTime, rate: float, burst: int) -> TokenBucket:
    return TokenBucket(rate, burst, clock=time_.clock, sleep=time_.sleep)


def test_a_full_bucket_lets_the_burst_through_without_waiting(time_):
    b = bucket(time_, rate=10, burst=5)
    assert b.read_budget(pending_bytes=0) == 5 * FRAME_SIZE
    assert time_.slept == []


def test_the_read_budget_leaves_room_for_a_partial_frame(time_):
    b = bucket(time_, rate=10, burst=5)
    assert b.read_budget(pending_bytes=3) == 5 * FRAME_SIZE - 3


def test_an_empty_bucket_waits_exactly_for_one_token(time_):
    b = bucket(time_, rate=10, burst=5)
    b.spend(5)
    assert b.read_budget(0) == FRAME_SIZE
    assert time_.slept == [pytest.approx(0.1)]
    assert b.throttled_seconds == pytest.approx(0.1)


def test_overspending_waits_longer(time_):
    b = bucket(time_, rate=10, burst=5)
    b.spend(8)  # connections of one IP read at once: the balance dips to -3
    b.read_budget(0)
    assert time_.slept == [pytest.approx(0.4)]


def test_tokens_refill_with_time_up_to_the_burst(time_):
    b = bucket(time_, rate=10, burst=5)
    b.spend(5)
    time_.now += 0.35
    assert b.read_budget(0) == 3 * FRAME_SIZE
    time_.now += 60
    assert b.read_budget(0) == 5 * FRAME_SIZE


def test_a_sustained_sender_gets_the_rate(time_):
    b = bucket(time_, rate=2000, burst=100)
    start, frames = time_.now, 0
    while time_.now - start < 10:
        allowed = b.read_budget(0) // FRAME_SIZE
        b.spend(allowed)
        frames += allowed
    assert frames / (time_.now - start) == pytest.approx(2000, rel=0.02)


def test_connections_of_one_ip_share_a_bucket_dropped_with_the_last():
    limiter = RateLimiter(rate=10, burst=5)
    first = limiter.acquire("192.0.2.1")
    second = limiter.acquire("192.0.2.1")
    other = limiter.acquire("192.0.2.2")
    assert first is second and first is not other
    first.throttled_seconds = 1.5
    limiter.release("192.0.2.1")
    assert limiter.acquire("192.0.2.1") is first  # still one user: kept
    limiter.release("192.0.2.1")
    limiter.release("192.0.2.1")
    assert limiter.throttled_seconds == pytest.approx(1.5)  # kept after the drop
    assert limiter.acquire("192.0.2.1") is not first
