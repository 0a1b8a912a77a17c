"""What can happen to a call of the client library, as exceptions that say
what became of the increment (in the manner of redis-py's error classes).

- ``Unavailable``: nothing was sent; the counter did not move because of this
  call. Safe to retry.
- ``Refused``: the server refused the frame (an increment that would take the
  counter past 2^64 - 1); the counter did not move. Retrying gives the same.
- ``Indeterminate``: the frame went out and no reply came back: the increment
  may or may not have been applied. Never retried by the library.
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
        """The counter's value where known (``Refused``), else None."""


class Unavailable(CounterError):
    """Nothing was sent: the server could not be reached (refused, timed out,
    TLS failed) or the client is closed. The counter did not move."""


class Refused(CounterError):
    """The server refused the increment (it would pass 2^64 - 1): the counter
    did not move. ``value`` holds the counter read right after, where known."""


class Indeterminate(CounterError):
    """The frame was sent and no reply came (connection reset or closed, a
    timeout, the server stopping): the increment may or may not have been
    applied. Read the counter, or make the operation idempotent, to find out."""
