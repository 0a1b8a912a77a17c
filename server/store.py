"""Counter stores: where the shared counter lives.

The connection loop only knows the ``CounterStore`` interface, so durable,
multi-process and Redis-backed stores plug in without touching it.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Protocol

from protocol import MAX_COUNTER


class CounterStore(Protocol):
    """The one shared counter.

    ``apply`` adds a batch of increments in order, as one atomic step with
    respect to every other caller, and returns the counter value right after
    each increment. It stops before the first increment that would take the
    counter past ``MAX_COUNTER``: a result shorter than the batch means the
    next increment was refused for overflow and nothing after it was applied.
    """

    def apply(self, increments: Sequence[int]) -> Sequence[int]: ...

    @property
    def value(self) -> int:
        """The current counter value."""
        ...

    @property
    def requests_applied(self) -> int:
        """Frames applied since start, zero-increment reads included."""
        ...

    def figures(self) -> list[tuple[str, str, float]]:
        """The store's own counters for the metrics endpoint, as
        (name, help, value) triples; empty when it has none."""
        ...

    def close(self) -> None:
        """Release resources; called once at shutdown after the last apply."""
        ...


class StoreUnavailable(OSError):
    """The store cannot confirm these increments; no reply may be sent."""


def advance(value: int, increments: Sequence[int], limit: int = MAX_COUNTER) -> list[int]:
    """The counter values after each increment, starting from ``value``, for
    the longest prefix of ``increments`` that stays within ``limit``."""
    if len(increments) == 1:  # ping-pong: skip the list machinery
        after = value + increments[0]
        return [after] if after <= limit else []
    count, first = len(increments), increments[0] if increments else 0
    if count and first and increments.count(first) == count:
        # A pipelined run of one increment (the usual case): C-level range.
        last = value + first * count
        if last <= limit:
            return list(range(value + first, last + 1, first))
    replies = list(accumulate(increments, initial=value))
    del replies[0]
    if replies and replies[-1] > limit:
        # Increments are never negative, so the values rise monotonically:
        # keep the prefix that fits.
        fits = next(i for i, after in enumerate(replies) if after > limit)
        del replies[fits:]
    return replies


class MemoryCounterStore:
    """The counter in this process's memory, as in the Go original.

    Atomic under gevent because ``apply`` never yields to another greenlet.
    """

    def __init__(self, initial: int = 0) -> None:
        if not 0 <= initial <= MAX_COUNTER:
            raise ValueError(f"initial value {initial} is outside 0..2^64-1")
        self._value = initial
        self._applied = 0

    @property
    def value(self) -> int:
        return self._value

    @property
    def requests_applied(self) -> int:
        return self._applied

    def apply(self, increments: Sequence[int]) -> Sequence[int]:
        replies = advance(self._value, increments)
        if replies:
            self._value = replies[-1]
            self._applied += len(replies)
        return replies

    def figures(self) -> list[tuple[str, str, float]]:
        return []

    def close(self) -> None:
        pass
