"""What can happen to a call of the client library, as exceptions that say
what became of the increment (in the manner of redis-py's error classes).

- ``Unavailable``: nothing was sent; the counter did not move because of this
  call. Safe to retry.
- ``Refused``: the increment cannot fit (it would take the counter past
  2^64 - 1), proven from values the client saw; the counter did not move.
  Retrying gives the same.
- ``Indeterminate``: the frame went out, no reply came back, and nothing
  proves it was not applied: it may or may not have been. Never retried by
  the library.
"""

from __future__ import annotations

from collections.abc import Sequence


class CounterError(Exception):
    """Base class of every error the client library raises for a call."""

    def __init__(
        self, message: str, *, replies: Sequence[int] = (), value: int | None = None
    ) -> None:
        super().__init__(message)
        self.replies: tuple[int, ...] = tuple(replies)
        """Replies received before the error (``increment_many``), in order."""
        self.value = value
        """A value the counter had: at least this (``Refused``), or read
        right after the error (``Indeterminate``); None where not known."""


class Unavailable(CounterError):
    """Nothing was sent: the server could not be reached (refused, timed out,
    TLS failed) or the client is closed. The counter did not move."""


class Refused(CounterError):
    """The increment cannot fit (it would pass 2^64 - 1), proven: refused
    without sending, or by the server. The counter did not move; ``value``
    is a value it had (at least)."""


class Indeterminate(CounterError):
    """The frame was sent, no reply came (connection reset or closed, a
    timeout, the server stopping) and nothing proves it was not applied: it
    may or may not have been. Read the counter, or make the operation
    idempotent, to find out."""
