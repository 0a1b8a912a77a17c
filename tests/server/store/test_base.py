"""server.store.base: the in-memory counter store."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from counter_server.protocol import MAX_COUNTER
from counter_server.server.store import MemoryCounterStore


def test_apply_returns_the_value_after_each_increment():
    store = MemoryCounterStore()
    assert store.apply([1, 2, 0, 5]) == [1, 3, 3, 8]
    assert store.value == 8
    assert store.requests_applied == 4


def test_empty_batch():
    store = MemoryCounterStore(10)
    assert store.apply([]) == []
    assert store.value == 10 and store.requests_applied == 0


def test_overflow_applies_the_prefix_that_fits():
    store = MemoryCounterStore(MAX_COUNTER - 3)
    assert store.apply([1, 2, 1, 0]) == [MAX_COUNTER - 2, MAX_COUNTER]
    assert store.value == MAX_COUNTER
    assert store.requests_applied == 2


def test_overflow_at_the_first_increment_changes_nothing():
    store = MemoryCounterStore(MAX_COUNTER)
    assert store.apply([1]) == []
    assert store.value == MAX_COUNTER and store.requests_applied == 0
    assert store.apply([0]) == [MAX_COUNTER]


@pytest.mark.parametrize("bad", [-1, MAX_COUNTER + 1])
def test_initial_value_is_checked(bad):
    with pytest.raises(ValueError):
        MemoryCounterStore(bad)


@given(st.lists(st.lists(st.integers(0, 2**62), max_size=8), max_size=8))
def test_batches_match_a_running_sum_that_never_wraps(batches):
    store = MemoryCounterStore()
    total = 0
    for batch in batches:
        replies = store.apply(batch)
        expected = []
        for n in batch:
            if total + n > MAX_COUNTER:
                break
            total += n
            expected.append(total)
        assert replies == expected
        assert store.value == total
