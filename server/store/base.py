"""The counter store interface, the arithmetic every store shares, and the
simplest store: this process's memory, as in the Go original.

The connection loop only knows ``CounterStore``, so durable, multi-process and
Redis-backed stores plug in without touching it.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, runtime_checkable

from counter_server.protocol import MAX_COUNTER

if TYPE_CHECKING:
    from counter_server.server.connection import Outbox


class Figure(NamedTuple):
    """One of a store's own figures for the metrics endpoint."""

    name: str
    help: str
    value: float
    kind: Literal["counter", "gauge"] = "counter"


class CounterStore(Protocol):
    """The one shared counter.

    ``apply`` adds a batch of increments in order, as one atomic step with
    respect to every other caller, and returns the counter value right after
    each increment. It stops before the first increment that would take the
    counter past ``MAX_COUNTER``: a result shorter than the batch means the
    next increment was refused for overflow and nothing after it was applied.
    It raises ``StoreUnavailable`` when it cannot confirm the increments.
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

    def health(self) -> str | None:
        """None while the store can acknowledge increments, else why not."""
        ...

    def figures(self) -> list[Figure]:
        """The store's own figures for the metrics endpoint (empty when none)."""
        ...

    def close(self) -> bool:
        """Release resources; called once at shutdown after the last apply.
        False if the final value could not be saved."""
        ...


@runtime_checkable
class DeferringStore(Protocol):
    """A ``CounterStore`` that can also answer a read later, from its own
    greenlet: ``submit`` queues the increments and returns at once; the store
    then calls ``outbox.deliver(increments, replies, value)`` (replies as
    ``apply`` would return them; ``value`` is the counter then) or
    ``outbox.fail(StoreUnavailable(...))``, exactly once. The connection loop
    uses it for plain sockets (server.connection.Outbox); ``apply`` stays for the rest."""

    def submit(self, increments: Sequence[int], outbox: Outbox) -> None: ...


class PlainStore:
    """Defaults for a store with nothing to report and nothing to save:
    always healthy, no figures of its own, closing loses nothing."""

    def health(self) -> str | None:
        return None

    def figures(self) -> list[Figure]:
        return []

    def close(self) -> bool:
        return True


class LayeredStore:
    """A store that adds a feature on top of a ``core`` store: everything it
    does not override passes through to the core."""

    def __init__(self, core: CounterStore) -> None:
        self._core = core

    @property
    def value(self) -> int:
        return self._core.value

    @property
    def requests_applied(self) -> int:
        return self._core.requests_applied

    def apply(self, increments: Sequence[int]) -> Sequence[int]:
        return self._core.apply(increments)

    def health(self) -> str | None:
        return self._core.health()

    def figures(self) -> list[Figure]:
        return self._core.figures()

    def close(self) -> bool:
        return self._core.close()


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
