"""The shared per-peer table of --processes, in process (and across a fork)."""

from __future__ import annotations

import os
import random

import pytest

from counter_server.server.errors import CloseReason, TurnedAway
from counter_server.server.peers import PeerTable, SharedAdmission


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
    from counter_server.server.admission import parse_network

    admission = SharedAdmission(table, 0, [parse_network("10.0.0.0/8")], max_per_ip=1)
    with pytest.raises(TurnedAway) as refused:
        admission.admit("192.0.2.1", "192.0.2.1")
    assert refused.value.reason is CloseReason.NOT_ALLOWED
    admission.admit("10.0.0.1", "10.0.0.1")
    with pytest.raises(TurnedAway):
        admission.admit("10.0.0.1", "10.0.0.1")
    admission.release("10.0.0.1")
    assert table.connections("10.0.0.1") == 0
