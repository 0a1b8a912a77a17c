"""The counter shared by --processes workers: exact across processes, and its
lock given back when a worker dies holding it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from counter_server.server.store.shared import HOLDER, SharedCounter


@pytest.fixture
def shared():
    return SharedCounter(10)


def in_child(body) -> int:
    """Fork, run ``body`` in the child, exit it without cleanup; the child's pid."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


def reap(pid: int) -> None:
    os.waitpid(pid, 0)


def test_workers_in_several_processes_get_distinct_exact_replies(shared):
    reader, writer = os.pipe()

    def work() -> None:
        store = shared.open_store()
        replies = [store.apply([1, 1])[-1] for _ in range(500)]
        os.write(writer, b"%d\n" % len(set(replies)))

    children = [in_child(work) for _ in range(3)]
    for pid in children:
        reap(pid)
    os.close(writer)
    assert os.read(reader, 100).split() == [b"500"] * 3
    os.close(reader)
    assert shared.value == 10 + 3 * 500 * 2
    assert shared.requests_applied == 3 * 500 * 2


def test_the_lock_of_a_worker_killed_while_holding_it_is_given_back(shared, caplog):
    def take_and_die() -> None:
        store = shared.open_store()
        store.apply([5])
        shared.lock.acquire()  # as apply does, then killed in the middle
        shared.cells[HOLDER] = os.getpid()
        os.kill(os.getpid(), signal.SIGKILL)

    pid = in_child(take_and_die)
    reap(pid)
    assert not shared.lock.acquire(False), "the dead worker should still hold the lock"
    assert shared.release_if_held_by(pid)
    assert shared.open_store().apply([1]) == [16]
    assert f"worker {pid} died holding the counter's lock; the lock was given back" in caplog.text


def test_a_lock_taken_just_before_dying_without_a_holder_is_given_back(shared, caplog):
    def take_and_die() -> None:
        shared.lock.acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    pid = in_child(take_and_die)
    reap(pid)
    started = time.monotonic()
    assert shared.release_if_held_by(pid)
    assert time.monotonic() - started < 5
    assert shared.open_store().apply([0]) == [10]
    assert f"worker {pid} died holding the counter's lock" in caplog.text


def test_the_lock_of_a_live_worker_is_left_alone(shared, caplog):
    def die_quietly() -> None:
        pass

    pid = in_child(die_quietly)
    reap(pid)
    assert not shared.release_if_held_by(pid)  # free: nothing to give back
    assert "died holding" not in caplog.text
    shared.lock.acquire()  # a live worker (this process) holds it
    shared.cells[HOLDER] = os.getpid()
    try:
        assert not shared.release_if_held_by(pid)
        assert not shared.lock.acquire(False)
    finally:
        shared.cells[HOLDER] = 0
        shared.lock.release()


def test_reads_without_the_lock_never_see_a_torn_value(shared):
    # Two processes apply as fast as they can while this one reads, as the
    # state file's commits and the metrics do: every read is a value the
    # counter really held, so the values read never go down (struct's
    # pack_into zeroed the bytes first: thousands of reads of 0 in a second).
    def work() -> None:
        store = shared.open_store()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            store.apply([1])

    children = [in_child(work) for _ in range(2)]
    try:
        previous, reads, went_down = shared.value, 0, []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            for _ in range(1000):
                value = shared.value
                if value < previous:
                    went_down.append((previous, value))
                previous = value
            reads += 1000
    finally:
        for pid in children:
            reap(pid)
    assert shared.value > 10 + 1000, "the workers did not apply enough to prove anything"
    assert not went_down, f"{len(went_down)} of {reads} reads went down: {went_down[:3]}"
