"""Replies computed away from their connection, written without waking it.

A store whose answers come from elsewhere (Redis: one round trip for many
connections' reads) takes a read with ``submit(increments, outbox)`` and
later calls ``deliver`` or ``fail`` on the connection's ``Outbox`` from its
own greenlet. ``deliver`` writes the replies straight to the socket when the
socket takes them at once (the usual case), so the connection's greenlet,
already back in its ``recv``, is not woken just to write them: in
ping-pong that halves the greenlet switches per request. A connection has
at most one read in the store at a time, so replies stay in request order.

What cannot be done on the spot is handed back: the rest of a write the
socket would not take is written by a greenlet of its own (watched like the
connection's writes, so the write timeout applies), and an ending (a refused
frame, the store unavailable) interrupts the connection's ``recv``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import gevent
from gevent.hub import Waiter

from counter_server.common.sockets import Reader
from counter_server.protocol import encode_replies, overflow
from counter_server.server.errors import ConnectionEnded, FrameRefused
from counter_server.server.stats import ServerStats
from counter_server.server.timeouts import Watched


class Outbox:
    """One connection's replies owed by a deferring store."""

    __slots__ = ("_reader", "_stats", "_waiter", "_watched", "ending", "owed")

    def __init__(self, watched: Watched, reader: Reader, stats: ServerStats) -> None:
        self._watched = watched
        self._reader = reader
        self._stats = stats
        self._waiter: Waiter | None = None  # the connection, waiting in settle()
        self.owed = False  # a read is in the store or its replies are being written
        # Set once, by the store's side (a refused frame, the store's
        # failure): the connection ends with it.
        self.ending: ConnectionEnded | None = None

    # --- the connection's side ---

    def submit(self, store, increments: Sequence[int]) -> None:
        """Hand a read to the store; first waits for the previous one's
        replies (a pipelining client's reads take turns). Nothing is handed
        over once the connection is ending (a frame before was refused)."""
        self.settle()
        if self.ending is None:
            self.owed = True
            store.submit(increments, self)

    def settle(self) -> None:
        """Wait until no reply is owed; then raise the store side's ending, if any."""
        while self.owed:
            waiter = self._waiter = Waiter()
            try:
                waiter.get()
            finally:
                self._waiter = None
        if self.ending is not None:
            raise self.ending

    # --- the store's side ---

    def deliver(self, increments: Sequence[int], replies: Sequence[int], value: int) -> None:
        """The replies of a submitted read (fewer than its increments if the
        next one was refused for overflow; ``value`` is the counter then)."""
        applied = len(replies)
        if applied < len(increments):
            self.ending = FrameRefused(overflow(increments[applied], value))
        if applied:
            self._stats.replies_per_write[applied.bit_length()] += 1
            data = encode_replies(replies)
            try:
                sent = self._watched.try_write(data)
            except OSError:  # the connection is gone; it ends on its own
                sent = len(data)
            if sent < len(data):
                gevent.spawn(self._write_rest, data, sent)
                return
        self._settled()

    def fail(self, error: ConnectionEnded) -> None:
        """The store could not confirm the submitted read: no reply is sent."""
        self.ending = error
        self._settled()

    def _write_rest(self, data: bytes, sent: int) -> None:
        # OSError: the reaper or the client ended it; the connection finds out reading.
        with contextlib.suppress(OSError):
            self._watched.write(memoryview(data)[sent:])
        self._settled()

    def _settled(self) -> None:
        self.owed = False
        waiter = self._waiter
        if waiter is not None:
            waiter.hub.loop.run_callback(waiter.switch, None)
        elif self.ending is not None:
            self._reader.interrupt()
