"""The group-commit logic of DurableCounterStore, driven in-process with a
state file whose commits we hold and release (no disk, no timing luck)."""

from __future__ import annotations

import threading

import gevent
import pytest

from counter_server.server.store import MemoryCounterStore, StoreUnavailable
from counter_server.server.store.statefile import DurableCounterStore


class HeldStateFile:
    """Commits block until ``release``d; the value is read late, as on disk."""

    path = "held.state"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.written: list[int] = []
        self.fail = False

    def commit(self, read_value, sync: bool) -> int:
        self.started.set()
        assert self.release.wait(10), "the test never released the commit"
        if self.fail:
            raise OSError(28, "No space left on device")
        value = read_value()
        self.written.append(value)
        return value

    def close(self) -> None:
        pass


def wait_until(condition, seconds: float = 5.0) -> None:
    with gevent.Timeout(seconds, AssertionError("condition never became true")):
        while not condition():
            gevent.sleep(0.01)


def test_waiters_covered_by_a_late_read_are_released():
    state = HeldStateFile()
    store = DurableCounterStore(state, MemoryCounterStore(), "always")
    first = gevent.spawn(store.apply, [1])
    wait_until(state.started.is_set)  # a commit covering 1 is in flight
    second = gevent.spawn(store.apply, [1])  # 2: needs the next commit
    gevent.sleep(0.05)
    state.release.set()  # the in-flight commit reads 2 and writes it
    first.join(5)
    second.join(5)
    assert first.value == [1]
    assert second.value == [2], "a waiter already covered was never woken"
    assert state.written == [2]
    store.close()


def test_replies_wait_for_the_commit_and_fail_if_it_fails():
    state = HeldStateFile()
    store = DurableCounterStore(state, MemoryCounterStore(), "always")
    waiting = gevent.spawn(store.apply, [5])
    wait_until(state.started.is_set)
    gevent.sleep(0.05)
    assert not waiting.ready(), "a reply went out before its value was durable"
    state.fail = True
    state.release.set()
    waiting.join(5)
    assert isinstance(waiting.exception, StoreUnavailable)
    state.fail = False
    assert store.apply([0]) == [5]  # the next commit succeeds and covers it
    store.close()
    with pytest.raises(StoreUnavailable):
        store.apply([1])
