"""server.limits: the allowlist and the per-IP cap, token buckets and the
per-client limiter (in process, with a fake clock), and the shared table of
--processes (in process, and across a fork)."""

from __future__ import annotations

import os
import random

import pytest

from counter_server.server.errors import CloseReason, TurnedAway
from counter_server.server.limits import (
    MIN_SWEEP,
    Admission,
    PeerTable,
    RateLimiter,
    SharedLimits,
    TokenBucket,
    client_ip,
    limits_for,
    parse_network,
    peer_key,
)

# --- the allowlist and the cap ------------------------------------------------------


def refusal(admission: Admission, ip: str, prefix: int = 64) -> CloseReason | None:
    try:
        admission.admit(ip, peer_key(ip, prefix))
    except TurnedAway as exc:
        return exc.reason
    return None


def test_nobody_is_refused_without_rules():
    assert limits_for() is None  # the server then checks nothing
    admission = Admission()
    assert refusal(admission, "203.0.113.9") is None


def test_the_allowlist_admits_its_networks_only():
    admission = Admission([parse_network("10.0.0.0/8"), parse_network("2001:db8::/32")])
    assert refusal(admission, "10.1.2.3") is None
    assert refusal(admission, "2001:db8::1") is None
    assert refusal(admission, "192.0.2.1") is CloseReason.NOT_ALLOWED


def test_the_per_ip_cap_counts_and_releases():
    admission = Admission(max_per_ip=2)
    assert refusal(admission, "192.0.2.1") is None
    assert refusal(admission, "192.0.2.1") is None
    assert refusal(admission, "192.0.2.1") is CloseReason.PER_IP_LIMIT
    assert refusal(admission, "192.0.2.2") is None  # another IP has its own count
    admission.release("192.0.2.1")
    assert refusal(admission, "192.0.2.1") is None


def test_a_refused_connection_is_not_counted():
    admission = Admission(max_per_ip=1)
    admission.admit("192.0.2.1", "192.0.2.1")
    for _ in range(3):
        assert refusal(admission, "192.0.2.1") is CloseReason.PER_IP_LIMIT
    admission.release("192.0.2.1")  # the one admitted: the IP is free again
    assert refusal(admission, "192.0.2.1") is None


def test_ipv4_mapped_peers_are_seen_as_ipv4():
    assert client_ip(("::ffff:192.0.2.7", 5000, 0, 0)) == "192.0.2.7"
    assert client_ip(("fe80::1%eth0", 5000, 0, 2)) == "fe80::1"


def test_a_bad_network_is_named():
    with pytest.raises(ValueError, match="not an IPv4 or IPv6 network"):
        parse_network("10.0.0.0/33")


def test_ipv6_peers_are_counted_by_prefix():
    admission = Admission(max_per_ip=2)
    assert refusal(admission, "2001:db8:1:2::1") is None
    assert refusal(admission, "2001:db8:1:2:ffff::9") is None  # same /64
    assert refusal(admission, "2001:db8:1:2::abcd") is CloseReason.PER_IP_LIMIT
    assert refusal(admission, "2001:db8:1:3::1") is None  # the next /64
    admission.release(peer_key("2001:db8:1:2::1", 64))
    assert refusal(admission, "2001:db8:1:2::77") is None


def test_the_prefix_is_configurable():
    assert peer_key("2001:db8:1:2::1", 48) == peer_key("2001:db8:1:ffff::1", 48)
    assert peer_key("2001:db8:1:2::1", 128) != peer_key("2001:db8:1:2::2", 128)
    assert peer_key("192.0.2.1", 64) == "192.0.2.1"


def test_ipv4_mapped_networks_match_ipv4_clients():
    admission = Admission([parse_network("::ffff:127.0.0.0/104")])
    assert refusal(admission, "127.0.0.1") is None
    assert refusal(admission, "10.0.0.1") is CloseReason.NOT_ALLOWED
    everyone_v6 = Admission([parse_network("::/0")])
    assert refusal(everyone_v6, "192.0.2.1") is None  # ::/0 holds the mapped range


# --- token buckets --------------------------------------------------------------


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


