"""Pool saturation: notice when connections are waiting because every pool
slot is busy, count it, tell the operator (rate-limited), and let the server
free slots held by idle connections.

When the pool is full, gevent stops accepting, so waiting connections sit in
the kernel's listen queue. On Linux its length is read from the listening
socket's TCP_INFO (``tcpi_unacked`` holds the accept-queue length there).
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable

import gevent
from gevent.pool import Pool

from counter_server.common.ratelog import RateLimitedLog
from counter_server.server.stats import ServerStats

CHECK_INTERVAL = 0.5
# struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked.
_TCP_INFO_QUEUE = struct.Struct("=8x16xI")


def listen_queue_length(listener: socket.socket) -> int | None:
    """Connections waiting to be accepted on ``listener``, or None if unknown."""
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
        return _TCP_INFO_QUEUE.unpack_from(info)[0]
    except (AttributeError, OSError, struct.error):
        return None


class SaturationWatch:
    """A greenlet that checks the pool and listen queue every ``interval`` s."""

    def __init__(
        self,
        listener: socket.socket,
        pool: Pool,
        stats: ServerStats,
        events: RateLimitedLog,
        relieve: Callable[[int], int] = lambda waiting: 0,
        interval: float = CHECK_INTERVAL,
    ) -> None:
        """``relieve(waiting)`` is called while connections wait; it may free
        pool slots and returns how many it freed."""
        self._listener = listener
        self._pool = pool
        self._stats = stats
        self._events = events
        self._relieve = relieve
        self._interval = interval
        self._saturated = False
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()

    def check(self) -> None:
        """One look: update the waiting gauge, count and log a new saturation."""
        waiting = 0
        if self._pool.full():
            queued = listen_queue_length(self._listener)
            waiting = 1 if queued is None else queued  # unknown: assume someone waits
        self._stats.connections_waiting = waiting
        freed = self._relieve(waiting) if waiting else 0
        if freed:
            self._events.log(
                "evicted",
                logging.INFO,
                "connection pool full with %d waiting: closed %d idle connections",
                waiting,
                freed,
                extra={"waiting": waiting, "evicted": freed},
            )
        if waiting and not self._saturated:
            self._stats.pool_saturation_events += 1
            self._events.log(
                "saturation",
                logging.WARNING,
                "connection pool full (%d of %d in use); %d connections waiting to be "
                "accepted (raise --multiplier if this persists)",
                len(self._pool),
                self._pool.size,
                waiting,
                extra={"in_use": len(self._pool), "pool_size": self._pool.size, "waiting": waiting},
            )
        self._saturated = bool(waiting)

    def _run(self) -> None:
        while True:
            self.check()
            gevent.sleep(self._interval)
