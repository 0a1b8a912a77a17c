"""Idle, frame and write timeouts, enforced by one reaper greenlet.

Per-read socket timeouts would make gevent arm and cancel a timer around
every wait, which costs more than the rest of a ping-pong request. Instead
the hot path only bumps two per-connection byte counters and a flag; the
reaper looks at every connection a few times per timeout period and shuts
down the sockets of those that broke a limit. The connection loop then wakes
(end of stream, or a failed send), sees ``verdict`` and ends with the
reason. Precision is a quarter of the shortest timeout (or one second).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
from counter_server.common.sockets import raw_send, shut_down
from counter_server.protocol import FrameDecoder
from counter_server.server.close import ClientTimeout, CloseReason, ConnectionEnded, Evicted
from counter_server.server.ratelimit import TokenBucket

# The reaper looks at every connection this often: at least four times per
# shortest timeout, and at most half a second apart (eviction needs to know
# which connections are idle even when no timeout is set).
MIN_INTERVAL, MAX_INTERVAL = 0.05, 0.5
# The reaper's clock counts whole nanoseconds, so a limit passes exactly when
# it is reached: with float seconds, (t + 5) - (t + 2) can come out an ulp
# short of 3, depending on t.
NS_PER_SECOND = 1_000_000_000


@dataclass(frozen=True)
class Timeouts:
    """Seconds; None means no limit.

    idle: no bytes at all for this long. frame: a frame whose first byte has
    arrived must be complete within this long (slowloris); the TLS handshake
    too. write: sending replies may stay blocked (the client is not reading)
    for at most this long. evict_idle: while the pool is full and connections
    wait to be accepted, connections idle this long give up their slot.
    """

    idle: float | None = 300.0
    frame: float | None = 10.0
    write: float | None = 30.0
    evict_idle: float | None = 1.0

    @property
    def check_interval(self) -> float:
        limits = [t for t in (self.idle, self.frame, self.write) if t is not None]
        if not limits:
            return MAX_INTERVAL
        return min(MAX_INTERVAL, max(MIN_INTERVAL, min(limits) / 4))


DEFAULT_TIMEOUTS = Timeouts()


class Watched:
    """One connection as the reaper sees it.

    The hot path bumps ``bytes_in``; its two blocking steps other than the
    read go through ``write`` and ``wait_for_tokens``, which raise the
    ``writing`` and ``throttled`` flags around the wait, so the reaper always
    knows whether the server or the client is the one holding things up.
    """

    __slots__ = (
        "_frame_since",
        "_frame_start",
        "_idle_since",
        "_raw_send",
        "_seen_in",
        "_seen_out",
        "_write_since",
        "bytes_in",
        "bytes_out",
        "decoder",
        "sock",
        "throttled",
        "verdict",
        "writing",
    )

    def __init__(self, sock: socket.socket, decoder: FrameDecoder, now: int) -> None:
        self.sock = sock
        self._raw_send = raw_send(sock)
        self.decoder = decoder
        self.bytes_in = 0
        self.bytes_out = 0
        self.writing = False
        self.throttled = False
        self.verdict: ConnectionEnded | None = None  # set by the reaper: how it ends
        self._seen_in = 0
        self._idle_since = now
        self._frame_start = -1
        self._frame_since = now
        self._seen_out = -1
        self._write_since = now

    def try_write(self, data: bytes) -> int:
        """Send what the socket takes at once, never blocking (for a store's
        side writing replies, server.outbox); the bytes taken (0 on a TLS
        socket, which has no such send)."""
        if self._raw_send is None:
            return 0
        try:
            sent = self._raw_send(data)
        except BlockingIOError:
            return 0  # the socket buffer is full
        self.bytes_out += sent
        return sent

    def write(self, data: bytes) -> None:
        """Send all of ``data``; blocks while the client is not reading."""
        self.writing = True
        sock = self.sock
        sent = sock.send(data)
        if sent != len(data):  # rare: the socket buffer is full
            sock.sendall(memoryview(data)[sent:])
        self.writing = False
        self.bytes_out += len(data)

    def wait_for_tokens(self, bucket: TokenBucket) -> int:
        """Bytes the connection may read now, after waiting for rate tokens."""
        self.throttled = True
        budget = bucket.read_budget(self.decoder.pending_bytes)
        self.throttled = False
        return budget


def nanoseconds(seconds: float | None) -> int | None:
    """A limit in seconds on the reaper's clock (None stays None: no limit)."""
    return None if seconds is None else round(seconds * NS_PER_SECOND)


