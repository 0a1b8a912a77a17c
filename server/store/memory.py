"""The counter in this process's memory, as in the Go original."""

from __future__ import annotations

from collections.abc import Sequence

from counter_server.protocol import MAX_COUNTER
from counter_server.server.store.base import PlainStore, advance


class MemoryCounterStore(PlainStore):
    """Atomic under gevent because ``apply`` never yields to another greenlet."""

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
