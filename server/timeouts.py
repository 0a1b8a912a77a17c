"""Idle, frame and write timeouts, enforced by one reaper greenlet.

Per-read socket timeouts would make gevent arm and cancel a timer around
every wait, which costs more than the rest of a ping-pong request. Instead
the hot path only bumps two per-connection byte counters and a flag; the
reaper looks at every connection a few times per timeout period and shuts
down the sockets of those that broke a limit. The connection loop then wakes
(end of stream, or a failed send), sees ``verdict`` and ends with the
reason. Precision is a quarter of the shortest timeout (or one second).

A connection is watched from its accept (its TLS handshake included) to its
close. Under pool pressure the connections that hold a slot without using
it give way: idle ones, ones whose TLS handshake or current frame has been
under way for as long (a trickle), longest first. A connection waiting for
rate tokens is not reading, so the reaper looks whether its peer has left.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gevent
from gevent.event import Event
from gevent.monkey import get_original

from counter_server.common.sockets import raw_send, shut_down
from counter_server.protocol import FRAME_SIZE, FrameDecoder
from counter_server.server.errors import (
    ClientTimeout,
    CloseReason,
    ConnectionEnded,
    Evicted,
    PeerClosed,
    Stopped,
)
from counter_server.server.limits import Bucket

# The reaper looks at every connection this often: at least four times per
# shortest timeout, and at most half a second apart (eviction needs to know
# which connections are idle even when no timeout is set).
MIN_INTERVAL, MAX_INTERVAL = 0.05, 0.5
# The reaper's clock counts whole nanoseconds, so a limit passes exactly when
# it is reached: with float seconds, (t + 5) - (t + 2) can come out an ulp
# short of 3, depending on t.
NS_PER_SECOND = 1_000_000_000
# The kernel's own poll (gevent's patched one has no POLLRDHUP): asked with
# no timeout whether peers of throttled connections have shut their side.
_poll = get_original("select", "poll")
# The peer sent its FIN (or reset): even with unread bytes pending (Linux).
PEER_GONE = getattr(select, "POLLRDHUP", 0x2000) | select.POLLHUP | select.POLLERR


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


class Watched:
    """One connection as the reaper sees it.

    The hot path bumps ``bytes_in``; its blocking steps other than the
    read go through ``write``, ``paid`` and ``read_size``, which raise the
    ``writing`` and ``throttled`` flags around the wait, so the
    reaper always knows whether the server or the client is the one holding
    things up. ``handshaking`` is set while the TLS handshake runs.
    """

    __slots__ = (
        "_frame_since",
        "_frame_start",
        "_idle_since",
        "_raw_send",
        "_resume",
        "_seen_in",
        "_seen_out",
        "_write_since",
        "bytes_in",
        "bytes_out",
        "decoder",
        "handshaking",
        "sock",
        "stopped",
        "throttled",
        "verdict",
        "writing",
    )

    def __init__(self, sock: socket.socket, now: int) -> None:
        self.sock = sock
        self._raw_send = raw_send(sock)
        self.decoder = FrameDecoder()
        self.bytes_in = 0
        self.bytes_out = 0
        self.writing = False
        self.throttled = False
        self.handshaking = False
        self.stopped = False  # shutdown began: no more waiting for tokens
        self._resume: Event | None = None  # while throttled: set to end the wait early
        self.verdict: ConnectionEnded | None = None  # set by the reaper: how it ends
        self._seen_in = 0
        self._idle_since = now
        self._frame_start = -1
        self._frame_since = now
        self._seen_out = -1
        self._write_since = now

    def try_write(self, data: bytes) -> int:
        """Send what the socket takes at once, never blocking (for a store's
        side writing replies, server.connection.Outbox); the bytes taken (0 on a TLS
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

    def wrapped(self, sock: socket.socket) -> None:
        """The TLS socket took over the descriptor: watch it from now on."""
        self.sock = sock
        self._raw_send = raw_send(sock)

    def paid(
        self, bucket: Bucket, increments: list[int]
    ) -> tuple[list[int], list[int] | None, float]:
        """Split ``increments`` into the frames whose rate tokens are taken now
        (at least one: waits while the client has none, its other
        connections having taken them) and the rest; and the tokens left."""
        taken, tokens = bucket.take(len(increments))
        while not taken:
            self._wait_for_tokens(bucket, tokens)
            taken, tokens = bucket.take(len(increments))
        if taken == len(increments):
            return increments, None, tokens
        return increments[:taken], increments[taken:], tokens

    def read_size(self, bucket: Bucket, tokens: float, most: int) -> tuple[int, float]:
        """Bytes to read next (at most ``most``): as many whole frames as the
        client has ``tokens`` for, after waiting for one if it has none; and
        the tokens it has then."""
        while tokens < 1:
            self._wait_for_tokens(bucket, tokens)
            _, tokens = bucket.take(0)
        return min(most, int(tokens) * FRAME_SIZE) - self.decoder.pending_bytes, tokens

    def _wait_for_tokens(self, bucket: Bucket, tokens: float) -> None:
        """Wait until one whole token is there, unless ``end`` cuts it short
        (raising the ending then) or shutdown has begun (raising Stopped)."""
        if self.stopped:
            raise Stopped()
        self.throttled = True
        self._resume = resume = Event()
        started = time.monotonic()
        try:
            resume.wait((1 - tokens) / bucket.rate)
        finally:
            self.throttled = False
            self._resume = None
            bucket.waited(time.monotonic() - started)
        if self.verdict is not None:
            raise self.verdict

    def end(self, verdict: ConnectionEnded, how: int = socket.SHUT_RDWR) -> None:
        """End the connection with ``verdict``: shut the socket (``how``), which
        wakes a read or a write, and cut short a wait for tokens."""
        if self.verdict is None:
            self.verdict = verdict
        shut_down(self.sock, how)
        if self._resume is not None:
            self._resume.set()


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
        self._reading = True  # until shutdown: stop_reading

    def watch(self, sock: socket.socket) -> Watched:
        """Watch a connection from its accept on; ``forget`` it at its close.
        After ``stop_reading`` it is born stopped: it reads no frame."""
        watched = Watched(sock, self._clock())
        watched.stopped = not self._reading
        self.watched.add(watched)
        return watched

    @contextlib.contextmanager
    def handshake(self, watched: Watched) -> Iterator[None]:
        """Around the TLS handshake: the connection is evictable while it
        lasts, and its idle clock starts when it is done."""
        watched.handshaking = True
        try:
            yield
        finally:
            watched.handshaking = False
            watched._idle_since = watched._frame_since = self._clock()

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
        """One pass: time out, and shut down, every connection over a limit,
        and end those waiting for rate tokens whose peer has left."""
        now = self._clock()
        throttled = []
        for watched in list(self.watched):
            if watched.verdict is None:
                broken = self._broken_limit(watched, now)
                if broken is not None:
                    watched.end(broken)
                elif watched.throttled:
                    throttled.append(watched)
        if throttled:
            self._end_if_peer_left(throttled)

    @staticmethod
    def _end_if_peer_left(throttled: list[Watched]) -> None:
        poller = _poll()
        by_fd = {}
        for watched in throttled:
            fd = watched.sock.fileno()
            if fd >= 0:
                by_fd[fd] = watched
                poller.register(fd, PEER_GONE)
        for fd, _ in poller.poll(0):
            by_fd[fd].end(PeerClosed("while its frames waited for rate tokens"))

    def stop_reading(self) -> None:
        """Shutdown: stop reading on every connection (a read returns end of
        stream, replies owed still go out) and end waits for tokens."""
        self._reading = False
        for watched in list(self.watched):
            watched.stopped = True
            if watched.throttled or watched.handshaking:
                watched.end(Stopped(), socket.SHUT_RD)
            else:
                shut_down(watched.sock, socket.SHUT_RD)

    def evict_idle(self, idle_for: float, count: int) -> int:
        """Close up to ``count`` connections that hold their slot without
        using it, for at least ``idle_for`` seconds: idle (no byte in, no
        partial frame, nothing being sent or throttled), or with a TLS
        handshake or a frame under way that long (a trickle delivers less
        than a frame per ``idle_for``). Longest first; returns how many. Only
        the read side is shut: a reply still being produced goes out first."""
        now, limit = self._clock(), nanoseconds(idle_for)
        unused = []
        for w in self.watched:
            since = self._unused_since(w)
            if since is not None and now - since >= limit:
                unused.append((since, w))
        unused.sort(key=lambda pair: pair[0])
        for _, w in unused[:count]:
            w.end(Evicted(idle_for), socket.SHUT_RD)
        return min(count, len(unused))

    @staticmethod
    def _unused_since(w: Watched) -> int | None:
        """Since when ``w`` has held its slot without using it, or None."""
        if w.verdict is not None or w.writing or w.throttled:
            return None
        if w.handshaking:
            return w._idle_since  # since its accept: bytes_in counts frames only
        pending = w.decoder.pending_bytes
        if not pending:
            return w._idle_since if w.bytes_in == w._seen_in else None
        if w.bytes_in - pending == w._frame_start:  # the frame the reaper timed
            return w._frame_since
        return None

    def _broken_limit(self, w: Watched, now: int) -> ClientTimeout | None:
        idle, frame, write = self._limits
        if not w.writing or w.bytes_out != w._seen_out:
            w._seen_out, w._write_since = w.bytes_out, now
        elif write is not None and now - w._write_since >= write:
            return ClientTimeout(CloseReason.WRITE_TIMEOUT, self.timeouts.write)
        if w.handshaking:
            return None  # its own timeout (server.lifecycle) bounds it
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