class TimeoutReaper:
    """Checks every registered connection against ``timeouts`` each interval.

    ``clock`` gives the time in integer nanoseconds (tests inject their own)."""

    def __init__(self, timeouts: Timeouts, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.timeouts = timeouts
        self.watched: set[Watched] = set()
        self._clock = clock
        limits = (timeouts.idle, timeouts.frame, timeouts.write)
        self._limits = tuple(nanoseconds(limit) for limit in limits)
        self._greenlet: gevent.Greenlet | None = None

    def watch(self, sock: socket.socket, decoder: FrameDecoder) -> Watched:
        watched = Watched(sock, decoder, self._clock())
        self.watched.add(watched)
        return watched

    def forget(self, watched: Watched) -> None:
        self.watched.discard(watched)

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()

    def _run(self) -> None:
        interval = self.timeouts.check_interval
        while True:
            gevent.sleep(interval)
            self.check()

    def check(self) -> None:
        """One pass: time out, and shut down, every connection over a limit."""
        now = self._clock()
        for watched in list(self.watched):
            if watched.verdict is None:
                broken = self._broken_limit(watched, now)
                if broken is not None:
                    watched.verdict = broken
                    shut_down(watched.sock, socket.SHUT_RDWR)

    def evict_idle(self, idle_for: float, count: int) -> int:
        """Close up to ``count`` connections that have been idle for at least
        ``idle_for`` seconds (no byte in, no partial frame, nothing being sent
        or throttled), longest idle first; returns how many. Only the read
        side is shut: a reply still being produced goes out before the close."""
        now, idle_ns = self._clock(), nanoseconds(idle_for)
        idle = [
            w
            for w in self.watched
            if w.verdict is None
            and not w.writing
            and not w.throttled
            and not w.decoder.pending_bytes
            and w.bytes_in == w._seen_in
            and now - w._idle_since >= idle_ns
        ]
        idle.sort(key=lambda w: w._idle_since)
        for w in idle[:count]:
            w.verdict = Evicted(idle_for)
            shut_down(w.sock, socket.SHUT_RD)
        return min(count, len(idle))

    def _broken_limit(self, w: Watched, now: int) -> ClientTimeout | None:
        idle, frame, write = self._limits
        if not w.writing or w.bytes_out != w._seen_out:
            w._seen_out, w._write_since = w.bytes_out, now
        elif write is not None and now - w._write_since >= write:
            return ClientTimeout(CloseReason.WRITE_TIMEOUT, self.timeouts.write)
        if w.bytes_in != w._seen_in or w.writing or w.throttled:
            w._seen_in, w._idle_since = w.bytes_in, now
        elif idle is not None and now - w._idle_since >= idle:
            return ClientTimeout(CloseReason.IDLE_TIMEOUT, self.timeouts.idle)
        pending = w.decoder.pending_bytes
        if not pending:
            w._frame_start = -1
        elif w.bytes_in - pending != w._frame_start or w.writing or w.throttled:
            # A new partial frame, or the server itself is not reading (busy
            # writing or throttling): the frame clock (re)starts.
            w._frame_start, w._frame_since = w.bytes_in - pending, now
        elif frame is not None and now - w._frame_since >= frame:
            return ClientTimeout(CloseReason.FRAME_TIMEOUT, self.timeouts.frame)
        return None