# --- the shared table of --processes ------------------------------------------------


@pytest.fixture
def table():
    table = PeerTable(capacity=8, workers=2, rate=10.0, burst=5)
    table.open()
    yield table
    table.remove()


def test_the_cap_holds_across_workers(table):
    table.enter("192.0.2.1", 0, limit=3)
    table.enter("192.0.2.1", 1, limit=3)
    table.enter("192.0.2.1", 1, limit=3)
    with pytest.raises(TurnedAway) as refused:
        table.enter("192.0.2.1", 0, limit=3)
    assert refused.value.reason is CloseReason.PER_IP_LIMIT
    table.enter("192.0.2.2", 0, limit=3)  # another peer is not affected
    table.leave("192.0.2.1", 1)
    table.enter("192.0.2.1", 0, limit=3)
    assert table.connections("192.0.2.1") == 3


def test_a_dead_workers_connections_are_forgotten(table):
    for _ in range(3):
        table.enter("192.0.2.1", 1, limit=None)
    table.enter("192.0.2.1", 0, limit=None)
    table.enter("192.0.2.9", 1, limit=None)
    table.forget_worker(1)
    assert table.connections("192.0.2.1") == 1
    assert table.connections("192.0.2.9") == 0


def test_entries_stay_reachable_through_any_deletions(table):
    rng = random.Random(7)
    live: dict[str, int] = {}
    for step in range(5000):
        key = f"10.0.{rng.randrange(4)}.{rng.randrange(200)}"
        if live.get(key) and rng.random() < 0.5:
            table.leave(key, 0)
            live[key] -= 1
        elif sum(1 for n in live.values() if n) < 900:
            table.enter(key, 0, limit=None)
            live[key] = live.get(key, 0) + 1
        if step % 500 == 0:
            for known, count in live.items():
                assert table.connections(known) == count, (step, known)
    for known, count in live.items():
        assert table.connections(known) == count


def test_one_bucket_per_peer_shared_by_processes(table):
    table.enter("192.0.2.1", 0, limit=None)
    assert table.take("192.0.2.1", 0) == (0, 5.0)
    pid = os.fork()
    if pid == 0:  # another worker takes the whole burst
        table.open()
        os._exit(0 if table.take("192.0.2.1", 7)[0] == 5 else 1)
    assert os.waitpid(pid, 0)[1] == 0
    taken, left = table.take("192.0.2.1", 5)
    assert taken == 0 and left < 1  # nothing left for this worker, nothing overdrawn


def test_a_debt_outlives_the_peers_connections(table):
    table.enter("192.0.2.1", 0, limit=None)
    assert table.take("192.0.2.1", 5)[0] == 5
    table.leave("192.0.2.1", 0)
    table.enter("192.0.2.1", 1, limit=None)  # reconnects on another worker
    assert table.take("192.0.2.1", 5)[0] == 0  # still in debt, not a new burst
    table.leave("192.0.2.1", 1)
    assert len(table) == 1


def test_rested_entries_are_swept_when_probes_grow_long():
    table = PeerTable(capacity=8, workers=1, rate=1000.0, burst=1)
    table.open()
    try:
        for n in range(3 * table.size):  # more peers than slots, one after another
            key = f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"
            table.enter(key, 0, limit=None)
            table.take(key, 1)  # each leaves a debt paid 1 ms later
            table.leave(key, 0)
        assert len(table) < table.size  # never full: new peers were always admitted
    finally:
        table.remove()


def test_shared_admission_applies_the_allowlist_locally(table):
    admission = SharedLimits(table, 0, [parse_network("10.0.0.0/8")], max_per_ip=1)
    with pytest.raises(TurnedAway) as refused:
        admission.admit("192.0.2.1", "192.0.2.1")
    assert refused.value.reason is CloseReason.NOT_ALLOWED
    admission.admit("10.0.0.1", "10.0.0.1")
    with pytest.raises(TurnedAway):
        admission.admit("10.0.0.1", "10.0.0.1")
    admission.release("10.0.0.1")
    assert table.connections("10.0.0.1") == 0
